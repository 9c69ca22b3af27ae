"""Ingest of a landing zone: the platform's Ray Data path against a plain pyarrow + tokenizer loop.

    python benchmarks/ingest.py            # 20k and 200k rows (the README quotes this)
    python benchmarks/ingest.py --quick    # 5k and 50k rows

The landing zone is the drift generator's stream (`lifelong data stream`): 8 windows of one file
each, JSONL, CSV and Parquet in turn; 10x the data is 10x the rows in each file. Both sides do the
same work: read every file, keep the rows whose text is a non-empty string and whose label is one
of the config's, and tokenize them for the classifier (max_length 32, padded).

- platform: `read_validated` (a Ray task per file copies it, hashes the copy, parses and
  validates it once; the valid rows go to the object store) then `tokenized`, consumed batch by
  batch the way a training loop streams it; local Ray with
  2 CPUs, warmed up by one small pass first (so Ray's worker processes already exist). Peak
  memory: the sum of the resident memory of the driver and every Ray process (the object
  store's shared pages count where a process has touched them), sampled every 50 ms, above the
  sum just before the pass.
- baseline: a fresh process, one file at a time: pyarrow reads it whole, the valid rows are
  tokenized in batches of 512 and the arrays kept (a hand-written script's training set).
  Peak memory: its resident memory sampled the same way, above what it held once the
  tokenizer was loaded.

Rows per second are over the wall time of the whole pass, start-up of the Ray tasks included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LABELS = ["finance", "science", "sports", "weather"]
MAX_LENGTH = 32


class PeakMemory:
    """Resident memory of this process and its children (Ray's processes, for the platform),
    sampled every 50 ms; `peak_mb` is the highest sum above the sum when it started."""

    def __init__(self):
        import psutil

        self.me, self.psutil = psutil.Process(), psutil
        self.idle = self.resident()
        self.samples, self.done = [self.idle], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def resident(self) -> float:
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total / 2**20

    def _run(self):
        while not self.done.wait(0.05):
            self.samples.append(self.resident())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        self.samples.append(self.resident())
        return max(self.samples) - self.idle


def plain_loop(files: list[str], tokenizer_dir: str) -> dict:
    """The baseline, run in a fresh process so that its peak memory is its own."""
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from lifelong.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok(["warm up"], truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="np")
    memory = PeakMemory()
    started = time.perf_counter()
    kept, rows = [], 0
    for path in files:
        reader = pq.read_table if path.endswith(".parquet") else pacsv.read_csv if path.endswith(".csv") else pajson.read_json
        table = reader(path)
        texts, labels = table.column("text").to_pylist(), table.column("label").to_pylist()
        valid = [(t, LABELS.index(y)) for t, y in zip(texts, labels) if isinstance(t, str) and t.strip() and y in LABELS]
        for start in range(0, len(valid), 512):
            chunk = valid[start : start + 512]
            enc = tok([t for t, _ in chunk], truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="np")
            kept.append(
                (enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), np.array([y for _, y in chunk], dtype=np.int64))
            )
            rows += len(chunk)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "peak_mb": memory.stop()}


def platform_pass(files: list[str], tokenizer_dir: str, store: str) -> dict:
    from lifelong.config import DataConfig
    from lifelong.data import TokenizerRef, read_validated, tokenized
    from lifelong.storage import Storage

    cfg = DataConfig(path=os.path.dirname(files[0]), text_column="text", label_column="label", labels=LABELS)
    memory = PeakMemory()
    started = time.perf_counter()
    validated = read_validated(cfg, Storage(store), "ingest-bench", files=files)
    rows = 0
    for batch in tokenized(validated.split(None), "sequence-classification", TokenizerRef(tokenizer_dir), MAX_LENGTH).iter_batches(
        batch_size=512, batch_format="numpy"
    ):
        rows += len(batch["labels"])
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "peak_mb": memory.stop()}


def write_landing(out: Path, rows_per_file: int) -> list[str]:
    from lifelong.synth import write_stream

    dirs = write_stream(out, windows=8, rows_per_window=rows_per_file, files_per_window=1, seed=0)
    return sorted(str(f) for d in dirs for f in d.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-only", nargs=2, metavar=("FILES_JSON", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        print(json.dumps(plain_loop(json.loads(Path(args.baseline_only[0]).read_text()), args.baseline_only[1])))
        return

    import ray

    from lifelong.models import train_tokenizer
    from lifelong.synth import write_stream

    sizes = [625, 6250] if args.quick else [2500, 25000]  # rows per file; 8 files
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    sample_dir = write_stream(work / "sample", windows=4, rows_per_window=200, seed=1)
    texts = [json.loads(line)["text"] for d in sample_dir for f in d.glob("*.jsonl") for line in f.read_text().splitlines()]
    tokenizer_dir = str(work / "tokenizer")
    train_tokenizer(texts, 600, tokenizer_dir)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    runs = []
    warm = write_landing(work / "warm-up", 50)
    platform_pass(warm, tokenizer_dir, str(work / "store"))  # Ray's worker processes start here, not in a measured pass
    for rows_per_file in sizes:
        files = write_landing(work / f"landing-{rows_per_file}", rows_per_file)
        listing = work / f"files-{rows_per_file}.json"
        listing.write_text(json.dumps(files))
        for repeat in range(args.repeats):
            base = json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--baseline-only", str(listing), tokenizer_dir],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT / "platform")},
                ).stdout.splitlines()[-1]
            )
            plat = platform_pass(files, tokenizer_dir, str(work / "store"))
            for side, r in (("platform", plat), ("baseline", base)):
                runs.append({"side": side, "rows_per_file": rows_per_file, "repeat": repeat, **r, "rows_per_s": r["rows"] / r["seconds"]})
                speed = r["rows"] / r["seconds"]
                print(f"{side:8s} {r['rows']:7d} rows  {r['seconds']:6.1f} s  {speed:8.0f} rows/s  peak +{r['peak_mb']:.0f} MB", flush=True)
    ray.shutdown()

    def med(side, size, key):
        return statistics.median(r[key] for r in runs if r["side"] == side and r["rows_per_file"] == size)

    small, large = sizes
    summary = {
        side: {str(size * 8): {k: round(med(side, size, k), 1) for k in ("rows_per_s", "seconds", "peak_mb")} for size in sizes}
        for side in ("platform", "baseline")
    }
    growth = {side: round(med(side, large, "peak_mb") / max(med(side, small, "peak_mb"), 1.0), 2) for side in ("platform", "baseline")}
    throughput = round(med("platform", large, "rows_per_s") / med("baseline", large, "rows_per_s"), 2)
    memory = round(med("platform", large, "peak_mb") / max(med("baseline", large, "peak_mb"), 1.0), 2)
    figures = [
        {
            "name": "ingest_throughput_200k" if not args.quick else "ingest_throughput_50k",
            "value": throughput,
            "unit": "x the plain loop's rows/s",
            "target": ">= 0.8",
            "met": throughput >= 0.8,
            "platform": round(med("platform", large, "rows_per_s")),
            "baseline": round(med("baseline", large, "rows_per_s")),
            "baseline_unit": "rows/s (read + validate + tokenize, median)",
        },
        {
            "name": "ingest_peak_memory_vs_plain_loop",
            "value": memory,
            "unit": f"x the plain loop's peak memory at {large * 8} rows (10x the small pass)",
            "target": "<= 1.5",
            "met": memory <= 1.5,
            "platform": round(med("platform", large, "peak_mb")),
            "baseline": round(med("baseline", large, "peak_mb")),
            "baseline_unit": (
                f"MB above idle, median (driver + every Ray process for the platform); "
                f"10x the rows grows the platform's peak {growth['platform']}x, the plain loop's {growth['baseline']}x"
            ),
        },
    ]
    result = {
        "benchmark": "ingest",
        "command": "python benchmarks/ingest.py" + (" --quick" if args.quick else ""),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"files": 8, "rows_per_file": sizes, "max_length": MAX_LENGTH, "repeats": args.repeats, "ray_cpus": 2},
        "summary": summary,
        "peak_memory_growth_10x": growth,
        "figures": figures,
        "runs": runs,
    }
    out = HERE / "results" / ("ingest_quick.json" if args.quick else "ingest.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "growth": growth}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
