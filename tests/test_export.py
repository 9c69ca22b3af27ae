"""ONNX and TorchScript export: parity with PyTorch, int8 measured and gated, add-only exports, backends agree."""

import numpy as np
import pytest
import torch

from conftest import register_tiny
from lifelong.cli import main
from lifelong.config import ExportSection
from lifelong.export import ExportError, export_files
from lifelong.inference import Classifier
from lifelong.registry import Registry
from lifelong.storage import Storage

TEXTS = ["markets fell as rates rose", "a new species of frog was found", "x", "goal " * 80]


@pytest.fixture(scope="module")
def store(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-store")
    registry = Registry(Storage(str(root)))
    return {"root": root, "registry": registry, "work": tmp_path_factory.mktemp("export-work")}


def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def test_export_adds_onnx_and_int8_to_an_existing_version_without_rewriting_it(
    ray_session, store, tiny_tokenizer, topic_rows, demo_data, capsys
):
    registry = store["registry"]
    version = register_tiny(registry, "plain", tiny_tokenizer, store["work"], seed=7, export=False)
    card_path = store["root"] / f"registry/plain/versions/{version}/card.json"
    before = card_path.read_bytes()
    assert registry.card("plain", version).exports == {}

    code = run_cli(
        "export", f"plain:{version}", "--root", str(store["root"]), "--data", str(demo_data / "topics.jsonl"), "--max-accuracy-drop", "1.0"
    )
    assert code in (0, None), capsys.readouterr()
    card = registry.card("plain", version)
    assert card_path.read_bytes() == before  # the card itself is never rewritten
    assert card.exports["onnx"].parity_max_abs_diff <= 1e-4
    assert card.exports["onnx-int8"].rows > 100
    assert card.exports["onnx-int8"].accuracy_fp32 > 0  # the rows carry their labels
    assert set(card.size_bytes) == {"safetensors", "onnx", "onnx-int8"}
    assert card.size_bytes["onnx-int8"] < card.size_bytes["onnx"]
    # The same formats again: refused, and nothing changes; said before any data is asked for
    # the int8 gate (this version records no training data: it said so instead).
    assert run_cli("export", f"plain:{version}", "--root", str(store["root"]), "--no-int8") == 2
    assert "already has" in capsys.readouterr().err
    assert run_cli("export", f"plain:{version}", "--root", str(store["root"])) == 2
    assert f"plain:{version} already has onnx, onnx-int8; versions are immutable" in capsys.readouterr().err
    assert registry.card("plain", version) == card


def test_backends_agree_on_the_same_inputs(store, tiny_tokenizer, topic_rows):
    registry = store["registry"]
    version = register_tiny(registry, "agree", tiny_tokenizer, store["work"], seed=8, rows=topic_rows[:200])
    model_dir, card = registry.local_dir("agree", version), registry.card("agree", version)
    probs = {b: Classifier(model_dir, b, card.max_length).probabilities(TEXTS)[0] for b in ("torch", "onnx", "onnx-int8")}
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-5)
    np.testing.assert_allclose(probs["onnx-int8"], probs["torch"], atol=0.05)  # quantized, but close
    _, truncated = Classifier(model_dir, "onnx", card.max_length).probabilities(TEXTS)
    assert truncated == [False, False, False, True]


def test_a_new_version_of_the_same_architecture_reuses_its_parents_graph(store, tiny_tokenizer, topic_rows, tmp_path):
    """A cycle's candidate gets its champion's ONNX graph with its own weights (no tracing); the
    ONNX logits are the candidate's, not the champion's. Another architecture is exported afresh."""
    import shutil

    from lifelong.export import OnnxTemplate
    from lifelong.models import load_for_inference

    registry = store["registry"]
    untrained = register_tiny(registry, "tmpl", tiny_tokenizer, store["work"], seed=11, rows=topic_rows[:100])
    untrained_dir, card = registry.local_dir("tmpl", untrained), registry.card("tmpl", untrained)
    rows = [{"text": r["text"], "label": i % 4} for i, r in enumerate(topic_rows[:64])]

    def trained(src, dest):  # every weight changed, as training changes them
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.onnx", "card.json"))
        model = load_for_inference(dest, "sequence-classification")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(dest)
        return dest

    parent_dir = trained(untrained_dir, tmp_path / "parent")
    export_files(parent_dir, "sequence-classification", card.max_length, ExportSection(), parent_dir, rows, ("onnx",))
    template = OnnxTemplate(parent_dir / "model.onnx", parent_dir, "tmpl:2")
    child = trained(parent_dir, tmp_path / "child")
    reused = export_files(
        child, "sequence-classification", card.max_length, ExportSection(), tmp_path / "reused", rows, ("onnx",), template
    )
    assert reused.records["onnx"]["exporter"] == "weights written into the graph of tmpl:2"
    assert reused.records["onnx"]["parity_max_abs_diff"] <= 1e-4
    ours = Classifier(child, "onnx", card.max_length, exported=reused.files["model.onnx"]).probabilities(TEXTS)[0]
    np.testing.assert_allclose(ours, Classifier(child, "torch", card.max_length).probabilities(TEXTS)[0], atol=1e-5)
    assert not np.allclose(ours, Classifier(parent_dir, "onnx", card.max_length).probabilities(TEXTS)[0], atol=1e-3)
    # An untrained template (its equal biases share one initializer) is not used: a fresh export.
    untouched = OnnxTemplate(untrained_dir / "model.onnx", untrained_dir, f"tmpl:{untrained}")
    fresh = export_files(child, "sequence-classification", card.max_length, ExportSection(), tmp_path / "f1", rows, ("onnx",), untouched)
    assert fresh.records["onnx"]["exporter"].startswith("torch.onnx TorchScript-based")
    # Nor a template of another architecture (3 layers instead of 2).
    other = register_tiny(registry, "tmpl-other", tiny_tokenizer, store["work"], seed=12, rows=topic_rows[:100], n_layer=3)
    other_dir = registry.local_dir("tmpl-other", other)
    fresh = export_files(
        child,
        "sequence-classification",
        card.max_length,
        ExportSection(),
        tmp_path / "fresh",
        rows,
        ("onnx",),
        OnnxTemplate(other_dir / "model.onnx", other_dir, f"tmpl-other:{other}"),
    )
    assert fresh.records["onnx"]["exporter"].startswith("torch.onnx TorchScript-based")
    assert fresh.records["onnx"]["parity_max_abs_diff"] <= 1e-4


def test_int8_gate_refuses_a_drop_above_the_limit(store, tiny_tokenizer, topic_rows, tmp_path):
    """Rows labelled with the fp32 model's own answers, among them rows int8 answers otherwise:
    fp32 scores 1.0 and int8 less, always, so the strict gate must refuse and the lenient keep.
    (Dynamic quantization scales activations per batch: the rows are found, and then scored by
    the gate, as one batch of the same texts.)"""
    registry = store["registry"]
    version = register_tiny(registry, "gate", tiny_tokenizer, store["work"], seed=9, export=False)
    model_dir, card = registry.local_dir("gate", version), registry.card("gate", version)
    texts = [r["text"] for r in topic_rows]
    lenient_gate = ExportSection(int8_max_accuracy_drop=1.0)
    probe = export_files(model_dir, card.task, card.max_length, lenient_gate, tmp_path / "probe", topic_rows[:20])
    fp32 = Classifier(model_dir, "torch", card.max_length)
    int8 = Classifier(model_dir, "onnx-int8", card.max_length, exported=probe.files["model.int8.onnx"])
    for start in range(0, len(texts) - 48, 48):  # 48 rows: one batch of the gate's scoring (64)
        batch = texts[start : start + 48]
        answers, quantized = fp32.probabilities(batch)[0].argmax(1), int8.probabilities(batch)[0].argmax(1)
        if (answers != quantized).any():
            break
    else:
        pytest.fail("int8 agreed with fp32 on every batch of the demo texts: the refusal cannot be forced with this model")
    rows = [{"text": t, "label": int(y)} for t, y in zip(batch, answers)]
    expected_drop = float((answers != quantized).mean())
    strict = export_files(model_dir, card.task, card.max_length, ExportSection(int8_max_accuracy_drop=0.0), tmp_path / "strict", rows)
    lenient = export_files(model_dir, card.task, card.max_length, lenient_gate, tmp_path / "lenient", rows)
    measured = lenient.records["onnx-int8"]
    assert measured["accuracy_fp32"] == 1.0 and measured["accuracy_drop"] == pytest.approx(expected_drop) and expected_drop > 0
    assert "model.int8.onnx" in lenient.files
    assert "onnx-int8" not in strict.records and "model.int8.onnx" not in strict.files
    assert "int8_max_accuracy_drop" in strict.refused["onnx-int8"]
    assert strict.records["onnx"]["int8_refused"]["accuracy_drop"] == measured["accuracy_drop"]


def test_torchscript_is_added_to_a_version_agrees_with_pytorch_and_loads_without_the_model_code(store, tiny_tokenizer, topic_rows, capsys):
    import subprocess
    import sys

    registry = store["registry"]
    version = register_tiny(registry, "traced", tiny_tokenizer, store["work"], seed=13, rows=topic_rows[:100])
    assert set(registry.card("traced", version).exports) == {"onnx", "onnx-int8"}
    code = run_cli("export", f"traced:{version}", "--root", str(store["root"]), "--torchscript")
    assert code in (0, None), capsys.readouterr()
    card = registry.card("traced", version)
    record = card.exports["torchscript"]
    assert record.parity_max_abs_diff <= 1e-4 and record.exporter.startswith("torch.jit.trace")
    assert [1, 1] in record.parity_shapes and any(batch > 1 for batch, _ in record.parity_shapes)  # one token; a padded batch
    assert card.size_bytes["torchscript"] > 0
    model_dir = registry.local_dir("traced", version)
    traced, eager = (Classifier(model_dir, b, card.max_length) for b in ("torchscript", "torch"))
    np.testing.assert_allclose(traced.probabilities(TEXTS)[0], eager.probabilities(TEXTS)[0], atol=1e-5)
    assert traced.probabilities(TEXTS)[1] == [False, False, False, True]
    # The file is the whole model: torch.jit.load alone runs it, no transformers imported.
    probe = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); "
        "out = m(torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)); "
        "print(tuple(out.shape), 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(model_dir / "model.torchscript.pt")], capture_output=True, text=True)
    assert done.stdout.split("\n")[0] == "(3, 4) False", done.stderr[-2000:]
    assert run_cli("export", f"traced:{version}", "--root", str(store["root"]), "--torchscript") == 2
    assert "already has" in capsys.readouterr().err


def test_torchscript_of_a_language_model_is_refused_naming_why(store, tiny_tokenizer, tmp_path):
    registry = store["registry"]
    version = register_tiny(registry, "lm-ts", tiny_tokenizer, store["work"], task="causal-lm", seed=14, export=False)
    with pytest.raises(ExportError, match="TorchScript is built for classifiers; a causal-lm model generates with PyTorch"):
        export_files(registry.local_dir("lm-ts", version), "causal-lm", 32, ExportSection(), tmp_path / "out", None, ("torchscript",))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_failure_is_an_error_and_registers_nothing(store, tiny_tokenizer, tmp_path, fmt):
    """A model whose outputs are NaN cannot pass parity (NaN is not within any tolerance)."""
    from transformers import AutoModelForSequenceClassification

    registry = store["registry"]
    version = register_tiny(registry, f"nan-{fmt}", tiny_tokenizer, store["work"], seed=10, export=False)
    model_dir = tmp_path / "nan"
    model = AutoModelForSequenceClassification.from_pretrained(str(registry.local_dir(f"nan-{fmt}", version)), use_safetensors=True)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    for f in tiny_tokenizer.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ExportError, match="parity_tolerance"):
        export_files(model_dir, "sequence-classification", None, ExportSection(), tmp_path / "out", None, (fmt,))


def test_export_errors_are_one_clear_message(store, capsys):
    assert run_cli("export", "missing:1", "--root", str(store["root"])) == 2
    assert "missing:1 does not exist" in capsys.readouterr().err
