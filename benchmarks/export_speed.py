"""What exporting a version to ONNX costs: torch's TorchScript-based exporter against its dynamo one.

    python benchmarks/export_speed.py            # 3 repeats of each exporter and model
    python benchmarks/export_speed.py --quick    # 1 repeat

Every classifier version is exported to ONNX when it is registered (and `lifelong export` does it
on demand), so this is paid once per registered classifier. Models: the tiny GPT-2 classifier of
the tests (2 layers, 32 wide) and the digits ResNet of configs/resnet/tiny_scratch.yaml (random
weights). Side by side, alternating within each repeat, each in a fresh process (as a command
exports: imports and the exporter's first call included), the same inputs and dynamic axes as
`lifelong.export.export_onnx`; per run the export's seconds and the largest |ONNX − PyTorch|
logit difference at another batch size and length than the example's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "export_speed.json"

CHILD = r"""
import contextlib, io, json, sys, time, warnings
import numpy as np, onnxruntime as ort, torch
warnings.simplefilter("ignore")
model_kind, exporter, path = sys.argv[1:4]
torch.manual_seed(0)
if model_kind == "gpt2":
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=600, n_positions=64, num_labels=4, pad_token_id=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    example = {"input_ids": torch.randint(1, 600, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    dims = {"input_ids": (0, 1), "attention_mask": (0, 1)}
    other = {"input_ids": torch.randint(1, 600, (5, 23)), "attention_mask": torch.ones(5, 23, dtype=torch.long)}
else:
    from transformers import ResNetConfig, ResNetForImageClassification
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10, num_channels=3)
    model = ResNetForImageClassification(cfg).eval()
    example = {"pixel_values": torch.randn(2, 3, 32, 32)}
    dims = {"pixel_values": (0,)}
    other = {"pixel_values": torch.randn(5, 3, 32, 32)}

class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, *args):
        return self.m(**dict(zip(example, args))).logits

wrapped = Logits(model).eval()  # as lifelong.export.logits_only: dropout off, batch norms on their running statistics
started = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    if exporter == "dynamo":
        def dim(name, axis):
            return torch.export.Dim(f"{name}_{axis}", max=64) if axis == 1 else torch.export.Dim(f"{name}_{axis}")
        shapes = tuple({axis: dim(name, axis) for axis in axes} for name, axes in dims.items())
        torch.onnx.export(wrapped, tuple(example.values()), path, input_names=list(example), output_names=["logits"],
                          dynamic_shapes=(shapes,), opset_version=18, dynamo=True)
    else:
        axes = {name: {axis: f"{name}_{axis}" for axis in a} for name, a in dims.items()}
        torch.onnx.export(wrapped, tuple(example.values()), path, input_names=list(example), output_names=["logits"],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
seconds = time.perf_counter() - started
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
got = session.run(["logits"], {k: v.numpy() for k, v in other.items()})[0]
with torch.no_grad():
    want = wrapped(*other.values()).numpy()
print(json.dumps({"seconds": seconds, "parity_max_abs_diff": float(np.max(np.abs(got - want)))}))
"""


def run(model: str, exporter: str, workdir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, exporter, str(workdir / f"{model}-{exporter}.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    workdir = HERE / "results" / ".export_speed"
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {m: {"torchscript": [], "dynamo": []} for m in ("gpt2", "resnet")}
    started = time.time()
    for _ in range(repeats):
        for model in runs:
            for exporter in ("torchscript", "dynamo"):
                runs[model][exporter].append(run(model, exporter, workdir))
                print(model, exporter, runs[model][exporter][-1], flush=True)
    summary = {}
    for model, by in runs.items():
        medians = {e: statistics.median(r["seconds"] for r in rs) for e, rs in by.items()}
        summary[model] = {
            "median_seconds": medians,
            "dynamo_over_torchscript": medians["dynamo"] / medians["torchscript"],
            "worst_parity": {e: max(r["parity_max_abs_diff"] for r in rs) for e, rs in by.items()},
        }
    result = {"command": "python benchmarks/export_speed.py", "date": date.today().isoformat(), "repeats": repeats}
    result.update(wall_s=time.time() - started, runs=runs, summary=summary, figures=figures(summary, repeats))
    out = OUT.with_name("export_speed_quick.json") if args.quick else OUT
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()


def figures(summary: dict, repeats: int) -> list[dict]:
    """The README table's rows (benchmarks/readme_table.py)."""
    return [
        {
            "name": f"onnx_export_{model}",
            "value": round(s["dynamo_over_torchscript"], 2),
            "unit": f"x faster ONNX export of the tiny {model} (TorchScript-based vs dynamo exporter, fresh process, median of {repeats})",
            "target": None,
            "met": None,
            "platform": round(s["median_seconds"]["torchscript"], 2),
            "baseline": round(s["median_seconds"]["dynamo"], 2),
            "baseline_unit": "s (TorchScript-based vs dynamo)",
        }
        for model, s in summary.items()
    ]


if __name__ == "__main__":
    main()
