"""One local Ray per test session, demo data, and a pretrained tiny GPT-2 shared by the slow tests."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The moto S3 server's (fake) credentials, set before the session's Ray starts so that its worker
# processes (which read landing zones and stores in the bucket) have them, as a node would.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lifelong-test-key",
    "AWS_SECRET_ACCESS_KEY": "lifelong-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for _key, _value in S3_CREDENTIALS.items():
    os.environ.setdefault(_key, _value)

from lifelong.runtime import free_port  # noqa: E402  (after the environment above, which Ray reads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


# The modules by how long they run alone (longest first; measured 2026-12-03, serial): the README's
# commands (about half an hour) start first, so that under `make test` the other worker runs the
# rest beside them; within each group below the long modules go first, so that the two workers
# end on short ones together rather than one running a long module alone at the end.
LONGEST_FIRST = [
    "test_readme_commands",
    "test_tune",
    "test_continual",
    "test_class_incremental",
    "test_train",
    "test_cluster_recovery",
    "test_cluster",
    "test_cli",
    "test_console",
    "test_cluster_s3",
    "test_vision",
    "test_serve",
    "test_moe",
    "test_lora",
]


def pytest_runtest_logreport(report):
    """Name a failure the moment it happens: `-q` under xdist names failures only in its final
    summary, which a run stopped by CI's time limit never prints; with why (the assertion's last
    lines), which that summary would have given. Only the controller (or a
    run without xdist) prints; a worker's lines would be lost."""
    if report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        import sys

        when = "" if report.when == "call" else f" (in {report.when})"
        crash = getattr(report.longrepr, "reprcrash", None)  # the assertion or error, its last lines
        why = "\n  ".join((crash.message if crash else str(report.longrepr)).splitlines()[-12:])[-1500:]
        sys.stdout.write(f"\nFAILED {report.nodeid}{when} after {report.duration:.0f} s:\n  {why}\n")
        sys.stdout.flush()


def pytest_collection_modifyitems(items):
    """The README's commands first; then the modules none of whose tests use the session's local Ray
    (cluster nodes bring up Ray of their own), before the session's Serve controller, proxy and idle
    workers exist to take CPU from them; long modules first within each. Modules stay whole, in
    order; `make test` runs two at once (pytest-xdist --dist loadfile --no-loadscope-reorder: each
    worker takes the next module in this order when it finishes one), which share no Ray, port or
    directory."""
    uses_session = {item.module for item in items if "ray_session" in item.fixturenames}

    def rank(name: str) -> int:
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    readme = LONGEST_FIRST[0]
    items.sort(key=lambda item: (item.module.__name__ != readme, item.module in uses_session, rank(item.module.__name__)))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from lifelong.runtime import connect

    # Logical CPUs above the 2 cores, so 2 training workers, the session's warm trainer (one-worker
    # runs: lifelong.train.driver.fit) and the data tasks coexist. Sweeps
    # need the dashboard's state API (lifelong.runtime.connect); off 8265, which the README's
    # local cluster (cluster/local.sh, test_readme_commands) binds as printed.
    connect(num_cpus=8, dashboard=True, dashboard_port=free_port())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from lifelong.synth import write_instruction_dataset, write_text_corpus, write_topic_dataset

    d = tmp_path_factory.mktemp("demo")
    write_text_corpus(d / "corpus.jsonl", max_rows=1200)
    write_topic_dataset(d / "topics.jsonl", 800, seed=0)
    write_instruction_dataset(d / "instructions.jsonl", 400, seed=0)
    return d


def make_config(path: str, *overrides: str):
    from lifelong.config import load_config

    return load_config(os.path.join(CONFIGS, path), list(overrides))


@pytest.fixture(scope="session")
def pretrained(ray_session, demo_data, tmp_path_factory):
    """A tiny GPT-2 pretrained with 2 DeepSpeed workers (ZeRO-2) for 2 epochs, registered."""
    from lifelong.train.driver import run_training

    root = tmp_path_factory.mktemp("store")
    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={root}",
        "train.epochs=2",
        "train.max_steps_per_epoch=40",
        "train.deepspeed.zero_stage=2",
        "scaling.num_workers=2",
    )
    outcome = run_training(config)
    return {"outcome": outcome, "root": root, "config": config}


LABELS = ["finance", "science", "sports", "weather"]


@pytest.fixture(scope="session")
def topic_rows(demo_data):
    import json

    rows = [json.loads(line) for line in (demo_data / "topics.jsonl").read_text().splitlines()]
    return [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows if r.get("label") in LABELS and r.get("text")]


@pytest.fixture(scope="session")
def tiny_tokenizer(topic_rows, demo_data, tmp_path_factory):
    """A byte-level BPE trained on the demo texts (seconds), for models built without training."""
    from lifelong.models import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [r["text"] for r in topic_rows] + (demo_data / "corpus.jsonl").read_text().splitlines()[:300]
    train_tokenizer(texts, 600, out)
    return out


def register_tiny(
    registry,
    name,
    tokenizer_dir,
    workdir,
    *,
    task="sequence-classification",
    seed=0,
    rows=None,
    export=True,
    n_layer=2,
    labels=LABELS,
    metrics=None,
):
    """Register a tiny GPT-2 with random weights (seeded) the way training registers one:
    HF files + tokenizer, ONNX and int8 exported first, records on the card. Returns the version."""
    import shutil
    from pathlib import Path

    import torch

    from lifelong.config import ExportSection, ModelConfig
    from lifelong.export import export_files
    from lifelong.models import build_model, load_tokenizer

    workdir = Path(workdir) / f"{name}-{seed}"
    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    cfg = ModelConfig(task=task, hf_config={"n_layer": n_layer, "n_embd": 32, "n_head": 2}, max_length=32, tokenizer=str(tokenizer_dir))
    labels = labels if task == "sequence-classification" else None
    model = build_model(cfg, tok, labels=labels)
    model.save_pretrained(workdir / "hf")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, workdir / "hf" / f.name)
    card = {
        "task": task,
        "labels": labels,
        "metrics": {"seed": seed, **(metrics or {})},
        "config": {"model": cfg.model_dump(mode="json")},
    }
    exported = None
    if export:
        formats = ("onnx", "onnx-int8") if task == "sequence-classification" else ("onnx",)
        exported = export_files(
            workdir / "hf", task, cfg.max_length, ExportSection(int8_max_accuracy_drop=1.0), workdir / "onnx", rows, formats
        )
        card["exports"] = exported.records
    return registry.register_version(name, workdir / "hf", card, extra_files=exported.files if exported else None)


def text_probabilities(model_dir, texts: list[str]):
    """The reference for a text classifier's answers: HF tokenizer + PyTorch model, no lifelong
    inference code (sequences cut at 32 tokens, as `register_tiny`'s models take them)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1).numpy()


def as_in_a_terminal() -> None:
    """SIGINT at its default, as a terminal's foreground process has it: a suite started in the
    background (`make test &`) passes SIGINT on ignored, and a server would ignore the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(args: list[str], **kwargs):
    """A server that the test stops with Ctrl-C, as a user would: a process group of its own (the
    test sends SIGINT to the group, as a terminal does), SIGINT at its default, output on one pipe."""
    import subprocess

    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=as_in_a_terminal, **kwargs
    )


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """One HTTP proxy per Ray cluster: every Serve test app shares this port."""
    return free_port()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback, for the session (its credentials: S3_CREDENTIALS, set above)."""
    import subprocess
    import sys
    import time

    import boto3

    port = free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield {"port": port, "client": client}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drop(window_dir, landing):
    """Land a stream window's files (as `lifelong data stream` / `doc-stream` wrote them), named by their window."""
    import shutil

    for f in sorted(window_dir.iterdir()):
        shutil.copy(f, landing / f"{window_dir.name}-{f.name}")


def wait_for_version(ask, version, timeout: float = 60):
    """Ask the endpoint (`ask()` -> the version that answered) until `version` answers; returns the last answer."""
    import time

    deadline = time.monotonic() + timeout
    while (answered := ask()) != version and time.monotonic() < deadline:
        time.sleep(0.3)
    return answered


def ask_until_stopped(url: str, path: str, body: dict, results: list, stop) -> None:
    """A bounded client loop (a thread's target): POST `body` every 50 ms until `stop` is set,
    recording (status, version answered or the error) per request."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set() and len(results) < 20000:
            try:
                r = client.post(path, json=body)
                results.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))
            except httpx.HTTPError as e:
                results.append((repr(e), None))
            stop.wait(0.05)


def lm_stream(name: str, tokenizer, tmp_path, write_windows) -> dict:
    """A registered random tiny causal LM `name` (champion, 32 positions), an empty landing zone and
    the windows `write_windows(dir)` writes to land: what a language model's stream test starts from."""
    root, landing = tmp_path / "store", tmp_path / "landing"
    landing.mkdir()
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    registry = Registry(Storage(str(root)))
    v1 = register_tiny(registry, name, tokenizer, tmp_path / "work", task="causal-lm", seed=4, export=False)
    registry.move_alias(name, "champion", v1)
    return {"root": root, "landing": landing, "registry": registry, "v1": v1, "windows": write_windows(tmp_path / "windows")}


def doc_lm_stream(name: str, tokenizer, tmp_path) -> dict:
    """`lm_stream` with two windows of the docs stream: what a continual-pretraining test starts from."""
    from lifelong.synth import write_doc_stream

    return lm_stream(name, tokenizer, tmp_path, lambda out: write_doc_stream(out, windows=2, files_per_window=2, max_rows=160))


def doc_lm_config(name: str, root, landing, *extra: str):
    """configs/gpt2/tiny_lm_continual.yaml for the stream of `doc_lm_stream`."""
    return make_config(
        "gpt2/tiny_lm_continual.yaml",
        f"name={name}",
        f"model.init_from={name}@champion",
        f"storage.root={root}",
        f"data.path={landing}",
        f"continual.landing={landing}",
        "model.max_length=32",
        "continual.min_new_rows=50",
        "train.lr=3e-3",
        *extra,
    )


def killed_after_first_checkpoint(command: list[str], run_dir, timeout: float = 400) -> list[dict]:
    """Start `command` (a training CLI in its own session), SIGKILL its whole process group as soon
    as a reported checkpoint of the run in `run_dir` is recorded (by Ray Train, or by a one-worker
    run's warm actor), and return the checkpoint results recorded then (a lost driver, mid-run)."""
    import json
    import signal
    import subprocess
    import time

    from lifelong.train.warm import MARKER

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def committed():
        try:
            if snapshot.exists():
                return json.loads(snapshot.read_text())["checkpoint_results"]
            markers = run_dir.glob(f"checkpoint_*/{MARKER}")
            return [{"metrics": json.loads(m.read_text()), "checkpoint_dir_name": m.parent.name} for m in markers]
        except ValueError:  # caught mid-write
            return []

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not committed():
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return committed()


@pytest.fixture(autouse=True, scope="module")
def session_ray_left_free(request):
    """After each module, the session's Ray as the next module expects it: every CPU free but the
    warm trainers'. What a module leaves holding CPUs (a Serve app, a placement group, an actor)
    would starve the modules after it on the same Ray (under `make test` a module once waited
    16 minutes for CPUs): it is named on the console and in .pytest_cache/held-cpus.log; Serve apps
    and placement groups are then removed (an actor's CPUs are only named: it is this module's bug)."""
    yield
    try:
        _release_held_cpus(request.module.__name__)
    except Exception as e:  # noqa: BLE001  (a check between modules: it never fails a test)
        print(f"\n[session ray] could not check what {request.module.__name__} left: {type(e).__name__}: {e}", flush=True)


def _release_held_cpus(module: str) -> None:
    import ray

    if not ray.is_initialized():
        return
    import time

    from ray.util.state import list_actors, list_placement_groups

    # This session's Ray, named: left to guess, the state API picks any Ray on the machine, or none
    # when it finds several (the other pytest-xdist worker's, the README's local cluster).
    address = ray.get_runtime_context().gcs_address

    def held():
        alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        actors = [a for a in alive if a.required_resources.get("CPU")]
        warm = sum(a.required_resources["CPU"] for a in actors if a.class_name == "WarmTrainer")
        return actors, ray.cluster_resources().get("CPU", 0) - warm - ray.available_resources().get("CPU", 0)

    deadline = time.monotonic() + 30
    while (state := held())[1] > 0 and time.monotonic() < deadline:
        time.sleep(1)
    actors, cpus = state
    if cpus <= 0:
        return
    from ray import serve
    from ray.util.placement_group import PlacementGroup

    groups = [g for g in list_placement_groups(address=address, detail=True, limit=1000) if g.state != "REMOVED"]
    apps = list(serve.status().applications)  # none when Serve never started
    report = f"{module} left {cpus:g} CPUs held: serve apps {apps}; {what_holds_cpus()}"
    print("\n[session ray] " + report, flush=True)
    os.makedirs(os.path.join(ROOT, ".pytest_cache"), exist_ok=True)
    with open(os.path.join(ROOT, ".pytest_cache", "held-cpus.log"), "a") as f:
        f.write(report + "\n")
    for app in apps:
        serve.delete(app)
    for group in groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))


def what_holds_cpus() -> str:
    """The session's live actors that hold CPUs (warm trainers but by name) and its placement
    groups not removed (bundles, state, creator): what a test names when CPUs stay held."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # this session's Ray, not another on the machine
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    actors = [f"{a.class_name}(pid={a.pid}, {a.required_resources})" for a in alive if a.required_resources.get("CPU")]
    groups = [
        f"{[b['unit_resources'] for b in g.bundles]} {g.state} name={g.name!r} detached={g.is_detached} job={g.creator_job_id}"
        for g in list_placement_groups(address=address, detail=True, limit=1000)
        if g.state != "REMOVED"
    ]
    return f"actors {actors}; placement groups {groups}"


def free_cpus_when_settled(expected: float | None = None, timeout: float = 20) -> float:
    """The session's free CPUs once they stop changing (or reach `expected`) within `timeout`."""
    import ray

    deadline, last = time.monotonic() + timeout, None
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free == expected or (expected is None and free == last) or time.monotonic() > deadline:
            return free
        last = free
        time.sleep(1)


class WebhookReceiver:
    """A webhook receiver on loopback (a real HTTP server in a thread): records every POST's
    headers and body; answers `status` to the first `failing` ones, 200 after."""

    def __init__(self, failing: int = 0, status: int = 503):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[dict] = []
        self.failing, self.status = failing, status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    receiver.posts.append({"headers": dict(self.headers), "body": body, "json": json.loads(body)})
                    answer = receiver.status if len(receiver.posts) <= receiver.failing else 200
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lifelong"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, kind: str | None = None) -> list[dict]:
        return [p["json"] for p in self.posts if kind is None or p["json"]["event"] == kind]

    def wait_for(self, kind: str, timeout: float = 60, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.events(kind)) < count:
            assert time.monotonic() < deadline, f"no {kind} webhook within {timeout} s; got {[e['event'] for e in self.events()]}"
            time.sleep(0.1)
        return self.events(kind)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def copy_project(project: Path) -> Path:
    """The project as a clone has it (tracked and unignored files), copied to `project`."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if (Path(ROOT) / rel).is_file():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(ROOT) / rel, project / rel)
    return project


def ray_metric(name: str, timeout: float = 45, at_least: float | None = None, equals: float | None = None, **labels) -> float:
    """A sample of Ray's metrics endpoint (what Prometheus scrapes on each node: ray.nodes()'s
    MetricsExportPort), summed over the nodes and the samples whose labels include `labels`;
    waits (Ray exports every few seconds) until one exists, at least `at_least` or equal to `equals`."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    deadline, seen = time.monotonic() + timeout, None
    while True:
        total, found = 0.0, False
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                        total, found = total + sample.value, True
        seen = total if found else None
        if found and (at_least is None or total >= at_least) and (equals is None or total == equals):
            return total
        assert time.monotonic() < deadline, f"{name}{labels}: {seen} after {timeout} s (wanted a sample, >= {at_least}, == {equals})"
        time.sleep(1)


def read_tensorboard(run_dir: Path) -> dict:
    """What TensorBoard's own event reader finds under `run_dir`: {"scalars": {tag: [(step,
    value)]}, "texts": {tag: [text]}} (a text summary's tag without its /text_summary suffix)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {"scalars": {}, "texts": {}}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["tensors"]:
            texts = [b.decode() for e in acc.Tensors(tag) for b in e.tensor_proto.string_val]
            found["texts"].setdefault(tag.removesuffix("/text_summary"), []).extend(texts)
    return found


def answering(url: str, proc, timeout: float, why=lambda: "") -> None:
    """Wait until `url` answers 200 while `proc` (the server we started) lives; `why()`: what to
    show when it does not (its log)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"{url}: the server exited ({proc.returncode}). {why()}"
        assert time.monotonic() < deadline, f"{url}: no answer in {timeout} s. {why()}"
        time.sleep(0.3)


class MlflowServer:
    """A real `mlflow server` (SQLite backend, artifacts proxied to a local directory) on loopback,
    in its own process group (ours to end)."""

    def __init__(self, home: Path):
        import subprocess

        self.home, self.port = home, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "server.log"
        # fmt: off
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        # fmt: on
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        answering(f"{self.uri}/health", self.proc, 120, lambda: f"mlflow server: {self.log.read_text()[-2000:]}")

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str) -> dict:
        """Run name → the run, in `experiment` (every run, however it ended)."""
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        assert found is not None, f"no MLflow experiment '{experiment}'"
        return {r.info.run_name: r for r in client.search_runs([found.experiment_id], max_results=1000)}

    def history(self, run, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client().get_metric_history(run.info.run_id, key)]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()
