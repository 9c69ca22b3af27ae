"""Sweep efficiency: Optuna TPE + ASHA against random search without early stopping.

    python benchmarks/tune_search.py              # full: 5 seeds x 40 trials each (the README quotes this)
    python benchmarks/tune_search.py --quick      # 1 seed x 6 trials

Same task (fine-tune the tiny GPT-2 into the 4-topic classifier, configs/gpt2/tiny_tune.yaml:
lr log-uniform over 1e-5..1e-1, batch size, frozen embeddings or not; 4 epochs of 25 steps),
same budget (trials per sweep, epochs per trial, concurrent trials) and same seeds for both
methods, run one after the other in one process on one local Ray. Each trial is a real
DeepSpeed run of one worker, which the platform runs inside the Tune trial's own process
(Tune reuses the process for the next trial).

Per sweep it reads the trials' reported results (Tune's own records) in the order they
arrived and counts the trial-epochs spent, and the wall time since the sweep started, until
the first result at or below the target validation loss (0.01: the classifier all but
perfect on the topics, which a good learning rate reaches within the 4 epochs; 0.1 and 0.03 are
recorded beside it); and the best validation loss of the sweep. Where random search's median
sweep never reaches the target, its median is bounded below by what its sweeps spent in all and
the ratios are given as "at least" (40 trials per sweep: at 20, random search reached the target
in 1 sweep of 5, which bounded little). Each trial's settings, start and curve are recorded.
Tune's overhead: the sweep's wall time against the sum of the trials' own training (train +
validation seconds the workers measured), and each trial's start-up, split into the part
inside the training loop (model load + DeepSpeed init, measured by the worker) and the
part before it (Tune starting or reusing the trial's process, the trial's config and data plan).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = {  # name: (search, scheduler)
    "tpe_asha": ("optuna", "asha"),
    "random_no_stop": ("random", "none"),
}


def sweep_stats(results, targets: list[float], started: float, finished: float, epochs: int) -> dict:
    """A sweep's figures; `targets[0]` is the headline target, the others are recorded beside it."""
    rows = []
    trials = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or "val_loss" not in history:
            continue
        history = history.sort_values("time_total_s")
        first = history.iloc[0]
        trial_start = first["timestamp"] - first["time_total_s"]
        training = float((history["epoch_seconds"] + history["val_seconds"]).sum())
        startup = float(first["time_total_s"] - first["epoch_seconds"] - first["val_seconds"])
        setup = float(first["setup_seconds"])
        trials.append(
            {
                "trial": result.metrics.get("trial_id"),
                "params": {k: result.config[k] for k in sorted(result.config) if "." in k},
                "started_s": float(trial_start - started),
                "val_loss_per_epoch": [round(float(v), 4) for v in history["val_loss"]],
                "epochs": int(history["epoch"].max()),
                "best_val_loss": float(history["val_loss"].min()),
                "wall_s": float(history["time_total_s"].iloc[-1]),
                "training_s": training,
                "startup_s": startup,
                "setup_in_loop_s": setup,
                "startup_before_loop_s": startup - setup,
            }
        )
        for _, row in history.iterrows():
            # Tune stamps results in whole seconds; the trial's own clock orders those of one second.
            rows.append((trial_start + float(row["time_total_s"]), float(row["val_loss"])))
    rows.sort()

    def reached(target):
        return next(((i + 1, at - started) for i, (at, loss) in enumerate(rows) if loss <= target), (None, None))

    to_target = reached(targets[0])
    return {
        "trials": len(trials),
        "trial_epochs": len(rows),
        "max_trial_epochs": len(trials) * epochs,
        "trial_epochs_to_target": to_target[0],
        "seconds_to_target": to_target[1],
        "to_targets": {str(t): dict(zip(("trial_epochs", "seconds"), reached(t), strict=True)) for t in targets},
        "best_val_loss": min((t["best_val_loss"] for t in trials), default=math.inf),
        "stopped_early": sum(t["epochs"] < epochs for t in trials),
        "sweep_wall_s": finished - started,
        "sum_training_s": sum(t["training_s"] for t in trials),
        "sum_trial_wall_s": sum(t["wall_s"] for t in trials),
        "startup_s": [t["startup_s"] for t in trials],
        "setup_in_loop_s": [t["setup_in_loop_s"] for t in trials],
        "startup_before_loop_s": [t["startup_before_loop_s"] for t in trials],
        "per_trial": trials,
    }


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_reached(values: list) -> float:
    """Median where a sweep that never reached the target counts as worse than any that did."""
    ordered = sorted(math.inf if v is None else v for v in values)
    return statistics.median(ordered)


def median_at_least(stats: list[dict], key: str, total: str) -> float:
    """A lower bound of the median of `key` where some sweeps never reached the target: such a
    sweep's value is more than what it spent in all (`total`), so that stands in for it."""
    return statistics.median(s[total] if s[key] is None else s[key] for s in stats)


def with_bounds(summary: dict, runs: dict) -> dict:
    """The summary with each method's lower bounds of the medians to the target."""
    for method, stats in runs.items():
        summary[method]["trial_epochs_to_target_at_least"] = median_at_least(stats, "trial_epochs_to_target", "trial_epochs")
        summary[method]["seconds_to_target_at_least"] = median_at_least(stats, "seconds_to_target", "sweep_wall_s")
    return summary


def finite(obj):
    """JSON has no infinity: a target never reached is written as null."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def make_figures(summary: dict, overhead: dict, n_seeds: int, trials: int, target: float) -> list[dict]:
    a, b = summary["tpe_asha"], summary["random_no_stop"]

    def inf(v):
        return math.inf if v is None else v

    def shown(v):
        return "not reached" if v is None or v == math.inf else round(v, 1)

    def to_target(key: str, unit: str, threshold: float, baseline_unit: str) -> dict:
        """TPE+ASHA's median against random search's; where random search's median sweep never
        reached the target, against the lower bound of that median (what its sweeps spent in all),
        so the ratio is a bound ("at least"), not infinity."""
        mine, theirs = inf(a[key]), inf(b[key])
        bounded = math.isfinite(mine) and not math.isfinite(theirs) and f"{key}_at_least" in b
        if bounded:
            theirs = b[f"{key}_at_least"]
        ratio = theirs / mine if math.isfinite(mine) else 0.0
        return {
            "value": round(ratio, 2) if math.isfinite(ratio) else "inf",
            "unit": unit
            + (
                " (at least: random search's median sweep never reached the target, so its median is counted as what it spent "
                f"in all; it reached it in {b.get('reached_target', '?')} of {n_seeds} sweeps)"
                if bounded
                else ""
            ),
            "target": f">= {threshold}",
            "met": bool(ratio >= threshold),
            "platform": shown(a[key]),
            "baseline": f"> {round(theirs, 1)}" if bounded else shown(b[key]),
            "baseline_unit": baseline_unit,
        }

    return [
        {
            "name": "tune_trial_epochs_to_target",
            **to_target(
                "trial_epochs_to_target", "x fewer with TPE+ASHA", 2, f"trial-epochs to val_loss <= {target} (median, {n_seeds} seeds)"
            ),
        },
        {"name": "tune_wall_to_target", **to_target("seconds_to_target", "x faster with TPE+ASHA", 1.5, "s (median)")},
        {
            "name": "tune_trial_epochs_per_sweep",
            "value": round(b["trial_epochs"] / a["trial_epochs"], 2),
            "unit": "x fewer with TPE+ASHA",
            "target": None,
            "met": None,
            "platform": a["trial_epochs"],
            "baseline": b["trial_epochs"],
            "baseline_unit": f"trial-epochs for {trials} trials (median)",
        },
        {
            "name": "tune_best_val_loss_within_budget",
            "value": round(a["best_val_loss"], 4),
            "unit": "val_loss (TPE+ASHA)",
            "target": None,
            "met": None,
            "platform": round(a["best_val_loss"], 4),
            "baseline": round(b["best_val_loss"], 4),
            "baseline_unit": f"best val_loss of {trials} trials (median)",
        },
        {
            "name": "tune_training_share_of_trial_wall",
            "value": round(overhead["training_share_of_trial_wall"], 3),
            "unit": "(train + validate seconds / trial wall seconds)",
            "target": ">= 0.6",
            "met": bool(overhead["training_share_of_trial_wall"] >= 0.6),
            "platform": round(overhead["sum_training_s"]),
            "baseline": round(overhead["sum_trial_wall_s"]),
            "baseline_unit": "s (all trials: training / trial wall)",
        },
        {
            "name": "tune_per_trial_startup",
            "value": round(overhead["startup_s_median"], 1),
            "unit": "s (median)",
            "target": "<= 5",
            "met": bool(overhead["startup_s_median"] <= 5),
            "platform": round(overhead["startup_before_loop_s_median"], 1),
            "baseline": round(overhead["setup_in_loop_s_median"], 1),
            "baseline_unit": "s (before the loop: Tune starting or reusing the trial's process, its config and data plan / "
            "in it: model load + DeepSpeed init)",
        },
    ]


def refigure(path: Path) -> None:
    """Rebuild a results file's figures from its own stored summary (no new measurement)."""
    result = json.loads(path.read_text())
    seeds, trials = len(result["runs"]["tpe_asha"]), result["runs"]["tpe_asha"][0]["trials"]
    target = float(result["setup"].split("target val_loss <= ")[1].split(";")[0])
    summary = with_bounds(result["summary"], result["runs"])
    result["figures"] = finite(make_figures(summary, result["overhead"], seeds, trials, target))
    path.write_text(json.dumps(result, indent=2) + "\n")


def pretrained_base(work: Path, topic_rows: int) -> Path:
    """A store under `work` with tiny-gpt2 pretrained on a small corpus (alias champion), and the
    topic set the sweeps fine-tune (work/topics.jsonl). Needs Ray connected and tests/ on the path."""
    from conftest import make_config
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.synth import write_text_corpus, write_topic_dataset
    from lifelong.train.driver import run_training

    write_text_corpus(work / "corpus.jsonl", max_rows=1200)
    write_topic_dataset(work / "topics.jsonl", topic_rows, seed=0)
    store = work / "store"
    pretrain = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={work / 'corpus.jsonl'}",
        f"storage.root={store}",
        "train.epochs=2",
        "train.max_steps_per_epoch=40",
        "scaling.num_workers=1",
    )
    Registry(Storage(str(store))).move_alias("tiny-gpt2", "champion", run_training(pretrain).version)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4; quick: 0)")
    parser.add_argument("--trials", type=int, default=None, help="trials per sweep (default 40; quick: 6)")
    parser.add_argument("--target", type=float, default=0.01, help="validation loss to reach (the headline figures)")
    parser.add_argument("--also", default="0.1,0.03", help="comma-separated further targets, recorded beside the headline one")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--refigure", type=Path, help="only rebuild the figures of this results file from its stored summary")
    args = parser.parse_args()
    if args.refigure:
        refigure(args.refigure)
        return
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",")]
    trials = args.trials or (6 if args.quick else 40)
    targets = [args.target, *(float(t) for t in args.also.split(",") if t)]

    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import make_config
    from lifelong.runtime import connect
    from lifelong.tune import run_sweep

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-tune-"))
    connect(num_cpus=args.concurrency + 1, dashboard=True)
    store = pretrained_base(work, topic_rows=800)

    runs = {m: [] for m in METHODS}
    for seed in seeds:
        for method, (search, scheduler) in METHODS.items():  # alternate, so drift hits both alike
            config = make_config(
                "gpt2/tiny_tune.yaml",
                f"data.path={work / 'topics.jsonl'}",
                f"storage.root={store}",
                f"name=bench-{method}-{seed}",
                f"tune.seed={seed}",
                f"tune.search={search}",
                f"tune.scheduler={scheduler}",
                f"tune.num_samples={trials}",
                f"tune.max_concurrent_trials={args.concurrency}",
                "train.epochs=4",
            )
            started = time.time()
            outcome = run_sweep(config)
            finished = time.time()
            stats = sweep_stats(outcome.results, targets, started, finished, config.train.epochs)
            stats["seed"] = seed
            runs[method].append(stats)
            print(
                f"[bench] seed {seed} {method}: {stats['trial_epochs_to_target']} trial-epochs / "
                f"{stats['seconds_to_target']} s to val_loss <= {args.target}; best {stats['best_val_loss']:.4f}; "
                f"{stats['trial_epochs']} trial-epochs in {stats['sweep_wall_s']:.0f} s",
                flush=True,
            )

    summary = {}
    for method, stats in runs.items():
        summary[method] = {
            "trial_epochs_to_target": median_reached([s["trial_epochs_to_target"] for s in stats]),
            "seconds_to_target": median_reached([s["seconds_to_target"] for s in stats]),
            "reached_target": sum(s["trial_epochs_to_target"] is not None for s in stats),
            "best_val_loss": statistics.median(s["best_val_loss"] for s in stats),
            "trial_epochs": statistics.median(s["trial_epochs"] for s in stats),
            "sweep_wall_s": statistics.median(s["sweep_wall_s"] for s in stats),
            "to_targets": {
                str(t): {
                    "trial_epochs": median_reached([s["to_targets"][str(t)]["trial_epochs"] for s in stats]),
                    "seconds": median_reached([s["to_targets"][str(t)]["seconds"] for s in stats]),
                    "reached": sum(s["to_targets"][str(t)]["trial_epochs"] is not None for s in stats),
                }
                for t in targets
            },
        }
    all_stats = [s for stats in runs.values() for s in stats]
    overhead = {
        "sweep_wall_s": sum(s["sweep_wall_s"] for s in all_stats),
        "sum_training_s": sum(s["sum_training_s"] for s in all_stats),
        "sum_trial_wall_s": sum(s["sum_trial_wall_s"] for s in all_stats),
        "startup_s_median": statistics.median(x for s in all_stats for x in s["startup_s"]),
        "setup_in_loop_s_median": statistics.median(x for s in all_stats for x in s["setup_in_loop_s"]),
        "startup_before_loop_s_median": statistics.median(x for s in all_stats for x in s["startup_before_loop_s"]),
    }
    overhead["training_share_of_trial_wall"] = overhead["sum_training_s"] / overhead["sum_trial_wall_s"]
    overhead["startup_share_of_trial_wall"] = sum(x for s in all_stats for x in s["startup_s"]) / overhead["sum_trial_wall_s"]

    figures = make_figures(with_bounds(summary, runs), overhead, len(seeds), trials, args.target)
    result = {
        "benchmark": "tune_search",
        "command": ("python benchmarks/tune_search.py " + " ".join(sys.argv[1:])).strip(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": f"{trials} trials per sweep, 4 epochs x 25 steps max each, {args.concurrency} concurrent trials of 1 worker, "
        f"seeds {seeds}, target val_loss <= {args.target}; Ray {args.concurrency + 1} logical CPUs on {os.cpu_count()} cores",
        "summary": summary,
        "overhead": overhead,
        "figures": figures,
        "runs": runs,
    }
    out = HERE / "results" / ("tune_search_quick.json" if args.quick else "tune_search.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2) + "\n")
    print(json.dumps({"summary": summary, "overhead": overhead, "figures": figures}, indent=2, default=str))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
