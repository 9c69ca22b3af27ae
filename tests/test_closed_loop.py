"""The closed loop on the local Ray, with real Serve and a real store: answers recorded, feedback
for a share of them, the labelled rows landed and trained on once, a challenger in shadow, the
candidate promoted by the live gates after its shadow quota, a bad version promoted by hand and
rolled back by the watch; and the store taken away under load."""

import os
import shutil
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import WebhookReceiver, make_config, ray_metric, register_tiny
from lifelong.continual.cycle import run_cycle
from lifelong.continual.ledger import Ledger
from lifelong.continual.report import build
from lifelong.feedback import ANSWERS, FEEDBACK, read_records, sampled
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.synth import write_stream

pytestmark = pytest.mark.slow
TOKEN = "loop-token-7d2e"


def loop_config(root, landing, port, *extra):
    return make_config(
        "gpt2/tiny_continual.yaml",
        "name=loop",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        "model.init_from=loop@champion",
        "scaling.num_workers=1",
        "export.on_register=never",
        "continual.min_new_rows=10",
        "continual.gates.max_forgetting=1.0",
        f"serve.port={port}",
        "serve.num_replicas=2",
        "serve.poll_interval_s=0.3",
        "serve.backend=torch",  # the cycle's versions are not exported
        "serve.route_prefix=/loop",
        "serve.auth.token_env=LIFELONG_LOOP_TOKEN",
        "serve.log_predictions.sample=0.5",
        "serve.log_predictions.flush_interval_s=0.5",
        "serve.log_predictions.max_buffered=200",
        "serve.shadow.alias=challenger",
        "serve.shadow.share=0.5",
        "continual.promotion.shadow_requests=40",
        "continual.promotion.min_agreement=0.0",  # the first champion has random weights: the candidate disagrees
        "continual.promotion.watch_s=150",
        "continual.promotion.min_requests=20",
        "continual.promotion.min_feedback=25",
        "continual.promotion.max_accuracy_drop=0.1",
        "continual.promotion.max_p95_increase=20",  # judged on accuracy here; latency on 2 busy cores is noise
        "train.epochs=3",
        "train.lr=3e-3",
        *extra,
    )


def client_load(url: str, rows: list[dict], out: list, stop: threading.Event, limit: int, feedback: threading.Event) -> None:
    """A bounded client: two labelled texts a request; records (status, texts' labels, body).
    While `feedback` is set, the right label of each answer's first text follows it."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        i = 0
        while not stop.is_set() and len(out) < limit:
            batch = [rows[i % len(rows)], rows[(i + 7) % len(rows)]]
            i += 1
            try:
                r = client.post("/v1/predict", json={"texts": [b["text"] for b in batch]})
                out.append((r.status_code, [b["label"] for b in batch], r.json() if r.status_code == 200 else r.text))
                if feedback.is_set() and r.status_code == 200:
                    sent = client.post("/v1/feedback", json={"request_id": r.json()["request_id"], "label": batch[0]["label"]})
                    assert sent.status_code == 202, sent.text
            except httpx.HTTPError as e:
                out.append((repr(e), None, None))


class Load:
    """Three client threads on the endpoint until `limit` requests or the block's end."""

    def __init__(self, url: str, rows: list[dict], limit: int):
        self.results: list = []
        self.stop, self.feedback = threading.Event(), threading.Event()
        args = (self.results, self.stop, limit, self.feedback)
        self.threads = [threading.Thread(target=client_load, args=(url, rows[k::3], *args)) for k in range(3)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def failed(self) -> list:
        return [r for r in self.results if r[0] != 200]


def model_info(client) -> dict:
    return client.get("/v1/model").json()


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.3)
    return value


def test_served_answers_and_feedback_become_training_rows_once_while_a_challenger_shadows(
    ray_session, serve_port, tiny_tokenizer, topic_rows, tmp_path, request
):
    from ray import serve

    from lifelong.serve import deploy

    root, landing = tmp_path / "store", tmp_path / "landing"
    landing.mkdir()
    registry = Registry(Storage(str(root)))
    v1 = register_tiny(registry, "loop", tiny_tokenizer, tmp_path / "work", seed=3, rows=topic_rows[:100])
    v2 = register_tiny(registry, "loop", tiny_tokenizer, tmp_path / "work", seed=4, rows=topic_rows[:100])
    registry.move_alias("loop", "champion", v1)
    registry.move_alias("loop", "challenger", v2)
    rows = [
        r
        for p in sorted(
            write_stream(tmp_path / "w", windows=1, rows_per_window=200, files_per_window=1, seed=5, classes_per_window=4)[0].iterdir()
        )
        for r in _jsonl(p)
    ]
    os.environ["LIFELONG_LOOP_TOKEN"] = TOKEN
    hooks = WebhookReceiver()
    request.addfinalizer(hooks.close)
    config = loop_config(root, landing, serve_port, f'notify.webhooks=["{hooks.url}"]')
    url = deploy(config)
    request.addfinalizer(lambda: serve.delete(config.serve_app_name))
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    request.addfinalizer(client.close)
    with Load(url, rows, 500) as load:
        results = load.results
        # Feedback for the first 200 answered requests' first item: a wrong label then the right
        # one (a correction) for every tenth; bad feedback refused by field.
        sent: dict[str, str] = {}
        wait_for(lambda: len(results) >= 200, "200 answered requests")
        for status, truth, body in list(results)[:200]:
            assert status == 200, body
            rid = body["request_id"]
            if len(sent) % 10 == 0:
                wrong = next(x for x in config.data.labels if x != truth[0])
                assert client.post("/v1/feedback", json={"request_id": rid, "label": wrong}).status_code == 202
            r = client.post("/v1/feedback", json={"request_id": rid, "label": truth[0]})
            assert r.status_code == 202 and r.json() == {"request_id": rid, "index": 0, "label": truth[0], "recorded": True}
            sent[rid] = truth[0]
        bad = client.post("/v1/feedback", json={"request_id": "x", "label": "cooking"})
        assert bad.status_code == 422 and bad.json()["field"] == "label" and "served labels" in bad.json()["error"]
        assert client.post("/v1/feedback", json={"request_id": "has space", "label": "sports"}).json()["field"] == "request_id"
        assert httpx.post(url + "/v1/feedback", json={"request_id": "x", "label": "sports"}).status_code == 401
        # The challenger answers in shadow on both replicas; /v1/model merges what every replica saw.
        live = wait_for(
            lambda: (info := model_info(client))["live"].get(str(v2), {}).get("shadow", {}).get("answers", 0) >= 30 and info,
            "30 shadow answers",
        )
        shadow = live["live"][str(v2)]["shadow"]
        assert live["shadow"]["version"] == v2 and shadow["errors"] == 0 and 0 <= shadow["agreement"] <= 1 and shadow["p95_ms"] > 0
        assert live["live"][str(v1)]["champion"]["answers"] >= 120 and live["live"][str(v1)]["champion"]["error_rate"] == 0
        wait_for(lambda: len(results) >= 500, "the load to finish", timeout=180)
    assert not load.failed(), load.failed()[:3]
    assert {r[2]["version"] for r in results} == {v1}
    # Every answer carries its id in the body and the header (errors too); ids are unique.
    assert len({r[2]["request_id"] for r in results}) == len(results)
    answered = client.post("/v1/predict", json={"texts": ["rain tonight"]})
    assert answered.headers["x-request-id"] == answered.json()["request_id"]
    refused = client.post("/v1/predict", json={"texts": []})
    assert refused.status_code == 422 and refused.headers["x-request-id"]
    assert (
        client.post("/v1/predict", json={"texts": ["x"]}, headers={"X-Request-Id": "client-chosen-1"}).json()["request_id"]
        == "client-chosen-1"
    )
    # Prometheus: the shadow's answers by version (the agreeing and the others).
    assert ray_metric("ray_lifelong_serve_shadow_answers_total", model="loop", version=str(v2), at_least=30) >= 30

    # The log is written; feedback for the recorded requests (half of them, by id) joins.
    expected = {rid: truth for rid, truth in sent.items() if sampled(rid, 0.5)}
    assert 5 <= len(expected) < len(sent)
    storage = Storage(str(root))

    def stored(kind: str) -> set:
        return set(read_records(storage, "loop", kind, 30, ["request_id"]).column("request_id").to_pylist())

    wait_for(lambda: expected.keys() <= stored(ANSWERS) and sent.keys() <= stored(FEEDBACK), "the log and the feedback written")
    assert not (sent.keys() - expected.keys()) & stored(ANSWERS), "a request outside the sample was recorded"
    # A file from elsewhere lands too: the window mixes it with the production rows.
    other = write_stream(tmp_path / "other", windows=1, rows_per_window=40, files_per_window=1, seed=8, classes_per_window=4)[0]
    shutil.copy(next(other.iterdir()), landing / "elsewhere.jsonl")

    # The rest runs under a client load that never stops: the cycle, the live gates, the rollback.
    with Load(url, rows, 20000) as load:
        first = run_cycle(config)
        print(first.summary())
        # It passed the offline gates: a candidate for the live gates, not champion by the cycle.
        assert first.window == 0 and first.version is not None and first.status == "passed", first.summary()
        v3 = first.version
        ledger = Ledger(Storage(str(root)), "loop")
        [record] = [r for r in ledger.records() if r.name.startswith("feedback-")]
        [elsewhere] = [r for r in ledger.records() if r.name == "elsewhere.jsonl"]
        assert (
            record.state == elsewhere.state == "consumed"
            and record.rows == len(expected)
            and sorted(first.files) == sorted([record.sha256, elsewhere.sha256])
        )
        assert first.new_rows == len(expected) + 40
        landed = pq.read_table(landing / record.name).to_pylist()
        assert {r["request_id"]: r["label"] for r in landed} == expected
        card = registry.card("loop", v3)
        assert {f["path"].rsplit("/", 1)[-1] for f in card.data["files"]} == {record.name, "elsewhere.jsonl"}
        # Nothing new (the clients send no labels yet): the next cycle waits, and no second file lands.
        assert run_cycle(config).status == "waiting"
        assert len([p for p in landing.iterdir() if p.name.startswith("feedback-")]) == 1

        # The report: live accuracy per version from the feedback, the same as counted here.
        answered = {r[2]["request_id"]: r[2]["predictions"][0]["label"] for r in results}
        right = sum(answered[rid] == truth for rid, truth in expected.items())
        live = build(config)["live"]
        assert live["accuracy"][str(v1)]["champion"] == {"labelled": len(expected), "correct": right, "accuracy": right / len(expected)}
        assert live["landed"] == len(expected) and live["corrections"] == len([i for i in range(len(sent)) if i % 10 == 0])

        # The live gates: the candidate answers in shadow and becomes champion once it has 40
        # shadow answers (the cycle made it challenger, kind candidate; the endpoint promoted it).
        # From here each answer is followed by its label.
        load.feedback.set()
        results = load.results
        wait_for(lambda: registry.alias_version("loop", "champion") == v3, "the live gates' promotion", timeout=180)
        promoted = registry.history("loop", "champion")[-1]
        candidate = registry.history("loop", "challenger")[-1]
        assert (candidate["kind"], candidate["version"]) == ("candidate", v3) and candidate["moved_at"] < promoted["moved_at"]
        assert promoted["kind"] == "promote" and promoted["reason"].startswith("passed the live gates (")
        assert int(promoted["reason"].split("(")[1].split(" shadow answers")[0]) >= 40, promoted
        wait_for(lambda: any(r[0] == 200 and r[2]["version"] == v3 for r in list(results)), "an answer from the new champion")
        by_receipt = [r[2]["version"] for r in list(results) if r[0] == 200]
        assert by_receipt.index(v3) > 0 and set(by_receipt[: by_receipt.index(v3)]) == {v1}
        # A bad version promoted by hand (random weights: it has learned nothing): the watch
        # compares its accuracy from feedback with v3's and rolls it back, saying why.
        wait_for(
            lambda: model_info(client)["live"].get(str(v3), {}).get("champion", {}).get("feedback", {}).get("labelled", 0) >= 25,
            "feedback on the new champion's answers",
            timeout=120,
        )
        bad = register_tiny(registry, "loop", tiny_tokenizer, tmp_path / "work", seed=11, rows=topic_rows[:100])
        registry.move_alias("loop", "champion", bad, reason="by hand")
        wait_for(lambda: registry.alias_version("loop", "champion") == v3, "the watch's rollback", timeout=150)
        rolled = registry.history("loop", "champion")[-1]
        assert rolled["kind"] == "rollback" and rolled["version"] == v3 and rolled["previous"] == bad, rolled
        assert rolled["reason"].startswith(f"live watch of loop:{bad}: accuracy from feedback"), rolled
        assert 0 < ray_metric("ray_lifelong_serve_live_accuracy", model="loop", version=str(v3), role="champion") <= 1
        [hook] = hooks.wait_for("live.rollback", timeout=30)
        assert hook["version"] == bad and hook["restored"] == v3 and hook["reason"] == rolled["reason"]
        wait_for(lambda: any(r[0] == 200 and r[2]["version"] == v3 for r in list(results)[-20:]), "v3 answering again")
        watches = model_info(client)
    assert not load.failed(), load.failed()[:3]
    assert {r[2]["version"] for r in results} == {v1, v3, bad}
    ended = {w["version"]: w for w in watches["watches"]}
    assert ended[bad]["outcome"] == "rolled back" and ended[bad]["reason"] == rolled["reason"] and ended[v3]["outcome"] == "superseded"

    # The store taken away under load (the log's directory replaced by a file): every request is
    # still answered, the records that do not fit are dropped and counted; back, it writes again.
    answers = root / "predictions" / "loop" / "answers"
    answers.rename(tmp_path / "answers-aside")
    answers.write_text("the store is gone")
    with Load(url, rows, 900) as load:
        wait_for(lambda: len(load.results) >= 900, "900 requests", timeout=180)
    assert len(load.results) >= 900 and not load.failed(), load.failed()[:3]
    logs = {}
    wait_for(lambda: logs.update({(i := model_info(client))["replica"]: i["prediction_log"]}) or len(logs) == 2, "both replicas' logs")
    assert all(
        s["store_error"] and s["dropped"] > 0 and s["dropped"] == s["dropped_queue_full"] + s["dropped_store_failed"] for s in logs.values()
    ), logs
    assert sum(s["dropped"] for s in logs.values()) + sum(s["queued"] for s in logs.values()) >= 300, logs
    answers.unlink()
    (tmp_path / "answers-aside").rename(answers)
    wait_for(lambda: (s := model_info(client)["prediction_log"])["store_error"] is None and s["queued"] == 0, "the log writing again")


def _jsonl(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
