"""What a one-shot command costs the machine: CPU-seconds (every process, not only the command's
own), side by side with an earlier commit's code.

    python benchmarks/command_cpu.py                 # 3 repeats, against BEFORE
    python benchmarks/command_cpu.py --quick         # 1 repeat
    python benchmarks/command_cpu.py --before REV    # against another commit

A command on an embedded Ray starts a raylet, a GCS, agents, workers and Ray Data's and Ray
Train's helper actors, each a process that imports before it works: on a machine of few cores
(CI's, this one's) the CPU they take is what a suite of such commands waits for, more than their
wall time says when the cores are idle. Measured here: the machine's CPU-seconds (user + system of
every process, /proc/stat) while the command runs, and its wall time.

Three commands on the data the README makes, each a subprocess with a fresh storage root (so that
it trains): the tiny GPT-2 pretraining (2 Ray Train workers), the digits ResNet (1 worker, the
warm actor) and `lifelong evaluate` of that ResNet's first version. "before" runs the commit
BEFORE's platform code (a git worktree, put first on PYTHONPATH, which Ray's workers inherit),
"after" this checkout's; the order alternates within each repeat. Linux only (/proc/stat).
"""

from __future__ import annotations

import argparse
import json
import os
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
# main before the fixed costs of 2026-12-03 (prestarted workers, the preemption watcher, Ray
# Data's metadata tasks for tables read in the driver, py-cpuinfo's process per question).
BEFORE = "fee97f7"
COMMANDS = {  # name: (arguments, what it does)
    "gpt2_pretrain": (["pretrain", "configs/gpt2/tiny_pretrain.yaml"], "tiny GPT-2 pretraining, 2 Ray Train workers"),
    "resnet_digits": (["pretrain", "configs/resnet/tiny_scratch.yaml"], "digits ResNet, 1 worker (warm actor)"),
    "evaluate": (
        ["evaluate", "configs/resnet/tiny_scratch.yaml", "--model", "tiny-resnet-digits:1"],
        "evaluate of the digits ResNet on its 1,797 images",
    ),
}


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent (user, nice, system) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def run(project: Path, name: str, env: dict, store: Path) -> dict:
    args, _ = COMMANDS[name]
    trains = args[0] != "evaluate"  # evaluate reads the one store set up for it (its override is in args)
    command = [str(BIN / "lifelong"), *args, *([f"storage.root={store}"] if trains else [])]
    cpu, started = busy_seconds(), time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    wall, cpu = time.perf_counter() - started, busy_seconds() - cpu
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="the commit whose platform code runs as 'before'")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    work = Path(tempfile.mkdtemp(prefix="command-cpu-"))
    old = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=ROOT, check=True, capture_output=True)
    project = work / "project"
    shutil.copytree(ROOT / "configs", project / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LIFELONG_"))}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    variants = {"before": {**env, "PYTHONPATH": str(old / "platform")}, "after": env}
    for setup in (["data", "demo", "data/demo"], ["data", "image-stream", "data/digits", "--windows", "1", "--classes", "10"]):
        subprocess.run([str(BIN / "lifelong"), *setup], cwd=project, env=env, check=True, capture_output=True)
    # evaluate's model: one ResNet version, in a store of its own that both variants read.
    evaluated = work / "evaluated"
    subprocess.run(
        [str(BIN / "lifelong"), "pretrain", "configs/resnet/tiny_scratch.yaml", f"storage.root={evaluated}"],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
    )
    COMMANDS["evaluate"][0].append(f"storage.root={evaluated}")

    runs: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in variants} for c in COMMANDS}
    try:
        for k in range(repeats):
            for name in COMMANDS:
                order = list(variants) if k % 2 == 0 else list(reversed(variants))  # neither always goes first
                for variant in order:
                    measured = run(project, name, variants[variant], work / f"store-{name}-{variant}-{k}")
                    runs[name][variant].append(measured)
                    print(f"{name} {variant} #{k}: {measured['cpu_s']:.1f} CPU-s, {measured['wall_s']:.1f} s wall", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    summary, figures = {}, []
    for name, (_, what) in COMMANDS.items():
        med = {v: {m: statistics.median(r[m] for r in runs[name][v]) for m in ("cpu_s", "wall_s")} for v in variants}
        summary[name] = med
        before, after = med["before"], med["after"]
        figures.append(
            {
                "name": f"command_cpu_{name}",
                "value": round(before["cpu_s"] / after["cpu_s"], 2),
                "unit": f"x fewer CPU-seconds, whole machine ({what}; median of {repeats})",
                "target": None,
                "met": None,
                "platform": round(after["cpu_s"], 1),
                "baseline": round(before["cpu_s"], 1),
                "baseline_unit": f"CPU-s (this checkout vs {args.before})",
                "wall_s": {"after": round(after["wall_s"], 1), "before": round(before["wall_s"], 1)},
            }
        )
    result = {
        "benchmark": "command_cpu",
        "command": "python benchmarks/command_cpu.py" + (" --quick" if args.quick else ""),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"repeats": repeats, "before": args.before, "commands": {n: a for n, (a, _) in COMMANDS.items()}},
        "runs": runs,
        "summary": summary,
        "figures": figures,
    }
    out = HERE / "results" / ("command_cpu_quick.json" if args.quick else "command_cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
