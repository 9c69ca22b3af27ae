"""Ray Serve on the local Ray: the HTTP API, hot-swap under load, refused versions, auth."""

import os
import re
import select
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import LABELS, WebhookReceiver, ray_metric, register_tiny
from conftest import text_probabilities as offline_probabilities
from lifelong.config import absolute_paths, validate_config
from lifelong.registry import Registry
from lifelong.storage import Storage

TOKEN = "test-token-4f1c"
TEXTS = [
    "stocks and bonds rallied after the central bank decision",
    "the telescope found a new planet orbiting a distant star",
    "rain tomorrow " * 40,
]  # longer than the model's 32 tokens


def serve_config(root, name, port, notify=None, **serve):
    raw = {
        "name": name,
        "storage": {"root": str(root)},
        "serve": {"port": port, "num_replicas": 2, "poll_interval_s": 0.3, "max_texts_per_request": 8, **serve},
        **({"notify": notify} if notify else {}),
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
    hooks = WebhookReceiver()
    config = serve_config(
        root,
        "topics",
        serve_port,
        notify={"webhooks": [hooks.url]},
        auth={"token_env": "LIFELONG_TEST_TOKEN"},
        max_batch_size=8,
        body_timeout_s=2,
    )
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
        "webhooks": hooks,
    }
    client.close()
    serve.delete("topics")
    hooks.close()


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
        ({"text": ["typo in the key"]}, 422, "text"),
        ({}, 422, "body"),
        ({"texts": ["a"], "images": ["aGk="]}, 422, "body"),
        ({"images": ["aGk="]}, 422, "images"),  # a text classifier is sent texts
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


def raw_request(url: str, head: str, body: bytes, timeout: float, trickle_s: float = 0.0) -> tuple[int | None, bytes, float]:
    """Send `head` and `body` on a raw socket (a byte at a time every `trickle_s` when set) and read
    whatever the server answers within `timeout`: (status or None, response bytes, seconds)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            if trickle_s:
                for i in range(len(body)):
                    if select.select([sock], [], [], 0)[0]:  # the server has answered
                        break
                    sock.sendall(body[i : i + 1])
                    time.sleep(trickle_s)
            else:
                sock.sendall(body)
        except OSError:  # the server answered and closed while we were still sending
            pass
        data = b""
        sock.settimeout(max(0.1, timeout - (time.monotonic() - started)))
        try:
            while True:
                head_end = data.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = re.search(rb"(?i)content-length: *(\d+)", data[:head_end])
                    if length is None or len(data) >= head_end + 4 + int(length.group(1)):
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    return status, data, time.monotonic() - started


def post_head(url: str, path: str, length: int, token: str | None = None) -> str:
    from urllib.parse import urlsplit

    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {urlsplit(url).path.rstrip('/')}{path} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )


def test_unauthenticated_or_oversized_bodies_are_refused_before_they_are_read(app):
    url = app["url"]
    # 5 MB announced, 64 KB sent: without a token the answer is 401 at once, no schema details.
    status, data, took = raw_request(url, post_head(url, "/v1/predict", 5_000_000), b'{"texts": [' + b"1," * 32000, timeout=10)
    assert status == 401 and b"bearer token" in data and b"texts" not in data and took < 5, (status, data[-300:], took)
    # With the token, a body announced above serve.max_body_bytes is 413 before a byte is read.
    status, data, took = raw_request(url, post_head(url, "/v1/predict", 5_000_000, TOKEN), b"{", timeout=10)
    assert status == 413 and b"serve.max_body_bytes" in data and took < 5, (status, data[-300:])
    # Chunked (no length announced): cut off once it passes the limit.
    chunks = (b'{"texts": ["' + b"x" * 100_000 for _ in range(30))
    r = app["client"].post("/v1/predict", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    # A body trickled a byte every 0.3 s is dropped after serve.body_timeout_s (2 s) with 408.
    status, data, took = raw_request(url, post_head(url, "/v1/predict", 200, TOKEN), b'{"texts": ["' + b"a" * 100, 15, trickle_s=0.3)
    assert status == 408 and b"serve.body_timeout_s" in data and took < 6, (status, data[-300:], took)


def test_the_haproxy_ingress_on_a_ray_started_without_it_is_refused_saying_how(ray_session, tmp_path):
    """Serve reads its HAProxy mode when Ray's processes start: asked of a Ray already running
    without it (a cluster, here the session's), serving refuses and says what the nodes need."""
    from lifelong.errors import ConfigError
    from lifelong.serve import connect_for_serving

    config = validate_config({"name": "topics", "storage": {"root": str(tmp_path)}, "serve": {"ingress": "haproxy"}})
    with pytest.raises(ConfigError, match=r"started without Serve's HAProxy mode.*RAY_SERVE_ENABLE_HA_PROXY=1"):
        connect_for_serving(config)


def test_the_batcher_runs_a_lone_request_at_once_and_batches_what_queued_meanwhile():
    import asyncio

    from lifelong.serve import Batcher

    async def settle():  # let every ready task run its next step
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario():
        calls, release = [], asyncio.Event()

        async def model(items):
            calls.append(list(items))
            if len(calls) == 1:
                await release.wait()  # the first call runs long: the others queue meanwhile
            if "bad" in items:
                raise ValueError("the model failed")
            return [f"out-{i}" for i in items]

        batcher = Batcher(model, max_size=8, wait_s=0.0)
        first = asyncio.create_task(batcher.submit("a"))
        await settle()  # the idle batcher starts its call
        assert calls == [["a"]]  # alone, without waiting for company
        queued = [asyncio.create_task(batcher.submit(f"q{i}")) for i in range(11)]
        left = asyncio.create_task(batcher.submit("gone"))
        await settle()
        left.cancel()  # a client that leaves while queued is not sent to the model
        release.set()
        assert await first == "out-a" and await asyncio.gather(*queued) == [f"out-q{i}" for i in range(11)]
        assert calls[1:] == [[f"q{i}" for i in range(8)], ["q8", "q9", "q10"]]  # what queued, in calls of at most 8
        # A failing call fails its own requests; the batcher goes on.
        results = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
        assert isinstance(results[0], ValueError) and await batcher.submit("z") == "out-z"

        # With a wait, a lone request waits for company (at most wait_s) and goes with it.
        waiting = Batcher(model, max_size=8, wait_s=5.0)
        calls.clear()
        together = [asyncio.create_task(waiting.submit(x)) for x in ("w1", "w2")]
        await asyncio.sleep(0.05)
        late = asyncio.create_task(waiting.submit("w3"))
        await asyncio.sleep(0.05)
        assert calls == []  # still waiting for company
        fill = [asyncio.create_task(waiting.submit(f"f{i}")) for i in range(5)]  # the batch is full: it goes
        await asyncio.gather(*together, late, *fill)
        assert calls == [["w1", "w2", "w3", "f0", "f1", "f2", "f3", "f4"]]

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_one_request_the_tokenizer_cannot_take_fails_alone(app):
    """A lone surrogate (valid JSON, invalid Unicode) gets 422 naming its field; the requests
    batched with it are answered."""
    bad = b'{"texts": ["fine", "\\ud800 broken"]}'
    rounds = []
    for _ in range(4):
        barrier, results = threading.Barrier(8), [None] * 8

        def send(i):
            with httpx.Client(base_url=app["url"], headers=app["client"].headers, timeout=30) as c:
                barrier.wait()
                if i == 0:
                    results[i] = c.post("/v1/predict", content=bad, headers={"Content-Type": "application/json"})
                else:
                    results[i] = c.post("/v1/predict", json={"texts": TEXTS[:2]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rounds.append(results)
    for results in rounds:
        assert results[0].status_code == 422 and results[0].json()["field"] == "texts[1]", results[0].text
        assert "surrogate" in results[0].json()["error"]
        assert [r.status_code for r in results[1:]] == [200] * 7, [r.text for r in results[1:] if r.status_code != 200][:2]


def test_the_schema_states_what_the_server_enforces(app):
    schema = httpx.get(app["url"] + "/openapi.json").json()
    texts = next(a for a in schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]["anyOf"] if a.get("type") == "array")
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"], texts["items"]["pattern"]) == (1, 8, 20000, r"\S")
    responses = schema["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "400", "401", "408", "413", "422"} <= set(responses)
    assert responses["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert schema["paths"]["/v1/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    # What the schema forbids the server refuses with the status it documents, naming the field.
    r = app["client"].post("/v1/predict", json={"texts": [" "]})
    assert r.status_code == 422 and r.json()["field"] == "texts[0]" and "empty" in r.json()["error"]


def replica_rss_mb(app_name: str) -> dict[int, float]:
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(f"ServeReplica:{app_name}:ModelServer" in part for part in p.info["cmdline"] or []):
            out[p.info["pid"]] = p.memory_info().rss / 2**20
    return out


@pytest.mark.slow
def test_a_thousand_malformed_requests_from_the_schema_get_4xx_while_the_client_is_served(app):
    """Requests generated from the app's own OpenAPI schema, then broken in many ways, plus
    unauthenticated and oversized ones: never a 5xx, replica memory bounded, and an
    authenticated client sending good requests throughout is always answered."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis_jsonschema import from_schema

    url = app["url"]
    schema = httpx.get(url + "/openapi.json").json()
    body_schema = dict(schema["components"]["schemas"]["PredictRequest"])
    texts = next(a for a in body_schema["properties"]["texts"]["anyOf"] if a.get("type") == "array")  # a text classifier's body
    body_schema["properties"] = {"texts": dict(texts, maxItems=3, items=dict(texts["items"], maxLength=40))}
    body_schema["required"] = ["texts"]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )

    def broken(valid: dict, how: int, junk, data) -> bytes:
        if how == 0:
            return json.dumps(junk).encode()  # any JSON at all
        if how == 1:
            return json.dumps({**valid, data.draw(st.text(min_size=1, max_size=8)).replace("texts", "x"): junk}).encode()
        if how == 2:
            texts = list(valid["texts"])
            texts[data.draw(st.integers(0, len(texts) - 1))] = junk
            return json.dumps({"texts": texts}).encode()
        if how == 3:
            return json.dumps({"texts": valid["texts"] * 9}).encode()  # above maxItems (8)
        if how == 4:
            return json.dumps({"texts": [valid["texts"][0] * 1000 + "x" * 20001]}).encode()  # above maxLength
        if how == 5:
            return json.dumps(valid).encode()[: data.draw(st.integers(0, 10))]  # cut short
        if how == 6:
            return json.dumps({"texts": [data.draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))]}).encode()
        if how == 7:
            return json.dumps({"texts": ["\ud800" + valid["texts"][0]]}).encode()  # lone surrogate
        return ("[" * data.draw(st.integers(100, 3000)) + "]" * 2).encode()  # deep and unbalanced

    sent, statuses, stop, good = [0], {}, threading.Event(), []
    load = threading.Thread(
        target=run_load, args=(httpx.Client(base_url=url, headers=app["client"].headers, timeout=30), stop, good, 5000, TEXTS[:2])
    )
    before = replica_rss_mb("topics")
    load.start()
    try:
        with httpx.Client(base_url=url, timeout=30) as raw:

            @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(valid=from_schema(body_schema), how=st.integers(0, 8), junk=json_values, authed=st.integers(0, 9), data=st.data())
            def one(valid, how, junk, authed, data):
                headers = {"Content-Type": "application/json"} | ({} if authed == 0 else {"Authorization": f"Bearer {TOKEN}"})
                r = raw.post("/v1/predict", content=broken(valid, how, junk, data), headers=headers)
                sent[0] += 1
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (r.status_code, r.text[:300])
                assert r.status_code in (200, 400, 401, 413, 422) and "error" in r.json() or r.status_code == 200, r.text[:300]
                if authed == 0:
                    assert r.status_code == 401

            one()
    finally:
        stop.set()
        load.join()
    after = replica_rss_mb("topics")
    print(f"abuse: {sent[0]} generated requests, statuses {statuses}; {len(good)} good requests; replica RSS MB {before} → {after}")
    assert sent[0] >= 1000 and statuses.get(401, 0) >= 50 and statuses.get(422, 0) >= 100 and statuses.get(413, 0) >= 20, statuses
    failed = [r for r in good if r[2] != 200]
    assert len(good) >= 100 and not failed, (len(good), failed[:3])
    assert set(after) == set(before), "a replica restarted under the abuse"
    assert all(after[pid] - before[pid] < 300 for pid in before), (before, after)


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
        # The app's webhook hears of it (from the follower: notify.webhooks of the served config).
        refused = app["webhooks"].wait_for("swap.refused", timeout=30, count=1 + (candidate == lm))[-1]
        assert (refused["model"], refused["alias"], refused["version"], refused["serving"]) == ("topics", "champion", candidate, serving)
        assert refused["error"] == info["last_swap_error"]["error"]
    # A replica that starts now (one is killed) loads the committed version, not the refused one
    # the alias names: it comes up and answers with the version the others serve.
    before = {client.post("/v1/predict", json={"texts": ["x"]}).headers["x-lifelong-replica"] for _ in range(30)}
    kill_replica("topics", sorted(before)[0])
    fresh = wait_for(
        lambda: (
            {r.headers.get("x-lifelong-replica") for r in [client.post("/v1/predict", json={"texts": ["x"]})] if r.status_code == 200}
            - before
        ),
        timeout=120,
        interval=0.1,
    )
    answers = [client.post("/v1/predict", json={"texts": ["x"]}) for _ in range(40)]
    assert {(r.status_code, r.json()["version"]) for r in answers} == {(200, serving)}
    assert fresh <= {r.headers["x-lifelong-replica"] for r in answers}
    # Promoted again later, a refused version gets a fresh try (and is refused again).
    registry.move_alias("topics", "champion", bad)
    before = info["last_swap_error"]["at"]
    wait_for(lambda: (e := client.get("/v1/model").json()["last_swap_error"])["version"] == bad and e["at"] > before, timeout=60)
    # A good version promoted afterwards is taken, and the error clears.
    good = app["v2"] if serving == app["v1"] else app["v1"]
    registry.move_alias("topics", "champion", good)
    wait_for(lambda: client.post("/v1/predict", json={"texts": ["x y"]}).json()["version"] == good, timeout=60)
    assert client.get("/v1/model").json()["last_swap_error"] is None
    # Prometheus (Ray's metrics endpoint): both refusals counted, at least (a re-promotion refused again too).
    assert ray_metric("ray_lifelong_serve_refused_swaps_total", at_least=3, model="topics") >= 3


def test_prometheus_metrics_count_requests_by_version_and_status_and_the_swaps(app):
    """What Ray's metrics endpoint holds for the app (the names Prometheus and the Grafana
    dashboard, cluster/grafana/lifelong.json, read): requests per version, route and status,
    their latency, the version each replica serves, swaps and their seconds."""
    client, registry = app["client"], app["registry"]
    serving = client.get("/v1/model").json()["version"]
    answered = [client.post("/v1/predict", json={"texts": ["x"]}) for _ in range(5)]
    assert {(r.status_code, r.headers["x-lifelong-version"]) for r in answered} == {(200, str(serving))}
    assert client.post("/v1/predict", json={"texts": []}).status_code == 422
    assert httpx.post(app["url"] + "/v1/predict", json={"texts": ["x"]}).status_code == 401  # no token
    ok = {"model": "topics", "version": serving, "route": "/v1/predict"}
    assert ray_metric("ray_lifelong_serve_requests_total", at_least=5, status=200, **ok) >= 5
    assert ray_metric("ray_lifelong_serve_requests_total", at_least=1, status=422, **ok) >= 1
    assert ray_metric("ray_lifelong_serve_requests_total", at_least=1, status=401, **ok) >= 1
    assert ray_metric("ray_lifelong_serve_request_seconds_count", at_least=5, **ok) >= 5
    # A swap: counted, timed, and every replica's gauge names the new version.
    other = app["v2"] if serving == app["v1"] else app["v1"]
    registry.move_alias("topics", "champion", other)
    wait_for(lambda: client.post("/v1/predict", json={"texts": ["x"]}).json()["version"] == other, timeout=60)
    assert ray_metric("ray_lifelong_serve_swaps_total", at_least=1, model="topics") >= 1
    assert ray_metric("ray_lifelong_serve_swap_seconds_count", at_least=1, model="topics") >= 1
    replicas = {client.post("/v1/predict", json={"texts": ["x"]}).headers["x-lifelong-replica"] for _ in range(30)}
    for replica in replicas:
        assert ray_metric("ray_lifelong_serve_version", model="topics", replica=replica, equals=other) == other


def kill_replica(app_name: str, unique_id: str) -> None:
    """SIGKILL-equivalent for one ModelServer replica (Serve starts a new one)."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#ModelServer#") and actor["name"].endswith(unique_id):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no replica {unique_id} of {app_name}")


@pytest.mark.slow
def test_swaps_under_requests_slower_than_the_hold_window_complete_or_abort_visibly(
    ray_session, serve_port, tiny_tokenizer, tmp_path_factory
):
    """Generations longer than serve.hold_timeout_s run all the time: a swap either drains in a
    (doubled) window or is aborted and shown in /v1/model; it never wedges, no request fails,
    and once the new version has answered the old one never does."""
    from ray import serve

    from lifelong.serve import deploy

    root, work = tmp_path_factory.mktemp("slow-store"), tmp_path_factory.mktemp("slow-work")
    registry = Registry(Storage(str(root)))
    v1, v2 = (register_tiny(registry, "slow-lm", tiny_tokenizer, work, task="causal-lm", seed=s, export=False) for s in (5, 6))
    registry.move_alias("slow-lm", "champion", v1)
    url = deploy(serve_config(root, "slow-lm", serve_port, route_prefix="/slow", max_new_tokens=30, hold_timeout_s=0.005))
    results, stop_slow, stop_all = [], threading.Event(), threading.Event()

    def client(new_tokens: int, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set() and len(results) < 20000:
                sent = time.monotonic()
                r = c.post("/v1/generate", json={"prompt": "the weather", "max_new_tokens": new_tokens})
                results.append((sent, time.monotonic(), r.status_code, r.json().get("version"), new_tokens))

    threads = [threading.Thread(target=client, args=(30, stop_slow)) for _ in range(3)]
    threads += [threading.Thread(target=client, args=(1, stop_all)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 30, timeout=60)
        registry.move_alias("slow-lm", "champion", v2)

        def outcome():
            if any(r[3] == v2 for r in results):
                return "completed"
            error = httpx.get(url + "/v1/model", timeout=30).json()["last_swap_error"]
            return error and "aborted" in error["error"] and error["version"] == v2 and "aborted"

        seen = wait_for(outcome, timeout=60, interval=0.1)
        stop_slow.set()  # with the slow generations gone, the retried swap goes through
        wait_for(lambda: [r[3] for r in results[-10:]] == [v2] * 10, timeout=60, interval=0.1)
    finally:
        stop_slow.set()
        stop_all.set()
        for t in threads:
            t.join()
        info = httpx.get(url + "/v1/model", timeout=30).json()
        serve.delete("slow-lm")
    assert seen in ("completed", "aborted")
    assert {r[2] for r in results} == {200}, [r for r in results if r[2] != 200][:3]
    assert sum(1 for r in results if r[4] == 30) >= 10
    by_receipt = [r[3] for r in sorted(results, key=lambda r: r[1])]
    assert all(v == v2 for v in by_receipt[by_receipt.index(v2) :]), "the old version answered after the new one had"
    assert info["version"] == v2 and info["swaps"][-1]["to"] == v2 and info["last_swap_error"] is None


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
        want = Generator(registry.local_dir("tiny-lm", v), registry.card("tiny-lm", v).max_length).generate("The weather today", 5)
        assert (r.json()["version"], r.json()["text"], r.json()["tokens"]) == (v, want["text"], want["tokens"])
        assert httpx.post(url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 9}).status_code == 422
        # A seed beyond what the sampler takes is a 422 naming it, not a 500.
        r = httpx.post(url + "/v1/generate", json={"prompt": "x", "temperature": 1.0, "seed": 2**70})
        assert r.status_code == 422 and r.json()["field"] == "seed"
        # Sampled generations with one seed agree, also when they run at the same time.
        body = {"prompt": "The weather today", "max_new_tokens": 8, "temperature": 1.5, "seed": 11}
        with httpx.Client(timeout=30) as c:
            threads, texts = [], []
            for _ in range(6):
                threads.append(threading.Thread(target=lambda: texts.append(c.post(url + "/v1/generate", json=body).json()["text"])))
                threads[-1].start()
            for t in threads:
                t.join()
        assert len(texts) == 6 and len(set(texts)) == 1, texts
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


def test_a_classifier_is_served_from_its_torchscript_export(app, serve_port):
    """serve.backend=torchscript: refused (naming the command) until the version has the file,
    then served from it, the answers those of the offline model."""
    from ray import serve

    from lifelong.config import ExportSection
    from lifelong.errors import LifelongError
    from lifelong.export import export_version
    from lifelong.serve import check_servable, deploy

    registry = app["registry"]
    served = registry.alias_version("topics", "champion")  # whichever version the tests before left serving
    config = serve_config(
        app["root"], "topics", serve_port, app_name="topics-ts", route_prefix="/ts", num_replicas=1, backend="torchscript"
    )
    with pytest.raises(
        LifelongError, match=f"topics:{served} has no model.torchscript.pt: run 'lifelong export topics:{served} --torchscript'"
    ):
        check_servable(config)
    export_version(registry, "topics", served, ExportSection(), None, ("torchscript",))
    url = deploy(config)
    try:
        r = httpx.post(url + "/v1/predict", json={"texts": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        got = np.array([[p["probabilities"][label] for label in LABELS] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, offline_probabilities(registry.local_dir("topics", served), TEXTS), atol=1e-4)
        info = httpx.get(url + "/v1/model", timeout=30).json()
        assert info["backend"] == "torchscript" and info["exports"]["torchscript"]["parity_max_abs_diff"] <= 1e-4
    finally:
        serve.delete("topics-ts")


def test_serving_without_a_token_is_said_loudly(tmp_path):
    from lifelong.serve import exposure_warning

    loud = exposure_warning(serve_config(tmp_path, "m", 8000, host="0.0.0.0"))
    assert "any process that can reach 0.0.0.0 can call every /v1 route (/v1/predict, /v1/generate, /v1/completions" in loud
    assert "on this machine" in exposure_warning(serve_config(tmp_path, "m", 8000))
    assert exposure_warning(serve_config(tmp_path, "m", 8000, host="0.0.0.0", auth={"token_env": "T"})) is None
