"""Drift as a cycle's trigger (continual.trigger: drift), on the local Ray with seeded data: rows
from the distribution the champion last trained on hold a cycle back, shifted rows start one."""

import json
import shutil

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
    assert not drift["drifted"] and drift["window"] == 0 and drift["rows"] == {"pending": 120, "reference": 240}
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
