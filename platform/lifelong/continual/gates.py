"""The continual gates and the accuracy matrix: pure functions of numbers, tested directly.

A candidate (the champion retrained on a new window) is compared with the champion on every
window's holdout. It passes when it is about as good on the new window (`new_window_tolerance`),
or, with `min_gain`, better there by at least that much, and forgets at most `max_forgetting` of
accuracy on the past windows, on average. A candidate that knows classes the champion does not (a
grown label set) is compared on past windows over the classes both know (`gated_accuracies`).
"""

from __future__ import annotations

from dataclasses import dataclass

# The limits are inclusive: accuracies are fractions, and 0.79 - 0.80 must not fail a 0.01 tolerance
# by a rounding error.
_EPS = 1e-9


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    new_gap: float  # candidate minus champion on the new window
    forgetting: float  # mean drop of the candidate against the champion on the past windows


def past_window_drop(candidate: list[float], champion: list[float]) -> float:
    """The forgetting gate's measure: the candidate's mean accuracy drop against the champion on
    the past windows (every window but the last, the new one)."""
    past = list(zip(candidate[:-1], champion[:-1]))
    return sum(b - a for a, b in past) / len(past) if past else 0.0


def judge(
    candidate: list[float], champion: list[float], new_window_tolerance: float, max_forgetting: float, min_gain: float | None = None
) -> GateDecision:
    """Both lists: accuracy per window, oldest first, the new window last. `min_gain` (when set)
    replaces the tolerance: the candidate must beat the champion on the new window by that much."""
    if len(candidate) != len(champion) or not candidate:
        raise ValueError(f"one accuracy per window for both models (got {len(candidate)} and {len(champion)})")
    new_gap = candidate[-1] - champion[-1]
    forgetting = past_window_drop(candidate, champion)
    reasons = []
    if min_gain is not None:
        if new_gap < min_gain - _EPS:
            reasons.append(
                f"new window accuracy {candidate[-1]:.3f} gains {new_gap:+.3f} on the champion's {champion[-1]:.3f}, "
                f"less than gates.min_gain {min_gain}"
            )
    elif new_gap < -new_window_tolerance - _EPS:
        reasons.append(
            f"new window accuracy {candidate[-1]:.3f} is below the champion's {champion[-1]:.3f} by more than {new_window_tolerance}"
        )
    if forgetting > max_forgetting + _EPS:
        reasons.append(f"forgets {forgetting:.3f} of accuracy on past windows (limit {max_forgetting})")
    if reasons:
        return GateDecision(False, "; ".join(reasons), new_gap, forgetting)
    return GateDecision(
        True,
        f"new window {candidate[-1]:.3f} vs {champion[-1]:.3f}, forgetting {forgetting:.3f} (limit {max_forgetting})",
        new_gap,
        forgetting,
    )


def accuracy_matrix(windows: list[dict]) -> list[list[float | None]]:
    """R[i][j] for the finished windows so far (in order); R[i-1][i] is the champion before
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
