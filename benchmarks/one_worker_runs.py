"""What a one-worker training run costs: in a Ray Train run against the driver's warm actor.

    python benchmarks/one_worker_runs.py            # 3 repeats of each
    python benchmarks/one_worker_runs.py --quick    # 1 repeat

`lifelong.train.driver.fit` trains a one-worker run in a `WarmTrainer` actor (train/warm.py)
and more workers in a Ray Train run. This measures why, on the tiny GPT-2 of
configs/gpt2/tiny_pretrain.yaml (one epoch of the demo corpus, one worker, no export), side by
side in one embedded local Ray, alternating within each repeat:

- `ray_train`: a Ray Train run (`build_trainer(...).fit()`: controller, worker group, data
  coordinators and helpers, each a process that imports Ray and most of them torch);
- `warm_fresh`: a new warm actor (what each `lifelong pretrain|finetune` command pays);
- `warm_reused`: the same actor again (later runs of one driver: a daemon's cycles, a test session).

Each on its own storage root, so each trains the whole epoch. Seconds from the trainer's start to
its result (the data is read and tokenized before, the same for all), and the validation loss,
which must be the same in all three (the same seeded loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "one_worker_runs.json"
CONFIG = HERE.parent / "configs" / "gpt2" / "tiny_pretrain.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    import ray

    from lifelong.config import load_config
    from lifelong.registry import Registry
    from lifelong.runtime import connect
    from lifelong.storage import Storage
    from lifelong.synth import write_text_corpus
    from lifelong.train import warm
    from lifelong.train.driver import build_trainer, loop_config, prepare_data, prepare_run, stored_run, worker_resources

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-one-worker-"))
    corpus = work / "corpus.jsonl"
    write_text_corpus(corpus, max_rows=1200)
    connect()

    def prepared(name: str):
        overrides = [f"storage.root={work / name}", f"data.path={corpus}", "train.epochs=1", "scaling.num_workers=1"]
        overrides.append("export.on_register=never")
        config = load_config(CONFIG, overrides)
        storage = Storage(config.storage.root)
        return prepare_run(config, prepare_data(config, storage, Registry(storage)))

    def timed(mode: str, name: str) -> dict:
        prep = prepared(name)
        started = time.perf_counter()
        if mode == "ray_train":
            result = build_trainer(prep, "run").fit()
        else:
            if mode == "warm_fresh":
                for actor in warm._trainers.values():
                    ray.kill(actor)
                warm._trainers.clear()
            datasets = {"train": prep.data.train_ds, "validation": prep.data.val_ds}
            run = stored_run(prep.storage, prep.config, "run")
            result = warm.train_warm(loop_config(prep), datasets, False, run, worker_resources(prep), 0)
        seconds = time.perf_counter() - started
        print(f"{mode:12s} {seconds:6.1f} s  val_loss={result.metrics['val_loss']:.6f}", flush=True)
        return {"seconds": seconds, "val_loss": result.metrics["val_loss"]}

    runs = {"ray_train": [], "warm_fresh": [], "warm_reused": []}
    for i in range(repeats):
        for mode in runs:
            runs[mode].append(timed(mode, f"{mode}-{i}"))
    medians = {mode: statistics.median(r["seconds"] for r in rs) for mode, rs in runs.items()}
    losses = {r["val_loss"] for rs in runs.values() for r in rs}
    result = {
        "command": "python benchmarks/one_worker_runs.py",
        "date": date.today().isoformat(),
        "machine": "2 CPU cores, no GPU",
        "model": "configs/gpt2/tiny_pretrain.yaml, 1 epoch, 1 worker, embedded local Ray",
        "repeats": repeats,
        "median_seconds": {k: round(v, 1) for k, v in medians.items()},
        "ray_train_over_warm_fresh": round(medians["ray_train"] / medians["warm_fresh"], 2),
        "ray_train_over_warm_reused": round(medians["ray_train"] / medians["warm_reused"], 2),
        "same_val_loss_in_all": len({round(v, 5) for v in losses}) == 1,
        "runs": runs,
    }
    result["figures"] = figures(medians, repeats)
    if not args.quick:
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    ray.shutdown()
    return 0 if result["same_val_loss_in_all"] else 1


def figures(medians: dict, repeats: int) -> list[dict]:
    """The README table's rows (benchmarks/readme_table.py)."""
    what = f"a tiny GPT-2 epoch on 1 worker, median of {repeats}"
    return [
        {
            "name": f"one_worker_run_{mode}",
            "value": round(medians["ray_train"] / medians[mode], 2),
            "unit": f"x faster than a Ray Train run ({what}; {label})",
            "target": None,
            "met": None,
            "platform": round(medians[mode], 1),
            "baseline": round(medians["ray_train"], 1),
            "baseline_unit": "s (warm actor vs Ray Train run)",
        }
        for mode, label in LABELS.items()
    ]


LABELS = {"warm_fresh": "a fresh warm actor: each training command", "warm_reused": "a warm actor reused: a driver's later runs"}


if __name__ == "__main__":
    sys.exit(main())
