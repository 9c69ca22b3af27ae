"""What a continual poll costs as a stream's history grows: the ledger now against its old floor.

    python benchmarks/ledger_poll.py            # 100 and 1,000 consumed files, local disk and S3 (moto)
    python benchmarks/ledger_poll.py --quick    # 30 and 300

A long-lived stream accumulates consumed files; a poll that finds nothing new should not get
slower with them. Both sides run on the same ledger, side by side, repeated, medians:

- platform: one poll as `lifelong continual` does it with nothing new: `Ledger.scan` (landing
  listing + the path index) + `check_pending` + `pending` (the open markers).
- baseline: the least the previous ledger read per poll: the landing listing plus every
  record (`Ledger.records()`; its scan and `pending()` each read them all).

Counted: seconds and objects read from the store. The S3 side runs against moto_server on
loopback (a real HTTP object store, without a network's latency, so its seconds are a floor).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ["finance", "science", "sports", "weather"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class Reads:
    """Counts the objects this process reads from the store."""

    def __init__(self):
        from lifelong.storage import Storage

        self.n = 0
        for name in ("read_bytes", "read_versioned"):
            real = getattr(Storage, name)

            def counted(storage, rel, real=real):
                self.n += 1
                return real(storage, rel)

            setattr(Storage, name, counted)


def grow(ledger, landing: Path, cfg, start: int, count: int) -> None:
    """`count` more consumed files in the stream's history."""
    for i in range(start, start + count):
        (landing / f"part-{i:05d}.jsonl").write_text(json.dumps({"text": f"rain and wind {i}", "label": "weather"}) + "\n")
    ledger.scan(str(landing), cfg)
    ledger.consume([r["sha256"] for r in ledger.pending()], "bench:1")


def measure(ledger, landing: Path, cfg, reads: Reads, repeats: int) -> dict:
    import pyarrow.fs as pafs

    from lifelong.data import list_files

    out = {"platform": [], "baseline": [], "platform_reads": 0, "baseline_reads": 0}
    for _ in range(repeats):  # alternating
        reads.n, t0 = 0, time.perf_counter()
        ledger.scan(str(landing), cfg)
        ledger.check_pending(cfg, str(landing))
        ledger.pending()
        out["platform"].append(time.perf_counter() - t0)
        out["platform_reads"] = reads.n
        reads.n, t0 = 0, time.perf_counter()
        list_files(pafs.LocalFileSystem(), str(landing))
        ledger.records()
        out["baseline"].append(time.perf_counter() - t0)
        out["baseline_reads"] = reads.n
    return {
        "platform_s": statistics.median(out["platform"]),
        "baseline_s": statistics.median(out["baseline"]),
        "platform_reads": out["platform_reads"],
        "baseline_reads": out["baseline_reads"],
    }


def moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    for _ in range(150):
        try:
            client.create_bucket(Bucket="bench")
            return proc, port
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)  # before Ray starts: its workers write to the bucket
    import ray

    from lifelong.config import DataConfig
    from lifelong.continual.ledger import Ledger
    from lifelong.storage import Storage

    small, large = (30, 300) if args.quick else (100, 1000)
    cfg = DataConfig(path="unused", label_column="label", labels=LABELS)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    server, port = moto()
    reads = Reads()
    results = {}
    try:
        for store_kind in ("local", "s3"):
            work = Path(tempfile.mkdtemp(prefix="poll-bench-"))
            landing = work / "landing"
            landing.mkdir()
            root = (
                str(work / "store")
                if store_kind == "local"
                else f"s3://bench/{store_kind}-{os.getpid()}?endpoint_override=127.0.0.1:{port}&scheme=http"
            )
            ledger = Ledger(Storage(root), "bench")
            grow(ledger, landing, cfg, 0, small)
            at_small = measure(ledger, landing, cfg, reads, args.repeats)
            grow(ledger, landing, cfg, small, large - small)
            at_large = measure(ledger, landing, cfg, reads, args.repeats)
            results[store_kind] = {str(small): at_small, str(large): at_large}
            print(store_kind, json.dumps(results[store_kind]), flush=True)
    finally:
        server.terminate()
        ray.shutdown()

    figures = []
    for kind, by in results.items():
        a, b = by[str(small)], by[str(large)]
        figures.append(
            {
                "name": f"poll_seconds_{kind}_{large}_files",
                "value": round(b["baseline_s"] / b["platform_s"], 1),
                "unit": f"x faster than reading the history ({large} consumed files)",
                "target": None,
                "met": None,
                "platform": round(b["platform_s"] * 1000, 1),
                "baseline": round(b["baseline_s"] * 1000, 1),
                "baseline_unit": "ms per poll (median)",
            }
        )
        figures.append(
            {
                "name": f"poll_growth_{kind}_10x_history",
                "value": round(b["platform_s"] / a["platform_s"], 2),
                "unit": f"x poll time for 10x history ({small} → {large} files; reads {a['platform_reads']} → {b['platform_reads']})",
                "target": None,
                "met": None,
                "platform": b["platform_reads"],
                "baseline": b["baseline_reads"],
                "baseline_unit": f"objects read per poll at {large} files "
                f"(the old floor grows {b['baseline_s'] / a['baseline_s']:.1f}x in time)",
            }
        )
    result = {
        "benchmark": "ledger_poll",
        "command": "python benchmarks/ledger_poll.py" + (" --quick" if args.quick else ""),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"history": [small, large], "repeats": args.repeats, "s3": "moto_server on loopback"},
        "results": results,
        "figures": figures,
    }
    out = HERE / "results" / ("ledger_poll_quick.json" if args.quick else "ledger_poll.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
