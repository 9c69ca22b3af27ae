"""What a one-shot training command pays besides training: `lifelong pretrain` as a user runs it.

    python benchmarks/command_overhead.py            # 3 repeats of each command and setting
    python benchmarks/command_overhead.py --quick    # 1 repeat

Two shipped configs on the data the README makes (`lifelong data demo`, `lifelong data
image-stream`), each run as a subprocess on an embedded local Ray with a fresh storage root (so
that it trains): the tiny GPT-2 pretraining (configs/gpt2/tiny_pretrain.yaml: 2 DeepSpeed
workers) and the digits ResNet (configs/resnet/tiny_scratch.yaml: 2 workers, 1,797 PNG files).

Side by side, alternating within each repeat:
- before: the data read and tokenized by Ray tasks and Ray Data (`data.in_process_mb=0`) and Ray
  Train's controller polling its workers at Ray's default (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2);
- after: the defaults (data of up to 16 MB read and tokenized in the command's own process,
  the controller polling every 0.5 s).

Per run: the command's wall time, and the training it did (the sum of the `epoch_seconds` its
rank-0 worker printed), so the share of the wall time that is training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
COMMANDS = {  # name: (config, what it trains)
    "gpt2_pretrain": ("configs/gpt2/tiny_pretrain.yaml", "tiny GPT-2 on the demo corpus, 2 workers"),
    "resnet_digits": ("configs/resnet/tiny_scratch.yaml", "ResNet on 1,797 digit PNGs, 2 workers"),
}
VARIANTS = {  # name: (overrides, environment)
    "before": (["data.in_process_mb=0"], {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}),
    "after": ([], {}),
}
EPOCH = re.compile(r"epoch \d+ done: .*?epoch_seconds ([0-9.e+-]+)")


def run(project: Path, config: str, variant: str, env: dict, k: int) -> dict:
    overrides, extra = VARIANTS[variant]
    store = project / f"store-{variant}-{k}"
    command = [str(BIN / "lifelong"), "pretrain", config, f"storage.root={store}", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    out = done.stdout + done.stderr
    if done.returncode != 0 or "registered" not in out:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{out[-3000:]}")
    training = sum(float(s) for s in EPOCH.findall(out))
    shutil.rmtree(store, ignore_errors=True)
    return {"wall_s": wall, "training_s": training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    project = Path(tempfile.mkdtemp(prefix="command-bench-"))
    shutil.copytree(ROOT / "configs", project / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LIFELONG_"))}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for setup in (["data", "demo", "data/demo"], ["data", "image-stream", "data/digits", "--windows", "1", "--classes", "10"]):
        subprocess.run([str(BIN / "lifelong"), *setup], cwd=project, env=env, check=True, capture_output=True)

    runs: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in VARIANTS} for c in COMMANDS}
    try:
        for k in range(repeats):
            for name, (config, _) in COMMANDS.items():
                order = list(VARIANTS) if k % 2 == 0 else list(reversed(VARIANTS))  # neither always goes first
                for variant in order:
                    measured = run(project, config, variant, env, k)
                    runs[name][variant].append(measured)
                    print(f"{name} {variant} #{k}: {measured['wall_s']:.1f} s, training {measured['training_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(project, ignore_errors=True)

    summary, figures = {}, []
    for name, (config, what) in COMMANDS.items():
        med = {v: {m: statistics.median(r[m] for r in runs[name][v]) for m in ("wall_s", "training_s")} for v in VARIANTS}
        summary[name] = med
        before, after = med["before"], med["after"]
        figures.append(
            {
                "name": f"command_wall_{name}",
                "value": round(before["wall_s"] / after["wall_s"], 2),
                "unit": f"x faster `lifelong pretrain {config}` ({what}; median of {repeats})",
                "target": None,
                "met": None,
                "platform": round(after["wall_s"], 1),
                "baseline": round(before["wall_s"], 1),
                "baseline_unit": "s wall (defaults vs data through Ray tasks + Ray Train's 2-s controller poll)",
            }
        )
        figures.append(
            {
                "name": f"command_training_share_{name}",
                "value": round(after["training_s"] / after["wall_s"], 3),
                "unit": "of the command's wall time is training (sum of epoch_seconds, defaults)",
                "target": None,
                "met": None,
                "platform": round(after["training_s"] / after["wall_s"], 3),
                "baseline": round(before["training_s"] / before["wall_s"], 3),
                "baseline_unit": "training share (defaults vs before)",
            }
        )
    result = {
        "benchmark": "command_overhead",
        "command": "python benchmarks/command_overhead.py" + (" --quick" if args.quick else ""),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"repeats": repeats, "commands": {n: c for n, (c, _) in COMMANDS.items()}, "variants": VARIANTS},
        "runs": runs,
        "summary": summary,
        "figures": figures,
    }
    out = HERE / "results" / ("command_overhead_quick.json" if args.quick else "command_overhead.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
