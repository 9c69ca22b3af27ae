"""Class-incremental continual learning (continual.new_labels: grow) on real handwritten digits:
windows of new digits land as image folders, each cycle grows the champion's head, and one
model ends up knowing every digit; replay forgets less than naive retraining."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LABELS, make_config, register_tiny
from lifelong.registry import Registry
from lifelong.storage import Storage


def start_version(registry: Registry, config, work: Path, seed: int) -> int:
    """The stream's first champion: a tiny ResNet over the first two digits, random weights (seeded)."""
    from lifelong.models import build_model
    from lifelong.tasks import image_classification

    torch.manual_seed(seed)
    out = work / "start"
    build_model(config.model, None, labels=config.data.labels).save_pretrained(out)
    image_classification.fresh_preprocessor(config, None, str(out))
    model = config.model.model_dump(mode="json")
    return registry.register_version(
        config.name, out, {"task": config.model.task, "labels": config.data.labels, "config": {"model": model}}
    )


def split_config(root: Path, landing: Path, strategy: str, *extra: str):
    return make_config(
        "resnet/tiny_continual.yaml",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        f"continual.strategy={strategy}",
        "continual.min_new_rows=1",
        "continual.gates.max_forgetting=1.0",  # the strategies are compared here, not the gates
        "continual.gates.new_window_tolerance=1.0",
        *extra,
    )


def broken_images(folder: Path) -> dict[str, str]:
    """A truncated JPEG, a zero-byte PNG, a text file named .png and a CMYK image: their reasons."""
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(good, format="JPEG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (9, 9, 9, 9)).save(cmyk, format="JPEG")
    (folder / "cut.jpg").write_bytes(good.getvalue()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("a note, not a digit\n")
    (folder / "print.jpg").write_bytes(cmyk.getvalue())
    return {
        "cut.jpg": "a truncated image (its data ends before the picture does)",
        "empty.png": "empty file (0 bytes)",
        "notes.png": "not an image (no image format recognises its bytes)",
        "print.jpg": "unsupported image mode CMYK (supported: 1, L, LA, P, PA, RGB, RGBA)",
    }


def run_stream(windows: list[Path], work: Path, strategy: str, broken: bool = False, serve_port: int | None = None):
    """The stream's windows landed one by one, a cycle after each. With `serve_port`, the endpoint
    serves the champion from the first window on, under a light load the whole time."""
    from lifelong.continual.cycle import run_cycle

    root, landing = work / "store", work / "landing"
    landing.mkdir(parents=True)
    config = split_config(
        root,
        landing,
        strategy,
        *([f"serve.port={serve_port}", "serve.route_prefix=/split", "serve.poll_interval_s=0.3"] if serve_port else []),
    )
    registry = Registry(Storage(str(root)))
    registry.move_alias(config.name, "champion", start_version(registry, config, work, seed=0))
    outcomes, reasons, endpoint = [], None, None
    try:  # (the caller closes the endpoint)
        for k, window in enumerate(windows):
            shutil.copytree(window, landing / window.name)
            if broken and k == 1:
                reasons = broken_images(landing / window.name / "2")
            outcome = run_cycle(config)
            print(outcome.summary())
            outcomes.append(outcome)
            if endpoint is None and serve_port:
                endpoint = Endpoint(config, sorted(window.rglob("*.png"))[0].read_bytes())
            if endpoint:
                endpoint.wait_for(outcome.version)
    except BaseException:
        if endpoint:
            endpoint.close()
        raise
    return config, registry, outcomes, reasons, endpoint


class Endpoint:
    """`lifelong serve` of the config, asked for a digit every 0.2 s in the background."""

    def __init__(self, config, image: bytes):
        import threading

        import httpx

        from lifelong.serve import deploy

        self.config, self.image, self.results = config, image, []
        self.client = httpx.Client(base_url=deploy(config), timeout=30)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._load)
        self.thread.start()

    def predict(self, images: list[bytes]) -> dict:
        r = self.client.post("/v1/predict", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)])
        assert r.status_code == 200, r.text
        return r.json()

    def _load(self) -> None:
        while not self.stop.wait(0.2) and len(self.results) < 5000:
            r = self.client.post("/v1/predict", files=[("images", ("x.png", self.image, "image/png"))])
            self.results.append((r.status_code, r.json().get("version")))

    def wait_for(self, version: int, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.client.get("/v1/model").json()["version"] != version:
            assert time.monotonic() < deadline, f"the endpoint did not swap to version {version}"
            time.sleep(0.3)

    def close(self) -> None:
        from ray import serve

        self.stop.set()
        self.thread.join()
        serve.delete(self.config.serve_app_name)
        self.client.close()


@pytest.fixture(scope="module")
def split_digits(tmp_path_factory):
    from lifelong.synth import write_digit_stream

    return write_digit_stream(tmp_path_factory.mktemp("split"), windows=3, classes_per_window=2, size=32, per_class=90, seed=0)


def test_a_digit_stream_that_grows_its_labels_ends_with_one_served_model_of_six_digits_and_replay_forgets_less(
    ray_session, split_digits, serve_port, tmp_path
):
    """Split-Digits (windows of digits 0-1, 2-3, 4-5) as image folders landing one by one: each
    cycle adds the window's digits to the label set and grows the champion's head; the endpoint
    swaps to every grown version (serve.allow_label_change: grow) with no failed request."""
    from lifelong.continual.ledger import Ledger
    from lifelong.continual.stream import Stream

    config, registry, outcomes, reasons, endpoint = run_stream(split_digits, tmp_path / "replay", "replay", True, serve_port)
    storage = Storage(config.storage.root)
    stream = Stream(storage, config.name)
    holdouts = [stream.holdout(k) for k in range(3)]
    try:  # every window's holdout images, as a user would send them: 16 per request at most
        served = [[endpoint.predict(h.column("image").to_pylist()[i : i + 16]) for i in range(0, h.num_rows, 16)] for h in holdouts]
    finally:
        endpoint.close()
    assert [o.status for o in outcomes] == ["promoted"] * 3
    assert "new labels ['2', '3']" in "\n".join(outcomes[1].scan) and "new labels ['4', '5']" in "\n".join(outcomes[2].scan)
    # The broken images were set aside with their reasons; the cycle trained on the rest.
    assert {Path(p).name: r for p, r in outcomes[1].quarantined} == reasons
    assert outcomes[1].new_rows == 180
    name, final = config.name, outcomes[-1].version
    card = registry.card(name, final)
    assert card.labels == ["0", "1", "2", "3", "4", "5"] and card.stream.labels_added == ["4", "5"]
    assert registry.card(name, outcomes[1].version).labels == ["0", "1", "2", "3"]
    assert registry.alias_version(name, "champion") == final
    assert stream.labels(["0", "1"]) == ["0", "1", "2", "3", "4", "5"]
    ledger = Ledger(storage, name)
    assert {r.state for r in ledger.records() if Path(r.path).name not in reasons} == {"consumed"}

    # The CL matrix over all three windows; the final model answers every digit.
    windows = stream.finished()
    assert [len(w["row"]) for w in windows] == [1, 2, 3]
    final_row = windows[-1]["row"]
    assert min(final_row) > 0.3 and np.mean(final_row) > 0.6, final_row  # chance over 6 digits: 0.17
    # Served (the answers above): the endpoint followed the champion through both label changes,
    # every request answered, and it answers every digit as the offline scoring did.
    answered = endpoint.results
    assert answered and {s for s, _ in answered} == {200} and answered[-1][1] == final
    assert {v for _, v in answered} <= {o.version for o in outcomes}
    right = {}
    for k, (holdout, answers) in enumerate(zip(holdouts, served)):
        predictions = [p for answer in answers for p in answer["predictions"]]
        assert {a["version"] for a in answers} == {final} and all(list(p["probabilities"]) == card.labels for p in predictions)
        hits = [p["label"] == truth for truth, p in zip(holdout.column("label").to_pylist(), predictions)]
        assert len(hits) == holdout.num_rows and abs(np.mean(hits) - final_row[k]) <= 1.5 / len(hits)  # ONNX served = scored offline
        for truth, hit in zip(holdout.column("label").to_pylist(), hits):
            right.setdefault(truth, []).append(hit)
    assert sorted(right) == card.labels and all(any(hits) for hits in right.values())  # every digit recognised

    # Naive retraining on the new digits alone: the same stream, the same start.
    _, _, naive, _, _ = run_stream(split_digits, tmp_path / "naive", "naive")
    replay_forgetting, naive_forgetting = outcomes[-1].metrics["forgetting"], naive[-1].metrics["forgetting"]
    print(f"forgetting: replay {replay_forgetting:.3f}, naive {naive_forgetting:.3f}")
    assert naive_forgetting > 0.5 and replay_forgetting < naive_forgetting - 0.25


def test_a_text_stream_grows_its_labels_as_an_image_stream_does(ray_session, tiny_tokenizer, tmp_path):
    """Rows whose label the stream does not know yet are kept under grow: the cycle's candidate
    knows the new topics (the champion's two kept), and says which it added."""
    from lifelong.continual.cycle import run_cycle
    from lifelong.synth import write_stream

    root, landing = tmp_path / "store", tmp_path / "landing"
    landing.mkdir()
    registry = Registry(Storage(str(root)))
    first = LABELS[:2]
    registry.move_alias("cl-grow", "champion", register_tiny(registry, "cl-grow", tiny_tokenizer, tmp_path, export=False, labels=first))
    (window,) = write_stream(tmp_path / "windows", windows=1, rows_per_window=240, files_per_window=1, seed=0, classes_per_window=4)
    for f in window.iterdir():
        shutil.copy(f, landing / f.name)
    config = make_config(
        "gpt2/tiny_continual.yaml",
        "name=cl-grow",
        "model.init_from=cl-grow@champion",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        f"data.labels={json.dumps(first)}",
        "continual.new_labels=grow",
        "continual.min_new_rows=1",
        "scaling.num_workers=1",
        "export.on_register=never",
    )
    outcome = run_cycle(config)
    print(outcome.summary())
    card = registry.card("cl-grow", outcome.version)
    added = card.stream.labels_added
    assert sorted(added) == sorted(LABELS[2:]) and card.labels == first + added
    assert f"new labels {added}" in "\n".join(outcome.scan)
    rows = json.loads(json.dumps(registry.card("cl-grow", outcome.version).data))["files"][0]
    assert rows["dropped"] == {} and outcome.new_rows == 240  # no row dropped as unknown
    assert outcome.status == "promoted" and outcome.accuracy["candidate"][0] > outcome.accuracy["champion"][0]


def test_a_grown_label_set_is_judged_again_and_a_swap_accepts_it_only_when_allowed(tmp_path):
    """Rows and image files of a label the stream does not know yet are recorded as new (not
    quarantined) under grow; the serving swap takes a grown set under allow_label_change: grow."""
    from types import SimpleNamespace

    from lifelong.config import JobConfig
    from lifelong.data import Fetched, parse_file
    from lifelong.errors import LifelongError
    from lifelong.serve import Loaded, check_compatible

    cfg = JobConfig.model_validate(
        {
            "name": "t",
            "model": {"task": "sequence-classification", "tokenizer": "x"},
            "data": {"path": "x", "label_column": "label", "labels": ["a", "b"]},
        }
    ).data
    body = b'{"text": "one", "label": "a"}\n{"text": "two", "label": "c"}\n{"text": "", "label": "d"}\n{"text": "3", "label": "e"}\n'
    refused = parse_file(Fetched(body, None, len(body), ""), "jsonl", cfg, "w.jsonl")
    assert refused.dropped == {"unknown_label": 2, "empty_text": 1} and refused.new_labels == []
    grow = cfg.with_labels(["a", "b"], grow=True)
    grown = parse_file(Fetched(body, None, len(body), ""), "jsonl", grow, "w.jsonl")
    assert grown.rows.num_rows == 1 and grown.dropped == {"new_label": 2, "empty_text": 1} and grown.new_labels == ["c", "e"]
    again = parse_file(Fetched(body, None, len(body), ""), "jsonl", grow.with_labels(["a", "b", "c", "e"], grow=True), "w.jsonl")
    assert again.rows.column("label").to_pylist() == [0, 2, 3] and again.new_labels == []

    png = io.BytesIO()
    Image.new("L", (8, 8), 7).save(png, format="PNG")
    image_cfg = JobConfig.model_validate(
        {"name": "i", "model": {"task": "image-classification", "architecture": "resnet"}, "data": {"path": "x", "labels": ["0", "1"]}}
    ).data
    data = png.getvalue()
    parsed = parse_file(Fetched(data, None, len(data), ""), "image", image_cfg.with_labels(["0", "1"], grow=True), "w/7/a.png")
    assert parsed.rows.num_rows == 0 and parsed.reason == "" and parsed.new_labels == ["7"]
    assert "not one of data.labels" in parse_file(Fetched(data, None, len(data), ""), "image", image_cfg, "w/7/a.png").reason

    def loaded(version, labels):
        return Loaded(version=version, task="image-classification", card=None, model=SimpleNamespace(labels=labels))

    serving, grown_version, renamed = loaded(1, ["0", "1"]), loaded(2, ["0", "1", "2"]), loaded(3, ["1", "0", "2"])
    check_compatible(serving, grown_version, "grow")
    check_compatible(serving, renamed, True)
    with pytest.raises(LifelongError, match="allow_label_change=true to accept a new label set, or grow"):
        check_compatible(serving, grown_version, False)
    with pytest.raises(LifelongError, match="accepts only new labels added after the serving ones"):
        check_compatible(serving, renamed, "grow")


def test_a_grown_head_keeps_the_old_classes_answers(tmp_path):
    from transformers import AutoConfig, AutoModelForImageClassification, BertConfig, BertForSequenceClassification

    from lifelong.tasks.classify import grown_head, grows, saved_labels

    torch.manual_seed(0)
    labels = {"num_labels": 2, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    resnet = AutoModelForImageClassification.from_config(
        AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **labels)
    ).eval()
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **labels)
    ).eval()
    for model, inputs in ((resnet, {"pixel_values": torch.randn(3, 3, 32, 32)}), (bert, {"input_ids": torch.randint(0, 50, (3, 6))})):
        model.save_pretrained(tmp_path / type(model).__name__)
        assert saved_labels(tmp_path / type(model).__name__) == ["a", "b"] and grows(["a", "b"], ["a", "b", "c"])
        with torch.no_grad():
            before = model(**inputs).logits
            bigger = grown_head(model, ["a", "b", "c"]).eval()
            out = bigger(**inputs, labels=torch.tensor([0, 2, 1]))
        assert out.logits.shape == (3, 3) and torch.allclose(out.logits[:, :2], before, atol=1e-6) and torch.isfinite(out.loss)
        assert bigger.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert not grows(["a", "b"], ["b", "a", "c"]) and not grows(["a", "b"], ["a", "b"]) and not grows(None, ["a"])
