"""Drift between a stream's pending rows and its past windows (`continual.trigger: drift | any`).

The champion answers each pending row and each row of the past windows' holdouts (at most
`continual.drift.max_rows` of each, a seeded sample). Holdouts, because no model of the stream
ever trained on them: on its own training rows the champion is surer and its loss lower than on
any fresh rows, drifted or not. A classifier's answers are compared by two
tests:
- a chi-square test of homogeneity (scipy.stats.chi2_contingency) of the predicted classes: the
  mix of what the rows are (as the champion sees it) moved;
- a two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp) of the champion's confidence (its
  top probability): rows unlike anything it trained on (new vocabulary, new classes it can only
  map onto old ones) are answered less surely, even when the predicted mix stays the same.
The pending rows drifted when either test gives p < `p_value` / 2 (0.01 over both, Bonferroni)
with an effect of at least `min_distance` (0.1): the predicted-class distributions' total
variation distance, or the KS statistic (the largest gap between the confidence distributions).
With thousands of rows any difference is significant; a shift this small is no reason to retrain.

A language model's answer to a row is its mean next-token loss on it: a two-sample KS test of the
losses (text unlike what it trained on is less predictable), p < `p_value` and D >= `min_distance`.

It is measured once per set of pending files (kept in streams/<stream>/drift.json with the
champion and the last window it was measured against), recorded on the cycle's window and its
version's card, and printed in the cycle's summary.
"""

from __future__ import annotations

import hashlib
import random

import pyarrow as pa

from lifelong.config import JobConfig
from lifelong.continual.ledger import FileRecord, Ledger
from lifelong.continual.stream import Stream, window_rows
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.tasks import task

TESTS = (
    "chi-square test of homogeneity of the champion's predicted classes",
    "two-sample Kolmogorov-Smirnov test of the champion's confidence",
    "two-sample Kolmogorov-Smirnov test of the champion's per-row loss",
)


def measurable(family) -> bool:
    """Whether drift is measured for a task: a classifier's classes, or a language model's losses."""
    return hasattr(family, "predicted") or hasattr(family, "row_losses")


def _sample(table: pa.Table, n: int, seed: str) -> pa.Table:
    if table.num_rows <= n:
        return table
    rows = sorted(random.Random(seed).sample(range(table.num_rows), n))
    return table.take(pa.array(rows))


def _rows(storage: Storage, ledger: Ledger, hashes: list[str], fingerprint: str, content: str) -> pa.Table:
    train, holdout = window_rows(storage, [ledger.rows_rel(h, fingerprint) for h in hashes], content)
    return pa.concat_tables([train, holdout]).select([content])


def _holdouts(stream: Stream, windows: list[int], content: str) -> pa.Table:
    tables = [stream.holdout(j) for j in windows]
    return pa.concat_tables([t.select([content]) for t in tables if content in t.column_names])


def measure(
    config: JobConfig, storage: Storage, registry: Registry, stream: Stream, ledger: Ledger, picked: list[FileRecord], fingerprint: str
) -> dict | None:
    """The drift of the `picked` pending files from the past windows' holdouts (None: no window
    trained yet, so nothing to compare with)."""
    done = [w for w in stream.journal() if w.status == "done"]
    if not done or not picked:
        return None
    last = done[-1]
    champion = registry.resolve(f"{config.name}@champion", weights=False).version
    files = [r.sha256 for r in picked]
    key = hashlib.sha256(repr((files, fingerprint, last.window, champion, config.continual.drift.model_dump())).encode()).hexdigest()
    rel = f"{stream.dir}/drift.json"
    if storage.exists(rel) and (cached := storage.read_json(rel)).get("key") == key:
        return cached["drift"]
    family = task(config.model.task)
    d = config.continual.drift
    pending = _sample(_rows(storage, ledger, files, fingerprint, family.CONTENT), d.max_rows, key)
    reference = _sample(_holdouts(stream, [w.window for w in done], family.CONTENT), d.max_rows, key + "ref")
    from lifelong.models import load_for_inference

    resolved = registry.resolve(f"{config.name}@champion")
    model = load_for_inference(resolved.local_dir, config.model.task)
    max_length = resolved.card.max_length or config.model.max_length
    if hasattr(family, "predicted"):
        ours = family.predicted(model, resolved.local_dir, pending, max_length)
        theirs = family.predicted(model, resolved.local_dir, reference, max_length)
        measured = compare(ours, theirs, d.p_value, d.min_distance, family.model_labels(model))
    else:
        ours, theirs = (family.row_losses(model, resolved.local_dir, t, max_length) for t in (pending, reference))
        measured = compare_losses(ours, theirs, d.p_value, d.min_distance)
    drift = {**measured, "window": last.window, "champion": champion}
    storage.write_json(rel, {"key": key, "drift": drift})
    return drift


def compare(
    pending: tuple[list[int], list[float]], reference: tuple[list[int], list[float]], p_value: float, min_distance: float, labels: list[str]
) -> dict:
    """Both tests on two samples of (predicted class, confidence); see the module's docstring."""
    from scipy.stats import chi2_contingency, ks_2samp

    (ours, our_conf), (theirs, their_conf) = pending, reference
    classes = sorted(set(ours) | set(theirs))
    table = [[ours.count(c) for c in classes], [theirs.count(c) for c in classes]]
    distance = 0.5 * sum(abs(a / len(ours) - b / len(theirs)) for a, b in zip(*table))
    # One class predicted on both sides: the same distribution (the test needs two).
    chi_p = float(chi2_contingency(table).pvalue) if len(classes) > 1 else 1.0
    ks = ks_2samp(our_conf, their_conf)
    each = p_value / 2
    tests = {
        "classes": {
            "test": TESTS[0],
            "p_value": chi_p,
            "effect": round(distance, 4),
            "drifted": bool(chi_p < each and distance >= min_distance),
        },
        "confidence": {
            "test": TESTS[1],
            "p_value": float(ks.pvalue),
            "effect": round(float(ks.statistic), 4),
            "drifted": bool(ks.pvalue < each and ks.statistic >= min_distance),
        },
    }
    return {
        "drifted": any(t["drifted"] for t in tests.values()),
        "tests": tests,
        "threshold": {"p_value": p_value, "per_test": each, "min_distance": min_distance},
        "rows": {"pending": len(ours), "reference": len(theirs)},
        "predicted": {
            "pending": {labels[c] if 0 <= c < len(labels) else str(c): n for c, n in zip(classes, table[0])},
            "reference": {labels[c] if 0 <= c < len(labels) else str(c): n for c, n in zip(classes, table[1])},
        },
        "mean_confidence": {"pending": round(sum(our_conf) / len(our_conf), 4), "reference": round(sum(their_conf) / len(their_conf), 4)},
    }


def compare_losses(pending: list[float], reference: list[float], p_value: float, min_distance: float) -> dict:
    """The KS test of two samples of per-row losses (a language model's drift)."""
    from scipy.stats import ks_2samp

    ks = ks_2samp(pending, reference)
    test = {"test": TESTS[2], "p_value": float(ks.pvalue), "effect": round(float(ks.statistic), 4)}
    test["drifted"] = bool(ks.pvalue < p_value and ks.statistic >= min_distance)
    return {
        "drifted": test["drifted"],
        "tests": {"loss": test},
        "threshold": {"p_value": p_value, "per_test": p_value, "min_distance": min_distance},
        "rows": {"pending": len(pending), "reference": len(reference)},
        "mean_loss": {"pending": round(sum(pending) / len(pending), 4), "reference": round(sum(reference) / len(reference), 4)},
    }


def line(drift: dict) -> str:
    verdict = "drifted" if drift["drifted"] else "no drift"
    t = drift["threshold"]
    if "loss" in drift["tests"]:
        k, m = drift["tests"]["loss"], drift["mean_loss"]
        return (
            f"drift from window {drift['window']}: {verdict} ({drift['rows']['pending']} pending rows vs {drift['rows']['reference']}; "
            f"loss KS p={k['p_value']:.3g}, D {k['effect']:.3f}, mean {m['pending']:.3f} vs {m['reference']:.3f}; "
            f"drift: p < {t['per_test']:g} and D >= {t['min_distance']})"
        )
    c, k = drift["tests"]["classes"], drift["tests"]["confidence"]
    return (
        f"drift from window {drift['window']}: {verdict} ({drift['rows']['pending']} pending rows vs {drift['rows']['reference']}; "
        f"predicted classes chi-square p={c['p_value']:.3g}, distance {c['effect']:.3f}; confidence KS p={k['p_value']:.3g}, "
        f"D {k['effect']:.3f}; drift: p < {t['per_test']:g} and effect >= {t['min_distance']})"
    )
