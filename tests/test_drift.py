"""Drift as a cycle's trigger (continual.trigger: drift), on the local Ray with seeded data: rows
from the distribution the champion last trained on hold a cycle back, shifted rows start one."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import make_config, register_tiny
from lifelong.continual.cycle import run_cycle
from lifelong.continual.drift import compare
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.synth import write_stream

pytestmark = pytest.mark.slow


def test_the_tests_on_answers_alone():
    same = compare(([0, 1] * 100, [0.9] * 200), ([0, 1] * 100, [0.9] * 200), 0.01, 0.1, ["a", "b"])
    assert not same["drifted"] and same["tests"]["classes"]["p_value"] == 1.0
    classes = compare(([0] * 150 + [1] * 50, [0.9] * 200), ([0, 1] * 100, [0.9] * 200), 0.01, 0.1, ["a", "b"])
    assert classes["drifted"] and classes["tests"]["classes"]["drifted"] and not classes["tests"]["confidence"]["drifted"]
    unsure = compare(([0, 1] * 100, [0.5] * 200), ([0, 1] * 100, [0.9] * 200), 0.01, 0.1, ["a", "b"])
    assert unsure["drifted"] and unsure["tests"]["confidence"]["drifted"] and unsure["predicted"]["pending"] == {"a": 100, "b": 100}
    # Significant but small (2,000 rows, 4 points apart): not drift.
    small = compare(([0] * 1040 + [1] * 960, [0.9] * 2000), ([0, 1] * 1000, [0.9] * 2000), 0.5, 0.1, ["a", "b"])
    assert small["tests"]["classes"]["p_value"] < 0.25 and not small["drifted"]


def test_rows_like_the_last_window_hold_a_cycle_back_and_shifted_rows_start_one(ray_session, tiny_tokenizer, topic_rows, tmp_path):
    root, landing = tmp_path / "store", tmp_path / "landing"
    landing.mkdir()
    registry = Registry(Storage(str(root)))
    v1 = register_tiny(registry, "drifting", tiny_tokenizer, tmp_path / "work", seed=3, rows=topic_rows[:100])
    registry.move_alias("drifting", "champion", v1)
    w0, w1 = write_stream(tmp_path / "windows", windows=2, rows_per_window=360, files_per_window=3, seed=0)
    config = make_config(
        "gpt2/tiny_continual.yaml",
        "name=drifting",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        "model.init_from=drifting@champion",
        "scaling.num_workers=1",
        "export.on_register=never",
        "train.epochs=3",
        "train.lr=3e-3",
        "continual.min_new_rows=100",
        "continual.gates.max_forgetting=1.0",
        "continual.trigger=drift",
        "data.validation_fraction=0.4",  # holdouts (the rows drift is measured against) of about 100 rows
    )
    first_files, same_file = sorted(w0.iterdir())[:2], sorted(w0.iterdir())[2]
    for f in first_files:
        shutil.copy(f, landing / f"w0-{f.name}")
    first = run_cycle(config)  # nothing trained yet to compare with: the first window starts on rows
    assert first.window == 0 and first.version is not None, first.summary()

    # More rows of window 0's distribution: 120 rows (above min_new_rows), and no drift: held back.
    shutil.copy(same_file, landing / f"w0-{same_file.name}")
    held = run_cycle(config)
    print(held.summary())
    drift = json.loads((root / "streams" / "drifting" / "drift.json").read_text())["drift"]
    assert held.status == "waiting" and "did not drift from window 0" in held.reason
    holdout = pq.read_table(root / "streams" / "drifting" / "holdouts" / "window-000.parquet").num_rows
    assert not drift["drifted"] and drift["window"] == 0 and drift["rows"] == {"pending": 120, "reference": holdout} and holdout > 60
    assert all(t["p_value"] >= 0.005 or t["effect"] < 0.1 for t in drift["tests"].values()), drift

    # A shifted window (other classes, new vocabulary) lands: drift, and a cycle starts on it.
    for f in sorted(w1.iterdir())[:1]:
        shutil.copy(f, landing / f"w1-{f.name}")
    started = run_cycle(config)
    print(started.summary())
    assert started.window == 1 and started.version is not None, started.summary()
    card = registry.card("drifting", started.version)
    assert card.stream.drift["drifted"] and card.stream.drift["window"] == 0 and card.stream.drift["rows"]["pending"] == 240
    assert any(t["drifted"] for t in card.stream.drift["tests"].values())
    assert any("drift from window 0: drifted" in line for line in started.scan)


def test_a_language_models_stream_drifts_on_text_it_predicts_worse(ray_session, tiny_tokenizer, tmp_path):
    """Texts of the synthetic topic stream as a language model's stream (window 1: other topics,
    all their vocabulary new): more of window 0's texts hold a cycle back; window 1's, on which
    the champion's loss is higher, start one."""
    from conftest import doc_lm_config, lm_stream

    def windows(out):
        return write_stream(out, windows=2, rows_per_window=240, files_per_window=3, seed=0, new_vocab_fraction=1.0)

    s = lm_stream("drift-lm", tiny_tokenizer, tmp_path, windows)
    config = doc_lm_config(
        "drift-lm",
        s["root"],
        s["landing"],
        "continual.trigger=drift",
        "scaling.num_workers=1",
        "train.epochs=4",
        "data.validation_fraction=0.4",
    )
    w0, w1 = (sorted(w.iterdir()) for w in s["windows"])
    for f in w0[:2]:
        shutil.copy(f, s["landing"] / f"w0-{f.name}")
    first = run_cycle(config)
    assert first.window == 0 and first.version is not None, first.summary()

    shutil.copy(w0[2], s["landing"] / f"w0-{w0[2].name}")
    held = run_cycle(config)
    print(held.summary())
    drift = json.loads((s["root"] / "streams" / "drift-lm" / "drift.json").read_text())["drift"]
    assert held.status == "waiting" and "did not drift from window 0" in held.reason and not drift["drifted"], drift
    assert drift["tests"]["loss"]["test"] == "two-sample Kolmogorov-Smirnov test of the champion's per-row loss"

    for f in w1[:2]:
        shutil.copy(f, s["landing"] / f"w1-{f.name}")
    started = run_cycle(config)
    print(started.summary())
    assert started.window == 1 and started.version is not None, started.summary()
    measured = s["registry"].card("drift-lm", started.version).stream.drift
    assert (
        measured["drifted"]
        and measured["tests"]["loss"]["drifted"]
        and measured["mean_loss"]["pending"] > measured["mean_loss"]["reference"]
    )
