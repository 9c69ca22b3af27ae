"""ASHA on long epochs: reporting inside an epoch (`tune.report_every_steps`) against reporting
at its end only.

    python benchmarks/tune_within_epoch.py            # seeds 0, 1, 2 (the README quotes this)
    python benchmarks/tune_within_epoch.py --quick    # seed 0

The sweep of benchmarks/tune_search.py (fine-tune the tiny GPT-2 into the 4-topic classifier:
lr log-uniform over 1e-5..1e-1, batch size, frozen embeddings or not), but one long epoch of
120 steps per trial, so an epoch-end report comes only when a trial is done and ASHA can stop
nothing. Both sides: Optuna TPE with the same seed, ASHA, 8 trials, 2 at a time, 1 worker each.

- epoch_end: reports once per epoch (`grace_period: 1`): every trial trains its whole epoch.
- within_epoch: `report_every_steps: 30`, `grace_period: 0.25`: ASHA can stop a trial a quarter
  into its epoch, at each rung.

Per sweep: the trial-epochs trained (a stopped trial counts the fraction it trained), the wall
time of the sweep, the best validation loss, and the trial-epochs and seconds until a report at
or below the target validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from tune_search import finite, pretrained_base  # one pretrained base; a target never reached is written as null

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = 120
SIDES = {
    "epoch_end": ["tune.grace_period=1"],
    "within_epoch": ["tune.report_every_steps=30", "tune.grace_period=0.25"],
}


def sweep_stats(results, target: float, started: float, finished: float) -> dict:
    """Reports in the order they arrived; a trial's clock is its reported progress in epochs."""
    reports, trained, best = [], [], float("inf")
    for result in results:
        history = result.metrics_dataframe
        if history is None or "val_loss" not in history:
            continue
        history = history.sort_values("time_total_s")
        clock = history["progress"] if "progress" in history else history["epoch"]
        first = history.iloc[0]
        trial_start = first["timestamp"] - first["time_total_s"]
        previous = 0.0
        for (_, row), progress in zip(history.iterrows(), clock):
            reports.append((trial_start + float(row["time_total_s"]), float(progress) - previous, float(row["val_loss"])))
            previous = float(progress)
        trained.append(previous)
        best = min(best, float(history["val_loss"].min()))
    reports.sort()
    spent, to_target = 0.0, (None, None)
    for at, epochs, loss in reports:
        spent += epochs
        if loss <= target:
            to_target = (round(spent, 2), at - started)
            break
    return {
        "trials": len(trained),
        "trial_epochs": round(sum(trained), 2),
        "stopped_early": sum(t < 1 for t in trained),
        "trial_epochs_to_target": to_target[0],
        "seconds_to_target": to_target[1],
        "best_val_loss": best,
        "sweep_wall_s": finished - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--target", type=float, default=0.1, help="validation loss to reach")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    trials = 8

    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import make_config
    from lifelong.runtime import connect
    from lifelong.tune import run_sweep

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-within-epoch-"))
    connect(num_cpus=3, dashboard=True)
    store = pretrained_base(work, topic_rows=4000)  # 120 steps of up to 32 rows

    runs = {side: [] for side in SIDES}
    for seed in seeds:
        for side, overrides in SIDES.items():  # alternate, so drift hits both alike
            config = make_config(
                "gpt2/tiny_tune.yaml",
                f"data.path={work / 'topics.jsonl'}",
                f"storage.root={store}",
                f"name=bench-{side}-{seed}",
                f"tune.seed={seed}",
                f"tune.num_samples={trials}",
                "tune.max_concurrent_trials=2",
                "train.epochs=1",
                f"train.max_steps_per_epoch={STEPS}",
                *overrides,
            )
            started = time.time()
            outcome = run_sweep(config)
            stats = {"seed": seed, **sweep_stats(outcome.results, args.target, started, time.time())}
            runs[side].append(stats)
            print(f"[bench] seed {seed} {side}: {json.dumps(stats)}", flush=True)

    def med(side, key):
        values = sorted(float("inf") if s[key] is None else s[key] for s in runs[side])
        return statistics.median(values)

    summary = {
        side: {
            key: med(side, key) for key in ("trial_epochs", "sweep_wall_s", "best_val_loss", "trial_epochs_to_target", "seconds_to_target")
        }
        for side in SIDES
    }
    a, b = summary["within_epoch"], summary["epoch_end"]
    n = f"median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    figures = [
        {
            "name": "tune_within_epoch_trial_epochs",
            "value": round(b["trial_epochs"] / a["trial_epochs"], 2),
            "unit": f"x fewer trial-epochs per sweep with reports inside the epoch ({trials} trials of one {STEPS}-step epoch, {n})",
            "target": None,
            "met": None,
            "platform": a["trial_epochs"],
            "baseline": b["trial_epochs"],
            "baseline_unit": "trial-epochs trained (within-epoch reports vs epoch-end only)",
        },
        {
            "name": "tune_within_epoch_sweep_wall",
            "value": round(b["sweep_wall_s"] / a["sweep_wall_s"], 2),
            "unit": f"x faster sweep with reports inside the epoch ({n})",
            "target": None,
            "met": None,
            "platform": round(a["sweep_wall_s"], 1),
            "baseline": round(b["sweep_wall_s"], 1),
            "baseline_unit": "s per sweep (within-epoch reports vs epoch-end only)",
        },
        {
            "name": "tune_within_epoch_best_val_loss",
            "value": round(a["best_val_loss"], 4),
            "unit": f"best val_loss with reports inside the epoch ({n})",
            "target": None,
            "met": None,
            "platform": round(a["best_val_loss"], 4),
            "baseline": round(b["best_val_loss"], 4),
            "baseline_unit": "best val_loss of the sweep (within-epoch reports vs epoch-end only)",
        },
    ]
    result = {
        "benchmark": "tune_within_epoch",
        "command": "python benchmarks/tune_within_epoch.py" + (" --quick" if args.quick else ""),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"trials": trials, "steps_per_epoch": STEPS, "concurrent": 2, "seeds": seeds, "target": args.target, "sides": SIDES},
        "summary": summary,
        "figures": figures,
        "runs": runs,
    }
    out = HERE / "results" / ("tune_within_epoch_quick.json" if args.quick else "tune_within_epoch.json")
    out.write_text(json.dumps(finite(result), indent=2) + "\n")
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}; {f['platform']} vs {f['baseline']} {f['baseline_unit']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
