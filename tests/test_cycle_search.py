"""continual.search on its own (no Ray): trials recorded as they go, the best kept by its score,
earlier windows' trials warm the sampler, and a cycle that stopped mid-search carries on."""

from types import SimpleNamespace

import pytest

from conftest import make_config
from lifelong.continual.search import Fitted, score, search
from lifelong.errors import ConfigError

SPACE = "continual.search.space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, continual.replay_ratio: {uniform: [0.5, 2.0]}}"


def search_config(*extra):
    return make_config("gpt2/tiny_continual.yaml", "continual.search.num_samples=4", SPACE, *extra)


class Drill:
    """A window's journal in memory, a fake trainer whose candidates are better the nearer their
    lr is to 3e-3, and a stop after `stop_after` journal writes (the cycle dies there)."""

    def __init__(self, stop_after=None):
        self.window = SimpleNamespace(window=1, search=[], search_pending=None)
        self.fits, self.writes, self.stop_after = [], 0, stop_after

    def record(self, trials, pending):
        self.window = SimpleNamespace(window=1, search=trials, search_pending=pending)
        self.writes += 1
        if self.stop_after is not None and self.writes >= self.stop_after:
            raise KeyboardInterrupt("the cycle stopped")

    def fit(self, config, run):
        self.fits.append((run, config.train.lr, config.continual.replay_ratio))
        return Fitted(prep=None, result=config.train.lr, run=run, replay_rows=round(config.continual.replay_ratio * 100))

    @staticmethod
    def accuracies(fitted):
        import math

        closeness = abs(math.log10(fitted.result) - math.log10(3e-3))
        return [0.9 - 0.05 * closeness, 0.8 - 0.1 * closeness]  # past window, new window

    def run(self, config, journal=()):
        return search(config, self.window, list(journal), self.record, self.fit, self.accuracies, [0.9, 0.7], "cycle-w001", lambda m: None)


def test_the_best_scoring_trial_is_kept_and_every_trial_recorded():
    drill = Drill()
    config = search_config()
    fitted, trials = drill.run(config)
    assert [t["trial"] for t in trials] == [0, 1, 2, 3] and drill.window.search == [
        {k: v for k, v in t.items() if k != "chosen"} for t in trials
    ]
    best = max(trials, key=lambda t: t["score"])
    assert [t["chosen"] for t in trials].count(True) == 1 and best["chosen"] and fitted.run == best["run"]
    assert {t["run"] for t in trials} == {f"cycle-w001-s{i}" for i in range(4)}
    assert all(1e-4 <= t["params"]["train.lr"] <= 1e-2 and 0.5 <= t["params"]["continual.replay_ratio"] <= 2.0 for t in trials)
    # The config as it is is the first trial (lr 2e-3, replay ratio 2 in tiny_continual.yaml).
    assert trials[0]["params"] == {"train.lr": config.train.lr, "continual.replay_ratio": config.continual.replay_ratio}
    assert drill.fits[0] == ("cycle-w001-s0", 2e-3, 2.0)
    # ... unless the space does not hold it.
    narrow = search_config("continual.search.space={train.lr: {loguniform: [1.0e-4, 1.0e-3]}}")
    assert Drill().run(narrow)[1][0]["params"]["train.lr"] != 2e-3
    # The score: gain on the new window minus forgetting on the past ones (weight 1 by default).
    assert score([0.85, 0.75], [0.9, 0.7], 1.0) == pytest.approx({"new": 0.75, "gain": 0.05, "forgetting": 0.05, "score": 0.0})
    assert score([0.85, 0.75], [0.9, 0.7], 0.0)["score"] == pytest.approx(0.05)


def test_the_same_window_samples_the_same_trials_and_earlier_windows_warm_the_sampler():
    config = search_config()
    _, first = Drill().run(config)
    _, again = Drill().run(config)
    assert [t["params"] for t in first] == [t["params"] for t in again]
    earlier = [SimpleNamespace(status="done", search=[{**t, "params": {**t["params"], "train.lr": 3e-3}, "score": 1.0} for t in first])]
    _, warmed = Drill().run(config, earlier)
    assert [t["params"] for t in warmed] != [t["params"] for t in first]
    # An earlier trial outside today's space is left out rather than failing the cycle.
    odd = [SimpleNamespace(status="done", search=[{"params": {"train.lr": 5.0}, "score": 1.0}])]
    assert len(Drill().run(config, odd)[1]) == 4


def test_a_cycle_stopped_mid_search_carries_on_and_reruns_the_trial_it_was_training():
    config = search_config()
    stopped = Drill(stop_after=5)  # journal writes: asked 0, scored 0, asked 1, scored 1, asked 2: stops while 2 trains
    with pytest.raises(KeyboardInterrupt):
        stopped.run(config)
    pending = stopped.window.search_pending
    assert pending["trial"] == 2 and [t["trial"] for t in stopped.window.search] == [0, 1]
    resumed = Drill()
    resumed.window = stopped.window
    fitted, trials = resumed.run(config)
    assert resumed.fits[0] == ("cycle-w001-s2", pending["params"]["train.lr"], pending["params"]["continual.replay_ratio"])
    assert [t["trial"] for t in trials] == [0, 1, 2, 3] and len(resumed.fits) in (2, 3)
    assert [t["params"] for t in trials[:2]] == [t["params"] for t in stopped.window.search[:2]]
    assert fitted.run == max(trials, key=lambda t: t["score"])["run"]


def test_a_best_trial_scored_before_the_stop_is_fitted_again_to_be_registered():
    done = {"trial": 0, "params": {"train.lr": 3e-3, "continual.replay_ratio": 1.0}, "run": "cycle-w001-s0", "score": 1.0}
    drill = Drill()
    drill.window = SimpleNamespace(window=1, search=[done], search_pending=None)
    fitted, trials = drill.run(search_config("continual.search.num_samples=2"))
    assert [t["chosen"] for t in trials] == [True, False]
    assert drill.fits[-1] == ("cycle-w001-s0", 3e-3, 1.0) and fitted.run == "cycle-w001-s0" and fitted.replay_rows == 100


def test_the_best_trial_the_gates_would_pass_is_kept_over_a_better_score_that_forgets_too_much():
    """A high learning rate gains more on the new window but forgets past ones beyond
    gates.max_forgetting: its score is higher, yet the passing trial is the one registered."""

    def accuracies(fitted):
        return [0.8, 1.0] if fitted.result > 3e-3 else [0.9, 0.8]  # forgetting 0.1, gain 0.3 / none, gain 0.1

    config = search_config("continual.search.space={train.lr: {loguniform: [1.0e-3, 1.0e-2]}}", "continual.gates.max_forgetting=0.05")
    drill = Drill()
    drill.accuracies = accuracies
    fitted, trials = drill.run(config)
    failing = [t for t in trials if not t["passes_gates"]]
    assert failing and all(t["score"] > max(p["score"] for p in trials if p["passes_gates"]) for t in failing)  # the case at hand
    chosen = [t for t in trials if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passes_gates"] and fitted.run == chosen[0]["run"]
    # No trial passes: the best score goes to the gates (to be rejected with its reason).
    _, none_pass = Drill().run(search_config("continual.gates.min_gain=0.5"))
    assert not any(t["passes_gates"] for t in none_pass)
    assert max(none_pass, key=lambda t: t["score"])["chosen"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "continual.search.space={model.n_layer: {choice: [1, 2]}}",
            "continual.search.space.model.n_layer: a cycle searches how it trains",
        ),
        (
            "continual.search.space={train.epochs: {randint: [0, 3]}}",
            "continual.search.space.train.epochs: the value 0 makes an invalid config",
        ),
        ("continual.search.space={train.lr: {grid: [1.0e-3, 3.0e-3]}}", "continual.search.space.train.lr: a grid"),
        (
            "continual.search.space={continual.replay_weighting: {choice: [rows, windows]}}",
            "continual.search.space.continual.replay_weighting: the value 'windows' makes an invalid config",
        ),
        ("continual.search.space={continual.min_new_rows: {choice: [10, 20]}}", "continual.search.space.continual.min_new_rows: a cycle"),
        ("continual.search.space={}", "continual.search.space: name at least one"),
        ("continual.search.num_samples=1", "continual.search.num_samples"),
    ],
)
def test_a_bad_search_section_is_refused_with_its_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        make_config("gpt2/tiny_continual.yaml", SPACE, override)
    assert message in str(e.value)


def test_a_cycle_may_search_how_its_replayed_rows_are_weighed():
    drill, trained_with = Drill(), []
    fit = drill.fit
    drill.fit = lambda config, run: (trained_with.append(config.continual.replay_weighting), fit(config, run))[1]
    config = search_config(
        "continual.search.space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, continual.replay_weighting: {choice: [rows, history]}}"
    )
    _, trials = drill.run(config)
    assert trials[0]["params"]["continual.replay_weighting"] == "history"  # the config as it is first
    assert trained_with == [t["params"]["continual.replay_weighting"] for t in trials]
    assert set(trained_with) <= {"rows", "history"}
