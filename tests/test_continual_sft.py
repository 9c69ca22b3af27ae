"""Continual instruction tuning on real Ray: prompt/response windows through the ledger, replay
and holdouts, the loss on the responses only, and gates on BLEU of the answers to each window's
holdout prompts (continual.gates.metric), which an offline computation reproduces."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from conftest import drop, lm_stream, make_config
from lifelong.continual.gates import gate
from lifelong.data import REPLAYED, RESPONSE
from lifelong.errors import LifelongError
from lifelong.tasks.causal_lm import instruction_rows, tokenize

NAME = "sft-stream"


def sft_config(root, landing, *extra):
    return make_config(
        "gpt2/tiny_sft_continual.yaml",
        f"name={NAME}",
        f"model.init_from={NAME}@champion",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        "model.max_length=32",
        "continual.min_new_rows=50",
        *extra,
    )


def test_instruction_rows_of_a_cycle_keep_their_replayed_marks_and_their_response_only_labels(tiny_tokenizer):
    """A cycle's rows (new: 0, replayed sample e: e) tokenized as the loop reads them: each mark's
    rows apart, each block carrying its mark, labels on the response tokens only, as without marks."""
    from lifelong.models import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    prompts = [f"What is this about? rain {'storm ' * (i % 3)}" for i in range(6)]
    responses = [f"It is about weather: it says rain {i}." for i in range(6)]
    marks = [0, 1, 0, 2, 1, 0]
    batch = tokenize(pa.table({"text": prompts, "label": [-1] * 6, RESPONSE: responses, REPLAYED: marks}), str(tiny_tokenizer), 32)
    assert batch[REPLAYED].tolist() == [0, 0, 0, 1, 1, 2]
    for mark in (0, 1, 2):
        rows = [i for i, m in enumerate(marks) if m == mark]
        alone = instruction_rows([prompts[i] for i in rows], [responses[i] for i in rows], tok, 32)
        assert np.array_equal(batch["labels"][batch[REPLAYED] == mark], alone["labels"])
        assert np.array_equal(batch["input_ids"][batch[REPLAYED] == mark], alone["input_ids"])


def test_a_gate_on_answers_needs_instruction_data_and_a_metric_of_its_task(tmp_path):
    from lifelong.continual.cycle import check_continual

    landing = tmp_path / "landing"
    landing.mkdir()
    with pytest.raises(LifelongError, match=r"continual.gates.metric=bleu scores answers against each holdout's responses"):
        check_continual(make_config("gpt2/tiny_lm_continual.yaml", f"continual.landing={landing}", "continual.gates.metric=bleu"))
    with pytest.raises(LifelongError, match=r"continual.gates.metric=accuracy: a causal-lm stream gates on perplexity or bleu"):
        check_continual(sft_config(tmp_path / "store", landing, "continual.gates.metric=accuracy"))
    with pytest.raises(LifelongError, match=r"continual.gates.metric=bleu: a sequence-classification stream gates on accuracy"):
        check_continual(make_config("gpt2/tiny_continual.yaml", f"continual.landing={landing}", "continual.gates.metric=bleu"))
    check_continual(sft_config(tmp_path / "store", landing))  # the shipped config passes


def test_bleu_gates_read_points_as_fractions_of_a_hundred():
    from lifelong.config import GatesSection

    gates = GatesSection(new_window_tolerance=0.0, max_forgetting=0.05)
    passed = gate("bleu", [38.0, 40.0], [40.0, 20.0], gates)  # 2 points lost on the past window, 20 gained on the new one
    assert passed.passed and passed.new_gap == pytest.approx(0.2) and passed.forgetting == pytest.approx(0.02)
    failed = gate("bleu", [30.0, 40.0], [40.0, 20.0], gates)  # 10 points lost
    assert not failed.passed and "forgets 0.100 of bleu on past windows (limit 0.05)" in failed.reason
    worse = gate("chrf", [50.0, 39.0], [50.0, 40.0], gates)
    assert not worse.passed and "new window chrf 0.390 is below the champion's 0.400" in worse.reason


@pytest.mark.slow
def test_two_instruction_cycles_gate_on_the_bleu_of_their_answers_as_an_offline_computation_scores_them(
    ray_session, tiny_tokenizer, tmp_path
):
    """A random tiny GPT-2, then two windows of instructions about different topics: each cycle
    fine-tunes the champion on the window's prompts (plus replay), both models answer every
    window's holdout prompts, and the gates decide on BLEU. The first cycle is promoted (it learned
    to answer); every BLEU the gates read equals the one `reference_metrics` computes here from
    the registered versions and the stored holdouts; the report's matrix is in BLEU."""
    from lifelong.continual.cycle import run_cycle
    from lifelong.continual.report import write_report
    from lifelong.continual.stream import Stream
    from lifelong.models import load_for_inference, load_tokenizer
    from lifelong.storage import Storage
    from lifelong.synth import write_instruction_stream
    from lifelong.tasks.causal_lm import reference_metrics

    start = lm_stream(
        NAME, tiny_tokenizer, tmp_path, lambda out: write_instruction_stream(out, windows=2, rows_per_window=300, files_per_window=2)
    )
    root, landing, registry, v1, windows = (start[k] for k in ("root", "landing", "registry", "v1", "windows"))
    config = sft_config(root, landing, "train.lr=3e-3", "continual.gates.generate_rows=24")
    outcomes = []
    for window in windows:
        drop(window, landing)
        outcome = run_cycle(config)
        print(outcome.summary())
        outcomes.append(outcome)
    first, second = outcomes
    assert first.metric == second.metric == "bleu" and second.replay_rows > 0
    assert first.status == "promoted" and first.accuracy["candidate"][0] > first.accuracy["champion"][0] + 10
    assert "bleu per window: w0" in first.summary()

    stream = Stream(Storage(str(root)), NAME)
    holdouts = [stream.holdout(k) for k in (0, 1)]
    assert all(h.column_names == ["text", RESPONSE] and h.num_rows >= 24 for h in holdouts)
    assert all("finance" in r or "science" in r for r in holdouts[0].column(RESPONSE).to_pylist())  # window 0's topics

    def bleu(version: int, k: int) -> float:
        model_dir = registry.resolve(f"{NAME}:{version}").local_dir
        model, tok = load_for_inference(model_dir, "causal-lm"), load_tokenizer(model_dir)
        rows = holdouts[k].slice(0, 24)
        return reference_metrics(model, tok, rows.column("text").to_pylist(), rows.column(RESPONSE).to_pylist(), 24)["bleu"]

    assert first.accuracy["champion"][0] == pytest.approx(bleu(v1, 0), abs=1e-6)
    assert first.accuracy["candidate"][0] == pytest.approx(bleu(first.version, 0), abs=1e-6)
    assert second.accuracy["candidate"] == [pytest.approx(bleu(second.version, k), abs=1e-6) for k in (0, 1)]
    expected = gate("bleu", second.accuracy["candidate"], second.accuracy["champion"], config.continual.gates)
    assert second.status == ("promoted" if expected.passed else "rejected") and second.reason == expected.reason

    data = json.loads(write_report(config).json_path.read_text())
    serving1 = second.accuracy["candidate"] if second.status == "promoted" else second.accuracy["champion"]
    assert data["metric"] == "bleu"
    matrix = [[first.accuracy["candidate"][0], second.accuracy["champion"][1]], serving1]
    assert [pytest.approx(row) for row in data["bleu_matrix"]] == matrix
