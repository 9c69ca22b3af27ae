"""What tracking costs a training run: none, TensorBoard, MLflow (a real `mlflow server` on loopback).

    python benchmarks/tracking_overhead.py            # 5 repeats of each
    python benchmarks/tracking_overhead.py --quick    # 1 repeat

`run_training` of configs/gpt2/tiny_pretrain.yaml (three epochs of the demo corpus, every step
logged, one worker in the driver's warm actor, reused after a first run that is not measured, so
no mode pays a start-up), side by side in one
embedded local Ray, alternating within each repeat, each on its own storage root:

- `off`: no `tracking` section;
- `tensorboard`: `tracking.tensorboard.dir`;
- `mlflow`: `tracking.mlflow.uri`, an `mlflow server --backend-store-uri sqlite:///…` this script
  starts (one request per logged step and epoch, the params once, the run made by the driver).

Seconds of the whole `run_training` call (data read, training, registration), the validation
loss (the same seeded loop in all three) and the points logged (read back from each tracker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "tracking_overhead.json"
CONFIG = HERE.parent / "configs" / "gpt2" / "tiny_pretrain.yaml"
MODES = ("off", "tensorboard", "mlflow")


def start_mlflow(home: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from lifelong.runtime import free_port

    port = free_port()
    # fmt: off
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # fmt: on
    proc = subprocess.Popen(command, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return proc, uri
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("mlflow server did not start")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5

    import ray
    from mlflow import MlflowClient

    from lifelong.config import load_config
    from lifelong.runtime import connect
    from lifelong.synth import write_text_corpus
    from lifelong.train.driver import run_training

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-tracking-"))
    corpus = work / "corpus.jsonl"
    write_text_corpus(corpus, max_rows=1200)
    (work / "mlflow").mkdir()
    server, uri = start_mlflow(work / "mlflow")
    connect()

    def timed(mode: str, i: int) -> dict:
        name = f"{mode}-{i}"
        overrides = [
            f"storage.root={work / name}",
            f"data.path={corpus}",
            "train.epochs=3",
            "train.log_every_steps=1",
            "scaling.num_workers=1",
        ]
        overrides += ["export.on_register=never", f"name=bench-{mode}", f"run_name={name}"]
        if mode == "tensorboard":
            overrides.append(f"tracking.tensorboard.dir={work / 'tb'}")
        if mode == "mlflow":
            overrides += [f"tracking.mlflow.uri={uri}", "tracking.mlflow.experiment=bench"]
        config = load_config(CONFIG, overrides)
        started = time.perf_counter()
        outcome = run_training(config)
        seconds = time.perf_counter() - started
        points = 0
        if mode == "mlflow":
            client = MlflowClient(tracking_uri=uri)
            (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id], f"tags.`lifelong.run` = '{name}'")
            points = sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
        if mode == "tensorboard":
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(work / "tb" / name), size_guidance={"scalars": 0})
            acc.Reload()
            points = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
        print(f"{mode:12s} {seconds:6.1f} s  val_loss={outcome.metrics['val_loss']:.6f}  points logged={points}", flush=True)
        return {"seconds": seconds, "val_loss": outcome.metrics["val_loss"], "points": points}

    try:
        timed("off", -1)  # the warm actor started and the ops loaded: not measured
        runs = {mode: [] for mode in MODES}
        for i in range(repeats):
            for mode in MODES:
                runs[mode].append(timed(mode, i))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        ray.shutdown()
    medians = {mode: statistics.median(r["seconds"] for r in rs) for mode, rs in runs.items()}
    losses = {round(r["val_loss"], 5) for rs in runs.values() for r in rs}
    result = {
        "command": "python benchmarks/tracking_overhead.py",
        "date": date.today().isoformat(),
        "machine": "2 CPU cores, no GPU",
        "model": "configs/gpt2/tiny_pretrain.yaml, 3 epochs, every step logged, 1 worker (warm actor, reused), embedded local Ray",
        "repeats": repeats,
        "median_seconds": {k: round(v, 2) for k, v in medians.items()},
        "over_off": {k: round(v / medians["off"], 3) for k, v in medians.items()},
        "points_logged": {k: rs[0]["points"] for k, rs in runs.items()},
        "same_val_loss_in_all": len(losses) == 1,
        "runs": runs,
    }
    result["figures"] = [
        {
            "name": f"tracking_{mode}",
            "value": round(medians[mode] / medians["off"], 3),
            "unit": f"x the run's time untracked (a tiny GPT-2, 3 epochs, every step logged, 1 worker, median of {repeats}; {mode})",
            "target": None,
            "met": None,
            "platform": round(medians[mode], 1),
            "baseline": round(medians["off"], 1),
            "baseline_unit": "s (tracked vs untracked)",
        }
        for mode in ("tensorboard", "mlflow")
    ]
    if not args.quick:
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0 if result["same_val_loss_in_all"] else 1


if __name__ == "__main__":
    sys.exit(main())
