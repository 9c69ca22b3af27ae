"""A cycle that searches for itself (`continual.search`) against the fixed config, on the same
streams and seeds.

    python benchmarks/cycle_search.py            # 4 windows of 600 rows, seeds 0, 1, 2 (the README quotes this)
    python benchmarks/cycle_search.py --quick    # 3 windows of 300 rows, seed 0

Both sides are `run_cycle` on the drift generator's stream (as benchmarks/continual.py: each
window brings 2 of the 4 topics and new vocabulary), from the same tiny GPT-2 classifier (random
weights, seeded), replay strategy, gates opened so that every candidate is promoted (the
strategies are compared, not the gates):

- fixed: configs/gpt2/tiny_continual.yaml as benchmarks/continual.py runs it (lr 3e-3, 3 epochs,
  the config's replay settings, recorded in the result).
- search2, search3: the same config plus `continual.search` with 2 or 3 trials (the fixed
  config's settings first, then TPE over lr loguniform [3e-4, 1e-2], epochs choice [1, 2, 3],
  replay ratio uniform [0.5, 2]), scored as gain on the new window minus forgetting on the past
  ones, warm-started from the stream's earlier windows.
- fixed_low_lr, search2_low_lr: both at train.lr 3e-5, where a cycle learns next to nothing in
  its epochs (the case that motivated the search), the second with a 2-trial search.

Figures (medians over the seeds): the accuracy on its new window of the model serving after
each window (windows 1 on: window 0 trains from random weights on both sides), the stream's
final forgetting (the CL metric), and the cycle's wall time (all of run_cycle) over the fixed one's.
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

# One stream, starting model, arguments and results file for both continual benchmarks.
from continual import config, parse_args, run_seeds, starting_model, write_result

SPACE = (
    "continual.search.space={train.lr: {loguniform: [3.0e-4, 1.0e-2]}, train.epochs: {choice: [1, 2, 3]}, "
    "continual.replay_ratio: {uniform: [0.5, 2.0]}}"
)
SAMPLES = (2, 3)  # search sizes measured, each against the same fixed cycles
# A learning rate at which a cycle learns next to nothing in its epochs (as the real
# encoder did at its config's rate): the fixed cycle at it, and a 2-trial search starting from it.
LOW_LR = "train.lr=3e-5"
SIDES = {
    "fixed": [],
    **{f"search{n}": [f"continual.search.num_samples={n}", SPACE] for n in SAMPLES},
    "fixed_low_lr": [LOW_LR],
    "search2_low_lr": [LOW_LR, "continual.search.num_samples=2", SPACE],
}
# (search side, its fixed side, trials, what the pair is called in the figures' names)
PAIRS = [(f"search{n}", "fixed", n, f"cycle_search{n}") for n in SAMPLES] + [("search2_low_lr", "fixed_low_lr", 2, "cycle_search2_low_lr")]


def run_seed(seed: int, windows: int, rows: int) -> dict:
    from lifelong.continual.cycle import run_cycle
    from lifelong.models import train_tokenizer
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.synth import write_stream

    work = Path(tempfile.mkdtemp(prefix="cycle-search-bench-"))
    dirs = write_stream(work / "windows", windows=windows, rows_per_window=rows, files_per_window=2, seed=seed)
    first = [json.loads(line)["text"] for f in dirs[0].glob("*.jsonl") for line in f.read_text().splitlines()]
    tokenizer_dir = str(work / "tokenizer")
    train_tokenizer(first, 600, tokenizer_dir)
    sides = {side: [] for side in SIDES}
    for side in sides:
        store, landing = work / side, work / f"landing-{side}"
        landing.mkdir()
        registry = Registry(Storage(str(store)))
        start = starting_model(registry, "tiny-topics", tokenizer_dir, work / side, seed)
        registry.move_alias("tiny-topics", "champion", start)
        for w, d in enumerate(dirs):
            for f in sorted(d.iterdir()):
                shutil.copy(f, landing / f"window-{w:03d}-{f.name}")
            outcome = run_cycle(config(store, landing, "replay", seed, *SIDES[side]))
            print(outcome.summary(), flush=True)
            sides[side].append(
                {
                    "window": w,
                    "seconds": outcome.seconds,
                    "phases": outcome.phases,
                    "new_window_accuracy": outcome.accuracy["candidate"][-1],
                    "accuracy": outcome.accuracy,
                    "metrics": outcome.metrics,
                    "search": outcome.search,
                }
            )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "seed": seed,
        "new_window_accuracy": {s: statistics.fmean(c["new_window_accuracy"] for c in cycles[1:]) for s, cycles in sides.items()},
        "forgetting": {s: cycles[-1]["metrics"]["forgetting"] for s, cycles in sides.items()},
        "cycle_seconds": {s: statistics.fmean(c["seconds"] for c in cycles[1:]) for s, cycles in sides.items()},
        "cycles": sides,
    }


def main() -> None:
    args, windows, rows, seeds = parse_args(__doc__, quick=(3, 300), full=(4, 600))
    runs, med = run_seeds(run_seed, seeds, windows, rows)

    n = f"median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    figures = []
    for side, base, samples, label in PAIRS:
        which = "the fixed config" if base == "fixed" else f"the fixed config at {LOW_LR}"
        gain = med(lambda r, side=side, base=base: r["new_window_accuracy"][side] - r["new_window_accuracy"][base])
        less = med(lambda r, side=side, base=base: r["forgetting"][base] - r["forgetting"][side])
        time_ratio = med(lambda r, side=side, base=base: r["cycle_seconds"][side] / r["cycle_seconds"][base])
        train_share = med(lambda r, base=base: statistics.fmean(c["phases"]["train"] / c["seconds"] for c in r["cycles"][base][1:]))
        figures += [
            {
                "name": f"{label}_new_window_accuracy",
                "value": round(100 * gain, 1),
                "unit": f"points on each window's own holdout vs {which} ({samples} trials, windows 1-{windows - 1}, {n})",
                "target": "> 0",
                "met": bool(gain > 0),
                "platform": round(med(lambda r, side=side: r["new_window_accuracy"][side]), 3),
                "baseline": round(med(lambda r, base=base: r["new_window_accuracy"][base]), 3),
                "baseline_unit": "mean new-window accuracy (search vs fixed)",
            },
            {
                "name": f"{label}_forgetting",
                "value": round(100 * less, 1),
                "unit": f"points less forgetting than {which} ({samples} trials, {n})",
                "target": "> 0",
                "met": bool(less > 0),
                "platform": round(med(lambda r, side=side: r["forgetting"][side]), 3),
                "baseline": round(med(lambda r, base=base: r["forgetting"][base]), 3),
                "baseline_unit": "final forgetting (search vs fixed)",
            },
            {
                "name": f"{label}_wall_time",
                "value": round(time_ratio, 2),
                "unit": f"x {which}'s cycle wall time ({samples} trials, {n})",
                "target": "<= 2",
                "met": bool(time_ratio <= 2),
                "platform": round(med(lambda r, side=side: r["cycle_seconds"][side]), 1),
                "baseline": round(med(lambda r, base=base: r["cycle_seconds"][base]), 1),
                "baseline_unit": (
                    f"s per cycle, windows 1 on (search vs fixed); training is {train_share:.0%} of a fixed cycle and each "
                    "trial trains up to as long, so N trials cost about 1 + (N - 1) x that share"
                ),
            },
        ]
    fixed = config(Path("."), Path("."), "replay", 0)  # the settings the fixed side ran with
    result = {
        "benchmark": "cycle_search",
        "command": " ".join(["python benchmarks/cycle_search.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {
            "windows": windows,
            "rows_per_window": rows,
            "seeds": seeds,
            "fixed": f"lr {fixed.train.lr:g}, {fixed.train.epochs} epochs, replay ratio {fixed.continual.replay_ratio:g}, "
            f"replayed rows weighted by {fixed.continual.replay_weighting}",
            "sides": SIDES,
        },
        "figures": figures,
        "runs": runs,
    }
    write_result(result, "cycle_search", args.quick)


if __name__ == "__main__":
    main()
