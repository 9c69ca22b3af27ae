"""Batch predictions (`lifelong predict`): every row scored by a registry version through Ray Data,
as the endpoint would answer it, written to Parquet in order; rows that cannot be scored keep their
place with the reason; bad references and outputs are one message before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import LABELS, register_tiny, text_probabilities
from lifelong.errors import LifelongError
from lifelong.registry import Registry
from lifelong.storage import Storage


@pytest.fixture(scope="module")
def store(tiny_tokenizer, topic_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-store")
    registry = Registry(Storage(str(root)))
    rows = [{"text": r["text"], "label": r["label"]} for r in topic_rows[:64]]
    version = register_tiny(registry, "topics", tiny_tokenizer, tmp_path_factory.mktemp("work"), rows=rows)
    register_tiny(registry, "lm", tiny_tokenizer, tmp_path_factory.mktemp("work-lm"), task="causal-lm", export=False)
    return {"root": str(root), "registry": registry, "version": version}


def test_every_row_comes_out_in_order_scored_as_the_model_scores_it_or_with_its_reason(ray_session, store, topic_rows, tmp_path):
    from lifelong.predict import check_request, predict

    data = tmp_path / "in"
    data.mkdir()
    texts = [r["text"] for r in topic_rows[:40]]
    lines = [{"id": i, "text": t} for i, t in enumerate(texts[:25])]
    lines[3]["text"] = "   "  # nothing to score
    lines[7]["text"] = None
    lines[11]["text"] = 42  # a number, not text
    (data / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (data / "b.csv").write_text("id,text\n" + "".join(f'{25 + i},"{t}"\n' for i, t in enumerate(texts[25:])))

    request = check_request(store["root"], "topics:1", str(data), str(tmp_path / "out"))
    assert (request.backend, request.column, request.content) == ("onnx", "text", "text")  # exported on register
    report = predict(request, batch_size=8)

    out = pq.read_table(tmp_path / "out")
    assert out.column("id").to_pylist() == list(range(40))  # every row, in the order it was read
    assert set(out.column("model").to_pylist()) == {"topics"} and set(out.column("version").to_pylist()) == {store["version"]}
    assert all(p.endswith(("a.jsonl", "b.csv")) for p in out.column("path").to_pylist())
    errors = out.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 7, 11]
    assert "empty text" in errors[3] and "is empty" in errors[7] and "a JSON int, not text" in errors[11]
    ok = [i for i, e in enumerate(errors) if e is None]
    model_dir = store["registry"].model_dir("topics", store["version"])
    expected = text_probabilities(model_dir, [texts[i] for i in ok])
    probabilities = out.column("probabilities").flatten()
    assert [f.name for f in out.schema.field("probabilities").type] == LABELS
    got = np.stack([np.asarray(col.to_pylist(), dtype=np.float64) for col in probabilities], axis=1)
    np.testing.assert_allclose(got[ok], expected, atol=1e-4)  # ONNX Runtime = PyTorch
    assert np.isnan(np.asarray([got[i] for i in (3, 7, 11)], dtype=np.float64)).all()  # null, not a made-up answer
    predictions = out.column("prediction").to_pylist()
    assert [predictions[i] for i in ok] == [LABELS[k] for k in expected.argmax(1)]
    np.testing.assert_allclose([out.column("confidence")[i].as_py() for i in ok], expected.max(1), atol=1e-4)
    assert report.rows == 40 and sum(report.predicted.values()) == 37 and sum(report.errors.values()) == 3

    # Written once: the same OUT again is refused, and what is there stays.
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(LifelongError, match="already holds files"):
        check_request(store["root"], "topics:1", str(data), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    # PyTorch answers the same where asked.
    torch_request = check_request(store["root"], "topics:1", str(data / "b.csv"), str(tmp_path / "torch"), backend="torch")
    predict(torch_request)
    by_torch = pq.read_table(tmp_path / "torch").column("prediction").to_pylist()
    assert by_torch == predictions[25:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch:1", "DATA", "OUT"], "nosuch:1 does not exist"),
        (["topics:9", "DATA", "OUT"], "topics:9 does not exist"),
        (["lm:1", "DATA", "OUT"], "lifelong predict scores classifiers"),
        (["topics:1", "DATA", "OUT", "--backend", "torchscript"], "has no torchscript export"),
        (["topics:1", "DATA", "OUT", "--backend", "tensorrt"], "--backend tensorrt: use one of"),
        (["topics:1", "DATA", "FILE"], "is a file: give a directory"),
        (["topics:1", "nowhere", "OUT"], "DATA nowhere does not exist"),
        (["topics:1", "IMAGES", "OUT"], "holds image files"),
        (["topics:1", "TABLE.csv", "OUT"], "has no column 'text' (its columns: body): name the text column with --column"),
        (["topics:1", "CLASH.csv", "OUT"], "already has column(s) ['prediction']"),
    ],
)
def test_bad_arguments_are_one_message(store, tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    data = tmp_path / "DATA"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "rain tomorrow"}\n')
    (tmp_path / "TABLE.csv").write_text("body\nrain tomorrow\n")
    (tmp_path / "CLASH.csv").write_text("text,prediction\nrain tomorrow,x\n")
    (tmp_path / "IMAGES").mkdir()
    (tmp_path / "IMAGES" / "a.png").write_bytes(b"not really")
    done = subprocess.run(
        [sys.executable, "-m", "lifelong.cli", "predict", *args, "--root", store["root"]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "OUT").exists()
