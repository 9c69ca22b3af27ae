"""ONNX and TorchScript exports of a registry version: dynamic axes, parity, int8.

    HF weights ─▶ torch.onnx.export ─▶ model.onnx ─▶ parity vs PyTorch (max |Δlogit|)
                                                  └─▶ quantize_dynamic ─▶ model.int8.onnx
                                                        └─▶ accuracy drop on validation rows (gate)

A new classification version is exported before it is registered (the files and records go
into its card); `lifelong export NAME:VERSION` adds an export to an existing version (see
`Registry.add_export`: new files and a record, nothing rewritten).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lifelong.config import ExportSection
from lifelong.errors import LifelongError, first_line
from lifelong.inference import EXPORT_FILES, Classifier, OnnxLogits, TorchLogits, TorchScriptLogits, model_max_length
from lifelong.moe import is_moe_dir
from lifelong.tasks import task as family

# ONNX files above this size keep their weights in an external .onnx.data file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(LifelongError):
    """An export that fails its parity check or cannot be produced."""


class LogitsOnly(nn.Module):
    """The model as an export sees it: its inputs, positionally in the task's order (text:
    input_ids, attention_mask; images: pixel_values) → logits, no KV cache."""

    def __init__(self, model: nn.Module, names: list[str], forward_kwargs: dict):
        super().__init__()
        self.model, self.names, self.forward_kwargs = model, names, forward_kwargs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs)), **self.forward_kwargs).logits


def logits_only(torch_model: nn.Module, task: str, names) -> LogitsOnly:
    return LogitsOnly(torch_model, list(names), family(task).FORWARD_KWARGS).eval()


@dataclass
class ExportResult:
    files: dict[str, Path] = field(default_factory=dict)  # name in the version → local file
    records: dict[str, dict] = field(default_factory=dict)  # format → what was measured
    refused: dict[str, str] = field(default_factory=dict)  # format → why it was not kept


def export_onnx(torch_model: nn.Module, out_path: Path, opset: int, max_length: int, task: str, model_dir: Path) -> str:
    """Write `torch_model` as ONNX with the task's dynamic axes (batch; and sequence, for text);
    returns which exporter wrote it. Models that fit one protobuf go through the TorchScript-based
    exporter: 1.5 s against the dynamo exporter's 11.6 s for a tiny GPT-2 classifier, 1.2 s against
    6.3 s for the digits ResNet, each the first export of a process on 2 cores (medians,
    benchmarks/export_speed.py); every classifier version is exported when registered. Larger
    ones go through dynamo, which writes external data. Parity against PyTorch over several batch
    shapes and lengths (`parity`) judges either."""
    inputs, dynamic = family(task).export_inputs(model_dir, max_length, padded=False)
    big = sum(p.numel() * p.element_size() for p in torch_model.parameters()) > EXTERNAL_DATA_BYTES
    wrapped = logits_only(torch_model, task, inputs)
    common = {"input_names": list(inputs), "output_names": ["logits"], "opset_version": opset, "verbose": False}
    # The exporters print progress lines and warn about internals: keep the job log readable.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if big:
                torch.onnx.export(
                    wrapped,
                    tuple(inputs.values()),
                    str(out_path),
                    dynamic_shapes=(tuple(dynamic.values()),),  # forward(*inputs): one tuple of them
                    dynamo=True,
                    external_data=True,
                    **common,
                )
                return f"torch.onnx dynamo (torch {torch.__version__})"
            axes = {name: {axis: f"{name}_{axis}" for axis in dims} for name, dims in dynamic.items()}
            torch.onnx.export(wrapped, tuple(inputs.values()), str(out_path), dynamic_axes=axes, dynamo=False, **common)
            return f"torch.onnx TorchScript-based (torch {torch.__version__})"
        except Exception as e:  # the exporter raises many types; all mean "this model did not export"
            raise ExportError(f"torch.onnx.export failed for {type(torch_model).__name__}: {e}") from None


@dataclass(frozen=True)
class OnnxTemplate:
    """An earlier version's ONNX export of the same architecture (a cycle's champion): its graph
    can take the new weights instead of exporting afresh. `ref` names it on the record."""

    onnx_path: Path
    model_dir: Path
    ref: str


def write_into_template(template: OnnxTemplate, task: str, torch_model: nn.Module, out_path: Path) -> bool:
    """`torch_model`'s weights written into a copy of the template's graph: every initializer
    that is a weight of the template's model (by name, or a constant the exporter folded from one,
    as is or transposed) takes the new model's value. False when the two models differ in
    parameters, equal weights share an initializer, or a weight-sized constant matches none
    (export afresh then); the caller checks
    parity either way, so a constant this misses cannot pass unseen."""
    import onnx
    from onnx import numpy_helper

    from lifelong.models import load_for_inference

    template_model = load_for_inference(template.model_dir, task)
    old = {f"model.{k}": v.detach().cpu().numpy() for k, v in template_model.state_dict().items()}
    new = {f"model.{k}": v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        return False
    graph = onnx.load(str(template.onnx_path))
    if len({(v.shape, v.tobytes()) for v in old.values()}) < len(old):
        return False  # equal weights (untrained or frozen ones): the exporter keeps one initializer for them
    for init in graph.graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name in new:
            replacement = new[init.name]
        elif value.dtype.kind == "f" and value.size > 1:
            found = next(
                (
                    (k, t)
                    for k, w in old.items()
                    for t in (False, True)
                    if (w.T if t else w).shape == value.shape and np.array_equal(w.T if t else w, value)
                ),
                None,
            )
            if found is None:
                if value.ndim >= 2:
                    return False  # a weight-sized constant of unknown origin
                continue  # a small constant of the graph itself (a scale, a mask value)
            replacement = new[found[0]].T if found[1] else new[found[0]]
        else:
            continue  # shapes, indices, scalars
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(replacement, dtype=value.dtype), init.name))
    onnx.save(graph, str(out_path))
    return True


def parity(model_dir: Path, task: str, candidate, samples: list, max_length: int, torch_model=None) -> dict:
    """Max |exported − PyTorch| over the logits of `samples` (texts or encoded images;
    `candidate`: an exported backend's logits, OnnxLogits or TorchScriptLogits), in the task's
    groups (`parity_groups`: several batch shapes, for text several lengths too): a traced graph
    keeps the branches its example inputs took, so other shapes must agree too."""
    encode = family(task).encoder(model_dir, max_length)
    reference = TorchLogits(model_dir, task, threads=None, model=torch_model)
    worst, shapes = 0.0, []
    for group in family(task).parity_groups(samples):
        batch = encode(group)
        a, b = family(task).comparable(batch, reference(batch), candidate(batch))
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        worst = diff if not (diff <= worst) else worst  # NaN stays NaN and fails the gate
        shapes.append(batch.shape)
    return {"parity_max_abs_diff": worst, "parity_shapes": shapes}


def accuracy(classifier: Classifier, rows: list[dict], batch_size: int = 64) -> float:
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        probs, _ = classifier.probabilities([r[family(classifier.task).CONTENT] for r in chunk])
        correct += int((probs.argmax(axis=-1) == np.asarray([r["label"] for r in chunk])).sum())
    return correct / max(len(rows), 1)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a pre-processing hint through the root logger on every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_files(
    model_dir: str | Path,
    task: str,
    max_length: int | None,
    cfg: ExportSection,
    workdir: str | Path,
    rows: list[dict] | None = None,
    formats: tuple[str, ...] = ("onnx", "onnx-int8"),
    template: OnnxTemplate | None = None,
) -> ExportResult:
    """Build the requested formats of the model in `model_dir` into `workdir`.

    `task` and `max_length` are what the model was trained as (its card's, or its run's).
    `rows` are labelled validation rows ({"text" or "image", "label" id}) for the int8 accuracy gate.
    A format already present in `model_dir` (e.g. model.onnx when only int8 is asked for)
    is reused as the quantization source. With a `template` (the same architecture's export),
    the new weights are written into its graph, which takes a fraction of a second instead of
    seconds of tracing; should parity fail that way, the model is exported afresh.
    """
    import onnxruntime

    from lifelong.models import load_for_inference

    model_dir, workdir = Path(model_dir), Path(workdir)
    if is_moe_dir(model_dir):
        raise ExportError(
            f"{model_dir} is a Mixture-of-Experts model (model.moe): its token routing does not export to a fixed "
            "ONNX graph; it is served and evaluated by PyTorch (serve.backend torch)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    max_length = model_max_length(model_dir, max_length)
    result = ExportResult()
    onnx_path = model_dir / EXPORT_FILES["onnx"]
    samples = family(task).parity_samples(rows)
    torch_model = load_for_inference(model_dir, task) if {"onnx", "torchscript"} & set(formats) else None
    if "onnx" in formats:
        onnx_path = workdir / EXPORT_FILES["onnx"]
        measured, missed = None, ""
        if template is not None and write_into_template(template, task, torch_model, onnx_path):
            measured = parity(model_dir, task, OnnxLogits(onnx_path, threads=1), samples, max_length, torch_model)
            exporter = f"weights written into the graph of {template.ref}"
            if not measured["parity_max_abs_diff"] <= cfg.parity_tolerance:
                measured, missed = None, f"; {template.ref}'s graph missed parity"
        if measured is None:
            exporter = export_onnx(torch_model, onnx_path, cfg.opset, max_length, task, model_dir) + missed
            measured = parity(model_dir, task, OnnxLogits(onnx_path, threads=1), samples, max_length, torch_model)
        require_parity(measured, cfg, f"ONNX export of {model_dir}")
        result.files["model.onnx"] = onnx_path
        for extra in workdir.glob("model.onnx.data"):
            result.files[extra.name] = extra
        result.records["onnx"] = {
            **measured,
            "parity_tolerance": cfg.parity_tolerance,
            "opset": cfg.opset,
            "max_length": max_length,
            "exporter": exporter,
            "onnxruntime": onnxruntime.__version__,
        }
    if "onnx-int8" in formats:
        if "onnx-int8" not in family(task).EXPORT_FORMATS:
            raise ExportError(f"int8 export is gated on accuracy over labelled rows, which a {task} model has none of: export onnx only")
        if not rows:
            raise ExportError("the int8 accuracy gate needs labelled validation rows: pass --data or keep the version's data readable")
        if not onnx_path.exists():
            raise ExportError(f"{model_dir} has no model.onnx to quantize: export onnx first")
        int8_path = workdir / EXPORT_FILES["onnx-int8"]
        quantize_int8(onnx_path, int8_path)
        scored = rows[: cfg.eval_rows]
        acc_fp32 = accuracy(Classifier(model_dir, "onnx", max_length, exported=onnx_path), scored)
        acc_int8 = accuracy(Classifier(model_dir, "onnx-int8", max_length, exported=int8_path), scored)
        drop = acc_fp32 - acc_int8
        record = {
            "accuracy_fp32": acc_fp32,
            "accuracy_int8": acc_int8,
            "accuracy_drop": drop,
            "rows": len(scored),
            "max_accuracy_drop": cfg.int8_max_accuracy_drop,
            "quantization": "onnxruntime quantize_dynamic QInt8 weights",
        }
        if drop <= cfg.int8_max_accuracy_drop:
            result.files["model.int8.onnx"] = int8_path
            result.records["onnx-int8"] = record
        else:
            result.refused["onnx-int8"] = (
                f"int8 accuracy {acc_int8:.4f} is {drop * 100:.2f} points below fp32 {acc_fp32:.4f} "
                f"(allowed: {cfg.int8_max_accuracy_drop * 100:.2f}; export.int8_max_accuracy_drop): not kept"
            )
            if "onnx" in result.records:
                result.records["onnx"]["int8_refused"] = {**record, "reason": result.refused["onnx-int8"]}
    if "torchscript" in formats:
        if "torchscript" not in family(task).EXPORT_FORMATS:
            raise ExportError(f"TorchScript is built for classifiers; a {task} model generates with PyTorch: export onnx only")
        ts_path = workdir / EXPORT_FILES["torchscript"]
        export_torchscript(torch_model, ts_path, max_length, task, model_dir)
        measured = parity(model_dir, task, TorchScriptLogits(ts_path, threads=None), samples, max_length, torch_model)
        require_parity(measured, cfg, f"TorchScript export of {model_dir}")
        result.files[ts_path.name] = ts_path
        result.records["torchscript"] = {
            **measured,
            "parity_tolerance": cfg.parity_tolerance,
            "max_length": max_length,
            "exporter": f"torch.jit.trace (torch {torch.__version__})",
        }
    return result


def require_parity(measured: dict, cfg: ExportSection, what: str) -> None:
    """Refuse an export whose logits differ from PyTorch's by more than export.parity_tolerance
    (NaN included: it is within no tolerance)."""
    if not measured["parity_max_abs_diff"] <= cfg.parity_tolerance:
        raise ExportError(
            f"{what} differs from PyTorch by {measured['parity_max_abs_diff']:.3g} "
            f"(max |logit difference|) > export.parity_tolerance={cfg.parity_tolerance:g}: not kept"
        )


def export_torchscript(torch_model: nn.Module, out_path: Path, max_length: int, task: str, model_dir: Path) -> None:
    """Trace `torch_model` (the task's inputs → logits) into a TorchScript file, loadable with
    torch.jit.load alone (no transformers, no Python model code). The batch axis (and a text's
    length) stays dynamic; the parity check that follows runs other shapes than the trace's."""
    inputs, _ = family(task).export_inputs(model_dir, max_length, padded=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shapes the model checks in Python
        try:
            traced = torch.jit.trace(logits_only(torch_model, task, inputs), tuple(inputs.values()), strict=False)
            torch.jit.save(traced, str(out_path))
        except Exception as e:  # the tracer raises many types; all mean "this model did not trace"
            raise ExportError(f"torch.jit.trace failed for {type(torch_model).__name__}: {first_line(e, 300)}") from None


def export_formats(task: str, int8: bool, torchscript: bool) -> tuple[str, ...]:
    """The formats an export of a `task` model builds: the task's, less int8 and TorchScript
    unless asked for."""
    wanted = {"onnx-int8": int8, "torchscript": torchscript}
    return tuple(f for f in family(task).EXPORT_FORMATS if wanted.get(f, True))


def should_export_on_register(cfg: ExportSection, task: str) -> bool:
    return cfg.on_register == "always" or (cfg.on_register == "auto" and family(task).EXPORT_ON_REGISTER)


def validation_rows(data_cfg, storage, limit: int, path: str | None = None) -> list[dict]:
    """Labelled rows for the int8 gate: the validation split of the data, or every valid
    row of `path` when one is given (data set aside for evaluation)."""
    from lifelong.data import first_rows, read_validated

    validated = read_validated(data_cfg, storage, quarantine_area="export", path=path)
    return first_rows(validated.split_rows(None if path else "validation"), limit)


def export_version(
    registry, name: str, version: int, cfg: ExportSection, rows: list[dict] | None, formats: tuple[str, ...]
) -> ExportResult:
    """Add the missing `formats` to an existing version (files + records, nothing rewritten)."""
    from lifelong.registry import format_of

    card = registry.card(name, version)
    if not family(card.task).EXPORT_FORMATS:
        raise ExportError(
            f"{name}:{version} is a {card.task} model: it has no deployment format (fine-tune a model from it and export that)"
        )
    todo = tuple(f for f in formats if f not in card.exports)
    if not todo:
        raise ExportError(f"{name}:{version} already has {', '.join(formats)}; versions are immutable")
    with tempfile.TemporaryDirectory(prefix="lifelong-export-") as work:
        result = export_files(registry.model_dir(name, version), card.task, card.max_length, cfg, work, rows, todo)
        for fmt in tuple(result.records):
            files = {rel: path for rel, path in result.files.items() if format_of(rel) == fmt}
            result.records[fmt] = registry.add_export(name, version, fmt, files, result.records[fmt])
    return result
