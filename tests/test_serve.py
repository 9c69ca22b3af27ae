"""Ray Serve on the local Ray: the HTTP API, hot-swap under load, refused versions, auth."""

import os
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import LABELS, register_tiny
from lifelong.config import absolute_paths, validate_config
from lifelong.registry import Registry
from lifelong.storage import Storage

TOKEN = "test-token-4f1c"
TEXTS = [
    "stocks and bonds rallied after the central bank decision",
    "the telescope found a new planet orbiting a distant star",
    "rain tomorrow " * 40,
]  # longer than the model's 32 tokens


def serve_config(root, name, port, **serve):
    raw = {
        "name": name,
        "storage": {"root": str(root)},
        "serve": {"port": port, "num_replicas": 2, "poll_interval_s": 0.3, "max_texts_per_request": 8, **serve},
    }
    return absolute_paths(validate_config(raw))


def wait_for(predicate, timeout=60, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def app(ray_session, serve_port, tiny_tokenizer, topic_rows, tmp_path_factory):
    """`topics` v1 (champion) and v2, served by 2 replicas with bearer auth on."""
    from ray import serve

    from lifelong.serve import deploy

    root = tmp_path_factory.mktemp("serve-store")
    work = tmp_path_factory.mktemp("serve-work")
    registry = Registry(Storage(str(root)))
    v1 = register_tiny(registry, "topics", tiny_tokenizer, work, seed=1, rows=topic_rows[:200])
    v2 = register_tiny(registry, "topics", tiny_tokenizer, work, seed=2, rows=topic_rows[:200])
    registry.move_alias("topics", "champion", v1)
    os.environ["LIFELONG_TEST_TOKEN"] = TOKEN
    config = serve_config(root, "topics", serve_port, auth={"token_env": "LIFELONG_TEST_TOKEN"}, max_batch_size=8)
    url = deploy(config)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield {
        "url": url,
        "client": client,
        "registry": registry,
        "root": root,
        "work": work,
        "v1": v1,
        "v2": v2,
        "tokenizer": tiny_tokenizer,
        "rows": topic_rows,
    }
    client.close()
    serve.delete("topics")


def offline_probabilities(model_dir, texts):
    """The reference: HF tokenizer + PyTorch model, no lifelong inference code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1).numpy()


def test_predictions_over_http_equal_the_offline_model(app):
    r = app["client"].post("/v1/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == ("topics", app["v1"])
    got = np.array([[p["probabilities"][label] for label in LABELS] for p in body["predictions"]])
    want = offline_probabilities(app["registry"].local_dir("topics", app["v1"]), TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [p["label"] for p in body["predictions"]] == [LABELS[i] for i in want.argmax(1)]
    assert [p["truncated"] for p in body["predictions"]] == [False, False, True]
    assert body["max_length"] == 32


def test_model_info_health_and_openapi(app):
    info = app["client"].get("/v1/model").json()
    assert info["version"] == app["v1"] and info["backend"] == "onnx" and info["labels"] == LABELS
    assert info["exports"]["onnx"]["parity_max_abs_diff"] <= 1e-4 and info["loaded_at"]
    assert info["last_swap_error"] is None
    assert httpx.get(app["url"] + "/healthz").json()["status"] == "ok"  # no token needed
    schema = httpx.get(app["url"] + "/openapi.json").json()
    assert {"/v1/predict", "/v1/generate", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert httpx.get(app["url"] + "/docs").status_code == 200


@pytest.mark.parametrize(
    "body, status, field",
    [
        (b"{not json", 400, "body"),
        ({"texts": "one text"}, 422, "texts"),
        ({"texts": [1, 2]}, 422, "texts[0]"),
        ({"texts": []}, 422, "texts"),
        ({"text": ["typo in the key"]}, 422, "texts"),
        ({"texts": ["ok"], "extra": 1}, 422, "extra"),
        ({"texts": ["fine", "  "]}, 422, "texts[1]"),
        ({"texts": ["x"] * 9}, 413, "texts"),
        ({"texts": ["x" * 20001]}, 413, "texts[0]"),
        (b"[1, 2]", 422, "body"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(app, body, status, field):
    client = app["client"]
    if isinstance(body, bytes):
        r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["error"], r.json()


def test_wrong_endpoint_for_the_task_and_replicas_survive_bad_input(app):
    r = app["client"].post("/v1/generate", json={"prompt": "hello"})
    assert r.status_code == 400 and "sequence-classification" in r.json()["error"]
    # After all the bad input above, the replicas still answer.
    assert app["client"].post("/v1/predict", json={"texts": ["still alive"]}).status_code == 200


def test_auth_missing_or_wrong_token_is_401(app):
    assert httpx.post(app["url"] + "/v1/predict", json={"texts": ["x"]}).status_code == 401
    r = httpx.post(app["url"] + "/v1/predict", json={"texts": ["x"]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert httpx.get(app["url"] + "/v1/model").status_code == 401


def run_load(client, stop, results, limit, texts):
    """A bounded load loop: records (sent, received, status, version, replica) per request."""
    while not stop.is_set() and len(results) < limit:
        sent = time.monotonic()
        try:
            r = client.post("/v1/predict", json={"texts": texts})
            version = r.json().get("version") if r.status_code == 200 else None
            results.append((sent, time.monotonic(), r.status_code, version, r.headers.get("x-lifelong-replica")))
        except httpx.HTTPError as e:
            results.append((sent, time.monotonic(), repr(e), None, None))


def swap_under_load(app, move, old, new, threads=4, limit=800):
    results: list = []
    stop = threading.Event()
    clients = [httpx.Client(base_url=app["url"], headers=app["client"].headers, timeout=30) for _ in range(threads)]
    workers = [threading.Thread(target=run_load, args=(c, stop, results, limit, TEXTS[:2])) for c in clients]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 60, timeout=60, interval=0.05)
        moved_at = time.monotonic()
        move()
        wait_for(
            lambda: (sum(1 for r in results if r[3] == new) >= 150 and len(results) >= 300) or len(results) >= limit,
            timeout=120,
            interval=0.05,
        )
    finally:
        stop.set()
        for w in workers:
            w.join()
        for c in clients:
            c.close()
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:5]
    assert {r[3] for r in results} == {old, new}
    by_receipt = [r[3] for r in sorted(results, key=lambda r: r[1])]
    first_new = by_receipt.index(new)
    assert all(v == new for v in by_receipt[first_new:]), "the old version answered after the new one had"
    first_new_received = min(r[1] for r in results if r[3] == new)
    assert not [r for r in results if r[3] == old and r[0] > first_new_received]
    return {"requests": len(results), "replicas": {r[4] for r in results}, "swap_s": first_new_received - moved_at}


@pytest.mark.slow
def test_hot_swap_under_load_loses_no_request_and_rollback_swaps_back(app):
    registry, v1, v2 = app["registry"], app["v1"], app["v2"]
    promoted = swap_under_load(app, lambda: registry.move_alias("topics", "champion", v2), v1, v2)
    assert promoted["requests"] >= 300 and len(promoted["replicas"]) >= 2
    assert promoted["swap_s"] < 15
    info = app["client"].get("/v1/model").json()
    assert info["version"] == v2 and info["swaps"][-1]["to"] == v2
    rolled = swap_under_load(app, lambda: registry.rollback("topics"), v2, v1)
    assert rolled["requests"] >= 300
    assert app["client"].get("/v1/model").json()["version"] == v1


@pytest.mark.slow
def test_corrupt_or_incompatible_version_is_refused_and_the_old_keeps_serving(app):
    registry, client = app["registry"], app["client"]
    serving = client.get("/v1/model").json()["version"]
    bad = register_tiny(registry, "topics", app["tokenizer"], app["work"], seed=3, rows=app["rows"][:100])
    # Corrupt the stored ONNX file (what a broken upload or disk would leave).
    registry.storage.write_bytes(f"registry/topics/versions/{bad}/model.onnx", b"\x08\x07garbage")
    lm = register_tiny(registry, "topics", app["tokenizer"], app["work"], task="causal-lm", seed=4, export=False)
    for candidate, why in ((bad, "ONNX Runtime cannot load"), (lm, "causal-lm")):
        registry.move_alias("topics", "champion", candidate)
        info = wait_for(
            lambda: (i := client.get("/v1/model").json())["last_swap_error"] and i["last_swap_error"]["version"] == candidate and i,
            timeout=60,
        )
        assert why in info["last_swap_error"]["error"] and info["version"] == serving
        r = client.post("/v1/predict", json={"texts": TEXTS})
        assert r.status_code == 200 and r.json()["version"] == serving
    # Promoted again later, a refused version gets a fresh try (and is refused again).
    registry.move_alias("topics", "champion", bad)
    before = info["last_swap_error"]["at"]
    wait_for(lambda: (e := client.get("/v1/model").json()["last_swap_error"])["version"] == bad and e["at"] > before, timeout=60)
    # A good version promoted afterwards is taken, and the error clears.
    good = app["v2"] if serving == app["v1"] else app["v1"]
    registry.move_alias("topics", "champion", good)
    wait_for(lambda: client.post("/v1/predict", json={"texts": ["x y"]}).json()["version"] == good, timeout=60)
    assert client.get("/v1/model").json()["last_swap_error"] is None


@pytest.mark.slow
def test_generate_serves_a_causal_lm_with_pytorch(ray_session, serve_port, tiny_tokenizer, tmp_path_factory):
    from ray import serve

    from lifelong.inference import Generator
    from lifelong.serve import deploy

    root = tmp_path_factory.mktemp("lm-store")
    registry = Registry(Storage(str(root)))
    v = register_tiny(registry, "tiny-lm", tiny_tokenizer, tmp_path_factory.mktemp("lm-work"), task="causal-lm", seed=5, export=False)
    registry.move_alias("tiny-lm", "champion", v)
    url = deploy(serve_config(root, "tiny-lm", serve_port, num_replicas=1, route_prefix="/lm", max_new_tokens=8))
    try:
        r = httpx.post(url + "/v1/generate", json={"prompt": "The weather today", "max_new_tokens": 5}, timeout=30)
        assert r.status_code == 200, r.text
        want = Generator(registry.local_dir("tiny-lm", v), registry.card("tiny-lm", v)).generate("The weather today", 5)
        assert (r.json()["version"], r.json()["text"], r.json()["tokens"]) == (v, want["text"], want["tokens"])
        assert httpx.post(url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 9}).status_code == 422
        assert httpx.post(url + "/v1/predict", json={"texts": ["x"]}).status_code == 400
    finally:
        serve.delete("tiny-lm")


@pytest.mark.slow
def test_autoscaling_config_deploys_and_serves(app, serve_port):
    """serve.autoscaling replaces num_replicas; the app comes up within its bounds and answers."""
    from ray import serve

    from lifelong.serve import deploy

    config = serve_config(
        app["root"],
        "topics",
        serve_port,
        app_name="topics-auto",
        route_prefix="/auto",
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    )
    url = deploy(config)
    try:
        r = httpx.post(url + "/v1/predict", json={"texts": ["markets"]}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "topics"
        status = serve.status().applications["topics-auto"].deployments["ModelServer"]
        assert 1 <= sum(status.replica_states.values()) <= 2
    finally:
        serve.delete("topics-auto")
