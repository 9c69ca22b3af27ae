"""Split-Digits: class-incremental continual learning on real handwritten digits, replay against
naive retraining on the new classes alone.

    python benchmarks/split_digits.py            # 5 windows (digits 0-1, 2-3, ... 8-9), seeds 0, 1, 2 (the README quotes this)
    python benchmarks/split_digits.py --quick    # 3 windows, seed 0

The Split-MNIST protocol on scikit-learn's 1,797 real handwritten digits (`lifelong data
image-stream`: 8x8 scans upscaled to 32x32 PNGs, one folder per digit, every image of each
digit). Each window brings two digits the model has never seen; the stream grows its label set
(continual.new_labels: grow) and each cycle grows the champion's head. Every strategy starts
from the same tiny ResNet over digits 0 and 1 (random weights, seeded) and trains with
configs/resnet/tiny_continual.yaml (3 epochs, 1 worker), one after the other on one local Ray:

- replay: `run_cycle` for every window (new images + as many replayed from the reservoir).
- naive: the same from window 1 on (forked from replay's store after window 0), new images only.

The gates are opened (every candidate is promoted) so that the strategies themselves are
compared, not the gates. Forgetting is the mean over past windows of the best accuracy a
window ever had minus its final accuracy (lifelong.continual.metrics); the figures are medians
over the seeds.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from continual import config as continual_config
from continual import forgetting_figure, parse_args, run_seeds, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def config(root: Path, landing: Path, strategy: str, seed: int):
    return continual_config(root, landing, strategy, seed, "export.on_register=never", path="configs/resnet/tiny_continual.yaml")


def starting_model(registry, cfg, work: Path, seed: int) -> int:
    """A tiny ResNet over the config's first labels with random weights (seeded), registered."""
    import torch

    from lifelong.models import build_model
    from lifelong.tasks import image_classification

    torch.manual_seed(seed)
    out = work / "start"
    build_model(cfg.model, None, labels=cfg.data.labels).save_pretrained(out)
    image_classification.fresh_preprocessor(cfg, None, str(out))
    card = {"task": cfg.model.task, "labels": cfg.data.labels, "config": {"model": cfg.model.model_dump(mode="json")}}
    return registry.register_version(cfg.name, out, card)


def run_seed(seed: int, windows: int, _rows: int) -> dict:
    from lifelong.continual.cycle import run_cycle
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.synth import write_digit_stream

    work = Path(tempfile.mkdtemp(prefix="split-digits-"))
    dirs = write_digit_stream(work / "windows", windows=windows, classes_per_window=2, size=32)
    landing, stores = work / "landing", {"replay": work / "replay", "naive": work / "naive"}
    landing.mkdir()
    first = config(stores["replay"], landing, "replay", seed)
    registry = Registry(Storage(str(stores["replay"])))
    registry.move_alias(first.name, "champion", starting_model(registry, first, work, seed))
    cycles = {s: [] for s in stores}
    for w, d in enumerate(dirs):
        shutil.copytree(d, landing / d.name)
        for strategy in stores if w else ("replay",):
            outcome = run_cycle(config(stores[strategy], landing, strategy, seed))
            print(outcome.summary(), flush=True)
            cycles[strategy].append(
                {
                    "window": w,
                    "seconds": outcome.seconds,
                    "new_rows": outcome.new_rows,
                    "replay_rows": outcome.replay_rows,
                    "version": outcome.version,
                    "accuracy": outcome.accuracy,
                    "metrics": outcome.metrics,
                }
            )
        if w == 0:
            shutil.copytree(stores["replay"], stores["naive"])
            cycles["naive"].append(cycles["replay"][0])
    shutil.rmtree(work, ignore_errors=True)
    final = {s: cycles[s][-1]["metrics"] for s in stores}
    return {
        "seed": seed,
        "average_accuracy": {s: final[s]["average_accuracy"] for s in stores},
        "forgetting": {s: final[s]["forgetting"] for s in stores},
        "final_accuracy_per_window": {s: cycles[s][-1]["accuracy"]["candidate"] for s in stores},
        "cycle_seconds": {s: statistics.median(c["seconds"] for c in cycles[s][1:]) for s in stores},
        "cycles": cycles,
    }


def main() -> None:
    args, windows, _, seeds = parse_args(__doc__, quick=(3, 0), full=(5, 0))
    runs, med = run_seeds(run_seed, seeds, windows, 0)
    acc = {s: med(lambda r, s=s: r["average_accuracy"][s]) for s in ("replay", "naive")}
    forgetting = {s: med(lambda r, s=s: r["forgetting"][s]) for s in ("replay", "naive")}
    less = med(lambda r: 1 - r["forgetting"]["replay"] / r["forgetting"]["naive"] if r["forgetting"]["naive"] else 0.0)
    n = f"median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    figures = [
        forgetting_figure(
            "split_digits_forgetting",
            f"% less forgetting with replay, class-incremental ({windows} windows of 2 digits, {n})",
            forgetting,
            less,
        ),
        {
            "name": "split_digits_average_accuracy",
            "value": round(acc["replay"] - acc["naive"], 3),
            "unit": f"average accuracy over all {2 * windows} digits, replay minus naive ({n})",
            "target": "",
            "met": True,
            "platform": round(acc["replay"], 3),
            "baseline": round(acc["naive"], 3),
            "baseline_unit": "average accuracy (replay vs naive)",
        },
    ]
    replayed = config(Path("."), Path("."), "replay", 0).continual
    result = {
        "benchmark": "split_digits",
        "command": " ".join(["python benchmarks/split_digits.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {
            "windows": windows,
            "digits_per_window": 2,
            "images": "all of each digit (about 180), 32x32",
            "seeds": seeds,
            "epochs": 3,
            "workers": 1,
            "replay_ratio": replayed.replay_ratio,
            "replay_weighting": replayed.replay_weighting,
            "replay_capacity": replayed.replay_capacity,
        },
        "summary": {
            "average_accuracy": acc,
            "forgetting": forgetting,
            "less_forgetting": less,
            "cycle_seconds": {s: med(lambda r, s=s: r["cycle_seconds"][s]) for s in ("replay", "naive")},
        },
        "figures": figures,
        "runs": runs,
    }
    print(json.dumps(result["summary"], indent=2))
    write_result(result, "split_digits", args.quick)


if __name__ == "__main__":
    main()
