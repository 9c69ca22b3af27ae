"""Each job as every entry point runs it. `lifelong JOB CONFIG` (cli.py) and a Ray job script,
`python jobs/JOB.py CONFIG` (which `lifelong submit JOB` runs on the cluster), call the same
function here, and `lifelong submit` runs the same `check_config` before anything travels: a check
or a summary kept in one of them alone let the three disagree (a pretrain of a classifier's config,
refused by the CLI, ran as a fine-tune when submitted).
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from lifelong import notify
from lifelong.config import JobConfig, load_config
from lifelong.console import console, quiet
from lifelong.errors import LifelongError


def check_config(job: str, config_path: str | Path, config: JobConfig) -> None:
    """What a job refuses from its config alone, before Ray starts (or the job is submitted)."""
    from lifelong.tasks import task, with_capability

    if job == "pretrain" and not task(config.model.task).PRETRAINS:
        raise LifelongError(
            f"{config_path}: 'lifelong pretrain' trains a {' or '.join(with_capability('PRETRAINS'))} from scratch; "
            f"for model.task={config.model.task} use 'lifelong finetune'"
        )
    if job == "finetune" and not config.model.init_from:
        raise LifelongError(f"{config_path}: 'lifelong finetune' needs model.init_from (a registry reference or an HF directory)")
    if job == "tune" and not config.tune.space:
        raise LifelongError(
            f"{config_path}: tune.space is empty: add the keys to search, e.g. tune.space.train.lr={{loguniform: [1e-4, 1e-2]}}"
        )
    if job == "continual":
        from lifelong.continual.cycle import check_stream

        check_stream(config)


def _connect(config: JobConfig, address: str | None, dashboard: bool = False) -> str:
    from lifelong.runtime import connect

    s = config.scaling
    return connect(address or config.ray.address, config.ray.num_cpus, min_cpus=s.num_workers * s.cpus_per_worker, dashboard=dashboard)


def train(job: str, config_path: str | Path, overrides: list[str], address: str | None = None, resume: bool = False) -> None:
    """pretrain or finetune: train on Ray Train + DeepSpeed (or the warm actor), register, summarise."""
    config = load_config(config_path, overrides)
    check_config(job, config_path, config)
    notify.configure(config.notify)
    quiet(config.storage.root, f"{job}-{config.name}")
    from lifelong.train.driver import run_training  # torch, DeepSpeed, Ray Train: seconds; after the checks

    where = _connect(config, address)
    console.print(f"[bold]lifelong {job}[/] {config_path} on {where}")
    print_training_summary(run_training(config, resume=resume))


def print_training_summary(outcome, hint: bool = True) -> None:
    metrics = sorted(outcome.metrics.items())
    table = Table(title=f"registered {outcome.ref}", title_justify="left")
    for key, _ in metrics:
        table.add_column(key, justify="right")
    table.add_row(*(f"{value:.4g}" if isinstance(value, float) else str(value) for _, value in metrics))
    console.print(table)
    console.print(f"run: {outcome.run_path}  epochs: {outcome.epochs_run}")
    if hint:
        console.print(f"promote it with: lifelong models promote {outcome.ref} --alias champion")


def tune(config_path: str | Path, overrides: list[str], address: str | None = None, resume: bool = False, promote: bool = False) -> None:
    """A sweep (Ray Tune + Optuna + ASHA); the best trial is registered; its table summarised."""
    from lifelong.storage import Storage
    from lifelong.tune import check_resumable, needs_state_api, run_sweep, sweep_name

    config = load_config(config_path, overrides)
    check_config("tune", config_path, config)
    check_resumable(Storage(config.storage.root), sweep_name(config), resume)  # before Ray starts: a typo more often than not
    notify.configure(config.notify)
    quiet(config.storage.root, f"tune-{sweep_name(config)}")
    where = _connect(config, address, dashboard=needs_state_api(config))
    console.print(f"[bold]lifelong tune[/] {config_path}{' --resume' if resume else ''} on {where}")
    print_sweep_summary(run_sweep(config, resume=resume, promote=promote))


def print_sweep_summary(outcome) -> None:
    """The trials' table; an error when no trial finished (nothing was registered)."""
    table = Table(title=f"sweep {outcome.name}", show_header=True)
    for column in outcome.table.columns:
        table.add_column(str(column), justify="right" if outcome.table[column].dtype.kind in "fi" else "left")
    for row in outcome.table.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
    console.print(f"table: {outcome.csv}  curves: {outcome.plot}  sweep: {outcome.path}")
    if outcome.version is None:
        raise LifelongError(f"sweep {outcome.name}: no trial finished, so nothing was registered (see the errors in {outcome.csv})")
    ref = f"{outcome.model}:{outcome.version}"
    console.print(f"best trial {outcome.best['run']} ({outcome.best['params']}) registered as {ref} with alias {outcome.alias}")
    if outcome.alias != "champion":
        console.print(f"promote it with: lifelong models promote {ref} --alias champion")


def continual(config_path: str | Path, overrides: list[str], address: str | None = None, once: bool = False, force: bool = False) -> None:
    """Cycles on the landing zone: one with `once`, else a polling loop (Ctrl-C stops it)."""
    from lifelong.continual.cycle import check_continual
    from lifelong.continual.daemon import run_cycles

    config = load_config(config_path, overrides)
    check_continual(config)
    notify.configure(config.notify)
    quiet(config.storage.root, f"continual-{config.continual.stream or config.name}")
    where = _connect(config, address)
    console.print(
        f"[bold]lifelong continual[/] {config_path} on {where}: landing zone {config.continual.landing}"
        + ("" if once else f", polling every {config.continual.poll_interval_s:g} s (Ctrl-C stops)")
    )
    try:
        run_cycles(config, once=once, force=force, show=lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        console.print("stopped (an interrupted cycle carries on where it stopped next time)")


def serve(config_path: str | Path, overrides: list[str], address: str | None = None) -> JobConfig:
    """Deploy the app that follows serve.alias and say where it answers; it keeps running on Ray
    after this returns (the CLI then waits for Ctrl-C; a Ray job ends). Returns the config."""
    from lifelong.serve import check_servable, connect_for_serving, deploy, exposure_warning, haproxy_exposure, resolve_token

    config = load_config(config_path, overrides)
    check_servable(config)  # before starting Ray: a missing alias or export fails in a second
    resolve_token(config)
    notify.configure(config.notify)
    quiet(config.storage.root, f"serve-{config.serve_app_name}")
    where = connect_for_serving(config, address)
    url = deploy(config)
    ingress = " through HAProxy" if config.serve.ingress == "haproxy" else ""
    console.print(f"[bold]lifelong serve[/] {config.served_model}@{config.serve.alias} on {where}{ingress}")
    console.print(f"  {url}/v1/predict  {url}/v1/generate  {url}/v1/model  {url}/healthz  docs: {url}/docs")
    for warning in filter(None, (exposure_warning(config), haproxy_exposure(config))):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    return config
