"""Continual-learning metrics over the accuracy matrix.

R[i][j] is the accuracy, on window j's holdout, of the model after window i (windows 0..T-1).
`before[j]` is the accuracy on window j's holdout of the model that was champion just before
window j was trained on (R[j-1][j] for j > 0; for window 0, the starting champion), which is
what the cycle measures anyway when it compares the candidate with the champion.

Definitions (GEM: Lopez-Paz & Ranzato, 2017; forgetting: Chaudhry et al., 2018):
- average accuracy  ACC = 1/T Σ_j R[T-1][j]
- backward transfer BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j])       (negative: forgetting)
- forward transfer  FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b[j])             b: the starting model
- forgetting        F   = 1/(T-1) Σ_{j<T-1} max_{l<T-1, l>=j} R[l][j] - R[T-1][j]
GEM's b[j] is a randomly initialised model; here it is the model the stream started from (the
first champion), which is what a user can compare against.
Entries not measured are None; metrics that need them are None (e.g. BWT with one window).

A language model's stream holds a perplexity matrix P instead (lower is better, on a scale that
depends on each window's text), and the same measures are relative, signed alike (BWT and FWT
negative when worse, forgetting positive):
- average perplexity            1/T Σ_j P[T-1][j]
- backward transfer  BWT = 1/(T-1) Σ_{j<T-1} (P[j][j] - P[T-1][j]) / P[j][j]
- forward transfer   FWT = 1/(T-1) Σ_{j>0} (b[j] - P[j-1][j]) / b[j]
- forgetting         F   = 1/(T-1) Σ_{j<T-1} (P[T-1][j] - min_{j<=l<T-1} P[l][j]) / min_{j<=l<T-1} P[l][j]
"""

from __future__ import annotations

from statistics import fmean

# Per metric: the change from `before` to `after` as a gain (positive: better), and the best of values.
_TERMS = {
    "accuracy": (lambda before, after: after - before, max),
    "perplexity": (lambda before, after: (before - after) / before, min),
    # Answers against references (an instruction stream's gates): higher is better, in their points.
    **{name: (lambda before, after: after - before, max) for name in ("bleu", "chrf", "exact_match")},
}


def cl_metrics(
    R: list[list[float | None]], baseline: list[float | None] | None = None, metric: str = "accuracy"
) -> dict[str, float | None]:
    """ACC (or the average perplexity), BWT, FWT and forgetting of the square matrix R (T windows so far)."""
    gain, best = _TERMS[metric]
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"the {metric} matrix must be square and non-empty (got {[len(r) for r in R]} for {T} rows)")
    last = R[T - 1]
    seen = [last[j] for j in range(T)]
    acc = fmean(seen) if all(v is not None for v in seen) else None
    bwt = forgetting = fwt = None
    if T > 1:
        pairs = [(last[j], R[j][j]) for j in range(T - 1)]
        if all(a is not None and b is not None for a, b in pairs):
            bwt = fmean(gain(b, a) for a, b in pairs)
        peaks = [[R[i][j] for i in range(j, T - 1)] for j in range(T - 1)]
        if all(v is not None for col in peaks for v in col) and all(v is not None for v in last[:-1]):
            forgetting = fmean(-gain(best(col), last[j]) for j, col in enumerate(peaks))
        if baseline is not None and len(baseline) >= T:
            ahead = [(R[j - 1][j], baseline[j]) for j in range(1, T)]
            if all(a is not None and b is not None for a, b in ahead):
                fwt = fmean(gain(b, a) for a, b in ahead)
    return {"windows": T, f"average_{metric}": acc, "backward_transfer": bwt, "forward_transfer": fwt, "forgetting": forgetting}


def metrics_over_cycles(R: list[list[float | None]], baseline: list[float | None] | None = None, metric: str = "accuracy") -> list[dict]:
    """The metrics as they stood after each cycle (the top-left t x t block of R)."""
    return [cl_metrics([row[:t] for row in R[:t]], baseline, metric) for t in range(1, len(R) + 1)]
