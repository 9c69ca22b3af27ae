"""Image models: training throughput against a plain PyTorch loop, and ONNX Runtime against
PyTorch eager latency.

    python benchmarks/vision.py            # full: 2 repetitions (the README quotes this)
    python benchmarks/vision.py --quick    # 1 repetition, fewer latency calls

Throughput: the same model config (a small ResNet and a small ViT at 32x32), the same images
(scikit-learn's 1,797 handwritten digits, upscaled PNGs in class folders) and global batch (2
workers x 32 = 64 images), alternating platform and baseline in one run. The platform figure is
`lifelong pretrain`'s steady-state epoch (epoch 2; epoch 1 includes the data pipeline's spin-up)
as the workers report it, images streaming from Ray Data; the baseline is one process with all
cores, AdamW, pixel values decoded and processed once, in memory (bf16 via autocast).

Latency: one version's classifier called on already-processed pixel values (what the backend
does per request, decoding apart), 1 thread each as a replica runs it, batch 1 and 8; p50 over
the calls after a warm-up, ONNX Runtime (the exported model.onnx) against PyTorch eager.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MODELS = {
    "resnet": (
        "resnet",
        {"image_size": 32, "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1], "layer_type": "basic"},
    ),
    "vit": (
        "vit",
        {"image_size": 32, "patch_size": 4, "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 192},
    ),
}
LABELS = [str(d) for d in range(10)]
GLOBAL_BATCH, WORKERS = 64, 2


def config_for(arch: str, data: Path, root: Path, precision: str, run: str):
    from lifelong.config import JobConfig

    architecture, hf_config = MODELS[arch]
    return JobConfig.model_validate(
        {
            "name": f"bench-{arch}",
            "run_name": run,
            "model": {"task": "image-classification", "architecture": architecture, "hf_config": hf_config},
            "data": {"path": str(data), "labels": LABELS, "validation_fraction": 0.1},
            "train": {"epochs": 2, "batch_size": GLOBAL_BATCH // WORKERS, "lr": 1e-3, "precision": precision, "log_every_steps": 1000},
            "scaling": {"num_workers": WORKERS},
            "export": {"on_register": "never"},
            "storage": {"root": str(root)},
        }
    )


def platform_images_per_s(arch: str, data: Path, root: Path, precision: str, rep: int) -> float:
    from lifelong.train.driver import run_training

    outcome = run_training(config_for(arch, data, root, precision, f"{arch}-{precision}-{rep}"))
    return outcome.metrics["train_images_per_s"]  # epoch 2, the best (=last) checkpoint's


def processed(data: Path, processor_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from lifelong.tasks.image_classification import cached_processor, decode, pixel_values

    files = sorted(data.rglob("*.png"))
    pixels = pixel_values(cached_processor(str(processor_dir)), [decode(p.read_bytes()) for p in files])
    return torch.from_numpy(pixels), torch.tensor([LABELS.index(p.parent.name) for p in files])


def baseline_images_per_s(arch: str, pixels: torch.Tensor, labels: torch.Tensor, precision: str, epochs: int = 2) -> float:
    """A plain loop over the same images: epoch 1 warms up, the last is timed."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    architecture, hf_config = MODELS[arch]
    model = AutoModelForImageClassification.from_config(AutoConfig.for_model(architecture, **hf_config, num_labels=len(LABELS))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = int(len(pixels) * 0.9)
    rate = 0.0
    for _ in range(epochs):
        order = torch.randperm(train)
        started = time.perf_counter()
        for start in range(0, train, GLOBAL_BATCH):
            idx = order[start : start + GLOBAL_BATCH]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        rate = train / (time.perf_counter() - started)
    return rate


def _ceiling_worker(rank: int, arch: str, pixels: torch.Tensor, labels: torch.Tensor, port: int, out) -> None:
    """One of WORKERS plain processes: DeepSpeed ZeRO-2 over gloo, its half of every global batch
    from memory (no Ray), one thread: what the platform's loop could reach on this machine."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForImageClassification

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORKERS), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    architecture, hf_config = MODELS[arch]
    model = AutoModelForImageClassification.from_config(AutoConfig.for_model(architecture, **hf_config, num_labels=len(LABELS))).train()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORKERS,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    mine = torch.arange(rank, int(len(pixels) * 0.9), WORKERS)
    rate = 0.0
    for _ in range(2):  # epoch 1 warms up, the last is timed
        started = time.perf_counter()
        for idx in mine[torch.randperm(len(mine))].split(GLOBAL_BATCH // WORKERS):
            engine.backward(engine(pixel_values=pixels[idx], labels=labels[idx]).loss)
            engine.step()
        rate = WORKERS * len(mine) / (time.perf_counter() - started)
    if rank == 0:
        out.put(rate)


def deepspeed_ceiling_images_per_s(arch: str, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """WORKERS processes of DeepSpeed ZeRO-2 without Ray (fp32): the ceiling of a 2-worker run here."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(r, arch, pixels, labels, port, out)) for r in range(WORKERS)]
    for p in procs:
        p.start()
    rate = out.get(timeout=600)
    for p in procs:
        p.join()
    return rate


def latency_ms(fn, batch, calls: int) -> float:
    for _ in range(10):
        fn(batch)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def version_dir(arch: str, out: Path) -> Path:
    """An untrained classifier of `arch` with its image processor and ONNX export, as a version holds them."""
    from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessor

    from lifelong.config import ExportSection
    from lifelong.export import export_files

    architecture, hf_config = MODELS[arch]
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(AutoConfig.for_model(architecture, **hf_config, num_labels=len(LABELS)))
    model.eval().save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    result = export_files(out, "image-classification", None, ExportSection(), out / "export", None, ("onnx",))
    result.files["model.onnx"].replace(out / "model.onnx")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    reps, calls = (1, 100) if args.quick else (2, 300)

    from lifelong.inference import Batch, Classifier
    from lifelong.runtime import connect
    from lifelong.synth import write_digit_stream

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-vision-"))
    data = write_digit_stream(work / "digits", windows=1, classes_per_window=10, size=32)[0]
    connect(num_cpus=4)
    figures, raw = [], {}

    # --- ONNX Runtime vs PyTorch eager, 1 thread (a replica's) ---------------------------------
    torch.set_num_threads(1)
    for arch in MODELS:
        model_dir = version_dir(arch, work / f"version-{arch}")
        pixels, _ = processed(data, model_dir)
        backends = {name: Classifier(model_dir, name, threads=1).logits for name in ("torch", "onnx")}
        for batch_size in (1, 8):
            batch = Batch(inputs={"pixel_values": pixels[:batch_size].numpy()}, truncated=[False] * batch_size)
            eager, onnx = (latency_ms(backends[name], batch, calls) for name in ("torch", "onnx"))
            raw[f"latency_{arch}_b{batch_size}"] = {"torch_ms": eager, "onnx_ms": onnx}
            print(f"{arch} batch {batch_size}: PyTorch eager p50 {eager:.2f} ms, ONNX Runtime p50 {onnx:.2f} ms", flush=True)
            figures.append(
                {
                    "name": f"{arch}_onnx_vs_eager_p50_batch{batch_size}",
                    "value": round(eager / onnx, 2),
                    "unit": "x",
                    "target": ">= 1.5" if batch_size == 1 else None,
                    "met": (eager / onnx >= 1.5) if batch_size == 1 else None,
                    "platform": round(onnx, 2),
                    "baseline": round(eager, 2),
                    "baseline_unit": "ms",
                }
            )

    # --- training throughput ---------------------------------------------------------------------
    for arch in MODELS:
        pixels, labels = processed(data, work / f"version-{arch}")
        for precision in args.precisions.split(","):
            ours, base = [], []
            for rep in range(reps):  # alternate, so drift on a shared machine hits both alike
                base.append(baseline_images_per_s(arch, pixels, labels, precision))
                ours.append(platform_images_per_s(arch, data, work / "store", precision, rep))
                print(f"{arch} {precision} rep {rep}: platform {ours[-1]:.0f} images/s, baseline {base[-1]:.0f} images/s", flush=True)
            p, b = statistics.median(ours), statistics.median(base)
            raw[f"throughput_{arch}_{precision}"] = {"platform": ours, "baseline": base}
            if precision == "fp32":  # the same loop's ceiling on this machine: DeepSpeed alone, no Ray
                ceiling = statistics.median(deepspeed_ceiling_images_per_s(arch, pixels, labels) for _ in range(reps))
                raw[f"throughput_{arch}_{precision}"]["deepspeed_2proc_no_ray"] = ceiling
                print(f"{arch} {precision}: DeepSpeed ZeRO-2, {WORKERS} processes, no Ray: {ceiling:.0f} images/s", flush=True)
                figures.append(
                    {
                        "name": f"{arch}_{precision}_deepspeed_{WORKERS}proc_ceiling_vs_pytorch_images_per_s",
                        "value": round(ceiling / b, 3),
                        "unit": f"x (DeepSpeed ZeRO-2 in {WORKERS} plain processes, batches from memory, no Ray: "
                        "the ceiling of the platform's loop here)",
                        "target": None,
                        "met": None,
                        "platform": round(ceiling),
                        "baseline": round(b),
                        "baseline_unit": "images/s",
                    }
                )
            figures.append(
                {
                    "name": f"{arch}_{precision}_platform_vs_pytorch_images_per_s",
                    "value": round(p / b, 3),
                    "unit": "x",
                    "target": ">= 0.8",
                    "met": p / b >= 0.8,
                    "platform": round(p),
                    "baseline": round(b),
                    "baseline_unit": "images/s",
                }
            )
    result = {
        "benchmark": "vision",
        "command": ("python benchmarks/vision.py " + " ".join(sys.argv[1:])).strip(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": f"throughput: platform {WORKERS} Ray Train workers x 1 CPU, DeepSpeed ZeRO-2, batch {GLOBAL_BATCH // WORKERS}/worker "
        "(the rate of epoch 2: each worker's shard kept in memory after epoch 1), "
        f"vs 1 process with {os.cpu_count()} threads, batch {GLOBAL_BATCH}; 1,797 digit images at 32x32; medians of {reps}. "
        f"latency: 1 thread, p50 of {calls} calls on processed pixels; models: {json.dumps(MODELS)}",
        "figures": figures,
        "raw": raw,
    }
    out = HERE / "results" / ("vision_quick.json" if args.quick else "vision.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
