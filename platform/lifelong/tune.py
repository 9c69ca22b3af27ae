"""Hyperparameter sweeps: Ray Tune (Optuna TPE or random, ASHA) over the DeepSpeed trainer.

    driver: config (space validated at load) → data + tokenizer once (prepare_run)
      Tuner(run_trial, OptunaSearch|random, ASHA on `epoch`, RunConfig(name=<sweep>, <root>/tune))
        one-worker trial (the worker's CPUs/GPU, actor reused between trials): base config +
          params → the training loop itself in the trial's process, reporting and
          checkpointing through Tune (under <root>/tune/<sweep>/trial-<id>, resumed from there)
        multi-worker trial (0.01 CPU): → TorchTrainer named <sweep>-<trial id> under
          <root>/runs (resumes from its checkpoints), TuneReportCallback
      ResultGrid → table + trials.csv + curves.png → best trial's best checkpoint → registry
      version (alias challenger, or champion with --promote), its card naming the sweep and params

A trial that is a whole `TorchTrainer.fit()` starts a Train controller, a worker group and
data-split coordinators, each a process importing torch: about a minute on 2 cores before it
trains for seconds. One-worker trials (the common case for small models) skip all of that.
The Train V2 pattern (../shared/REFERENCE.md) stays for multi-worker trials: a function
trainable builds the TorchTrainer with a deterministic name so that a restored sweep resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator, SearchGenerator

from lifelong import metrics as prometheus
from lifelong import notify, tracking
from lifelong.config import JobConfig, set_dotted, validate_config
from lifelong.console import SweepBar, detail, say, sweep_bar
from lifelong.errors import ConfigError, LifelongError
from lifelong.runtime import release_orphaned_workers, release_when_settled, reserved_groups
from lifelong.storage import Storage, local_cache_dir

TRIAL_DRIVER_CPU = 0.01  # a trial's own function needs a non-zero share to be scheduled


def sweep_name(config: JobConfig) -> str:
    return config.tune.sweep_name or f"{config.name}-sweep"


def param_space(config: JobConfig) -> dict:
    space = {}
    for key, spec in config.tune.space.items():
        kind, args = next(iter(spec.items()))
        space[key] = {
            "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a),
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
        }[kind](args)
    if not space:
        raise LifelongError("tune.space is empty: add at least one key to search, e.g. tune.space={train.lr: {loguniform: [1e-4, 1e-2]}}")
    return space


def trial_config(base: dict, params: dict, run_name: str, tokenizer: str | None) -> JobConfig:
    """The base config (as JSON) with the trial's parameters set on their dotted keys."""
    raw = set_dotted(copy.deepcopy(base), params)
    raw["run_name"] = run_name
    if tokenizer and not raw["model"].get("init_from"):  # the sweep's tokenizer: a local path or a storage URI
        raw["model"]["tokenizer"] = tokenizer
    return validate_config(raw, source="a sweep trial")


def run_trial(params: dict, base: dict, sweep: str, data) -> None:
    """One trial: the DeepSpeed training loop, in this process for one worker (`in_trial`), else
    a Ray Train run whose epochs reach Tune through TuneReportCallback.

    `data` is the sweep's prepared data (shared), or None when the trial's parameters change
    the data pipeline and it must prepare its own.
    """
    from lifelong.train.driver import build_trainer, loop_config, prepare_run
    from lifelong.train.loop import train_in_trial

    run_name = trial_run_name(sweep, tune.get_context().get_trial_id())
    config = trial_config(base, params, run_name, data.tokenizer.location if data else None)
    prep = prepare_run(config, data)
    tracking.begin(config, run_name, parent=sweep)  # MLflow: a child of the sweep's run
    every = config.tune.report_every_steps
    if in_trial(config):
        train_in_trial(loop_config(prep, every), {"train": prep.data.train_ds, "validation": prep.data.val_ds}, prep.gpu)
        return
    trainer = build_trainer(prep, run_name, callbacks=[TuneReportCallback()], report_every_steps=every)
    trainer.fit()  # raises on failure: Tune records the trial as errored with the reason


def in_trial(config: JobConfig) -> bool:
    """Whether trials run the loop in their own process: one worker each, and a space that
    does not change the scaling."""
    return config.scaling.num_workers == 1 and not any(key.startswith("scaling.") for key in config.tune.space)


def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"  # the parameters are in its params.json and the sweep's table


def trial_run_name(sweep: str, trial_id: str) -> str:
    # Deterministic: a resumed sweep re-creates the trainer under the same name, which resumes it.
    return f"{sweep}-{trial_id}"


# Keys whose values change what the trials read or how it is tokenized: searching any of them
# means each trial prepares its own data instead of sharing the sweep's.
DATA_KEYS = ("data.", "storage.", "model.max_length", "model.tokenizer", "model.vocab_size", "model.task", "model.init_from")


def shares_data(config: JobConfig) -> bool:
    return not any(key.startswith(prefix) for key in config.tune.space for prefix in DATA_KEYS)


class FailureBudget(tune.Callback, tune.Stopper):
    """Stop the sweep once more than `limit` trials have errored."""

    def __init__(self, limit: int):
        self.limit, self.failed = limit, 0

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.failed > self.limit


class GiveBackWorkers(tune.Callback):
    """Between trials, remove the worker reservations of trials whose Ray Train controller died
    with its trial (runtime.release_orphaned_workers): the next trials need those CPUs."""

    def on_trial_start(self, iteration, trials, trial, **info):
        release_orphaned_workers("a trial that ended")

    on_trial_complete = on_trial_error = on_trial_start


class Progress(tune.Callback):
    """The sweep's story on the driver: each trial's outcome on the console, its start and
    epochs in the log file, and the sweep's bar (on a terminal) counting them."""

    def __init__(self, config: JobConfig):
        self.metric, self.epochs, self.keys = config.tune.metric, config.train.epochs, list(config.tune.space)
        self.sweep, self.mode, self.best = sweep_name(config), config.tune.mode, None
        self.trials = {"running": 0, "finished": 0, "stopped": 0, "errored": 0}  # the bar's and lifelong_sweep_trials

    def _count(self, state: str) -> None:
        if state != "running":
            self.trials["running"] = max(0, self.trials["running"] - 1)
        self.trials[state] += 1
        for key, count in self.trials.items():
            prometheus.record("lifelong_sweep_trials", count, sweep=self.sweep, state=key)
        sweep_bar().show(self.trials, self.best)

    def _params(self, trial) -> str:
        return ", ".join(f"{k.split('.')[-1]}={_short(trial.config.get(k))}" for k in self.keys)

    def on_trial_start(self, iteration, trials, trial, **info):
        detail(f"[lifelong] trial {trial.trial_id} started ({self._params(trial)})")
        self._count("running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else value
        detail(f"[lifelong] trial {trial.trial_id} epoch {_when(result)}/{self.epochs} {self.metric} {shown}")
        if isinstance(value, (int, float)) and (self.best is None or (value < self.best if self.mode == "min" else value > self.best)):
            self.best = value
            sweep_bar().show(self.trials, self.best)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = last.get("progress", last.get("epoch", 0))
        finished = done >= self.epochs
        how = "finished" if finished else f"stopped early by the scheduler after epoch {_when(last)}"
        value = last.get(self.metric)
        shown = f", {self.metric} {value:.4g}" if isinstance(value, (int, float)) else ""
        say(f"[lifelong] trial {trial.trial_id} {how} ({self._params(trial)}){shown}")
        self._count("finished" if finished else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"[lifelong] trial {trial.trial_id} errored: {_last_line(trial.get_error() or '')}")
        self._count("errored")


def _when(result: dict):
    """Epochs trained: 2, or 1.25 for a report a quarter into the second epoch."""
    progress = result.get("progress")
    return result.get("epoch") if progress is None or float(progress).is_integer() else round(progress, 2)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class SweepOutcome:
    name: str
    model: str
    path: str
    table: pd.DataFrame
    csv: str
    plot: str
    best: dict | None
    version: int | None
    alias: str | None
    results: object = dataclasses.field(default=None, repr=False)  # Tune's ResultGrid, every trial's history


def trial_resources(config: JobConfig) -> dict:
    """What a trial's own process holds: the worker's CPUs (and GPU) when it trains in itself,
    else a token share (its TorchTrainer reserves the workers)."""
    if not in_trial(config):
        return {"cpu": TRIAL_DRIVER_CPU}
    from lifelong.train.driver import use_gpu

    resources = {"cpu": config.scaling.cpus_per_worker}
    if use_gpu(config):
        resources["gpu"] = config.scaling.gpus_per_worker
    return resources


def max_concurrency(config: JobConfig) -> int:
    """Trials that fit the cluster at once: each needs its workers' CPUs, plus one CPU for Ray
    Data when it prepares its own data (training workers holding every CPU starve its reads)."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    per_trial = config.scaling.num_workers * config.scaling.cpus_per_worker + (0 if in_trial(config) else TRIAL_DRIVER_CPU)
    if not shares_data(config):
        per_trial += 1
    return max(1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial))


def check_schedule(config: JobConfig) -> None:
    """ASHA's first rung must come within a trial's epochs (its max_t)."""
    t = config.tune
    if t.scheduler == "asha" and t.grace_period > config.train.epochs:
        raise ConfigError(
            f"tune.grace_period is {t.grace_period:g} epochs but a trial trains train.epochs={config.train.epochs}: "
            "ASHA stops trials no earlier than grace_period, so lower it to train.epochs or less"
        )


def check_resumable(storage: Storage, name: str, resume: bool) -> None:
    exists = tune.Tuner.can_restore(storage.path("tune", name), storage_filesystem=storage.fs)
    path = storage.uri_of("tune", name)
    if resume and not exists:
        raise LifelongError(f"no sweep to resume at {path}: run without --resume to start it")
    if not resume and exists:
        raise LifelongError(f"sweep '{name}' already exists at {path}: resume it with --resume, or set tune.sweep_name")


def needs_state_api(config: JobConfig) -> bool:
    """Ray Train frees the workers of a trial stopped early only if it can see (through the
    dashboard's state API) that the trial's controller is gone; without it their CPUs stay
    reserved and later trials wait for them until they time out. One-worker trials, which
    train in their own process, do not need it, nor does a sweep that stops no trial early:
    an embedded Ray then starts without its dashboard."""
    return config.tune.scheduler != "none" and not in_trial(config)


def check_state_api(config: JobConfig) -> None:
    if not needs_state_api(config):
        return
    from ray.util.state import list_nodes

    try:
        # This driver's cluster, named: left to guess, Ray picks any Ray on the machine, or none
        # when it finds several ("Found multiple active Ray instances").
        list_nodes(address=getattr(ray.get_runtime_context(), "gcs_address", None), limit=1, timeout=10)
    except Exception as e:  # no dashboard: its address is missing, refused or not answering
        raise LifelongError(
            "early stopping (tune.scheduler=asha) needs the Ray dashboard's state API, which this cluster does not serve "
            f"({_last_line(e)}): start the cluster with its dashboard (`ray start --head` has it by default) or set tune.scheduler=none"
        ) from e


class SavedWhole:
    """A search algorithm whose saved state appears in the sweep's directory only as whole files.

    Tune saves the searcher's state into its staging directory (a temporary file renamed into
    place) while its background thread may still be copying that directory to the sweep's
    storage from the last save; a copy that lists the temporary file and opens it after the
    rename fails ("Saving experiment state to storage ... failed", a traceback on the console,
    and that snapshot not stored). Forced saves come one after another when trials checkpoint
    often (one per trial checkpoint with checkpoint.num_to_keep 1). Here the state is written
    in a scratch directory beside it and each finished file is renamed in: a copy sees the old
    file or the new one, never a name that vanishes.
    """

    def save_to_dir(self, dirpath: str, session_str: str = "default"):
        scratch = tempfile.mkdtemp(prefix=".searcher-", dir=os.path.dirname(os.path.abspath(dirpath)))
        try:
            super().save_to_dir(scratch, session_str)
            for name in os.listdir(scratch):
                os.replace(os.path.join(scratch, name), os.path.join(dirpath, name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class WholeSearchGenerator(SavedWhole, SearchGenerator):
    """Tune's wrapper of a Searcher (Optuna's), saved whole."""


class WholeVariantGenerator(SavedWhole, BasicVariantGenerator):
    """Tune's random search, saved whole."""


def search_algorithm(config: JobConfig, concurrency: int):
    """Optuna's TPE or random search, `concurrency` trials at a time at most."""
    t = config.tune
    if t.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # Constant liar: a running trial counts as a bad result while it runs, so trials started
        # together do not all sample the same region; multivariate: one joint model of the space.
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.optuna_startup_trials, constant_liar=True, multivariate=True)
        # The wrapping Tune would do for max_concurrent_trials, done here to save it whole.
        search_alg = WholeSearchGenerator(ConcurrencyLimiter(OptunaSearch(metric=t.metric, mode=t.mode, sampler=sampler), concurrency))
    else:
        search_alg = WholeVariantGenerator(random_state=t.seed, max_concurrent=concurrency)
    return search_alg


def build_tuner(config: JobConfig, data, resume: bool) -> tune.Tuner:
    storage = Storage(config.storage.root)
    name = sweep_name(config)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=config.model_dump(mode="json"), sweep=name, data=data.for_trials() if shares_data(config) else None
        ),
        trial_resources(config),
    )
    if resume:  # run_sweep has checked that the sweep exists (or not) before preparing its data
        # Restores the searcher (Optuna's history) and the scheduler with the trials.
        return tune.Tuner.restore(
            storage.path("tune", name),
            trainable=trainable,
            storage_filesystem=storage.fs,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    t, ckpt = config.tune, config.train.checkpoint
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            # Epochs trained: whole ones, or fractional when trials also report inside epochs.
            time_attr="progress" if t.report_every_steps else "epoch",
            metric=t.metric,
            mode=t.mode,
            max_t=config.train.epochs,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
        )
    budget = FailureBudget(t.max_failed_trials)
    return tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            search_alg=search_algorithm(config, max_concurrency(config)),
            scheduler=scheduler,
            num_samples=t.num_samples,
            trial_dirname_creator=trial_dirname,
            reuse_actors=in_trial(config),  # the next trial starts in a process that has torch and DeepSpeed loaded
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.path("tune"),
            storage_filesystem=storage.fs,
            checkpoint_config=tune.CheckpointConfig(  # for trials that train in themselves; a TorchTrainer keeps its own
                num_to_keep=ckpt.num_to_keep,
                checkpoint_score_attribute=ckpt.score_attribute,
                checkpoint_score_order=ckpt.score_order,
            ),
            stop=budget,
            callbacks=[budget, Progress(config), GiveBackWorkers()],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=0,
        ),  # Progress tells the trials' story instead
    )


def epoch_ends(result) -> pd.DataFrame:
    """A trial's reports at the ends of its epochs: the ones that come with a checkpoint (a
    trial that also reports inside epochs, `tune.report_every_steps`, has others)."""
    history = result.metrics_dataframe
    if history is None or not len(history):
        return pd.DataFrame()
    return history[history["progress"] % 1 == 0] if "progress" in history else history


def best_result(results, config: JobConfig):
    """The trial whose best epoch-end metric is the best of the sweep (a report inside an epoch
    has no checkpoint to register), NaN and infinities left out; None when no trial has one."""
    t = config.tune
    scored = []
    for result in results:
        ends = epoch_ends(result)
        values = ends[t.metric].replace([math.inf, -math.inf], math.nan).dropna() if t.metric in ends else []
        if len(values):
            scored.append((values.min() if t.mode == "min" else values.max(), result))
    if not scored:
        return None
    return (min if t.mode == "min" else max)(scored, key=lambda pair: pair[0])[1]


def trials_table(results, config: JobConfig) -> pd.DataFrame:
    t = config.tune
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        ends = epoch_ends(result)  # what can be registered: a report inside an epoch has no checkpoint
        values = ends[t.metric].dropna() if t.metric in ends else pd.Series(dtype=float)
        best = (values.min() if t.mode == "min" else values.max()) if len(values) else float("nan")
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        status = "errored" if result.error else "finished"
        rows.append(
            {
                "trial": _trial_id(result),
                **{k: (result.config or {}).get(k) for k in t.space},  # None: errored before its first report
                f"best_{t.metric}": best,
                "epochs": epochs,
                **({"epochs_trained": float(history["progress"].max()) if "progress" in history else 0.0} if t.report_every_steps else {}),
                "stopped_early": bool(not result.error and epochs < config.train.epochs),
                "status": status,
                "error": _last_line(result.error) if result.error else "",
            }
        )
    return pd.DataFrame(rows)


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial-")


def _last_line(error) -> str:
    """The last line of an error (a remote traceback ends with the exception itself)."""
    text = str(error).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), "")[:300] if text else ""


def plot_curves(results, config: JobConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = config.tune.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        history = result.metrics_dataframe
        if history is None or metric not in history or "epoch" not in history:
            continue
        x = history["progress"] if "progress" in history else history["epoch"]  # fractional inside epochs
        ax.plot(x, history[metric], marker="o", label=_trial_id(result))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {sweep_name(config)}: {metric} per trial")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_sweep(config: JobConfig, resume: bool = False, promote: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep, write its table and plot, register the best trial's model."""
    from lifelong.registry import Registry
    from lifelong.train.driver import pin_init_from, prepare_data, prepare_run, register_best

    check_schedule(config)
    name = sweep_name(config)
    storage = Storage(config.storage.root)
    config = pin_init_from(config, Registry(storage))  # every trial starts from the same version
    check_resumable(storage, name, resume)
    check_state_api(config)
    # The sweep's data (and its tokenizer, trained once under runs/<sweep>/), shared by every
    # trial unless the space changes the data itself.
    sweep_config = config.model_copy(update={"run_name": name})
    data = prepare_data(sweep_config, storage, Registry(storage))
    prep = prepare_run(sweep_config, data)
    tokenizer = data.tokenizer.location
    say(
        f"[lifelong] sweep '{name}': {config.tune.num_samples} trials of {config.train.epochs} epochs, "
        f"{config.tune.search} search, scheduler {config.tune.scheduler}, up to {max_concurrency(config)} at once; "
        f"{'shared' if shares_data(config) else 'per-trial'} data ({data.train_examples} training examples)"
    )
    tracking.begin(config, name)  # MLflow: the sweep's parent run, before any trial
    before = reserved_groups()
    try:
        with SweepBar(name, config.tune.num_samples, config.tune.metric):
            results = build_tuner(config, data, resume).fit()
    finally:
        release_when_settled(before, f"a trial of sweep '{name}'")

    out_dir = Path(storage.path("tune", name)) if storage.is_local else local_cache_dir("tune", name)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(results, config)
    csv, plot = out_dir / "trials.csv", out_dir / "curves.png"
    table.to_csv(csv, index=False)
    plot_curves(results, config, plot)

    failed = int((table["status"] == "errored").sum()) if len(table) else 0
    if failed > config.tune.max_failed_trials:
        say(
            f"[lifelong] sweep '{name}' stopped: {failed} trials failed (tune.max_failed_trials={config.tune.max_failed_trials}); "
            f"trials it cut short count as stopped early; {len(table)} of {config.tune.num_samples} trials ran"
        )
    finished = [r for r in results if not r.error and r.metrics and config.tune.metric in r.metrics]
    best = best_result(results, config) if finished else None
    stopped = int(table["stopped_early"].sum()) if len(table) else 0
    trials = {"trials": len(table), "completed": len(table) - failed - stopped, "stopped_early": stopped, "errored": failed}
    if best is None:
        tracking.sweep(config, name, table, trials, None, None)
        notify.event("sweep.finished", config.notify, model=config.name, sweep=name, **trials, version=None, table=str(csv))
        return SweepOutcome(name, config.name, results.experiment_path, table, str(csv), str(plot), None, None, None, results)
    params = {k: best.config[k] for k in config.tune.space}
    run_name = trial_run_name(name, best.metrics["trial_id"])
    best_config = trial_config(config.model_dump(mode="json"), params, run_name, tokenizer)
    # A one-worker trial's checkpoints are its Tune result's; a multi-worker trial's are its run's.
    train_result = best if in_trial(config) else ray.train.Result.from_path(storage.path("runs", run_name), storage_filesystem=storage.fs)
    outcome = register_best(
        dataclasses.replace(prep, config=best_config),
        train_result,
        run_name,
        extra_card={"sweep": {"name": name, "params": params, "path": results.experiment_path}},
    )
    alias = "champion" if promote else "challenger"
    prep.registry.move_alias(config.name, alias, outcome.version, reason=f"best trial of sweep {name}")
    metric = config.tune.metric
    tracking.sweep(
        config,
        name,
        table,
        trials,
        {"run": run_name, "params": params, metric: best.metrics.get(metric)},
        f"{config.name}:{outcome.version}",
    )
    notify.event(
        "sweep.finished",
        config.notify,
        model=config.name,
        sweep=name,
        **trials,
        version=outcome.version,
        alias=alias,
        best={"run": run_name, "params": params, metric: best.metrics.get(metric)},
        table=str(csv),
    )
    return SweepOutcome(
        name,
        config.name,
        results.experiment_path,
        table,
        str(csv),
        str(plot),
        {"run": run_name, "params": params, "metrics": outcome.metrics},
        outcome.version,
        alias,
        results,
    )
