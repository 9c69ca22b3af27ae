"""A cycle that searches for itself (`continual.search`): a few candidates trained from the
champion with sampled settings (learning rate, epochs, replay ratio, ...), each scored on the new
window's holdout and on every past window's; the best one the gates would pass (else the best)
is kept for them.

    score = gain on the new window - forgetting_weight x forgetting on the past ones

(gains and forgetting against the champion, as the gates measure them: accuracy points, or
perplexity relative to the champion's; gates.gain_and_forgetting).

The first trial is the config as it is (where the space holds its values); Optuna's TPE
(seeded per window) picks the others, warm-started with the trials of the stream's earlier
windows (scored as gains over their champion, so windows of different difficulty compare).
Each trial is recorded in the window's journal when it is asked and when it is scored: a cycle
that stops carries on with the trials left, and the trial it was training runs again with the
same settings, resuming its run from its checkpoints.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from lifelong.config import JobConfig, dotted_parent, set_dotted, validate_config
from lifelong.continual.gates import gain_and_forgetting, gate
from lifelong.tasks import holdout_metric


@dataclass
class Fitted:
    """A trained candidate, not yet registered: its prepared run and its Ray Train result."""

    prep: object
    result: object
    run: str
    replay_rows: int


def with_params(config: JobConfig, params: dict) -> JobConfig:
    """The config with a trial's settings on their dotted keys."""
    return validate_config(set_dotted(config.model_dump(mode="json"), params), source="a cycle's search trial")


def config_values(config: JobConfig, keys) -> dict:
    """The config's own values of the searched keys."""
    raw = config.model_dump(mode="json")
    values = {}
    for key in keys:
        node, leaf = dotted_parent(raw, key, create=False)
        values[key] = node.get(leaf)
    return values


def distributions(space: dict) -> dict:
    import optuna

    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[key] = optuna.distributions.FloatDistribution(args[0], args[1], log=True)
        elif kind == "uniform":
            out[key] = optuna.distributions.FloatDistribution(args[0], args[1])
        elif kind == "randint":  # upper bound excluded, as in tune.space
            out[key] = optuna.distributions.IntDistribution(args[0], args[1] - 1)
        else:
            out[key] = optuna.distributions.CategoricalDistribution(args)
    return out


def _holds(dist, value) -> bool:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high


def _rank(trial: dict) -> tuple:
    """The best trial is the best-scoring one the gates would pass; the best of all only when
    none would (it then goes to the gates to be rejected with its reason)."""
    return (trial.get("passes_gates", True), trial["score"])


def passes_gates(config: JobConfig, candidate: list[float], champion: list[float]) -> bool:
    return gate(holdout_metric(config), candidate, champion, config.continual.gates).passed


def score(candidate: list[float], champion: list[float], forgetting_weight: float, metric: str = "accuracy") -> dict:
    """A trial's figures: the metric's lists per window, oldest first, the new window last."""
    gain, forgetting = gain_and_forgetting(metric, candidate, champion)
    return {"new": candidate[-1], "gain": gain, "forgetting": forgetting, "score": gain - forgetting_weight * forgetting}


def earlier_trials(journal: list) -> list[dict]:
    """Every scored trial of the stream's finished windows, oldest first."""
    return [t for w in journal if w.status == "done" for t in (getattr(w, "search", None) or []) if "score" in t]


def search(
    config: JobConfig,
    window,
    journal: list,
    record: Callable[[list[dict], dict | None], None],
    fit: Callable[[JobConfig, str], Fitted],
    accuracies: Callable[[Fitted], list[float]],
    champion: list[float],
    run: str,
    say: Callable[[str], None],
) -> tuple[Fitted, list[dict]]:
    """Train `continual.search.num_samples` candidates, return the best and every trial's record.
    `record(trials, pending)` writes the window's journal; `fit(config, run)` trains one
    candidate; `accuracies(fitted)` scores it on every window's holdout."""
    import optuna

    s = config.continual.search
    k = window.window
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(s.space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        sampler = optuna.samplers.TPESampler(seed=s.seed + k, n_startup_trials=s.startup_trials, multivariate=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trials = list(window.search or [])
    for t in earlier_trials(journal) + trials:
        try:
            study.add_trial(optuna.trial.create_trial(params=t["params"], distributions=dists, value=t["score"]))
        except ValueError:
            pass  # the space changed since: that trial says nothing about this one
    if window.search_pending:
        study.enqueue_trial(window.search_pending["params"])
    elif not trials:
        # The config as it is comes first (where the space holds it): the search then keeps it
        # unless a trial scores better.
        own = {key: value for key, value in config_values(config, dists).items() if _holds(dists[key], value)}
        if own:
            study.enqueue_trial(own)
    best: tuple[float, Fitted] | None = None
    while len(trials) < s.num_samples:
        i = len(trials)
        asked = study.ask(dists)
        params = asked.params
        record(trials, {"trial": i, "params": params})
        started = time.perf_counter()
        fitted = fit(with_params(config, params), f"{run}-s{i}")
        scored = accuracies(fitted)
        metric = holdout_metric(config)
        figures = {**score(scored, champion, s.forgetting_weight, metric), "passes_gates": passes_gates(config, scored, champion)}
        study.tell(asked, figures["score"])
        trials = [*trials, {"trial": i, "params": params, "run": fitted.run, **figures, "seconds": round(time.perf_counter() - started, 1)}]
        record(trials, None)
        say(
            f"cycle window {k}: search trial {i + 1}/{s.num_samples} {shown_params(params)}: new window {figures['new']:.3f} "
            f"({figures['gain']:+.3f}), forgetting {figures['forgetting']:.3f} → score {figures['score']:+.3f}"
        )
        if best is None or _rank(trials[-1]) > best[0]:
            best = (_rank(trials[-1]), fitted)
    chosen = max(trials, key=_rank)
    if best is None or best[1].run != chosen["run"]:
        # The best trial finished before the cycle stopped: its run resumes with nothing left to train.
        best = (_rank(chosen), fit(with_params(config, chosen["params"]), chosen["run"]))
    say(f"cycle window {k}: search chose trial {chosen['trial'] + 1} {shown_params(chosen['params'])} (score {chosen['score']:+.3f})")
    return best[1], [{**t, "chosen": t is chosen} for t in trials]


def shown_params(params: dict) -> str:
    """{train.lr: 0.00312, continual.replay_ratio: 1.2}: a trial's settings on one line."""
    return "{" + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in params.items()) + "}"
