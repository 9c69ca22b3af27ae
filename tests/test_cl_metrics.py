"""Continual-learning metrics against a matrix worked out by hand."""

import pytest

from lifelong.continual.metrics import cl_metrics, metrics_over_cycles

# Three windows. Row i: the model after window i; column j: window j's holdout.
R = [
    [0.90, 0.30, 0.25],
    [0.60, 0.80, 0.35],
    [0.50, 0.70, 0.95],
]
B = [0.25, 0.20, 0.30]  # the starting model on each window


def test_metrics_match_a_hand_computed_case():
    m = cl_metrics(R, B)
    assert m["average_accuracy"] == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # BWT: ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = -0.25
    assert m["backward_transfer"] == pytest.approx(-0.25)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.30 - 0.20) + (0.35 - 0.30)) / 2 = 0.075
    assert m["forward_transfer"] == pytest.approx(0.075)
    # Forgetting: window 0 peaked at 0.90 (after window 0), window 1 at 0.80: ((0.90-0.50) + (0.80-0.70)) / 2
    assert m["forgetting"] == pytest.approx(0.25)


def test_metrics_over_cycles_use_only_what_was_seen():
    cycles = metrics_over_cycles(R, B)
    assert [c["windows"] for c in cycles] == [1, 2, 3]
    assert cycles[0] == {"windows": 1, "average_accuracy": 0.90, "backward_transfer": None, "forward_transfer": None, "forgetting": None}
    assert cycles[1]["average_accuracy"] == pytest.approx(0.70)
    assert cycles[1]["forgetting"] == pytest.approx(0.30) and cycles[1]["backward_transfer"] == pytest.approx(-0.30)
    assert cycles[1]["forward_transfer"] == pytest.approx(0.10)


def test_a_peak_before_the_last_model_counts_as_forgetting_even_when_bwt_is_positive():
    m = cl_metrics([[0.5, None], [0.9, 0.8]])  # window 0 improved after window 1: no forgetting
    assert m["backward_transfer"] == pytest.approx(0.4) and m["forgetting"] == pytest.approx(-0.4)
    assert m["forward_transfer"] is None  # R[0][1] was not measured


def test_a_ragged_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        cl_metrics([[0.5, 0.2], [0.4]])


def test_a_perplexity_matrix_gives_relative_measures_signed_as_for_accuracy():
    P = [
        [100.0, 300.0, None],
        [125.0, 50.0, 400.0],
        [110.0, 60.0, 40.0],
    ]
    B = [500.0, 600.0, 800.0]  # the starting model on each window
    m = cl_metrics(P, B, metric="perplexity")
    assert m["average_perplexity"] == pytest.approx((110 + 60 + 40) / 3) and "average_accuracy" not in m
    # BWT: window 0 100 → 110 (-10%), window 1 50 → 60 (-20%).
    assert m["backward_transfer"] == pytest.approx((-0.10 - 0.20) / 2)
    # Forgetting against each window's best so far: window 0's best 100 (not 125), window 1's 50.
    assert m["forgetting"] == pytest.approx((0.10 + 0.20) / 2)
    # FWT: the model before window j against the starting model on it: 300 vs 600, 400 vs 800.
    assert m["forward_transfer"] == pytest.approx((0.5 + 0.5) / 2)
    first = metrics_over_cycles(P, B, metric="perplexity")[0]
    assert first == {"windows": 1, "average_perplexity": 100.0, "backward_transfer": None, "forward_transfer": None, "forgetting": None}
