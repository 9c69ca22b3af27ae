"""The landing zone's ledger: content identity, copies, rewrites, consumption after registration."""

import shutil

from transformers import GPT2Config, GPT2LMHeadModel

from lifelong.continual.ledger import Ledger
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.synth import write_stream


def test_copies_rewrites_and_rescans(tmp_path):
    landing, storage = tmp_path / "landing", Storage(str(tmp_path / "store"))
    windows = write_stream(tmp_path / "stream", windows=2, rows_per_window=20)
    shutil.copytree(windows[0], landing / "w0")
    ledger = Ledger(storage, "topics")

    first = ledger.scan(str(landing))
    assert len(first.new) == 2 and not first.copies and not first.rewritten
    assert {r["state"] for r in ledger.records()} == {"pending"}

    again = ledger.scan(str(landing))  # nothing changed: nothing new
    assert not again.new and again.unchanged == 2

    # The same bytes under another name: recorded as a copy, not as new data.
    original = sorted((landing / "w0").iterdir())[0]
    shutil.copy(original, landing / "w0" / f"copy-of-{original.name}")
    dup = ledger.scan(str(landing))
    assert not dup.new and dup.copies == [(str(landing / "w0" / f"copy-of-{original.name}"), str(original))]
    assert len(ledger.records()) == 2

    # A known path rewritten with other content: new data, flagged as a rewrite of the old hash.
    old_hash = next(r["sha256"] for r in ledger.records() if r["path"] == str(original))
    assert original.name == "part-0.jsonl"
    original.write_text('{"text": "rain storm tonight", "label": "weather"}\n')
    rewrite = ledger.scan(str(landing))
    assert len(rewrite.new) == 1 and rewrite.rewritten[0]["rewrites"] == old_hash
    assert rewrite.rewritten[0]["path"] == str(original) and rewrite.rewritten[0]["state"] == "pending"
    assert any("rewritten with new content" in line for line in rewrite.lines())
    assert len(ledger.records()) == 3 and ledger.record(old_hash)["state"] == "pending"  # the old content stays on record


def test_files_are_consumed_once_and_a_crash_after_registration_is_reconciled(tmp_path):
    landing, storage = tmp_path / "landing", Storage(str(tmp_path / "store"))
    shutil.copytree(write_stream(tmp_path / "stream", windows=1, rows_per_window=20)[0], landing)
    ledger = Ledger(storage, "topics")
    ledger.scan(str(landing))
    hashes = [r["sha256"] for r in ledger.pending()]

    # A version registered with the files on its card, then the process died before consume().
    model_dir = tmp_path / "m"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8)).save_pretrained(model_dir)
    registry = Registry(storage)
    version = registry.register_version("topics-clf", model_dir, {"task": "sequence-classification",
                                        "stream": {"name": "topics", "files": hashes}})
    assert ledger.counts() == {"pending": 2, "consumed": 0, "quarantined": 0}
    assert sorted(ledger.reconcile(registry, "topics-clf")) == sorted(hashes)
    assert ledger.counts() == {"pending": 0, "consumed": 2, "quarantined": 0}
    assert {r["consumed_by"] for r in ledger.records()} == {f"topics-clf:{version}"}

    ledger.consume(hashes, "topics-clf:99")  # a second mark changes nothing: consumed once
    assert {r["consumed_by"] for r in ledger.records()} == {f"topics-clf:{version}"}
    assert not ledger.scan(str(landing)).new  # and a rescan does not bring them back
