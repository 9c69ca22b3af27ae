"""The continual gates, the accuracy matrix and the daemon's backoff: pure functions, checked on numbers."""

import math

import pytest

from lifelong.config import GatesSection
from lifelong.continual.daemon import backoff
from lifelong.continual.gates import (
    accuracy,
    accuracy_matrix,
    gain_and_forgetting,
    gate,
    gated_accuracies,
    gated_values,
    judge,
    judge_perplexity,
    past_window_drop,
    window_value,
)


def test_a_candidate_as_good_on_the_new_window_that_forgets_little_passes():
    d = judge([0.9, 0.85, 0.8], [0.92, 0.86, 0.7], new_window_tolerance=0.01, max_forgetting=0.05)
    assert d.passed and d.forgetting == pytest.approx(0.015) and d.new_gap == pytest.approx(0.1)
    assert d.reason == "new window 0.800 vs 0.700, forgetting 0.015 (limit 0.05)"


def test_each_gate_refuses_on_its_own_and_both_reasons_are_given():
    worse = judge([0.9, 0.60], [0.9, 0.62], new_window_tolerance=0.01, max_forgetting=0.05)
    assert not worse.passed and worse.reason == "new window accuracy 0.600 is below the champion's 0.620 by more than 0.01"
    forgets = judge([0.5, 0.9], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05)
    assert not forgets.passed and forgets.reason == "forgets 0.400 of accuracy on past windows (limit 0.05)"
    both = judge([0.5, 0.5], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05)
    assert not both.passed and both.reason.count(";") == 1


def test_the_limits_are_inclusive_and_the_first_window_has_nothing_to_forget():
    assert judge([0.70, 0.79], [0.75, 0.80], new_window_tolerance=0.01, max_forgetting=0.05).passed
    assert past_window_drop([0.4], [0.9]) == 0.0
    with pytest.raises(ValueError, match="one accuracy per window"):
        judge([0.5], [0.5, 0.6], 0.01, 0.05)


def test_min_gain_refuses_a_candidate_that_learned_nothing_on_the_new_window():
    # Equal to the champion on the new window: passes the tolerance, not a min_gain of 0.005.
    assert judge([0.9, 0.8], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05).passed
    same = judge([0.9, 0.8], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05, min_gain=0.005)
    assert (
        not same.passed and same.reason == "new window accuracy 0.800 gains +0.000 on the champion's 0.800, less than gates.min_gain 0.005"
    )
    assert judge([0.9, 0.805], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05, min_gain=0.005).passed  # inclusive
    # It replaces the tolerance, and the forgetting gate still applies.
    forgets = judge([0.5, 0.95], [0.9, 0.8], new_window_tolerance=0.01, max_forgetting=0.05, min_gain=0.005)
    assert not forgets.passed and forgets.reason == "forgets 0.400 of accuracy on past windows (limit 0.05)"


def test_the_accuracy_matrix_takes_rows_from_the_serving_model_and_the_diagonal_neighbour_from_the_next_window():
    windows = [
        {"row": [0.9], "champion": [0.3]},
        {"row": [0.8, 0.85], "champion": [0.9, 0.4]},
        {"row": [0.7, 0.8, 0.9], "champion": [0.8, 0.85, 0.5]},
    ]
    assert accuracy_matrix(windows) == [[0.9, 0.4, None], [0.8, 0.85, 0.5], [0.7, 0.8, 0.9]]


def test_the_daemon_waits_longer_after_each_failure_up_to_ten_intervals():
    assert [backoff(30, n) for n in range(6)] == [30, 60, 120, 240, 300, 300]


def test_the_gates_compare_past_windows_on_the_classes_both_models_know():
    champion = {"labels": ["0", "1"], "windows": [{"0": [9, 10], "1": [8, 10]}, {"2": [0, 10], "3": [0, 10]}]}
    candidate = {"labels": ["0", "1", "2", "3"], "windows": [{"0": [7, 10], "1": [8, 10]}, {"2": [9, 10], "3": [7, 10]}]}
    cand, champ, note = gated_accuracies(candidate, champion)
    assert cand == [0.75, 0.8] and champ == [0.85, 0.0] and "2 classes both models know" in note
    # A past window of classes only the candidate knows says nothing of forgetting: left out.
    three = {"labels": ["0", "1", "2", "3"], "windows": [{"2": [5, 10]}, {"0": [10, 10]}, {"4": [1, 2]}]}
    two = {"labels": ["0", "1"], "windows": [{"2": [0, 10]}, {"0": [9, 10]}, {"4": [0, 2]}]}
    assert gated_accuracies(three, two)[:2] == ([1.0, 0.5], [0.9, 0.0])
    same = {"labels": ["0", "1"], "windows": [{"0": [1, 2]}]}
    assert gated_accuracies(same, same) == ([0.5], [0.5], "")
    assert accuracy({"0": [1, 4], "1": [3, 4]}) == 0.5 and accuracy({"0": [1, 4]}, {"9"}) is None and accuracy({}) == 0.0


def test_perplexity_gates_are_relative_to_the_champions_perplexity_on_each_window():
    # New window 20% lower; past windows +4% and +2%: a mean rise of 3%, within 5%.
    d = judge_perplexity([52.0, 30.6, 80.0], [50.0, 30.0, 100.0], min_improvement=0.1, max_increase=0.05)
    assert d.passed and d.new_gap == pytest.approx(0.2) and d.forgetting == pytest.approx(0.03)
    assert d.reason == "new window perplexity 80.00 vs 100.00 (-20.0%), past windows +3.0% (limit 5.0%)"
    # 5% lower is not the 10% asked for; past windows 20% higher is past the limit.
    short = judge_perplexity([60.0, 95.0], [50.0, 100.0], min_improvement=0.1, max_increase=0.05)
    assert not short.passed and short.reason == (
        "new window perplexity 95.00 vs the champion's 100.00 (-5.0%): not 10.0% lower (gates.min_relative_improvement); "
        "raises past windows' perplexity by 20.0% on average (gates.max_relative_increase 5.0%)"
    )
    # The limits are inclusive; a perplexity that is no number (a diverged model) never passes.
    assert judge_perplexity([52.5, 90.0], [50.0, 100.0], min_improvement=0.1, max_increase=0.05).passed
    assert not judge_perplexity([float("nan"), 90.0], [50.0, 100.0], 0.0, 0.05).passed
    assert not judge_perplexity([float("inf"), 90.0], [50.0, 100.0], 0.0, 0.05).passed
    with pytest.raises(ValueError):
        judge_perplexity([1.0], [1.0, 2.0], 0.0, 0.05)


def test_gain_and_forgetting_put_both_metrics_on_one_footing():
    assert gain_and_forgetting("accuracy", [0.8, 0.9], [0.9, 0.85]) == pytest.approx((0.05, 0.1))
    assert gain_and_forgetting("perplexity", [60.0, 80.0], [50.0, 100.0]) == pytest.approx((0.2, 0.2))
    gates = GatesSection(min_relative_improvement=0.1, max_relative_increase=0.05, max_forgetting=0.5, new_window_tolerance=0.5)
    assert gate("perplexity", [60.0, 80.0], [50.0, 100.0], gates).passed is False  # 20% worse on the past window
    assert gate("accuracy", [0.6, 0.8], [0.5, 1.0], gates).passed is True  # accuracy reads its own keys


def test_a_language_models_window_value_is_the_perplexity_of_its_summed_loss():
    counts = {"loss_sum": 3.0 * 200, "tokens": 200.0}
    assert window_value("perplexity", counts) == pytest.approx(math.exp(3.0))
    cand, champ, note = gated_values("perplexity", {"labels": [], "windows": [counts]}, {"labels": [], "windows": [counts]})
    assert cand == champ == [pytest.approx(math.exp(3.0))] and note == ""
    assert window_value("accuracy", {"a": [3, 4]}) == 0.75
