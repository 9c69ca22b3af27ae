"""Hyperparameter sweeps: Ray Tune (Optuna TPE or random, ASHA) over the DeepSpeed trainer.

    driver: config (space validated at load) → data + tokenizer once (prepare_run)
      Tuner(run_trial, OptunaSearch|random, ASHA on `epoch`, RunConfig(name=<sweep>, <root>/tune))
        trial (a Tune function, 0.01 CPU): base config + params → TorchTrainer named
          <sweep>-<trial id> under <root>/runs (resumes from its checkpoints), TuneReportCallback
      ResultGrid → table + trials.csv + curves.png → best trial's best checkpoint → registry
      version (alias challenger, or champion with --promote), its card naming the sweep and params

The Train V2 pattern (../shared/REFERENCE.md): `Tuner(trainer)` is gone; a function trainable
builds the TorchTrainer with a deterministic name so that a restored sweep resumes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from lifelong.config import JobConfig, validate_config
from lifelong.errors import LifelongError
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
        }[kind](args)
    if not space:
        raise LifelongError("tune.space is empty: add at least one key to search, e.g. tune.space={train.lr: {loguniform: [1e-4, 1e-2]}}")
    return space


def trial_config(base: dict, params: dict, run_name: str, tokenizer_dir: str | None) -> JobConfig:
    """The base config (as JSON) with the trial's parameters set on their dotted keys."""
    raw = _deep_copy(base)
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    raw["run_name"] = run_name
    if tokenizer_dir and not raw["model"].get("init_from"):
        raw["model"]["tokenizer"] = tokenizer_dir
    return validate_config(raw, source="a sweep trial")


def _deep_copy(obj):
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def run_trial(params: dict, base: dict, sweep: str, tokenizer_dir: str | None) -> None:
    """One trial: a full Ray Train + DeepSpeed run; epochs reach Tune through TuneReportCallback."""
    from lifelong.train.driver import build_trainer, prepare_run

    run_name = f"{sweep}-{tune.get_context().get_trial_id()}"
    config = trial_config(base, params, run_name, tokenizer_dir)
    prep = prepare_run(config, tokenizer_dir)
    trainer = build_trainer(prep, run_name, prep.storage.uri_of("runs"), callbacks=[TuneReportCallback()])
    trainer.fit()  # raises on failure: Tune records the trial as errored with the reason


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


@dataclass
class SweepOutcome:
    name: str
    path: str
    table: pd.DataFrame
    csv: str
    plot: str
    best: dict | None
    version: int | None
    alias: str | None


def max_concurrency(config: JobConfig) -> int:
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    per_trial = config.scaling.num_workers * config.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    return max(1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial))


def build_tuner(config: JobConfig, tokenizer_dir: str | None, resume: bool) -> tune.Tuner:
    storage = Storage(config.storage.root)
    name = sweep_name(config)
    path = storage.uri_of("tune", name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.model_dump(mode="json"), sweep=name, tokenizer_dir=tokenizer_dir),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    exists = tune.Tuner.can_restore(path)
    if resume:
        if not exists:
            raise LifelongError(f"no sweep to resume at {path}: run without --resume to start it")
        # Restores the searcher (Optuna's history) and the scheduler with the trials.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    if exists:
        raise LifelongError(f"sweep '{name}' already exists at {path}: resume it with --resume, or set tune.sweep_name")
    t = config.tune
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=t.metric, mode=t.mode, seed=t.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=t.seed)
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="epoch", metric=t.metric, mode=t.mode, max_t=config.train.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    budget = FailureBudget(t.max_failed_trials)
    return tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=max_concurrency(config)),
        run_config=tune.RunConfig(name=name, storage_path=storage.uri_of("tune"), stop=budget, callbacks=[budget],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  verbose=1),
    )


def trials_table(results, config: JobConfig) -> pd.DataFrame:
    t = config.tune
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        values = history[t.metric].dropna() if t.metric in history else pd.Series(dtype=float)
        best = (values.min() if t.mode == "min" else values.max()) if len(values) else float("nan")
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        status = "errored" if result.error else "finished"
        rows.append({
            "trial": (result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else ""),
            **{k: result.config.get(k) for k in t.space},
            f"best_{t.metric}": best,
            "epochs": epochs,
            "stopped_early": bool(not result.error and epochs < config.train.epochs),
            "status": status,
            "error": _first_line(result.error) if result.error else "",
        })
    return pd.DataFrame(rows)


def _first_line(error) -> str:
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
        ax.plot(history["epoch"], history[metric], marker="o", label=Path(result.path).name[-12:] if result.path else "?")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {sweep_name(config)}: {metric} per trial")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_sweep(config: JobConfig, resume: bool = False, promote: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep, write its table and plot, register the best trial's model."""
    from lifelong.train.driver import prepare_run, register_best

    name = sweep_name(config)
    # The sweep's data report and tokenizer (trained once, under runs/<sweep>/, for every trial).
    prep = prepare_run(config.model_copy(update={"run_name": name}))
    tokenizer_dir = prep.tokenizer_dir
    tuner = build_tuner(config, tokenizer_dir, resume)
    results = tuner.fit()

    storage = prep.storage
    out_dir = Path(storage.path("tune", name)) if storage.is_local else local_cache_dir("tune", name)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(results, config)
    csv, plot = out_dir / "trials.csv", out_dir / "curves.png"
    table.to_csv(csv, index=False)
    plot_curves(results, config, plot)

    finished = [r for r in results if not r.error and r.metrics and config.tune.metric in r.metrics]
    if not finished:
        return SweepOutcome(name, results.experiment_path, table, str(csv), str(plot), None, None, None)
    best = results.get_best_result(metric=config.tune.metric, mode=config.tune.mode, scope="all", filter_nan_and_inf=True)
    params = {k: best.config[k] for k in config.tune.space}
    run_name = f"{name}-{best.metrics['trial_id']}"
    best_config = trial_config(config.model_dump(mode="json"), params, run_name, tokenizer_dir)
    train_result = ray.train.Result.from_path(storage.uri_of("runs", run_name))
    outcome = register_best(dataclasses.replace(prep, config=best_config), train_result, run_name,
                            extra_card={"sweep": {"name": name, "params": params, "path": results.experiment_path}})
    alias = "champion" if promote else "challenger"
    prep.registry.move_alias(config.name, alias, outcome.version, reason=f"best trial of sweep {name}")
    return SweepOutcome(name, results.experiment_path, table, str(csv), str(plot),
                        {"run": run_name, "params": params, "metrics": outcome.metrics}, outcome.version, alias)
