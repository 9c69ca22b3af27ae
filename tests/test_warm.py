"""The warm trainer's stored runs (train/warm.py): which checkpoints count, which are kept."""

import json

from lifelong.storage import Storage
from lifelong.train.warm import MARKER, StoredRun


def save(run: StoredRun, tmp_path, epoch: int, val_loss: float):
    src = tmp_path / f"src-{epoch}"
    (src / "hf").mkdir(parents=True)
    (src / "hf" / "model.safetensors").write_bytes(b"w" * epoch)
    (src / "state.json").write_text(json.dumps({"epoch": epoch}))
    run.save({"epoch": epoch, "val_loss": val_loss}, str(src))


def test_a_checkpoint_counts_once_complete_and_the_best_and_latest_are_kept(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    run = StoredRun(storage, "r", num_to_keep=1, score="val_loss", order="min")
    assert run.latest() is None and run.result().checkpoint is None
    save(run, tmp_path, 1, 0.9)
    save(run, tmp_path, 2, 0.5)
    save(run, tmp_path, 3, 0.7)
    runs = tmp_path / "store" / "runs" / "r"
    # num_to_keep=1 by val_loss keeps epoch 2; the latest (3) stays for a resume.
    assert sorted(p.name for p in runs.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    result = run.result()
    assert [m["epoch"] for _, m in result.best_checkpoints] == [2, 3] and result.metrics["epoch"] == 3
    assert result.checkpoint.path == storage.path("runs/r/checkpoint_000003")
    # A save cut short (files, no marker) is not a checkpoint: a resume starts from the last whole one.
    (runs / "checkpoint_000004" / "hf").mkdir(parents=True)
    (runs / "checkpoint_000004" / "state.json").write_text(json.dumps({"epoch": 4}))
    assert run.latest().path == storage.path("runs/r/checkpoint_000003")
    # Saving that epoch again replaces the remains.
    save(run, tmp_path, 4, 0.4)
    assert (runs / "checkpoint_000004" / MARKER).is_file()
    assert (runs / "checkpoint_000004" / "hf" / "model.safetensors").read_bytes() == b"wwww"
    assert sorted(p.name for p in runs.iterdir()) == ["checkpoint_000004"]  # best and latest at once


def test_a_small_shard_is_kept_after_one_whole_pass_and_reshuffled_every_epoch():
    import torch

    from lifelong.train.loop import ShardCache

    batches = [{"x": torch.arange(i, min(i + 4, 10)), "y": torch.arange(i, min(i + 4, 10)) * 10} for i in (0, 4, 8)]  # 4 + 4 + 2 rows
    cut = ShardCache()
    for _ in cut.collect(iter(batches)):
        break  # an epoch cut short (max_steps_per_epoch) keeps nothing: the next one reads the shard again
    assert cut.rows == 0
    cache = ShardCache()
    assert [b["x"].tolist() for b in cache.collect(iter(batches))] == [b["x"].tolist() for b in batches]
    assert cache.rows == 10
    epochs = [list(cache.epoch(4, seed=s)) for s in (1, 2)]
    for epoch in epochs:
        assert [len(b["x"]) for b in epoch] == [4, 4, 2]
        rows = torch.cat([b["x"] for b in epoch])
        assert sorted(rows.tolist()) == list(range(10))  # every row once
        assert torch.equal(torch.cat([b["y"] for b in epoch]), rows * 10)  # rows stay whole
    assert torch.cat([b["x"] for b in epochs[0]]).tolist() != torch.cat([b["x"] for b in epochs[1]]).tolist()
