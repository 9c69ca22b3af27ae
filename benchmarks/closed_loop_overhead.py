"""What the closed loop costs a request: serving p50/p99 with the prediction log at 10% and with a
shadow challenger at 20%, against neither, in one run.

    python benchmarks/closed_loop_overhead.py            # 9 rounds (about 5 minutes)
    python benchmarks/closed_loop_overhead.py --rounds 3

The tiny GPT-2 classifier of serve_latency.py (fine-tuned for a moment, exported, registered twice:
champion and challenger) is deployed three times side by side on the embedded local Ray, one
replica each: plain, `serve.log_predictions: {sample: 0.1}`, `serve.shadow: {share: 0.2}`. Each
round loads the three in turn (the order rotating from round to round, so that a machine that
slows or speeds up over the run weighs on each alike), one client at a time (sequential: the
latency a lone caller sees) and 8 at a time (a busy replica). A figure is the median over rounds
of the round's p50 against the plain endpoint's p50 in the same round (paired: this machine's
speed wanders by half within a run), with the medians of the p50s and p99s beside it.
Targets (issue 20): logging adds at most 10% to p50, the shadow at most 15%.
Written to benchmarks/results/closed_loop_overhead.json.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_latency import THREADS, build_tiny, load, register, topic_rows  # noqa: E402

MODES = {
    "plain": {},
    "log_10pct": {"log_predictions": {"sample": 0.1, "flush_interval_s": 1.0}},
    "shadow_20pct": {"shadow": {"alias": "challenger", "share": 0.2}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=200, help="requests per run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.registry import Registry
    from lifelong.runtime import connect
    from lifelong.serve import deploy
    from lifelong.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="lifelong-loop-bench-"))
    rows = topic_rows(work, 1200)
    texts = [r["text"] for r in rows[960:]]
    connect(num_cpus=6)
    registry = Registry(Storage(str(work / "store")))
    print("fine-tune, export, register champion and challenger", flush=True)
    model_dir, max_length = build_tiny(work, rows[:960])
    v1, v2 = register(registry, "tiny", model_dir, max_length, rows[960:], work, copies=2)
    registry.move_alias("tiny", "champion", v1)
    registry.move_alias("tiny", "challenger", v2)

    urls = {}
    for mode, keys in MODES.items():
        raw = {
            "name": "tiny",
            "storage": {"root": str(work / "store")},
            "serve": {
                "port": 8766,
                "app_name": f"loop-{mode}",
                "route_prefix": f"/{mode}",
                "num_replicas": 1,
                "threads_per_replica": THREADS,
                **keys,
            },
        }
        urls[mode] = deploy(absolute_paths(validate_config(raw)))
        asyncio.run(load(urls[mode], texts, 1, 30, 60))  # warm
    print(f"deployed {', '.join(urls)}", flush=True)

    runs = {mode: {"sequential": [], "concurrency_8": []} for mode in MODES}
    order = list(urls)
    for r in range(args.rounds):
        for mode in order[r % 3 :] + order[: r % 3]:
            url = urls[mode]
            runs[mode]["sequential"].append(asyncio.run(load(url, texts, 1, args.requests, 120)))
            runs[mode]["concurrency_8"].append(asyncio.run(load(url, texts, 8, args.requests, 120)))
        print(
            f"round {r + 1}: "
            + "; ".join(
                f"{m} p50 {runs[m]['sequential'][-1]['p50_ms']:.2f} ms / {runs[m]['concurrency_8'][-1]['p50_ms']:.2f} ms" for m in MODES
            ),
            flush=True,
        )
    shadow_info = httpx.get(urls["shadow_20pct"] + "/v1/model", timeout=30).json()
    log_info = httpx.get(urls["log_10pct"] + "/v1/model", timeout=30).json()
    for app in urls:
        serve.delete(f"loop-{app}")

    def med(mode: str, load_kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode][load_kind])

    figures = []
    for load_kind in ("sequential", "concurrency_8"):
        base_p50, base_p99 = med("plain", load_kind, "p50_ms"), med("plain", load_kind, "p99_ms")
        for mode, target in (("log_10pct", 0.10), ("shadow_20pct", 0.15)):
            p50, p99 = med(mode, load_kind, "p50_ms"), med(mode, load_kind, "p99_ms")
            pairs = zip(runs[mode][load_kind], runs["plain"][load_kind])
            added = statistics.median(run["p50_ms"] / plain["p50_ms"] for run, plain in pairs) - 1
            figures.append(
                {
                    "name": f"{mode}_{load_kind}_added_p50",
                    "value": round(added, 4),
                    "unit": "fraction of the plain endpoint's p50 (median over rounds of the paired ratio)",
                    "target": f"<= {target}",
                    "met": bool(added <= target),
                    "platform": round(p50, 2),
                    "baseline": round(base_p50, 2),
                    "baseline_unit": "ms p50 (medians over rounds)",
                    "p50_ms": round(p50, 3),
                    "p99_ms": round(p99, 3),
                    "plain_p50_ms": round(base_p50, 3),
                    "plain_p99_ms": round(base_p99, 3),
                    "added_p50_of_medians": round(p50 / base_p50 - 1, 4),
                    "added_p99_of_medians": round(p99 / base_p99 - 1, 4),
                }
            )
    failures = sum(run["failures"] for mode in runs.values() for kind in mode.values() for run in kind)
    result = {
        "benchmark": "closed_loop_overhead",
        "command": ("python benchmarks/closed_loop_overhead.py " + " ".join(sys.argv[1:])).strip(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": f"tiny GPT-2 classifier (ONNX, {THREADS} thread), one replica per mode, deployed side by side; "
        f"{args.rounds} rounds x {args.requests} one-text requests per mode and load, client on loopback; medians over rounds",
        "failed_requests": failures,
        "figures": figures,
        "shadow": shadow_info.get("live", {}),
        "shadow_replica": shadow_info.get("shadow"),
        "prediction_log_replica": log_info.get("prediction_log"),
        "raw": runs,
    }
    out = HERE / "results" / "closed_loop_overhead.json"
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for f in figures:
        print("  ", json.dumps(f), flush=True)
    print(f"failed requests: {failures}; written: {out}")


if __name__ == "__main__":
    main()
