"""The prediction log's writer and the feedback join, on a real store, without Ray."""

import io
import time
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from conftest import make_config
from lifelong.feedback import ANSWERS, FEEDBACK, Labels, RecordLog, join_feedback, live_accuracy, read_records, sampled
from lifelong.storage import Storage


def answer(rid: str, text: str, label: str, version: int = 1, role: str = "champion", index: int = 0) -> dict:
    return {
        "request_id": rid,
        "index": index,
        "time": datetime.now(timezone.utc),
        "version": version,
        "role": role,
        "input": text,
        "label": label,
        "probabilities": None,
        "latency_ms": 1.0,
        "replica": "r1",
    }


def label(rid: str, value: str, index: int = 0) -> dict:
    return {"request_id": rid, "index": index, "label": value, "time": datetime.now(timezone.utc), "replica": "r1"}


def wait_until(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_sampling_is_by_request_id_and_near_its_share():
    ids = [f"req-{i}" for i in range(4000)]
    share = sum(sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert [sampled(i, 0.1) for i in ids[:50]] == [sampled(i, 0.1) for i in ids[:50]]
    assert all(sampled(i, 1.0) for i in ids[:50])


def test_a_store_that_refuses_writes_costs_counted_records_and_the_log_recovers(tmp_path):
    root = tmp_path / "store"
    log = RecordLog(str(root), "m", "r1", flush_interval_s=0.1, max_buffered=20)
    try:
        assert log.add(ANSWERS, answer("a", "one", "x"))
        wait_until(lambda: log.stats()["written"] == 1)
        # The store goes away for real: the log's directory is replaced by a plain file.
        answers = root / "predictions" / "m" / "answers"
        answers.rename(tmp_path / "moved")
        answers.write_text("in the way")
        added = [log.add(ANSWERS, answer(f"b{i}", "two", "x")) for i in range(50)]
        wait_until(lambda: log.stats()["store_error"] is not None)
        stats = log.stats()
        assert added.count(True) == 20 and stats["dropped"] == 30 and stats["dropped_queue_full"] == 30
        assert "NotADirectoryError" in stats["store_error"] or "FileExistsError" in stats["store_error"], stats
        assert stats["queued"] == 20 and stats["written"] == 1
        answers.unlink()
        wait_until(lambda: log.stats()["written"] == 21)
        assert log.stats()["store_error"] is None and log.stats()["dropped"] == 30
        table = read_records(Storage(str(root)), "m", ANSWERS, 30)
        assert sorted(table.column("request_id").to_pylist()) == sorted(f"b{i}" for i in range(20))
    finally:
        log.close()


@pytest.fixture
def loop(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    config = make_config(
        "gpt2/tiny_continual.yaml",
        "name=fb",
        f"storage.root={tmp_path / 'store'}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        "serve.log_predictions.sample=1.0",
    )
    storage = Storage(config.storage.root)
    log = RecordLog(config.storage.root, "fb", "r1", flush_interval_s=60, max_buffered=1000)
    yield config, storage, log, landing
    log.close()


def test_labels_join_recorded_answers_once_with_corrections_and_live_accuracy(loop):
    config, storage, log, landing = loop
    labels = config.data.labels
    for i in range(6):
        log.add(ANSWERS, answer(f"r{i}", f"text {i}", labels[0], version=1))
    log.add(ANSWERS, answer("r0", "text 0", labels[1], version=2, role="shadow"))
    log.add(FEEDBACK, label("r0", labels[2]))  # corrected below
    log.add(FEEDBACK, label("r1", labels[0]))
    log.add(FEEDBACK, label("r2", labels[1]))
    log.add(FEEDBACK, label("unknown-request", labels[0]))
    log.flush()
    log.add(FEEDBACK, label("r0", labels[1]))  # a correction, before the join
    log.flush()

    first = join_feedback(config, storage, "fb")
    assert first.rows == 3 and first.unmatched == 1 and first.corrections == 1 and first.feedback == 4
    landed = sorted(landing.iterdir())
    assert [p.name for p in landed] == [first.file.rsplit("/", 1)[-1]]
    table = pq.read_table(landed[0]).to_pylist()
    assert [(r["request_id"], r["text"], r["label"], r["served_version"]) for r in table] == [
        ("r0", "text 0", labels[1], 1),
        ("r1", "text 1", labels[0], 1),
        ("r2", "text 2", labels[1], 1),
    ]
    # Nothing new: nothing lands. A late correction is counted, not landed again; a new label lands alone.
    assert join_feedback(config, storage, "fb").rows == 0
    log.add(FEEDBACK, label("r1", labels[3]))
    log.add(FEEDBACK, label("r3", labels[0]))
    log.flush()
    third = join_feedback(config, storage, "fb")
    assert third.rows == 1 and third.already == 3 and third.late_corrections == 1
    assert [r["request_id"] for r in pq.read_table(third.file).to_pylist()] == ["r3"]

    acc = live_accuracy(storage, "fb", 30, Labels.read(storage, "fb", 30))
    # r0: labels[1] (champion said labels[0]: wrong; the shadow said labels[1]: right), r1: now labels[3]
    # (wrong), r2: labels[1] (wrong), r3: labels[0] (right).
    assert acc[1]["champion"] == {"labelled": 4, "correct": 1, "accuracy": 0.25}
    assert acc[2]["shadow"] == {"labelled": 1, "correct": 1, "accuracy": 1.0}


def test_a_join_stopped_before_it_marked_its_rows_lands_the_same_bytes_again(loop):
    """A join that died after writing its outbox file (the state it leaves, made here with the
    same calls) lands exactly those bytes on the next join, and the rows only once."""
    from lifelong.feedback import _joined_file, _outbox, _rows

    config, storage, log, landing = loop
    labels = config.data.labels
    log.add(ANSWERS, answer("r0", "text 0", labels[0]))
    log.add(FEEDBACK, label("r0", labels[1]))
    log.flush()
    answers = read_records(storage, "fb", ANSWERS, 30)
    rows, _ = _rows(config, answers, {("r0", 0): labels[1]})
    name, data = _joined_file(config, rows)
    storage.write_bytes(f"{_outbox('fb')}/{name}", data)

    joined = join_feedback(config, storage, "fb")
    assert joined.recovered and joined.rows == 0 and joined.already == 1
    assert [p.name for p in landing.iterdir()] == [name] and (landing / name).read_bytes() == data
    assert storage.listdir(_outbox("fb")) == []
    assert pq.read_table(io.BytesIO(data)).column("label").to_pylist() == [labels[1]]


def test_days_past_the_retention_are_deleted_and_no_longer_read(tmp_path):
    from lifelong.feedback import day_of, prune

    storage = Storage(str(tmp_path / "store"))
    log = RecordLog(storage.root_uri, "m", "r1", flush_interval_s=60, max_buffered=100)
    log.add(ANSWERS, answer("today", "t", "x"))
    log.add(FEEDBACK, label("today", "x"))
    log.flush()
    log.close()
    old, kept = day_of(time.time() - 40 * 86400), day_of(time.time() - 20 * 86400)
    for kind in (ANSWERS, FEEDBACK):
        for day in (old, kept):
            (tmp_path / "store" / "predictions" / "m" / kind / day).mkdir(parents=True)
            for f in (tmp_path / "store" / "predictions" / "m" / kind / day_of(time.time())).iterdir():
                (tmp_path / "store" / "predictions" / "m" / kind / day / f.name).write_bytes(f.read_bytes())
    assert len(read_records(storage, "m", ANSWERS, 30)) == 2  # the 40-day-old copy is outside the retention
    assert sorted(prune(storage, "m", 30)) == [f"{ANSWERS}/{old}", f"{FEEDBACK}/{old}"]
    assert sorted(p.name for p in (tmp_path / "store" / "predictions" / "m" / ANSWERS).iterdir()) == sorted([kept, day_of(time.time())])
    assert len(read_records(storage, "m", FEEDBACK, 30)) == 2 and prune(storage, "m", 30) == []


def test_past_days_are_compacted_into_one_file_and_a_stopped_compaction_finishes(tmp_path):
    import shutil

    from lifelong.feedback import compact, day_of

    storage = Storage(str(tmp_path / "store"))
    log = RecordLog(storage.root_uri, "m", "r1", flush_interval_s=60, max_buffered=100)
    for i in range(3):  # three flushes: three files a kind
        log.add(ANSWERS, answer(f"a{i}", "t", "x"))
        log.add(FEEDBACK, label(f"a{i}", "x" if i else "y"))
        log.flush()
    log.add(FEEDBACK, label("a0", "x"))  # a correction
    log.flush()
    log.close()
    base, yesterday = tmp_path / "store" / "predictions" / "m", day_of(time.time() - 86400)
    for kind in (ANSWERS, FEEDBACK):
        (base / kind / day_of(time.time())).rename(base / kind / yesterday)
    before = Labels.read(storage, "m", 30)
    assert before.corrections == 1 and before.latest == {(f"a{i}", 0): "x" for i in range(3)}
    shutil.copytree(base / FEEDBACK / yesterday, tmp_path / "sources")

    assert compact(storage, "m", 30) == [f"{ANSWERS}/{yesterday}", f"{FEEDBACK}/{yesterday}"]
    for kind in (ANSWERS, FEEDBACK):
        assert [p.name[:8] for p in (base / kind / yesterday).iterdir()] == ["compact-"]
    assert sorted(read_records(storage, "m", ANSWERS, 30).column("request_id").to_pylist()) == ["a0", "a1", "a2"]
    # As if it had stopped before deleting its sources: both there, each record read twice ...
    for f in (tmp_path / "sources").iterdir():
        shutil.copy(f, base / FEEDBACK / yesterday / f.name)
    assert len(read_records(storage, "m", FEEDBACK, 30)) == 8
    after = Labels.read(storage, "m", 30)
    assert (after.latest, after.corrections) == (before.latest, before.corrections)  # ... and counted once
    assert compact(storage, "m", 30) == []  # the sources it names are deleted; nothing new to write
    assert [p.name[:8] for p in (base / FEEDBACK / yesterday).iterdir()] == ["compact-"]
    assert Labels.read(storage, "m", 30).corrections == 1
