"""The storage root on a real S3-compatible server (moto_server on loopback): registry, ledger,
leases, racing writers, and a whole training run whose checkpoints and registry live in the bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import ROOT, S3_CREDENTIALS
from lifelong.config import DataConfig
from lifelong.continual.ledger import Ledger
from lifelong.errors import AliasConflict
from lifelong.registry import Registry
from lifelong.storage import Storage


@pytest.fixture
def bucket(s3_server, request):
    name = "lifelong-" + request.node.name.replace("_", "-")[:40].strip("-").lower()
    s3_server["client"].create_bucket(Bucket=name)
    return f"s3://{name}/store?endpoint_override=127.0.0.1:{s3_server['port']}&scheme=http"


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(d)
    return d


def test_registry_on_s3_registers_resolves_and_moves_aliases(bucket, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    registry = Registry(Storage(bucket))
    assert not registry.storage.is_local and registry.storage.conditional_writes
    v1 = registry.register_version("m", model_dir, {"task": "causal-lm", "metrics": {"val_loss": 1.0}})
    v2 = registry.register_version("m", model_dir, {"task": "causal-lm", "metrics": {"val_loss": 0.5}})
    assert (v1, v2) == (1, 2) and registry.versions("m") == [1, 2]
    registry.move_alias("m", "champion", 1)
    registry.move_alias("m", "champion", 2)
    resolved = registry.resolve("m@champion")
    assert resolved.version == 2 and str(resolved.local_dir).startswith(str(tmp_path / "cache"))
    AutoModelForCausalLM.from_pretrained(resolved.local_dir)  # the downloaded copy loads
    assert [e["version"] for e in registry.history("m", "champion")] == [1, 2]
    assert registry.rollback("m")["version"] == 1
    # A version's card is created only-if-absent on S3 too (If-None-Match: *).
    assert not registry.storage.create_exclusive("registry/m/versions/1/card.json", b"{}")
    assert registry.card("m", 1).metrics == {"val_loss": 1.0}


def test_two_writers_racing_to_move_an_alias_on_s3_exactly_one_wins(bucket, model_dir):
    registry = Registry(Storage(bucket))
    for _ in range(4):
        registry.register_version("m", model_dir, {"task": "causal-lm"})
    registry.move_alias("m", "champion", 1)
    for rnd in range(5):
        base = registry.alias_version("m", "champion")
        targets = [v for v in (1, 2, 3, 4) if v != base]
        barrier, won, lost = threading.Barrier(len(targets)), [], []

        def move(v):
            writer = Registry(Storage(bucket))  # its own clients, as another process would have
            barrier.wait()
            try:
                won.append(writer.move_alias("m", "champion", v, expect=base))
            except AliasConflict as e:
                lost.append(str(e))

        threads = [threading.Thread(target=move, args=(v,)) for v in targets]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1 and len(lost) == len(targets) - 1, (rnd, won, lost)
        assert all("by another writer" in m for m in lost)
        pointer = registry.alias_pointer("m", "champion")
        assert pointer == won[0] and pointer["previous"] == base
    history = registry.history("m", "champion")
    assert [e["seq"] for e in history] == list(range(1, 7))  # one event per move that happened, none lost or doubled
    assert history[-1] == registry.alias_pointer("m", "champion")

    # Writers that do not care where the alias was: every move lands, in some order, none lost.
    barrier = threading.Barrier(3)

    def move_any(v):
        barrier.wait()
        Registry(Storage(bucket)).move_alias("m", "champion", v)

    threads = [threading.Thread(target=move_any, args=(v,)) for v in (2, 3, 4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    history = registry.history("m", "champion")
    assert [e["seq"] for e in history] == list(range(1, 10)) and sorted(e["version"] for e in history[-3:]) == [2, 3, 4]
    assert all(later["previous"] == earlier["version"] for earlier, later in zip(history, history[1:]))


LABELS = DataConfig(path="unused", label_column="label", labels=["finance", "science", "sports", "weather"])


def test_ledger_on_s3_loses_no_update_when_writers_race(ray_session, bucket, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "a.jsonl").write_text('{"text": "rain tonight", "label": "weather"}\n')
    ledger = Ledger(Storage(bucket), "s")
    [record] = ledger.scan(str(landing), LABELS).new
    digest = record.sha256
    # Eight writers each record another copy of the same bytes at once: all eight stay recorded.
    barrier = threading.Barrier(8)

    def add_copy(i):
        barrier.wait()
        Ledger(Storage(bucket), "s")._update(digest, lambda r: r.copies.append(f"copy-{i}"))

    threads = [threading.Thread(target=add_copy, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(ledger.record(digest).copies) == [f"copy-{i}" for i in range(8)]
    ledger.consume([digest], "m:3")
    ledger.consume([digest], "m:4")  # already consumed: the first consumer stays on record
    assert ledger.record(digest).consumed_by == "m:3" and ledger.counts()["consumed"] == 1 and ledger.pending() == []
    assert not ledger.scan(str(landing), LABELS).new  # nothing is new the second time


def test_a_landing_zone_on_s3_with_its_endpoint_in_the_uri(ray_session, bucket, s3_server):
    """The README's URI style for storage roots, used for a landing zone: per-file URIs are built
    from the filesystem (no query pasted into them), the bytes are kept in the store."""
    name, port = bucket.split("/")[2], s3_server["port"]
    client = s3_server["client"]
    client.put_object(Bucket=name, Key="landing/a.jsonl", Body=b'{"text": "rain tonight", "label": "weather"}\n')
    client.put_object(Bucket=name, Key="landing/sub/b.NDJSON", Body=b'{"text": "shares fell", "label": "finance"}\n')
    landing = f"s3://{name}/landing?endpoint_override=127.0.0.1:{port}&scheme=http"
    ledger = Ledger(Storage(bucket), "s")
    report = ledger.scan(landing, LABELS)
    assert sorted(r.path for r in report.new) == [f"s3://{name}/landing/a.jsonl", f"s3://{name}/landing/sub/b.NDJSON"]
    assert all(r.state == "pending" and r.rows == 1 for r in report.new)
    assert all(ledger.storage.exists(r.object) for r in report.new)
    client.delete_object(Bucket=name, Key="landing/a.jsonl")  # gone from the landing zone: its bytes are kept
    assert ledger.check_pending(LABELS, landing) == [] and len(ledger.pending()) == 2
    assert not ledger.scan(landing, LABELS).new


def test_the_s3_lease_admits_one_holder_and_is_taken_over_when_its_holder_died(bucket):
    storage = Storage(bucket)
    inside, overlaps = [], []

    def work(i):
        with Storage(bucket).lock("streams/s/cycle", lease_s=4):
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(list(inside))
            time.sleep(0.3)
            inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not overlaps and not storage.exists("streams/s/cycle.lease")
    # A holder that died: its lease expired and nobody renews it; the next writer takes it over.
    storage.write_bytes("streams/t/cycle.lease", json.dumps({"owner": "dead:1", "expires_at": time.time() - 1}).encode())
    t0 = time.monotonic()
    with storage.lock("streams/t/cycle", lease_s=4):
        assert json.loads(storage.read_bytes("streams/t/cycle.lease"))["owner"] != "dead:1"
    # Its expiry is judged on the taker's clock: unchanged for one lease from when it was first seen.
    assert 4 <= time.monotonic() - t0 < 6


def test_two_stores_whose_names_differ_only_in_punctuation_never_share_cached_weights(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    served = []
    for prefix, seed in (("st-ore", 1), ("st_ore", 2)):
        import torch

        torch.manual_seed(seed)
        d = tmp_path / f"model-{seed}"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(d)
        registry = Registry(Storage(bucket.replace("/store?", f"/{prefix}?")))
        version = registry.register_version("m", d, {"task": "causal-lm"})
        served.append((registry.local_dir("m", version) / "model.safetensors").read_bytes())
        assert served[-1] == (d / "model.safetensors").read_bytes()
    assert served[0] != served[1]


def test_the_registry_cache_keeps_only_the_most_recently_used_versions(bucket, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIFELONG_CACHE_VERSIONS", "2")
    registry = Registry(Storage(bucket))
    versions = [registry.register_version("m", model_dir, {"task": "causal-lm"}) for _ in range(3)]

    def cached() -> list[str]:
        return sorted(p.name for p in (tmp_path / "cache" / "registry").glob("*/m/*") if not p.name.startswith("."))

    for v in versions:
        registry.local_dir("m", v)
    assert cached() == ["2", "3"]
    assert (registry.local_dir("m", 1) / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert cached() == ["1", "3"]


def test_a_cached_version_with_a_later_export_is_not_downloaded_again(bucket, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    registry = Registry(Storage(bucket))
    v = registry.register_version("m", model_dir, {"task": "causal-lm"})
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"an export added after registration")
    registry.add_export("m", v, "onnx", {"model.onnx": onnx}, {"opset": 17})
    first = registry.local_dir("m", v)
    assert (first / "model.onnx").read_bytes() == onnx.read_bytes()
    (first / "marker").write_text("still the same copy")
    again = registry.local_dir("m", v)
    assert again == first and (again / "marker").exists()


class LosingProxy:
    """An HTTP proxy on loopback in front of moto that forwards every request and, while `drop` is
    set, swallows the response of the next conditional PUT: the write happened, the client never
    hears so, and botocore retries it (what a dropped connection does to a real client)."""

    def __init__(self, upstream_port: int):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.drop, self.dropped = threading.Event(), []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        size_line = self.rfile.readline()
                        raw += size_line
                        size = int(size_line.split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                                raw += line
                            return raw + b"\r\n"
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
                conditional = self.command == "PUT" and ("If-None-Match" in self.headers or "If-Match" in self.headers)
                if conditional and proxy.drop.is_set():
                    proxy.drop.clear()
                    proxy.dropped.append((self.path, response.status))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response_only(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answers the object's length with no body.
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_retried_conditional_put_is_our_own_write_not_a_conflict(bucket, s3_server, model_dir):
    proxy = LosingProxy(s3_server["port"])
    try:
        through = bucket.replace(f"127.0.0.1:{s3_server['port']}", f"127.0.0.1:{proxy.port}")
        storage = Storage(through)
        proxy.drop.set()
        assert storage.create_exclusive("ledger/open/abc", b"mine") is True
        assert proxy.dropped and proxy.dropped[0][1] == 200  # the first attempt had written it
        assert storage.create_exclusive("ledger/open/abc", b"theirs") is False  # a real conflict still is one
        assert storage.read_bytes("ledger/open/abc") == b"mine"
        # An alias move whose response was lost: moved, not "conflict with another writer".
        direct = Registry(Storage(bucket))
        v1 = direct.register_version("m", model_dir, {"task": "causal-lm"})
        v2 = direct.register_version("m", model_dir, {"task": "causal-lm"})
        registry = Registry(storage)
        registry.move_alias("m", "champion", v1)
        proxy.drop.set()
        registry.move_alias("m", "champion", v2, expect=v1)
        assert len(proxy.dropped) == 2
        assert registry.alias_version("m", "champion") == v2
        assert [e["version"] for e in registry.history("m", "champion")] == [v1, v2]
    finally:
        proxy.close()


LEASE_CHILD = """
import sys, time
if len(sys.argv) > 3:  # another machine whose wall clock is an hour ahead
    real = time.time
    time.time = lambda: real() + float(sys.argv[3])
from lifelong.storage import Storage
storage = Storage(sys.argv[1])
t0 = time.monotonic()
with storage.lock("streams/x/cycle", lease_s=float(sys.argv[2])) as hold:
    print(f"taken {time.monotonic() - t0:.2f}", flush=True)
    sys.stdin.readline()
    try:
        hold.check()
        print("still mine", flush=True)
    except Exception as e:
        print("lost", type(e).__name__, flush=True)
print("released", flush=True)
"""


def lease_child(bucket: str, lease_s: float, *skew: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "platform")}
    return subprocess.Popen(
        [sys.executable, "-c", LEASE_CHILD, bucket, str(lease_s), *skew],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_frozen_lease_holder_learns_it_lost_and_cannot_delete_its_successors_lease(bucket):
    """The holder is SIGSTOPped past its lease: the next writer takes the lease over; the old
    holder, resumed, finds out before it writes anything and its release leaves the new lease."""
    import signal

    storage = Storage(bucket)
    child = lease_child(bucket, 3)
    try:
        assert child.stdout.readline().startswith("taken")
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with storage.lock("streams/x/cycle", lease_s=3) as mine:
            took = time.monotonic() - t0
            os.kill(child.pid, signal.SIGCONT)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "lost LeaseLost"
            assert child.stdout.readline().strip() == "released"
            assert child.wait(timeout=30) == 0
            assert json.loads(storage.read_bytes("streams/x/cycle.lease"))["owner"] == mine.fence  # still ours
            mine.check()
        assert 3 <= took < 8, took
        assert not storage.exists("streams/x/cycle.lease")
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()


def test_a_writer_whose_clock_runs_an_hour_ahead_does_not_take_a_live_lease(bucket):
    storage = Storage(bucket)
    with storage.lock("streams/x/cycle", lease_s=2):
        child = lease_child(bucket, 2, "3600")
        time.sleep(5)  # the lease is renewed meanwhile; the child must still be waiting
        held_for = time.monotonic()
    try:
        line = child.stdout.readline()
        assert line.startswith("taken") and float(line.split()[1]) >= 4.5, line
        assert time.monotonic() - held_for < 5
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.read().split() == ["still", "mine", "released"]
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_training_run_with_its_storage_root_on_s3(bucket, demo_data, tmp_path, s3_server, monkeypatch):
    """`lifelong pretrain` as a user runs it, with an embedded Ray of its own: checkpoints, the
    registered version and its card all land in the bucket; the version loads back from there."""
    env = {**os.environ, **S3_CREDENTIALS, "HF_HUB_OFFLINE": "1", "LIFELONG_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "lifelong.cli",
        "pretrain",
        os.path.join(ROOT, "configs/gpt2/tiny_pretrain.yaml"),
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={bucket}",
        "name=s3-gpt2",
        "train.epochs=1",
        "train.max_steps_per_epoch=10",
        "scaling.num_workers=1",
        "export.on_register=never",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr  # never logged
    registry = Registry(Storage(bucket))
    assert registry.versions("s3-gpt2") == [1]
    card = registry.card("s3-gpt2", 1)
    name = bucket.split("/")[2]
    keys = [o["Key"] for o in s3_server["client"].list_objects_v2(Bucket=name, Prefix="store/runs/")["Contents"]]
    assert any("checkpoint" in k for k in keys), keys[:20]  # Ray Train wrote its checkpoints to the bucket
    assert "model.safetensors" in card.files
    monkeypatch.setenv("LIFELONG_CACHE", env["LIFELONG_CACHE"])
    model = AutoModelForCausalLM.from_pretrained(registry.resolve("s3-gpt2:1").local_dir)
    assert model.config.n_layer >= 1
