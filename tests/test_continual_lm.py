"""Continual pretraining of a language model on real Ray, Serve and storage: windows of real
text (CPython's documentation, one part per window) through the ledger, replay and holdouts,
gated on perplexity, under a running generate deployment; the perplexity matrix and its report."""

from __future__ import annotations

import json
import math
import threading

import httpx
import pyarrow as pa
import pytest
import torch

from conftest import ask_until_stopped, doc_lm_config, doc_lm_stream, drop, wait_for_version
from lifelong.continual.cycle import run_cycle
from lifelong.continual.gates import judge_perplexity
from lifelong.continual.ledger import Ledger
from lifelong.continual.stream import Stream
from lifelong.errors import ConfigError, first_line
from lifelong.storage import Storage
from lifelong.synth import DOC_PARTS, doc_paragraphs, write_doc_stream


def lm_config(root, landing, *extra):
    return doc_lm_config("doc-lm", root, landing, *extra)


@pytest.fixture
def lm_stream(tiny_tokenizer, tmp_path):
    return doc_lm_stream("doc-lm", tiny_tokenizer, tmp_path)


def hand_perplexity(model_dir, texts: list[str], length: int) -> float:
    """Every text followed by EOS, one token stream cut into blocks of `length` (the last one
    shorter), each block's next-token cross-entropy summed; exp of the mean over the tokens predicted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    total, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), length):
            block = torch.tensor([stream[start : start + length]])
            if block.shape[1] < 2:
                continue
            logits = model(input_ids=block).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, block[0, 1:], reduction="sum"))
            predicted += block.shape[1] - 1
    return math.exp(total / predicted)


@pytest.mark.slow
def test_two_continual_pretraining_cycles_gate_on_perplexity_and_swap_the_generate_endpoint_under_load(lm_stream, serve_port):
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.continual.report import write_report
    from lifelong.serve import deploy

    root, landing, registry = lm_stream["root"], lm_stream["landing"], lm_stream["registry"]
    config = lm_config(root, landing)
    serve_cfg = {"port": serve_port, "num_replicas": 2, "poll_interval_s": 0.3, "route_prefix": "/doc-lm", "app_name": "doc-lm"}
    url = deploy(absolute_paths(validate_config({"name": "doc-lm", "storage": {"root": str(root)}, "serve": serve_cfg})))
    results, stop = [], threading.Event()

    asked = {"prompt": "The for statement", "max_new_tokens": 3}
    client = threading.Thread(target=ask_until_stopped, args=(url, "/v1/generate", asked, results, stop))
    client.start()
    outcomes = []
    try:
        for window in lm_stream["windows"]:
            drop(window, landing)
            outcome = run_cycle(config)
            print(outcome.summary())
            outcomes.append(outcome)
            # The gates decided on perplexity, relative to the champion's, as gates.py judges it.
            cand, champ = outcome.accuracy["candidate"], outcome.accuracy["champion"]
            expected = judge_perplexity(cand, champ, 0.0, 0.05)
            assert outcome.metric == "perplexity" and outcome.status == ("promoted" if expected.passed else "rejected")
            assert outcome.reason == expected.reason and "perplexity per window: w0" in outcome.summary()
        first, second = outcomes
        assert (first.window, second.window) == (0, 1) and second.replay_rows > 0
        # The champion before the stream on window 0's holdout, by hand: the same number the gates read.
        storage = Storage(str(root))
        holdout0 = Stream(storage, "doc-lm").holdout(0)
        assert holdout0.column_names == ["text"] and 0 < holdout0.num_rows < 160
        texts0 = holdout0.column("text").to_pylist()
        assert set(texts0) <= set(doc_paragraphs(DOC_PARTS["statements"]))  # real text of window 0's part
        v1_dir = registry.local_dir("doc-lm", lm_stream["v1"])
        assert first.accuracy["champion"][0] == pytest.approx(hand_perplexity(v1_dir, texts0, 32), rel=1e-4)
        cand_dir = registry.local_dir("doc-lm", first.version)
        assert first.accuracy["candidate"][0] == pytest.approx(hand_perplexity(cand_dir, texts0, 32), rel=1e-4)
        assert first.accuracy["candidate"][0] < 0.5 * first.accuracy["champion"][0]  # a random model learned the text
        # Every file consumed once, by its window's version.
        consumed = {r.name: r.consumed_by for r in Ledger(storage, "doc-lm").records()}
        assert len(consumed) == 4 and all(v in (f"doc-lm:{first.version}", f"doc-lm:{second.version}") for v in consumed.values())

        # The perplexity matrix against the cycles' own measurements, and its relative measures by hand.
        report = write_report(config)
        serving0 = first.accuracy["candidate"] if first.status == "promoted" else first.accuracy["champion"]
        serving1 = second.accuracy["candidate"] if second.status == "promoted" else second.accuracy["champion"]
        P = [[serving0[0], second.accuracy["champion"][1]], serving1]
        data = json.loads(report.json_path.read_text())
        assert data["metric"] == "perplexity" and [pytest.approx(row) for row in data["perplexity_matrix"]] == P
        m = data["metrics_over_cycles"][-1]
        assert m["average_perplexity"] == pytest.approx((P[1][0] + P[1][1]) / 2)
        assert m["backward_transfer"] == pytest.approx((P[0][0] - P[1][0]) / P[0][0])
        assert m["forgetting"] == pytest.approx((P[1][0] - P[0][0]) / P[0][0])
        baseline = data["baseline"]  # the starting model on each new window
        assert m["forward_transfer"] == pytest.approx((baseline[1] - P[0][1]) / baseline[1])
        assert "perplexity matrix R[i][j]" in report.text and report.matrix_png.stat().st_size > 5000
        assert report.metrics_png.stat().st_size > 5000

        champion = registry.alias_version("doc-lm", "champion")
        promoted = [o.version for o in outcomes if o.status == "promoted"]
        assert champion == (promoted[-1] if promoted else lm_stream["v1"])

        def served():
            return httpx.post(url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 1}, timeout=30).json()["version"]

        assert wait_for_version(served, champion) == champion
    finally:
        stop.set()
        client.join()
        serve.delete("doc-lm")
    assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
    assert {v for _, v in results} == {lm_stream["v1"], *promoted}


def test_a_config_longer_than_the_champions_positions_is_refused_without_spending_an_attempt(ray_session, lm_stream):
    root, landing = lm_stream["root"], lm_stream["landing"]
    drop(lm_stream["windows"][0], landing)
    with pytest.raises(ConfigError, match=r"model.max_length is 64 but model.init_from 'doc-lm:1' has 32 positions"):
        run_cycle(lm_config(root, landing, "model.max_length=64"))
    storage = Storage(str(root))
    window = Stream(storage, "doc-lm").unfinished()
    assert window is not None and window.attempts == 0 and window.status == "open"
    assert {r.state for r in Ledger(storage, "doc-lm").records()} == {"pending"}  # nothing quarantined


def test_a_ray_task_error_is_reported_by_its_cause(ray_session):
    @ray_session.remote
    def fails():
        raise IndexError("index out of range in self")

    with pytest.raises(Exception) as caught:
        ray_session.get(fails.remote())
    assert str(caught.value).splitlines()[0].startswith("ray::") or "fails" in str(caught.value).splitlines()[0]
    assert first_line(caught.value) == "IndexError: index out of range in self"


def test_a_language_models_holdout_counts_every_token_of_its_text(tiny_tokenizer, tmp_path):
    from lifelong.config import ModelConfig
    from lifelong.models import build_model, load_tokenizer
    from lifelong.tasks import task

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_tokenizer)
    model = build_model(ModelConfig(task="causal-lm", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=16), tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    texts = doc_paragraphs(DOC_PARTS["expressions"])[:7]
    counts = task("causal-lm").holdout_counts(model.eval(), tmp_path / "m", pa.table({"text": texts}), 16)
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert counts["tokens"] == n - math.ceil(n / 16)  # every token but each block's first, the short last block too
    assert math.exp(counts["loss_sum"] / counts["tokens"]) == pytest.approx(hand_perplexity(tmp_path / "m", texts, 16), rel=1e-4)


def test_the_doc_stream_holds_one_part_of_the_documentation_per_window(tmp_path):
    import pyarrow.fs as pafs

    from lifelong.config import DataConfig
    from lifelong.data import read_file

    dirs = write_doc_stream(tmp_path, windows=4, files_per_window=3)
    seen = []
    for d, part in zip(dirs, DOC_PARTS):
        files = sorted(str(p) for p in d.iterdir())
        assert sorted(p.rsplit(".", 1)[1] for p in files) == ["csv", "jsonl", "parquet"]
        cfg = DataConfig(path=str(d), text_column="text")
        rows = {text for f in files for text in read_file(pafs.LocalFileSystem(), f, cfg)[1].column("text").to_pylist()}
        earlier = set().union(*seen)
        assert rows == set(doc_paragraphs(DOC_PARTS[part])) - earlier and len(rows) > 300
        seen.append(rows)
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # no paragraph in two windows
    with pytest.raises(ValueError, match="windows must be 1..4"):
        write_doc_stream(tmp_path / "more", windows=5)
