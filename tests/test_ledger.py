"""The landing zone's ledger on real files and real Ray tasks: content identity, copies, rewrites,
appends, files changed or deleted while pending, the suffix rule, a store inside the landing
zone, requeue, and a poll whose cost does not grow with the stream's history."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from lifelong.config import DataConfig
from lifelong.continual.ledger import Ledger
from lifelong.continual.stream import window_rows
from lifelong.data import validation_fingerprint
from lifelong.storage import Storage
from lifelong.synth import write_stream

LABELS = ["finance", "science", "sports", "weather"]


def cfg(**kw) -> DataConfig:
    return DataConfig(path="unused", label_column="label", labels=kw.pop("labels", LABELS), validation_fraction=0.2, **kw)


def lines(n: int, start: int = 0, label: str = "weather") -> str:
    return "".join(json.dumps({"text": f"rain and wind number {i}", "label": label}) + "\n" for i in range(start, start + n))


@pytest.fixture
def zone(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    return landing, Ledger(Storage(str(tmp_path / "store")), "topics")


def test_copies_rewrites_and_rescans(ray_session, tmp_path, zone):
    landing, ledger = zone
    windows = write_stream(tmp_path / "stream", windows=2, rows_per_window=20)
    shutil.copytree(windows[0], landing / "w0")

    first = ledger.scan(str(landing), cfg())
    assert len(first.new) == 2 and not first.copies and not first.rewritten
    assert {r.state for r in ledger.records()} == {"pending"}
    assert all(ledger.storage.exists(r.object) for r in first.new)  # the landed bytes, in the store

    again = ledger.scan(str(landing), cfg())  # nothing changed: nothing new, nothing read
    assert not again.new and again.unchanged == 2

    # The same bytes under another name: recorded as a copy, not as new data.
    original = sorted((landing / "w0").iterdir())[0]
    shutil.copy(original, landing / "w0" / f"copy-of-{original.name}")
    dup = ledger.scan(str(landing), cfg())
    assert not dup.new and dup.copies == [(str(landing / "w0" / f"copy-of-{original.name}"), str(original))]
    assert len(ledger.records()) == 2
    assert ledger.scan(str(landing), cfg()).unchanged == 3  # and the copy is not hashed again next poll

    # A consumed path rewritten with other content: new data, flagged as a rewrite of the old hash.
    old_hash = next(r.sha256 for r in ledger.records() if r.path == str(original))
    ledger.consume([old_hash], "topics-clf:1")
    original.write_text('{"text": "rain storm tonight", "label": "weather"}\n')
    rewrite = ledger.scan(str(landing), cfg())
    assert len(rewrite.new) == 1 and rewrite.rewritten[0].rewrites == old_hash
    assert rewrite.rewritten[0].path == str(original) and rewrite.rewritten[0].state == "pending"
    assert any("rewritten with new content" in line for line in rewrite.lines())
    assert ledger.record(old_hash).state == "consumed"  # the old content stays on record


def test_content_changed_while_pending_is_superseded_and_trains_once(ray_session, zone):
    """Appended to, then rewritten, while pending: only the bytes there now are data, once."""
    landing, ledger = zone
    f = landing / "log.jsonl"
    f.write_text(lines(30))
    first = ledger.scan(str(landing), cfg()).new[0]
    with open(f, "a") as out:
        out.write(lines(10, 30))
    appended = ledger.scan(str(landing), cfg())
    assert [r.sha256 for r in appended.superseded] == [first.sha256]
    assert ledger.record(first.sha256).state == "superseded"
    assert ledger.record(first.sha256).superseded_by == appended.new[0].sha256
    ledger.check_pending(cfg(), str(landing))
    [pending] = ledger.pending()
    assert pending.sha256 == appended.new[0].sha256 and pending.rows == 40

    # Changed again, and the landing copy changes once more after the scan: what trains is the
    # content the ledger recorded (its stored rows), not what the path holds when a cycle reads.
    f.write_text(lines(5, 100))
    recorded = ledger.scan(str(landing), cfg()).new[0]
    f.write_text(lines(7, 200))
    train, holdout = window_rows(ledger.storage, [ledger.rows_rel(recorded.sha256, validation_fingerprint(cfg()))], "text")
    assert sorted(train.column("text").to_pylist() + holdout.column("text").to_pylist()) == sorted(
        json.loads(line)["text"] for line in lines(5, 100).splitlines()
    )
    states = {r.sha256: r.state for r in ledger.records()}
    assert states[pending.sha256] == "superseded" and list(states.values()).count("pending") == 1


def test_rows_appended_to_a_consumed_file_are_trained_alone(ray_session, zone):
    landing, ledger = zone
    (landing / "log.jsonl").write_text(lines(30))
    (landing / "log.csv").write_text("text,label\n" + "".join(f"dry sunny day {i},weather\n" for i in range(20)))
    first = ledger.scan(str(landing), cfg()).new
    ledger.consume([r.sha256 for r in first], "m:1")
    with open(landing / "log.jsonl", "a") as out:
        out.write(lines(6, 30))
    with open(landing / "log.csv", "a") as out:
        out.write("".join(f"dry sunny day {i},weather\n" for i in range(20, 24)))
    report = ledger.scan(str(landing), cfg())
    assert {r.name: r.rows for r in report.appended} == {"log.jsonl": 6, "log.csv": 4}
    assert any("appended to consumed content" in line for line in report.lines())


def test_a_pending_file_that_vanished_before_its_content_was_kept_is_missing_and_the_rest_goes_on(ray_session, zone):
    """A record left by the previous version (path only, no stored copy) whose file was deleted:
    that stuck every later cycle with FileNotFoundError; now it is marked missing."""
    landing, ledger = zone
    (landing / "gone.jsonl").write_text(lines(12))
    (landing / "kept.jsonl").write_text(lines(12, 50))
    for r in ledger.scan(str(landing), cfg()).new:
        ledger.storage.delete(r.object)
        ledger._set(r.sha256, object=None, check=None)  # as the previous ledger wrote them
    (landing / "gone.jsonl").unlink()
    set_aside = ledger.check_pending(cfg(), str(landing))
    assert [(r.name, r.state) for r in set_aside] == [("gone.jsonl", "missing")]
    [kept] = ledger.pending()
    assert kept.path.endswith("kept.jsonl") and kept.rows == 12 and ledger.storage.exists(kept.object)


def test_one_suffix_rule_for_data_path_and_landing_and_the_store_inside_the_landing_zone(ray_session, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "a.ndjson").write_text(lines(3))
    (landing / "b.JSONL").write_text(lines(3, 10))
    (landing / "c.txt").write_text("notes")
    import pandas as pd

    pd.DataFrame({"text": ["sun", "cloud"], "label": ["weather", "weather"]}).to_parquet(landing / "d.pq")
    # The storage root inside the landing zone: its ledger JSON, parquet and copies are not data.
    storage = Storage(str(landing / "store"))
    ledger = Ledger(storage, "topics")
    first = ledger.scan(str(landing), cfg())
    assert sorted(r.name for r in first.new) == ["a.ndjson", "b.JSONL", "c.txt", "d.pq"]
    assert [r.name for r in first.quarantined] == ["c.txt"]
    assert "unknown file type '.txt'" in first.quarantined[0].reason
    second = ledger.scan(str(landing), cfg())
    assert not second.new and second.excluded > 0 and second.unchanged == 4


def test_a_config_mistake_quarantines_per_file_and_requeue_brings_them_back(ray_session, zone):
    landing, ledger = zone
    (landing / "a.jsonl").write_text(lines(10))
    (landing / "b.jsonl").write_text(lines(10, 20, label="sports"))
    wrong = cfg(labels=["rain", "snow"])  # labels renamed by mistake: no row is valid
    ledger.scan(str(landing), wrong)
    set_aside = ledger.check_pending(wrong, str(landing))
    assert sorted(r.state for r in set_aside) == ["quarantined", "quarantined"]
    assert all(r.reason == "no valid rows (unknown_label=10)" for r in set_aside)
    assert ledger.pending() == []
    back = ledger.requeue()  # all of them, after the config is fixed
    assert len(back) == 2 and {r.requeued_from["state"] for r in back} == {"quarantined"}
    ledger.check_pending(cfg(), str(landing))
    assert sorted(r.rows for r in ledger.pending()) == [10, 10]
    ledger.consume([r.sha256 for r in ledger.pending()], "m:1")
    ledger.consume([r.sha256 for r in ledger.records()], "m:2")  # a second mark changes nothing: consumed once
    assert {r.consumed_by for r in ledger.records()} == {"m:1"}
    with pytest.raises(Exception, match="only quarantined or missing files are requeued"):
        ledger.requeue([ledger.records()[0].sha256])


def test_a_poll_with_nothing_new_costs_the_same_after_ten_times_the_history(ray_session, zone, monkeypatch):
    landing, ledger = zone
    reads = []
    for name in ("read_bytes", "read_versioned"):
        real = getattr(Storage, name)
        monkeypatch.setattr(Storage, name, lambda self, rel, real=real: reads.append(rel) or real(self, rel))

    def history(n, start):
        for i in range(start, start + n):
            (landing / f"f{i:04d}.jsonl").write_text(lines(2, 1000 * i))
        ledger.scan(str(landing), cfg())
        ledger.consume([r.sha256 for r in ledger.pending()], "m:1")

    def poll() -> int:
        reads.clear()
        ledger.scan(str(landing), cfg())
        ledger.check_pending(cfg(), str(landing))
        ledger.pending()
        return len(reads)

    history(6, 0)
    small = poll()
    history(54, 6)
    assert poll() == small <= 3


def test_files_the_store_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        storage = Storage(str(tmp_path / "store"))
        storage.write_bytes("a/b.json", b"{}")
        assert storage.create_exclusive("a/c.json", b"{}")
        src = tmp_path / "w.bin"
        src.write_bytes(os.urandom(3 << 20))
        storage.write_file("a/w.bin", src)
        for name in ("b.json", "c.json", "w.bin"):
            assert (tmp_path / "store" / "a" / name).stat().st_mode & 0o777 == 0o644, name
        assert (tmp_path / "store" / "a" / "w.bin").read_bytes() == src.read_bytes()
    finally:
        os.umask(old)


def test_a_file_that_cannot_be_read_right_now_is_left_for_the_next_poll_not_quarantined(ray_session, zone):
    """A real I/O error (EIO: the file is a link to /proc/self/mem, whose first page is never
    mapped): retried, then left out of the ledger; once readable it is read like any file."""
    landing, ledger = zone
    (landing / "flaky.jsonl").symlink_to("/proc/self/mem")
    (landing / "fine.jsonl").write_text(lines(4))
    report = ledger.scan(str(landing), cfg())
    assert [r.name for r in report.new] == ["fine.jsonl"]
    assert [(p.rsplit("/", 1)[1], "could not be read" in why) for p, why in report.deferred] == [("flaky.jsonl", True)]
    assert any("flaky.jsonl: could not be read" in line and "read again next poll" in line for line in report.lines())
    assert len(ledger.records()) == 1
    (landing / "flaky.jsonl").unlink()
    (landing / "flaky.jsonl").write_text(lines(3, 40))
    again = ledger.scan(str(landing), cfg())
    assert [r.name for r in again.new] == ["flaky.jsonl"] and again.new[0].rows == 3


def test_a_cycle_takes_whole_files_oldest_first_up_to_its_row_cap(ray_session, zone):
    from lifelong.continual.cycle import pick_files

    landing, ledger = zone
    for i, n in enumerate((10, 10, 10, 40)):
        (landing / f"f{i}.jsonl").write_text(lines(n, 100 * i))
        ledger.scan(str(landing), cfg())  # one at a time: first seen in this order
    pending = ledger.pending()
    assert [r.name for r in pick_files(pending, 25)] == ["f0.jsonl", "f1.jsonl"]
    assert len(pick_files(pending, 1000)) == 4
    ledger.consume([r.sha256 for r in pending[:3]], "m:1")
    assert [r.rows for r in pick_files(ledger.pending(), 25)] == [40]  # a file above the cap goes alone


def test_a_scan_whose_tasks_find_no_free_cpu_says_so_while_it_waits_and_finishes_once_one_frees(ray_session, zone, monkeypatch, capsys):
    """Every free CPU of the cluster held for real (a placement group, as a run that outlived its
    driver leaves one): the scan's tasks cannot start. It says so, naming the free CPUs, instead
    of waiting in silence, and finishes once the CPUs are back."""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group

    import lifelong.runtime

    landing, ledger = zone
    (landing / "a.jsonl").write_text(lines(20))
    monkeypatch.setattr(lifelong.runtime, "WAIT_NOTICE_S", 1.0)
    holders = []  # quarter-CPU bundles (an ingest task's share) until one more finds no room
    while True:
        holder = placement_group([{"CPU": 0.25}])
        try:
            ray_session.get(holder.ready(), timeout=3)
        except ray_session.exceptions.GetTimeoutError:
            remove_placement_group(holder)
            break
        holders.append(holder)
    release = threading.Timer(4.0, lambda: [remove_placement_group(h) for h in holders])
    release.start()
    try:
        report = ledger.scan(str(landing), cfg())
    finally:
        release.join()
    assert [Path(r.path).name for r in report.new] == ["a.jsonl"] == [Path(r.path).name for r in ledger.pending()]
    out = capsys.readouterr().out
    said = re.search(r"1 of 1 task\(s\) not done after \d+ s; the cluster has ([\d.]+) of [\d.]+ CPUs free now", out)
    assert said and float(said.group(1)) < 0.25, out  # less than the task's share free
