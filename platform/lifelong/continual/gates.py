"""The continual gates and the matrix: pure functions of numbers, tested directly.

A candidate (the champion retrained on a new window) is compared with the champion on every
window's holdout, by the metric its task is gated on (`HOLDOUT_METRIC`):

- accuracy (classifiers): it passes when it is about as good on the new window
  (`new_window_tolerance`), or, with `min_gain`, better there by at least that much, and forgets
  at most `max_forgetting` of accuracy on the past windows, on average. A candidate that knows
  classes the champion does not (a grown label set) is compared on past windows over the classes
  both know (`gated_accuracies`).
- perplexity (language models; lower is better, and its scale depends on the text, so the gates
  are relative): the candidate must lower the new window's perplexity by at least
  `min_relative_improvement` (0.1: 10 % below the champion's) and may raise the past windows'
  perplexity by at most `max_relative_increase` (their mean of candidate / champion − 1).
- bleu, chrf, exact_match (a language model learning instructions, `continual.gates.metric`):
  its greedy answers to each holdout's prompts against their responses, gated as accuracy is,
  BLEU and chrF (0–100) read as fractions (so new_window_tolerance 0.01 is one point).

`gain_and_forgetting` puts both on one footing (gain: better is positive; forgetting: worse is
positive), which the gates and a cycle's search read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The limits are inclusive: accuracies are fractions, and 0.79 - 0.80 must not fail a 0.01 tolerance
# by a rounding error.
_EPS = 1e-9

# Answers scored against references (a holdout's responses), higher is better; their scale.
REFERENCE_METRICS = {"bleu": 100.0, "chrf": 100.0, "exact_match": 1.0}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    new_gap: float  # the candidate's gain on the new window (accuracy: points; perplexity: relative)
    forgetting: float  # its mean loss against the champion on the past windows (same units)


def past_window_drop(candidate: list[float], champion: list[float]) -> float:
    """The forgetting gate's measure: the candidate's mean accuracy drop against the champion on
    the past windows (every window but the last, the new one)."""
    past = list(zip(candidate[:-1], champion[:-1]))
    return sum(b - a for a, b in past) / len(past) if past else 0.0


def relative_increase(candidate: list[float], champion: list[float]) -> float:
    """The perplexity gates' forgetting: the mean, over past windows, of candidate / champion − 1."""
    past = list(zip(candidate[:-1], champion[:-1]))
    return sum(a / b - 1 for a, b in past) / len(past) if past else 0.0


def gain_and_forgetting(metric: str, candidate: list[float], champion: list[float]) -> tuple[float, float]:
    """(gain on the new window, forgetting on the past ones), better positive and worse positive:
    accuracy in points, perplexity relative to the champion's."""
    if metric == "perplexity":
        return (champion[-1] - candidate[-1]) / champion[-1], relative_increase(candidate, champion)
    candidate, champion = _fractions(metric, candidate), _fractions(metric, champion)
    return candidate[-1] - champion[-1], past_window_drop(candidate, champion)


def _fractions(metric: str, values: list[float]) -> list[float]:
    scale = REFERENCE_METRICS.get(metric, 1.0)
    return [v / scale for v in values]


def gate(metric: str, candidate: list[float], champion: list[float], gates) -> GateDecision:
    """The decision under a config's `continual.gates`, by the task's metric."""
    if metric == "perplexity":
        return judge_perplexity(candidate, champion, gates.min_relative_improvement, gates.max_relative_increase)
    candidate, champion = _fractions(metric, candidate), _fractions(metric, champion)
    return judge(candidate, champion, gates.new_window_tolerance, gates.max_forgetting, gates.min_gain, metric)


def judge_perplexity(candidate: list[float], champion: list[float], min_improvement: float, max_increase: float) -> GateDecision:
    """Both lists: perplexity per window, oldest first, the new window last."""
    if len(candidate) != len(champion) or not candidate:
        raise ValueError(f"one perplexity per window for both models (got {len(candidate)} and {len(champion)})")
    if not all(math.isfinite(v) and v > 0 for v in candidate + champion):
        return GateDecision(False, f"a perplexity is not a positive number (candidate {candidate}, champion {champion})", 0.0, 0.0)
    gain, increase = gain_and_forgetting("perplexity", candidate, champion)
    reasons = []
    if gain < min_improvement - _EPS:
        reasons.append(
            f"new window perplexity {candidate[-1]:.2f} vs the champion's {champion[-1]:.2f} ({-gain:+.1%}): "
            f"not {min_improvement:.1%} lower (gates.min_relative_improvement)"
        )
    if increase > max_increase + _EPS:
        reasons.append(f"raises past windows' perplexity by {increase:.1%} on average (gates.max_relative_increase {max_increase:.1%})")
    if reasons:
        return GateDecision(False, "; ".join(reasons), gain, increase)
    return GateDecision(
        True,
        f"new window perplexity {candidate[-1]:.2f} vs {champion[-1]:.2f} ({-gain:+.1%}), past windows {increase:+.1%} "
        f"(limit {max_increase:.1%})",
        gain,
        increase,
    )


def judge(
    candidate: list[float],
    champion: list[float],
    new_window_tolerance: float,
    max_forgetting: float,
    min_gain: float | None = None,
    metric: str = "accuracy",
) -> GateDecision:
    """Both lists: accuracy (or another fraction, `metric`) per window, oldest first, the new
    window last. `min_gain` (when set) replaces the tolerance: the candidate must beat the
    champion on the new window by that much."""
    if len(candidate) != len(champion) or not candidate:
        raise ValueError(f"one {metric} per window for both models (got {len(candidate)} and {len(champion)})")
    new_gap = candidate[-1] - champion[-1]
    forgetting = past_window_drop(candidate, champion)
    reasons = []
    if min_gain is not None:
        if new_gap < min_gain - _EPS:
            reasons.append(
                f"new window {metric} {candidate[-1]:.3f} gains {new_gap:+.3f} on the champion's {champion[-1]:.3f}, "
                f"less than gates.min_gain {min_gain}"
            )
    elif new_gap < -new_window_tolerance - _EPS:
        reasons.append(
            f"new window {metric} {candidate[-1]:.3f} is below the champion's {champion[-1]:.3f} by more than {new_window_tolerance}"
        )
    if forgetting > max_forgetting + _EPS:
        reasons.append(f"forgets {forgetting:.3f} of {metric} on past windows (limit {max_forgetting})")
    if reasons:
        return GateDecision(False, "; ".join(reasons), new_gap, forgetting)
    return GateDecision(
        True,
        f"new window {candidate[-1]:.3f} vs {champion[-1]:.3f}, forgetting {forgetting:.3f} (limit {max_forgetting})",
        new_gap,
        forgetting,
    )


def accuracy_matrix(windows: list[dict]) -> list[list[float | None]]:
    """(Or the perplexity matrix: the same shape, whatever the windows hold.) R[i][j] for the
    finished windows so far (in order); R[i-1][i] is the champion before
    window i on window i. Each window holds `row` (the serving model after it, per window so
    far) and `champion` (the champion before it, per window so far)."""
    T = len(windows)
    R = [[None] * T for _ in range(T)]
    for i, w in enumerate(windows):
        for j, value in enumerate(w["row"]):
            R[i][j] = value
        if i + 1 < T:
            R[i][i + 1] = windows[i + 1]["champion"][i + 1]  # measured when window i+1 arrived
    return R


def window_value(metric: str, counts: dict) -> float:
    """A model's metric on one window's holdout, from what scoring it counted (`holdout_counts`)."""
    if metric == "perplexity":
        return math.exp(min(counts["loss_sum"] / max(counts["tokens"], 1), 50.0))
    if metric in REFERENCE_METRICS:
        return counts[metric]
    return accuracy(counts)


def gated_values(metric: str, candidate: dict, champion: dict) -> tuple[list[float], list[float], str]:
    """What the gates compare, per window: accuracies over the classes both models know, or every
    window's perplexity."""
    if metric == "accuracy":
        return gated_accuracies(candidate, champion)
    return [window_value(metric, w) for w in candidate["windows"]], [window_value(metric, w) for w in champion["windows"]], ""


def accuracy(counts: dict[str, list[int]], classes: set[str] | None = None) -> float | None:
    """Accuracy over the rows of `classes` (all: None); None when the holdout has none of them."""
    kept = [v for name, v in counts.items() if classes is None or name in classes]
    rows = sum(v[1] for v in kept)
    return sum(v[0] for v in kept) / rows if rows else None if classes is not None else 0.0


def gated_accuracies(candidate: dict, champion: dict) -> tuple[list[float], list[float], str]:
    """What the gates compare: every row of the new window, and on the past windows the rows of
    the classes both models know (a grown label set: the champion cannot answer the new classes,
    and a past window of classes it never learned says nothing of its forgetting)."""
    shared = set(candidate["labels"]) & set(champion["labels"])
    cand = [accuracy(w) for w in candidate["windows"]]
    champ = [accuracy(w) for w in champion["windows"]]
    if shared == set(candidate["labels"]) == set(champion["labels"]):
        return cand, champ, ""
    past = [(accuracy(a, shared), accuracy(b, shared)) for a, b in zip(candidate["windows"][:-1], champion["windows"][:-1])]
    past = [(a, b) for a, b in past if a is not None]
    note = f" (past windows over the {len(shared)} classes both models know; the candidate adds {len(set(candidate['labels']) - shared)})"
    return [a for a, _ in past] + cand[-1:], [b for _, b in past] + champ[-1:], note
