"""Images through the lifecycle: image folders and image columns read and judged like text rows,
ViT and ResNet classifiers trained on real Ray with DeepSpeed, a linear probe, evaluation."""

from __future__ import annotations

import base64
import io
import json
import shutil
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
from lifelong.inference import EXPORT_FILES
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


def photo_folders(folder):
    """Three good PNGs in each of the folders 0/ and 1/, and a truncated JPEG in 1/."""
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            (folder / label / f"{i}.png").write_bytes(png(40 * i + int(label) * 7 + 1))
    (folder / "1" / "cut.jpg").write_bytes(jpeg(90)[:200])
    return folder


def test_image_files_and_image_columns_are_judged_with_reasons_like_text_rows(ray_session, tmp_path):
    """A truncated JPEG, a zero-byte PNG, a text file named .png, a CMYK image and an image in a
    folder that is no label: quarantined with their reasons; bad image rows in table files are
    dropped by reason; the good ones are rows whose split follows their bytes."""
    folder = photo_folders(tmp_path / "photos")
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
    assert data.rows is not None  # image tables go to Ray tasks, however small (their rows may name images)
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


def test_a_small_image_folder_is_read_here_and_judged_as_ray_tasks_judge_it(ray_session, tmp_path):
    """data.in_process_mb: an image folder's listed sizes are its images', so a small one is read
    in this process, with the same reasons, rows and splits as Ray tasks give; a table of image
    paths is not (the listing does not count the images its rows name)."""
    folder = photo_folders(tmp_path / "photos")
    (folder / "0" / "notes.png").write_text("not a picture at all\n")
    store = Storage(str(tmp_path / "store"))
    cfg = image_config(folder, store.root_uri).data
    here = read_validated(cfg, store, quarantine_area="here")
    by_ray = read_validated(cfg.model_copy(update={"in_process_mb": 0}), store, quarantine_area="ray")
    assert here.table is not None and here.rows is None and by_ray.table is None

    def reasons(data):
        return {Path(f.path).name: f.reason for f in data.report.quarantined}

    assert reasons(here) == reasons(by_ray) and set(reasons(here)) == {"cut.jpg", "notes.png"}
    ray_rows = pa.concat_tables(ray_session.get(by_ray.rows.to_arrow_refs()))

    def rows(table):
        return sorted(zip(*(table.column(c).to_pylist() for c in ("image", "label", "split"))))

    assert len(rows(here.table)) == 6 and rows(here.table) == rows(ray_rows)
    (tmp_path / "table.csv").write_text("image,label\nphotos/0/0.png,0\n")
    table_cfg = image_config(tmp_path / "table.csv", store.root_uri, label_column="label").data
    assert read_validated(table_cfg, store, quarantine_area="t").rows is not None


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


def test_a_table_of_image_paths_reads_the_images_it_names_in_a_run_and_in_a_landing_zone(ray_session, tmp_path):
    """A CSV whose image column holds paths (relative to the table's folder or data.image_root,
    absolute, never climbing above the root): the rows hold the images' bytes; a missing file,
    a path outside the root and a file that is no image are dropped by reason."""
    import csv

    from lifelong.continual.ledger import Ledger
    from lifelong.continual.stream import window_rows
    from lifelong.data import validation_fingerprint

    photos = tmp_path / "photos"
    (photos / "imgs").mkdir(parents=True)
    (photos / "imgs" / "a.png").write_bytes(png(10))
    (photos / "imgs" / "b.png").write_bytes(png(200))
    (photos / "imgs" / "bad.png").write_text("not a picture\n")
    (tmp_path / "secret.png").write_bytes(png(7))
    rows = [
        ("imgs/a.png", "0"),
        ("imgs/b.png", "1"),
        ("imgs/none.png", "1"),
        ("../secret.png", "0"),
        ("imgs/bad.png", "1"),
        (str(photos / "imgs" / "b.png"), "2"),
        (base64.b64encode(png(99)).decode(), "3"),
    ]

    def write_csv(path, refs):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), *refs])

    write_csv(photos / "table.csv", rows)
    store = Storage(str(tmp_path / "store"))
    data = read_validated(image_config(photos / "table.csv", store.root_uri, label_column="label").data, store, quarantine_area="t")
    assert data.report.dropped == {"missing_image_file": 1, "image_path_outside": 1, "not_an_image": 1}
    table = pa.concat_tables(ray_session.get(data.rows.to_arrow_refs()))
    got = dict(zip(table.column("label").to_pylist(), table.column("image").to_pylist()))
    assert got == {0: png(10), 1: png(200), 2: png(200), 3: png(99)}

    # In a landing zone, with the images kept elsewhere (data.image_root): the ledger's rows hold
    # the images as they were read when the table landed.
    landing, root = tmp_path / "landing", tmp_path / "photos" / "imgs"
    landing.mkdir()
    write_csv(landing / "new.csv", [("a.png", "0"), ("b.png", "1"), ("../../secret.png", "0")])
    cfg = image_config(landing, store.root_uri, label_column="label", image_root=str(root)).data
    ledger = Ledger(store, "paths")
    [record] = ledger.scan(str(landing), cfg).new
    assert record.check.rows == 2 and record.check.dropped == {"image_path_outside": 1}
    (root / "a.png").write_bytes(png(33))  # changed after it landed: the recorded bytes stand
    train, holdout = window_rows(store, [ledger.rows_rel(record.sha256, validation_fingerprint(cfg))], "image")
    assert sorted(train.column("image").to_pylist() + holdout.column("image").to_pylist()) == sorted([png(10), png(200)])


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
    # A few hundred KB of images is read and scored in this process; through Ray Data actors
    # (data above data.in_process_mb) the metrics are the same.
    config = resnet["config"]
    by_ray = config.model_copy(update={"data": config.data.model_copy(update={"in_process_mb": 0})})
    assert evaluate_model(by_ray, outcome.ref, str(digits / "window-001")).metrics == pytest.approx(result.metrics)
    confusion_png(result.confusion, result.labels, tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").format == "PNG"


@pytest.fixture(scope="module")
def probe(resnet, digits):
    """A linear probe of the ResNet: its version 2 (only the head trained, one epoch)."""
    from lifelong.train.driver import run_training

    config = make_config(
        "resnet/tiny_scratch.yaml",
        f"data.path={digits}",
        f"data.labels={json.dumps(DIGITS)}",
        f"storage.root={resnet['root']}",
        f"model.init_from={resnet['outcome'].ref}",
        "model.train_last_n_layers=0",
        "train.epochs=1",
        "train.lr=0.05",
    )
    return run_training(config)


def test_a_linear_probe_trains_only_the_head_and_leaves_the_body_bit_identical(resnet, probe):
    from lifelong.registry import Registry

    parent = resnet["outcome"].ref
    registry = Registry(Storage(str(resnet["root"])))
    before = load_file(registry.resolve(parent).local_dir / "model.safetensors")
    after = load_file(registry.resolve(probe.ref).local_dir / "model.safetensors")
    assert before.keys() == after.keys()
    body = [k for k in before if not k.startswith("classifier.")]
    assert any("running_mean" in k for k in body)  # batch-norm statistics are part of the body
    assert [k for k in body if not torch.equal(before[k], after[k])] == []
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert registry.card(probe.model, probe.version).parent == parent


def test_lora_adapts_a_resnets_convolutions_and_its_head_alone_and_the_merged_model_equals_them(resnet, digits):
    """train.lora on an image classifier: low-rank adapters on the ResNet's convolutions and its
    head trained whole (`modules_to_save`); the version holds only those and names its base; the
    merged model (what export and serving load) equals PEFT's unmerged forward, with the base's
    batch-norm statistics and every weight the adapters do not touch bit-identical, and reads digits."""
    from peft import PeftModel

    from lifelong.evaluate import evaluate_model
    from lifelong.models import load_for_inference
    from lifelong.registry import Registry
    from lifelong.train.driver import run_training

    base = resnet["outcome"].ref
    config = make_config(
        "resnet/tiny_scratch.yaml",
        f"data.path={digits}",
        f"data.labels={json.dumps(DIGITS)}",
        f"storage.root={resnet['root']}",
        f"model.init_from={base}",
        "name=tiny-resnet-lora",
        "train.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [convolution]}",
        "train.epochs=1",
        "train.lr=0.01",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(resnet["root"])))
    card = registry.card("tiny-resnet-lora", outcome.version)
    assert card.base == base and {"adapter_config.json", "adapter_model.safetensors"} <= set(card.files)
    version_dir = registry.local_dir("tiny-resnet-lora", outcome.version)
    saved = load_file(version_dir / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
    assert not any("normalization" in k for k in saved)  # batch norms: the base's

    base_dir = registry.resolve(base).local_dir
    merged = load_for_inference(registry.resolve(outcome.ref).local_dir, "image-classification")
    peft = PeftModel.from_pretrained(load_for_inference(base_dir, "image-classification"), str(version_dir)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=pixels).logits, peft(pixel_values=pixels).logits, atol=1e-4)
    before, after = load_file(base_dir / "model.safetensors"), merged.state_dict()
    norms = [k for k in before if "normalization" in k]
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)
    convolutions = [k for k in before if k.endswith("convolution.weight")]
    assert convolutions and not any(torch.equal(before[k], after[k]) for k in convolutions)
    assert evaluate_model(config, outcome.ref, str(digits / "window-001")).metrics["accuracy"] > 0.8


@pytest.mark.slow
def test_the_last_stage_of_a_resnet_fine_tunes_under_zero3_and_the_stages_before_stay_bit_identical(resnet, digits):
    """`train_last_n_layers: 1` on a ResNet trains its last stage and the head (its stages are its
    blocks), here under DeepSpeed ZeRO-3 (parameters partitioned across the 2 workers)."""
    from lifelong.registry import Registry
    from lifelong.train.driver import run_training

    config = make_config(
        "resnet/tiny_finetune.yaml",
        f"data.path={digits}",
        f"data.labels={json.dumps(DIGITS)}",
        f"storage.root={resnet['root']}",
        f"model.init_from={resnet['outcome'].ref}",
        "model.train_last_n_layers=1",
        "train.deepspeed.zero_stage=3",
        "train.epochs=1",
        "scaling.num_workers=2",  # a Ray Train run: the parameters partitioned across 2 ranks
        "scaling.cpus_per_worker=1",
        "train.batch_size=32",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(resnet["root"])))
    before = load_file(registry.resolve(resnet["outcome"].ref).local_dir / "model.safetensors")
    after = load_file(registry.resolve(outcome.ref).local_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = "resnet.encoder.stages.1."
    assert changed and all(k.startswith((last, "classifier.")) for k in changed)
    assert any(k.startswith(last) and k.endswith(".weight") for k in changed)  # the last stage trained, not only the head
    assert outcome.metrics["val_accuracy"] > 0.8


def tiny_vit_dir(out: Path) -> Path:
    """A tiny ViT classifier with random weights and its image processor, as a version holds them."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4
    )
    config.id2label, config.label2id = dict(enumerate(DIGITS)), {d: i for i, d in enumerate(DIGITS)}
    ViTForImageClassification(config).eval().save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


def test_onnx_and_torchscript_match_pytorch_for_vit_and_resnet_and_int8_is_gated_on_images(resnet, digits, tmp_path):
    from lifelong.config import ExportSection
    from lifelong.export import export_files
    from lifelong.inference import Classifier
    from lifelong.registry import Registry

    registry = Registry(Storage(str(resnet["root"])))
    resnet_dir = registry.resolve(resnet["outcome"].ref).local_dir
    # Registration exported the ResNet (export.on_register: auto): ONNX with parity, int8 gated.
    card = registry.card(resnet["outcome"].model, resnet["outcome"].version)
    assert card.exports["onnx"].parity_max_abs_diff <= 1e-4
    int8 = card.exports["onnx-int8"].model_dump() if "onnx-int8" in card.exports else card.exports["onnx"].int8_refused
    assert int8["rows"] > 0 and ("onnx-int8" in card.exports) == (int8["accuracy_drop"] <= 0.01)

    images = [p.read_bytes() for p in sorted(digits.rglob("*.png"))[::60]]
    rows = [{"image": b, "label": DIGITS.index(p.parent.name)} for b, p in zip(images, sorted(digits.rglob("*.png"))[::60])]
    for model_dir in (tiny_vit_dir(tmp_path / "vit"), resnet_dir):
        work = tmp_path / f"export-{model_dir.name}"
        result = export_files(model_dir, "image-classification", None, ExportSection(), work, rows, ("onnx", "onnx-int8", "torchscript"))
        for fmt in ("onnx", "torchscript"):
            record = result.records[fmt]
            assert record["parity_max_abs_diff"] <= 1e-4, (model_dir, fmt, record)
            assert record["parity_shapes"] == [[len(rows), 3, 32, 32], [1, 3, 32, 32]]  # the batch axis is dynamic
        measured = result.records.get("onnx-int8") or result.records["onnx"]["int8_refused"]
        assert measured["rows"] == len(rows) and measured["accuracy_fp32"] >= measured["accuracy_int8"] - 1
        torch_probs, _ = Classifier(model_dir, "torch").probabilities(images)
        for fmt in ("onnx", "torchscript"):
            probs, _ = Classifier(model_dir, fmt, exported=result.files[EXPORT_FILES[fmt]]).probabilities(images)
            np.testing.assert_allclose(probs, torch_probs, atol=1e-5)


def offline_probabilities(model_dir: Path, images: list[bytes]) -> np.ndarray:
    """The reference: HF's own image processor and model, no lifelong inference code."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return torch.softmax(model(pixel_values=pixels).logits, -1).numpy()


def test_images_over_http_as_base64_and_multipart_with_limits_and_a_swap_under_load(resnet, probe, digits, serve_port):
    import threading
    import time

    import httpx
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.registry import Registry
    from lifelong.serve import deploy

    root, name = resnet["root"], resnet["outcome"].model
    registry = Registry(Storage(str(root)))
    registry.move_alias(name, "champion", resnet["outcome"].version)
    config = absolute_paths(
        validate_config(
            {
                "name": name,
                "storage": {"root": str(root)},
                "serve": {
                    "port": serve_port,
                    "route_prefix": "/digits",
                    "num_replicas": 1,
                    "poll_interval_s": 0.3,
                    "max_images_per_request": 4,
                    "max_image_bytes": 20_000,
                    "max_image_pixels": 64 * 64,
                },
            }
        )
    )
    url = deploy(config)
    files = sorted(digits.rglob("*.png"))[::90][:4]
    images = [p.read_bytes() for p in files]
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in images]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["version"] == resnet["outcome"].version
            got = np.array([[p["probabilities"][d] for d in DIGITS] for p in body["predictions"]])
            np.testing.assert_allclose(got, offline_probabilities(registry.local_dir(name, body["version"]), images), atol=1e-4)
            uploaded = client.post("/v1/predict", files=[("images", (f.name, b, "image/png")) for f, b in zip(files, images)])
            assert uploaded.status_code == 200, uploaded.text
            assert uploaded.json()["predictions"] == body["predictions"]

            def refused(status, field, **request):
                r = client.post("/v1/predict", **request)
                assert r.status_code == status and r.json()["field"] == field, r.text
                return r.json()["error"]

            b64 = [base64.b64encode(b).decode() for b in images]
            big = io.BytesIO()
            Image.new("L", (100, 100)).save(big, format="PNG")
            noisy = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(noisy, format="BMP")
            big_b64 = base64.b64encode(big.getvalue()).decode()
            assert "100x100 pixels; at most 4096" in refused(413, "images[1]", json={"images": [b64[0], big_b64]})
            assert "bytes" in refused(413, "images[0]", json={"images": [base64.b64encode(noisy.getvalue()).decode()]})
            assert "not an image" in refused(422, "images[1]", json={"images": [b64[0], base64.b64encode(b"plain text").decode()]})
            assert "CMYK" in refused(422, "images[0]", json={"images": [base64.b64encode(jpeg(7, "CMYK")).decode()]})
            assert "truncated" in refused(422, "images[0]", json={"images": [base64.b64encode(jpeg(7)[:200]).decode()]})
            assert "base64" in refused(422, "images[0]", json={"images": ["%%%"]})
            assert "at most 4" in refused(413, "images", json={"images": b64 * 2})
            assert "send images" in refused(422, "texts", json={"texts": ["a digit?"]})
            assert "fields named 'images'" in refused(422, "photo", files=[("photo", ("a.png", images[0], "image/png"))])
            assert "empty file" in refused(422, "images[1]", files=[("images", ("a.png", images[0])), ("images", ("b.png", b""))])
            assert "images" in refused(413, "images", files=[("images", (f"{i}.png", images[0])) for i in range(5)])
            assert "multipart" in refused(400, "body", content=b"--x\r\nnot a form", headers={"Content-Type": "multipart/form-data"})

            # A swap to the probe (version 2) under load: every request answered, by one version or the other.
            results, stop = [], threading.Event()

            def load():
                while not stop.is_set() and len(results) < 2000:
                    r = client.post("/v1/predict", files=[("images", ("x.png", images[len(results) % 4], "image/png"))])
                    results.append((r.status_code, r.json().get("version")))

            thread = threading.Thread(target=load)
            thread.start()
            try:
                time.sleep(1)
                registry.move_alias(name, "champion", probe.version)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not any(v == probe.version for _, v in results[-5:]):
                    time.sleep(0.2)
                time.sleep(1)
            finally:
                stop.set()
                thread.join()
            assert [r for r in results if r[0] != 200] == []
            versions = [v for _, v in results]
            assert versions[0] == resnet["outcome"].version and versions[-1] == probe.version
            switch = versions.index(probe.version)
            assert set(versions[switch:]) == {probe.version}  # no answer from the old version after the first from the new
    finally:
        serve.delete(config.serve_app_name)


def test_mae_pretraining_lowers_reconstruction_loss_and_a_vit_fine_tuned_from_it_reads_digits(ray_session, digits, tmp_path):
    """Self-supervised ViT-MAE on the digit images (no labels: folders are ignored), registered like
    any version, not served; a ViT classifier fine-tuned from its encoder (a new head) learns."""
    from lifelong.errors import LifelongError
    from lifelong.registry import Registry
    from lifelong.serve import check_servable
    from lifelong.train.driver import run_training

    common = (f"data.path={digits}", f"storage.root={tmp_path}")
    mae = run_training(make_config("vit/tiny_mae_pretrain.yaml", *common, "train.epochs=6"))
    registry = Registry(Storage(str(tmp_path)))
    card = registry.card("tiny-vit-mae", mae.version)
    history = card.run.history
    assert card.task == "masked-image-modeling" and card.labels is None and card.exports == {}
    assert history[-1]["val_loss"] < history[0]["val_loss"], [h["val_loss"] for h in history]
    # Against the same model untrained, on the same images with the same patches hidden.
    from transformers import ViTMAEForPreTraining

    from lifelong.inference import ImageEncoder

    version_dir = registry.resolve(mae.ref).local_dir
    pixels = torch.from_numpy(
        ImageEncoder(version_dir)([p.read_bytes() for p in sorted(digits.rglob("*.png"))[::20]]).inputs["pixel_values"]
    )
    trained = ViTMAEForPreTraining.from_pretrained(str(version_dir), use_safetensors=True).eval()
    untrained = ViTMAEForPreTraining(trained.config).eval()
    noise = torch.rand(len(pixels), (32 // 4) ** 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [float(m(pixel_values=pixels, noise=noise).loss) for m in (untrained, trained)]
    assert losses[1] < 0.5 * losses[0], losses
    assert card.data["rows"]["train"] + card.data["rows"]["validation"] == sum(1 for _ in digits.rglob("*.png"))
    registry.move_alias("tiny-vit-mae", "champion", mae.version)
    with pytest.raises(LifelongError, match="masked-image-modeling model, which is not served: fine-tune a model from it"):
        check_servable(make_config("vit/tiny_mae_pretrain.yaml", *common))

    labels = f"data.labels={json.dumps(DIGITS)}"
    tuned = run_training(make_config("vit/tiny_finetune.yaml", *common, labels))
    assert tuned.metrics["val_accuracy"] > 0.85  # 4 digits: chance is 0.25
    encoder = load_file(registry.resolve(mae.ref).local_dir / "model.safetensors")
    start = load_file(registry.resolve(tuned.ref).local_dir / "model.safetensors")
    assert "classifier.weight" in start and not any(k.startswith("decoder.") for k in start)
    assert registry.card("tiny-vit-digits", tuned.version).parent == mae.ref
    assert encoder.keys() - start.keys() == {k for k in encoder if k.startswith("decoder.")}


def test_batch_predictions_answer_every_image_file_as_the_model_does_and_name_the_broken_one(resnet, digits, tmp_path):
    from lifelong.predict import check_request, predict
    from lifelong.registry import Registry

    data = tmp_path / "in"
    chosen = sorted((digits / "window-001").rglob("*.png"))[::20]  # 2s and 3s, in their class folders
    for f in chosen:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    (data / "2" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    outcome = resnet["outcome"]
    request = check_request(str(resnet["root"]), outcome.ref, str(data), str(tmp_path / "out"))
    assert (request.backend, request.content) == ("onnx", "image")
    report = predict(request, batch_size=4)

    out = pq.read_table(tmp_path / "out")
    files = sorted(p for p in data.rglob("*.png"))
    assert [Path(p).relative_to(data) for p in out.column("path").to_pylist()] == [f.relative_to(data) for f in files]
    assert "image" not in out.column_names  # the bytes stay in the input files
    errors = out.column("error").to_pylist()
    broken = [i for i, f in enumerate(files) if f.name == "zz-broken.png"]
    assert [i for i, e in enumerate(errors) if e] == broken and out.column("prediction")[broken[0]].as_py() is None
    ok = [i for i, e in enumerate(errors) if e is None]
    model_dir = Registry(Storage(str(resnet["root"]))).model_dir(outcome.model, outcome.version)
    expected = offline_probabilities(model_dir, [files[i].read_bytes() for i in ok])
    assert [out.column("prediction")[i].as_py() for i in ok] == [DIGITS[k] for k in expected.argmax(1)]
    np.testing.assert_allclose([out.column("confidence")[i].as_py() for i in ok], expected.max(1), atol=1e-4)
    right = np.mean([out.column("prediction")[i].as_py() == files[i].parent.name for i in ok])
    assert right > 0.8 and report.rows == len(files) and report.errors == {errors[broken[0]]: 1}
