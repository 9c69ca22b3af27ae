"""Images through the lifecycle: image folders and image columns read and judged like text rows,
ViT and ResNet classifiers trained on real Ray with DeepSpeed, a linear probe, evaluation."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_config
from lifelong.config import JobConfig
from lifelong.data import Fetched, parse_file, read_validated
from lifelong.storage import Storage

DIGITS = ["0", "1", "2", "3"]


def png(value: int, mode: str = "L", size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(out, format="PNG" if mode != "CMYK" else "JPEG")
    return out.getvalue()


def jpeg(value: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (16, 16), (value,) * len(mode)).save(out, format="JPEG")
    return out.getvalue()


def image_config(path, root, **data):
    return JobConfig.model_validate(
        {
            "name": "imgs",
            "model": {"task": "image-classification", "architecture": "resnet"},
            "data": {"path": str(path), "labels": DIGITS, **data},
            "storage": {"root": str(root)},
        }
    )


def test_image_files_and_image_columns_are_judged_with_reasons_like_text_rows(ray_session, tmp_path):
    """A truncated JPEG, a zero-byte PNG, a text file named .png, a CMYK image and an image in a
    folder that is no label: quarantined with their reasons; bad image rows in table files are
    dropped by reason; the good ones are rows whose split follows their bytes."""
    folder = tmp_path / "photos"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            (folder / label / f"{i}.png").write_bytes(png(40 * i + int(label) * 7 + 1))
    (folder / "1" / "cut.jpg").write_bytes(jpeg(90)[:200])
    (folder / "1" / "empty.png").write_bytes(b"")
    (folder / "0" / "notes.png").write_text("not a picture at all\n")
    (folder / "0" / "print.jpg").write_bytes(jpeg(30, "CMYK"))
    (folder / "cats").mkdir()
    (folder / "cats" / "tom.png").write_bytes(png(5))
    rows = [
        {"image": base64.b64encode(png(200)).decode(), "label": "2"},
        {"image": base64.b64encode(png(201)).decode(), "label": "3"},
        {"image": "@@not base64@@", "label": "2"},
        {"image": base64.b64encode(b"GIF89a but not really").decode(), "label": "2"},
        {"image": base64.b64encode(jpeg(9, "CMYK")).decode(), "label": "3"},
        {"image": base64.b64encode(png(202)).decode(), "label": "7"},
        {"image": base64.b64encode(png(203)).decode()},
    ]
    (folder / "table.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"image": [png(250), jpeg(9)[:150], png(250)], "label": ["3", "3", "3"]}), folder / "bytes.parquet")

    store = Storage(str(tmp_path / "store"))
    data = read_validated(image_config(folder, store.root_uri, label_column="label").data, store, quarantine_area="test")
    report = data.report
    reasons = {Path(f.path).name: f.reason for f in report.quarantined}
    assert reasons == {
        "cut.jpg": "a truncated image (its data ends before the picture does)",
        "empty.png": "empty file (0 bytes)",
        "notes.png": "not an image (no image format recognises its bytes)",
        "print.jpg": "unsupported image mode CMYK (supported: 1, L, LA, P, PA, RGB, RGBA)",
        "tom.png": "its folder 'cats' is not one of data.labels ['0', '1', '2', '3'] (images are labelled by their folder)",
    }
    notes = [store.read_json(f"quarantine/test/{n}") for n in store.listdir("quarantine/test") if n.endswith(".reason.json")]
    assert sorted(Path(n["source"]).name for n in notes) == sorted(reasons)
    assert report.dropped == {
        "invalid_base64": 1,
        "not_an_image": 1,
        "unsupported_mode_CMYK": 1,
        "unknown_label": 1,
        "missing_label": 1,
        "truncated_image": 1,
    }
    table = pa.concat_tables(ray_session.get(data.rows.to_arrow_refs()))
    assert table.schema.field("image").type == pa.binary() and table.num_rows == 6 + 2 + 2
    images = table.column("image").to_pylist()
    assert all(Image.open(io.BytesIO(b)).size == (16, 16) for b in images)
    # The same bytes under the same label land in the same split, whichever file holds them.
    twice = [s for b, s in zip(images, table.column("split").to_pylist()) if b == png(250)]
    assert len(twice) == 2 and len(set(twice)) == 1


def test_an_image_in_a_text_task_and_text_where_an_image_belongs_are_named():
    text_cfg = JobConfig.model_validate(
        {
            "name": "t",
            "model": {"task": "sequence-classification", "tokenizer": "x"},
            "data": {"path": "x", "label_column": "l", "labels": ["a", "b"]},
        }
    )
    parsed = parse_file(Fetched(png(3), None, len(png(3)), ""), "image", text_cfg.data, "a/1.png")
    assert parsed.rows is None and parsed.reason == "an image file, but model.task reads text"
    cfg = image_config("x", "/tmp/unused", label_column="label").data
    parquet = io.BytesIO()
    pq.write_table(pa.table({"image": [1.5, 2.0], "label": ["0", "1"]}), parquet)
    parsed = parse_file(Fetched(parquet.getvalue(), None, len(parquet.getvalue()), ""), "parquet", cfg, "t.parquet")
    assert parsed.rows.num_rows == 0 and parsed.dropped == {"wrong_image_type": 2}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from lifelong.synth import write_digit_stream

    out = tmp_path_factory.mktemp("digits")
    write_digit_stream(out, windows=2, classes_per_window=2, size=32)
    return out  # window-000: 0/ 1/, window-001: 2/ 3/ (all of each digit: ~180 images apiece)


@pytest.fixture(scope="module")
def resnet(ray_session, digits, tmp_path_factory):
    from lifelong.train.driver import run_training

    root = tmp_path_factory.mktemp("vision-store")
    config = make_config(
        "resnet/tiny_scratch.yaml",
        f"data.path={digits}",
        f"data.labels={json.dumps(DIGITS)}",
        f"storage.root={root}",
        "train.epochs=3",
    )
    return {"outcome": run_training(config), "root": root, "config": config}


def test_a_resnet_learns_digits_from_image_folders_with_its_image_processor_in_the_version(resnet, digits, tmp_path):
    from transformers import AutoImageProcessor

    from lifelong.evaluate import evaluate_model
    from lifelong.registry import Registry
    from lifelong.tasks.classify import confusion_png

    outcome = resnet["outcome"]
    assert outcome.metrics["val_accuracy"] > 0.8  # 4 digits: chance is 0.25
    assert outcome.metrics["train_images_per_s"] > 0 and 0 <= outcome.metrics["val_map"] <= 1
    registry = Registry(Storage(str(resnet["root"])))
    version_dir = registry.resolve(outcome.ref).local_dir
    processor = AutoImageProcessor.from_pretrained(str(version_dir))
    assert processor.size == {"height": 32, "width": 32}
    card = registry.card(outcome.model, outcome.version)
    assert card.task == "image-classification" and card.labels == DIGITS

    result = evaluate_model(resnet["config"], outcome.ref, str(digits / "window-001"))
    assert result.metrics["rows"] == sum(1 for _ in (digits / "window-001").rglob("*.png"))
    assert result.metrics["accuracy"] > 0.8 and result.metrics["map"] > 0.8 and result.metrics["macro_f1"] > 0
    counts = np.asarray(result.confusion)
    assert counts.shape == (4, 4) and counts.sum() == result.metrics["rows"] and counts[:2].sum() == 0  # only 2s and 3s
    assert np.trace(counts) / counts.sum() == pytest.approx(result.metrics["accuracy"])
    confusion_png(result.confusion, result.labels, tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").format == "PNG"


def test_a_linear_probe_trains_only_the_head_and_leaves_the_body_bit_identical(resnet, digits):
    from lifelong.registry import Registry
    from lifelong.train.driver import run_training

    parent = resnet["outcome"].ref
    config = make_config(
        "resnet/tiny_scratch.yaml",
        f"data.path={digits}",
        f"data.labels={json.dumps(DIGITS)}",
        f"storage.root={resnet['root']}",
        "name=probe",
        f"model.init_from={parent}",
        "model.train_last_n_layers=0",
        "train.epochs=1",
        "train.lr=0.05",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(resnet["root"])))
    before = load_file(registry.resolve(parent).local_dir / "model.safetensors")
    after = load_file(registry.resolve(outcome.ref).local_dir / "model.safetensors")
    assert before.keys() == after.keys()
    body = [k for k in before if not k.startswith("classifier.")]
    assert any("running_mean" in k for k in body)  # batch-norm statistics are part of the body
    assert [k for k in body if not torch.equal(before[k], after[k])] == []
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert registry.card("probe", outcome.version).parent == parent
