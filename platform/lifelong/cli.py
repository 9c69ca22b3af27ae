"""The `lifelong` command line (Typer). Each command: load config → connect → run → summarise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from lifelong.console import LOG_LEVEL_ENV, console, errors, quiet, say
from lifelong.errors import LifelongError, first_line

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Keep transformer models learning on Ray. A command's library and Ray logs go to a file under the storage root "
    "(logs/), its path shown once; --verbose shows them here instead.",
)
models_app = typer.Typer(no_args_is_help=True, help="Versions and aliases in the model registry.")
data_app = typer.Typer(no_args_is_help=True, help="Demo data the project generates (synthetic).")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (Ray's Job Submission API).")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")


@app.callback()
def options(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help=f"Ray's, DeepSpeed's and the libraries' logs on the console too (or {LOG_LEVEL_ENV}=INFO)."),
    ] = False,
) -> None:
    """--verbose: the libraries' and Ray's logs on the console too (LIFELONG_LOG_LEVEL, for jobs)."""
    if verbose:
        os.environ.setdefault(LOG_LEVEL_ENV, "INFO")


ConfigArg = Annotated[Path, typer.Argument(help="A YAML config (see configs/).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=3e-4.")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (else RAY_ADDRESS, else an embedded local Ray).")]
RootOpt = Annotated[str, typer.Option("--root", envvar="LIFELONG_ROOT", help="Storage root (a directory or URI).")]


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run named by run_name although its config or data changed.")]


def _train(job: str, config_path: Path, overrides: list[str] | None, address: str | None, resume: bool = False) -> None:
    from lifelong.commands import train

    train(job, config_path, overrides or [], address, resume)


@app.command()
def pretrain(config: ConfigArg, overrides: OverridesArg = None, address: AddressOpt = None, resume: ResumeOpt = False) -> None:
    """Pretrain a causal LM from scratch on Ray Train + DeepSpeed; register the best checkpoint.
    The same config and data again resume the run from its checkpoints."""
    _train("pretrain", config, overrides, address, resume)


@app.command()
def finetune(config: ConfigArg, overrides: OverridesArg = None, address: AddressOpt = None, resume: ResumeOpt = False) -> None:
    """Fine-tune from model.init_from (a registry version or an HF directory); register the best checkpoint.
    The same config and data again resume the run from its checkpoints."""
    _train("finetune", config, overrides, address, resume)


@app.command()
def tune(
    config: ConfigArg,
    overrides: OverridesArg = None,
    address: AddressOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the sweep of this config whose driver stopped (finished trials are kept).")
    ] = False,
    promote: Annotated[
        bool, typer.Option("--promote", help="Give the best trial's version the champion alias (default: challenger).")
    ] = False,
) -> None:
    """Search hyperparameters (tune.space) with Ray Tune: Optuna TPE or random, ASHA early stopping;
    each trial a Ray Train + DeepSpeed run; the best trial is registered."""
    from lifelong.commands import tune as run

    run(config, overrides or [], address, resume, promote)


@app.command()
def evaluate(
    config: ConfigArg,
    model: Annotated[str, typer.Option("--model", help="NAME@ALIAS, NAME:VERSION or an HF directory.")],
    overrides: OverridesArg = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data to evaluate on (default: data.path).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    confusion_png: Annotated[
        Optional[Path], typer.Option("--confusion-matrix", help="Also draw a classifier's confusion matrix as a PNG here.")
    ] = None,
    generate_rows: Annotated[
        int,
        typer.Option("--generate-rows", min=0, help="Instruction data: prompts answered and scored (BLEU, chrF)."),
    ] = 200,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max-new-tokens", min=1, help="Instruction data: longest answer (default serve.max_new_tokens).")
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Judge a model on data without updating it: a table and JSON of its metrics (BLEU, chrF and
    exact match too for a language model on prompt/response data)."""
    from lifelong.config import load_config
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    cfg = load_config(config, overrides or [])
    Registry(Storage(cfg.storage.root)).check_ref(model)
    quiet(cfg.storage.root, "evaluate")
    from lifelong.evaluate import evaluate_model
    from lifelong.runtime import connect

    connect(address or cfg.ray.address, cfg.ray.num_cpus)
    result = evaluate_model(cfg, model, data, generate_rows=generate_rows, max_new_tokens=max_new_tokens)
    table = Table(title=f"{result.model} on {result.data.source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"data: {result.data.summary()}")
    if confusion_png:
        if result.confusion is None:
            raise LifelongError(f"--confusion-matrix: {result.model} is a {result.task} model, not a classifier")
        from lifelong.tasks.classify import confusion_png as draw

        draw(result.confusion, result.labels, confusion_png, title=f"{result.model} on {result.data.source}")
        console.print(f"confusion matrix: {confusion_png}")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"written: {json_out}")
    else:  # on the console the files are counted, not listed (--json FILE has each with its hash)
        say(json.dumps(result.to_dict(per_file=False), indent=2))


@app.command()
def predict(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION or NAME@ALIAS of a classifier (text or images)")],
    data: Annotated[str, typer.Argument(help="Data to score: a file, directory or glob (Parquet, JSONL, CSV, images); a path or URI")],
    out: Annotated[str, typer.Argument(help="A new directory (or URI) for the Parquet files of predictions")],
    backend: Annotated[
        Optional[str], typer.Option("--backend", help="onnx, onnx-int8, torchscript or torch (default: onnx when exported, else torch).")
    ] = None,
    column: Annotated[
        Optional[str], typer.Option("--column", help="The text (or image) column (default: the one the version trained on).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per model call.")] = 64,
    root: RootOpt = "./lifelong-store",
    address: AddressOpt = None,
) -> None:
    """Score a data set with a registry version through Ray Data: every row, in order, with its
    prediction, confidence, probabilities, the model and version (or why it could not be scored)."""
    from lifelong.predict import check_request
    from lifelong.predict import predict as predict_rows
    from lifelong.runtime import connect

    request = check_request(root, ref, data, out, backend, column)  # a wrong reference, DATA or OUT: one message, before Ray starts
    quiet(root, "predict")
    connect(address)
    report = predict_rows(request, batch_size)
    table = Table(title=f"{report.model}:{report.version} ({report.backend}) on {data}")
    table.add_column("prediction")
    table.add_column("rows", justify="right")
    for label, count in report.predicted.items():
        table.add_row(label, str(count))
    for reason, count in report.errors.items():
        table.add_row(f"[red]not scored[/]: {escape(reason)}", str(count))
    console.print(table)
    console.print(f"{report.rows} row(s) written to {report.out}")


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION or NAME@ALIAS of the version to export")],
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also build the int8 variant (classification; gated on accuracy).")] = True,
    torchscript: Annotated[
        bool,
        typer.Option("--torchscript", help="Also trace a TorchScript module (classifiers, parity-checked; serve.backend=torchscript)."),
    ] = False,
    tolerance: Annotated[
        Optional[float], typer.Option("--tolerance", help="Max |ONNX - PyTorch| logit difference (default: export.parity_tolerance).")
    ] = None,
    max_drop: Annotated[
        Optional[float], typer.Option("--max-accuracy-drop", help="Max int8 accuracy drop as a fraction (0.01 = 1 point).")
    ] = None,
    data: Annotated[
        Optional[str], typer.Option("--data", help="Labelled data for the int8 gate (default: the version's validation split).")
    ] = None,
    root: RootOpt = "./lifelong-store",
    address: AddressOpt = None,
) -> None:
    """Write ONNX (a gated int8 variant, TorchScript with --torchscript) into a registry version; parity goes on its card."""
    from lifelong.config import DataConfig, ExportSection
    from lifelong.export import export_formats, export_version, validation_rows

    registry = _registry(root)
    resolved = registry.resolve(ref, weights=False)
    if resolved.name is None:
        raise LifelongError(f"'{ref}' is a directory, not a registry reference: register it first")
    card = resolved.card
    cfg = ExportSection(**{k: v for k, v in {"parity_tolerance": tolerance, "int8_max_accuracy_drop": max_drop}.items() if v is not None})
    asked = export_formats(card.task, int8, torchscript)
    formats = tuple(f for f in asked if f not in card.exports)
    if not formats:  # before any data is read for a gate that would not run
        raise LifelongError(f"{resolved.ref} already has {', '.join(asked)}; versions are immutable")
    rows = None
    quiet(root, "export")
    if "onnx-int8" in formats:
        from lifelong.runtime import connect

        connect(address)
        recorded = card.data_config
        if not data and not recorded.get("path"):
            raise LifelongError(f"{resolved.ref} records no training data: pass --data (labelled rows) for the int8 accuracy gate")
        data_cfg = DataConfig(**{"label_column": "label", "labels": card.labels, **recorded, "path": recorded.get("path") or data})
        rows = validation_rows(data_cfg, registry.storage, cfg.eval_rows, path=data)
    result = export_version(registry, resolved.name, resolved.version, cfg, rows, formats)
    for fmt, record in result.records.items():
        shown = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        console.print(f"{resolved.ref} {fmt}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for fmt, reason in result.refused.items():
        raise LifelongError(f"{resolved.ref} {fmt}: {reason}")


@app.command()
def serve(
    config: ConfigArg,
    overrides: OverridesArg = None,
    address: AddressOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once deployed (the app keeps running on the cluster).")] = False,
) -> None:
    """Serve the version serve.alias points at over HTTP; swap live when the alias moves."""
    import time

    from lifelong.commands import serve as deploy

    cfg = deploy(config, overrides or [], address)
    if detach:
        return
    console.print("following the alias; Ctrl-C stops serving")
    from ray import serve as ray_serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.delete(cfg.serve_app_name)


@app.command()
def ui(
    root: RootOpt = "./lifelong-store",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The port on 127.0.0.1.")] = 8270,
    token_file: Annotated[
        Optional[Path], typer.Option("--token-file", help="A file holding the token that promote and rollback ask for (else read-only).")
    ] = None,
    endpoint: Annotated[
        Optional[str], typer.Option("--endpoint", help="A serving endpoint (http://HOST:PORT) whose /v1/model the dashboard shows.")
    ] = None,
) -> None:
    """A read-only web dashboard of the store on loopback: models, streams, sweeps, the live endpoint."""
    from lifelong.ui import serve as serve_ui

    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise LifelongError(f"--endpoint {endpoint!r}: give an http:// or https:// URL")
    serve_ui(root, "127.0.0.1", port, token_file, endpoint)


# --- models ----------------------------------------------------------------------------------
def _registry(root: str):
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    return Registry(Storage(root))


@models_app.command("list")
def models_list(root: RootOpt = "./lifelong-store") -> None:
    """Every model, its versions, their key metrics and aliases."""
    registry = _registry(root)
    table = Table(title=f"models in {registry.storage.root_uri}")
    for col in ("model", "version", "task", "created", "metrics", "aliases"):
        table.add_column(col)
    for name in registry.models():
        aliases = registry.aliases(name)
        for version in registry.versions(name):
            card = registry.card(name, version)
            names = ", ".join(a for a, p in sorted(aliases.items()) if p["version"] == version)
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(card.metrics.items()) if k.startswith("val_"))
            table.add_row(name, str(version), card.task, card.created_at[:19], metrics, names)
    console.print(table)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME@ALIAS or NAME:VERSION")], root: RootOpt = "./lifelong-store") -> None:
    """A version's card (JSON) and the alias history of its model."""
    registry = _registry(root)
    resolved = registry.resolve(ref, weights=False)
    if resolved.name is None:
        raise LifelongError(f"'{ref}' is a directory, not a registry reference")
    print(
        json.dumps(
            {
                "card": resolved.card.model_dump(mode="json", exclude_unset=True),
                "aliases": registry.aliases(resolved.name),
                "history": registry.history(resolved.name),
            },
            indent=2,
            default=str,
        )
    )


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) to point the alias at")],
    alias: Annotated[str, typer.Option("--alias", help="The alias to move.")] = "champion",
    reason: Annotated[str, typer.Option("--reason")] = "",
    root: RootOpt = "./lifelong-store",
) -> None:
    """Move an alias (default: champion) to a version, atomically; the move is logged."""
    registry = _registry(root)
    resolved = registry.resolve(ref, weights=False)
    if resolved.name is None:
        raise LifelongError(f"'{ref}' is a directory, not a registry reference")
    event = registry.move_alias(resolved.name, alias, resolved.version, reason=reason or "promoted by hand")
    console.print(f"{resolved.name}@{alias}: {event['previous']} → {event['version']}")


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="The model name")],
    alias: Annotated[str, typer.Option("--alias")] = "champion",
    root: RootOpt = "./lifelong-store",
) -> None:
    """Move an alias back to the version it held before its latest promotion."""
    event = _registry(root).rollback(name, alias)
    console.print(f"{name}@{alias}: rolled back {event['previous']} → {event['version']}")


# --- data ------------------------------------------------------------------------------------
@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Argument(help="Directory to write corpus.jsonl and topics.jsonl into")] = Path("data/demo"),
    rows: Annotated[int, typer.Option(help="Rows of the labelled topic set")] = 1200,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write the demo data: a pretraining corpus (CPython docs), a synthetic topic set and synthetic instructions."""
    from lifelong.synth import write_instruction_dataset, write_text_corpus, write_topic_dataset

    n_corpus = write_text_corpus(out / "corpus.jsonl")
    n_topics = write_topic_dataset(out / "topics.jsonl", rows, seed)
    n_sft = write_instruction_dataset(out / "instructions.jsonl", rows, seed)
    console.print(
        f"wrote {out / 'corpus.jsonl'} ({n_corpus} rows), {out / 'topics.jsonl'} ({n_topics} rows, synthetic) "
        f"and {out / 'instructions.jsonl'} ({n_sft} prompt/response rows, synthetic)"
    )


@data_app.command("stream")
def data_stream(
    out: Annotated[Path, typer.Argument(help="Directory to write window-000/, window-001/, … into")] = Path("data/stream"),
    windows: Annotated[int, typer.Option(min=1, help="Number of windows")] = 4,
    rows: Annotated[int, typer.Option(min=4, help="Rows per window")] = 400,
    files: Annotated[int, typer.Option(min=1, help="Files per window (JSONL, CSV and Parquet in turn)")] = 2,
    classes: Annotated[int, typer.Option(min=1, max=4, help="Classes per window (4: no class drift)")] = 2,
    new_vocab: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of each class's words new in each window")] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a SYNTHETIC labelled text stream with drift, as windows of files to drop into a landing zone."""
    from lifelong.synth import write_stream

    dirs = write_stream(out, windows, rows, files, seed, classes, new_vocab)
    console.print(
        f"wrote {len(dirs)} windows of {rows} rows under {out} (synthetic; {classes} of 4 classes per window, "
        f"{new_vocab:.0%} new words per class per window); copy them into the landing zone one at a time"
    )


@data_app.command("doc-stream")
def data_doc_stream(
    out: Annotated[Path, typer.Argument(help="Directory to write window-000/, window-001/, … into")] = Path("data/doc-stream"),
    windows: Annotated[int, typer.Option(min=1, max=4, help="Number of windows (one part of the docs each)")] = 4,
    files: Annotated[int, typer.Option(min=1, help="Files per window (JSONL, CSV and Parquet in turn)")] = 2,
    max_rows: Annotated[int | None, typer.Option(min=1, help="At most this many paragraphs per window")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a REAL text stream for continual pretraining: CPython's documentation, one part per window."""
    from lifelong.synth import DOC_PARTS, write_doc_stream

    dirs = write_doc_stream(out, windows, files, max_rows, seed)
    parts = ", ".join(f"{d.name}: {part}" for d, part in zip(dirs, DOC_PARTS))
    console.print(
        f"wrote {len(dirs)} windows of CPython documentation paragraphs under {out} ({parts}); "
        "copy them into the landing zone one at a time"
    )


@data_app.command("instruction-stream")
def data_instruction_stream(
    out: Annotated[Path, typer.Argument(help="Directory to write window-000/, window-001/, … into")] = Path("data/instruction-stream"),
    windows: Annotated[int, typer.Option(min=1, help="Number of windows")] = 2,
    rows: Annotated[int, typer.Option(min=4, help="Prompt/response rows per window")] = 400,
    files: Annotated[int, typer.Option(min=1, help="Files per window (JSONL, CSV and Parquet in turn)")] = 2,
    topics: Annotated[int, typer.Option(min=1, max=4, help="Topics asked about per window (4: no drift)")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a SYNTHETIC instruction stream (prompt/response rows, new topics per window) for continual fine-tuning."""
    from lifelong.synth import write_instruction_stream

    dirs = write_instruction_stream(out, windows, rows, files, topics, seed)
    console.print(
        f"wrote {len(dirs)} windows of {rows} prompt/response rows under {out} (synthetic; {topics} of 4 topics per window); "
        "copy them into the landing zone one at a time"
    )


@data_app.command("image-stream")
def data_image_stream(
    out: Annotated[Path, typer.Argument(help="Directory to write window-000/<digit>/*.png, window-001/, … into")] = Path("data/digits"),
    windows: Annotated[int, typer.Option(min=1, max=10, help="Number of windows")] = 3,
    classes: Annotated[int, typer.Option(min=1, max=10, help="Digits per window (windows x classes <= 10)")] = 2,
    size: Annotated[int, typer.Option(min=8, max=512, help="Width and height of each PNG, in pixels")] = 32,
    per_class: Annotated[Optional[int], typer.Option(min=1, help="Images per digit (default: all, about 180)")] = None,
    seed: Annotated[int, typer.Option(help="Which images, with --per-class")] = 0,
) -> None:
    """Write REAL handwritten digits (scikit-learn's 8x8 set, upscaled PNGs in class folders) as class-incremental windows."""
    from lifelong.synth import write_digit_stream

    if windows * classes > 10:
        raise LifelongError(f"--windows {windows} x --classes {classes} needs {windows * classes} digits; there are 10")
    dirs = write_digit_stream(out, windows, classes, size, per_class, seed)
    images = sum(1 for d in dirs for _ in d.glob("*/*.png"))
    console.print(
        f"wrote {len(dirs)} windows of {classes} digits ({images} PNG images, {size}x{size} greyscale, real handwritten digits "
        f"from scikit-learn) under {out}: window-000 holds digits 0-{classes - 1}, one folder per digit"
    )


class _RunByDefault(TyperGroup):
    """`lifelong continual CONFIG` runs cycles; `report`, `requeue` and `ledger` are sub-commands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


continual_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Keep the champion learning from a landing zone: cycles of scan → retrain (+ replay) → gates → promote.",
)
app.add_typer(continual_app, name="continual")


@continual_app.command("run", context_settings={"allow_interspersed_args": True})
def continual_run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    address: AddressOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Run one cycle and exit (cron, a Ray job).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Train on what is pending even below continual.min_new_rows.")] = False,
) -> None:
    """Cycles on the landing zone (the default: `lifelong continual CONFIG`). A failed cycle is
    reported and retried with backoff; Ctrl-C stops."""
    from lifelong.commands import continual

    continual(config, overrides or [], address, once, force)


@continual_app.command("report")
def continual_report(
    config: ConfigArg,
    overrides: OverridesArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write report.json and the plots.")] = None,
) -> None:
    """The continual-learning metrics (the accuracy or perplexity matrix, ACC/BWT/FWT/forgetting) as text, JSON and PNG."""
    from lifelong.config import load_config
    from lifelong.continual.report import write_report

    report = write_report(load_config(config, overrides or []), out)
    console.print(report.text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"written: {report.json_path}, {report.matrix_png}, {report.metrics_png}", soft_wrap=True)


@continual_app.command("requeue")
def continual_requeue(
    config: ConfigArg,
    overrides: OverridesArg = None,
    content: Annotated[
        Optional[list[str]], typer.Option("--hash", help="A quarantined file's content hash (or its first 12+ characters); repeatable.")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every quarantined and missing file.")] = False,
) -> None:
    """Put quarantined files back to pending, to be checked again (by the next cycle, under the
    config as it is now): after fixing a config (labels, columns) or a cause of failure."""
    from lifelong.config import load_config

    cfg = load_config(config, overrides or [])
    if bool(content) == everything:
        raise LifelongError("name what to requeue: --hash HASH (repeatable) or --all")
    ledger, storage = _ledger(cfg)
    with storage.lock(f"streams/{ledger.stream}/cycle"):  # not while a cycle runs
        hashes = None if everything else [_full_hash(ledger, h) for h in content]
        changed = ledger.requeue(hashes)
    for r in changed:
        console.print(
            f"requeued {r.path} ({r.sha256[:12]}…), was {r.requeued_from['state']}: {r.requeued_from['reason']}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"{len(changed)} file(s) pending again in stream '{ledger.stream}'; the next cycle checks them")


@continual_app.command("ledger")
def continual_ledger(
    config: ConfigArg,
    overrides: OverridesArg = None,
    state: Annotated[
        Optional[str], typer.Option("--state", help="Only files in this state: pending, consumed, quarantined, superseded, missing.")
    ] = None,
) -> None:
    """Every file the stream's landing zone ever received: its state, rows, drops and why."""
    from lifelong.config import load_config
    from lifelong.continual.ledger import STATES

    if state is not None and state not in STATES:
        raise LifelongError(f"--state {state!r}: use one of {', '.join(STATES)}")
    ledger, _ = _ledger(load_config(config, overrides or []))
    records = [r for r in ledger.records() if state is None or r.state == state]
    table = Table(title=f"ledger of stream '{ledger.stream}' ({len(records)} file(s))")
    for col in ("content", "path", "state", "rows", "dropped rows", "by / why"):
        table.add_column(col, overflow="fold")
    for r in records:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(r.check.dropped.items())) if r.check else ""
        table.add_row(r.sha256[:12], r.path, r.state, str(r.rows) if r.check else "", dropped, r.consumed_by or r.reason or "")
    console.print(table)


def _ledger(cfg):
    from lifelong.continual.cycle import stream_name
    from lifelong.continual.ledger import Ledger
    from lifelong.storage import Storage

    storage = Storage(cfg.storage.root)
    return Ledger(storage, stream_name(cfg)), storage


def _full_hash(ledger, prefix: str) -> str:
    matches = [r.sha256 for r in ledger.records() if r.sha256.startswith(prefix.strip().lower())]
    if len(prefix.strip()) < 12 or len(matches) != 1:
        raise LifelongError(
            f"--hash {prefix!r} names {len(matches)} file(s) of stream '{ledger.stream}': give 12 or more "
            "characters of one content hash (`lifelong continual ledger CONFIG` lists them)"
        )
    return matches[0]


DashboardOpt = Annotated[
    Optional[str],
    typer.Option("--address", help="The head's dashboard, e.g. http://HEAD:8265 (else RAY_ADDRESS, else http://127.0.0.1:8265)."),
]
JobIdArg = Annotated[str, typer.Argument(help="A job's submission id (raysubmit_...).")]


@app.command(context_settings={"allow_interspersed_args": True, "ignore_unknown_options": True})
def submit(
    job: Annotated[str, typer.Argument(help="A script in jobs/: pretrain, finetune, tune, continual, serve, quickstart.")],
    config: ConfigArg,
    overrides: OverridesArg = None,
    address: DashboardOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Stream the job's logs until it ends and exit with its status.")] = True,
    submission_id: Annotated[Optional[str], typer.Option("--id", help="The job's submission id (default: generated).")] = None,
    project: Annotated[
        Optional[Path], typer.Option("--project", help="The project directory that travels (default: the current directory).")
    ] = None,
    carry_data: Annotated[
        bool,
        typer.Option(
            "--carry-data",
            help="Upload the local files the config names (data.path, model.tokenizer, an init_from directory) with the job "
            "even where .gitignore, .rayignore or the excludes leave them behind (never files that look like secrets).",
        ),
    ] = False,
) -> None:
    """Run jobs/JOB.py CONFIG on a Ray cluster: the project is its working directory; logs stream here.
    The job's own flags pass through: `lifelong submit continual CONFIG --once`, `... tune CONFIG --promote`."""
    from lifelong.submit import submit as submit_job

    job_id, status = submit_job(
        job, config, overrides or [], address, project=project, carry_data=carry_data, wait=wait, submission_id=submission_id
    )
    console.print(f"{job_id}: {status}")
    if wait and status != "SUCCEEDED":
        sys.exit(1)


@jobs_app.command("list")
def jobs_list(address: DashboardOpt = None) -> None:
    """The cluster's jobs, newest first."""
    from datetime import datetime

    from lifelong.submit import _call, client, resolve_address

    address = resolve_address(address)
    jobs = client(address)

    def stamp(ms):
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""

    rows = [
        (info.submission_id or info.job_id or "", str(info.status), stamp(info.start_time), stamp(info.end_time), info.entrypoint)
        for info in sorted(_call(address, jobs.list_jobs), key=lambda i: i.start_time or 0, reverse=True)
    ]
    table = Table(title=f"jobs on {address}")
    # Ids and statuses are never cut (they are copied into `jobs logs`, grepped); the rest folds.
    for i, col in enumerate(("id", "status")):
        table.add_column(col, no_wrap=True, min_width=max((len(r[i]) for r in rows), default=0))
    for col in ("started", "ended", "entrypoint"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobIdArg,
    address: DashboardOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """A job's driver output."""
    from lifelong.submit import _call, client, resolve_address
    from lifelong.submit import follow as follow_job

    jobs = client(address)
    if follow:
        status = follow_job(jobs, resolve_address(address), job_id)
        console.print(f"{job_id}: {status}")
    else:
        sys.stdout.write(_call(resolve_address(address), jobs.get_job_logs, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: DashboardOpt = None) -> None:
    """Ask a running job to stop."""
    from lifelong.submit import _call, client, resolve_address

    stopped = _call(resolve_address(address), client(address).stop_job, job_id)
    console.print(f"{job_id}: {'stop requested' if stopped else 'was not running'}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # Standalone mode: usage errors print their message and exit 2, as click does.
        app(args=argv)
    except LifelongError as e:
        # One line per line (logs get grepped); the message as written: `[haproxy]` is not markup.
        errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a store, a data path or a cluster cannot be reached: what and where, not a traceback
        hint = (
            "check --address / RAY_ADDRESS, that the cluster is up, and RAY_AUTH_TOKEN if it requires a token"
            if isinstance(e, ConnectionError) and "Ray cluster" in str(e)
            else "check that the storage root, data paths and their endpoints are right and reachable"
        )
        errors.print(f"[bold red]error:[/] {type(e).__name__}: {escape(first_line(e, 500))} ({hint})", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
