"""Multi-node on object storage: a head and a worker node, each with its own HOME, TMPDIR and
cache, a storage root and data only in a bucket (moto), and a driver whose temp and cache
directories sit on a private tmpfs that no Ray worker can see (its own mount namespace). What
the driver hands to Ray Data tasks and training workers must mean the same on every node."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from test_cluster import BIN, LocalCluster

from conftest import ROOT
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.synth import write_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _private_mounts() -> str | None:
    """Why a private mount namespace cannot be made here (None: it can)."""
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if done.returncode == 0 else f"unshare --mount is not permitted here: {done.stderr.strip()}"


@pytest.fixture(scope="module", autouse=True)
def _needs_private_mounts():
    if why := _private_mounts():
        pytest.skip(f"needs a private mount namespace for the driver ({why}); run as root or with CAP_SYS_ADMIN")


@pytest.fixture(scope="module")
def node_env(tmp_path_factory) -> dict[str, dict]:
    homes = tmp_path_factory.mktemp("nodes")
    env = {}
    for name in ("head", "worker-a"):
        for d in ("home", "tmp", "cache"):
            (homes / name / d).mkdir(parents=True)
        env[name] = {"HOME": str(homes / name / "home"), "TMPDIR": str(homes / name / "tmp"), "LIFELONG_CACHE": str(homes / name / "cache")}
    return env


@pytest.fixture(scope="module")
def nodes(node_env):
    c = LocalCluster(token=uuid.uuid4().hex)
    try:
        yield c.start(workers=("worker-a",), node_env=node_env)
    finally:
        c.stop()


def driver(nodes: LocalCluster, private: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`lifelong ARGS` joined to the cluster, in a mount namespace where `private` is a tmpfs:
    its TMPDIR, HOME and registry cache exist for it alone."""
    private.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": nodes.token, "HF_HUB_OFFLINE": "1", "PRIVATE": str(private)}
    env.update({"TMPDIR": f"{private}/tmp", "HOME": f"{private}/home", "LIFELONG_CACHE": f"{private}/cache"})
    env.pop("RAY_ADDRESS", None)
    script = 'mount -t tmpfs tmpfs "$PRIVATE" && mkdir -p "$TMPDIR" "$HOME" "$LIFELONG_CACHE" && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(BIN / "lifelong"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_pretrain_finetune_evaluate_and_a_cycle_on_s3_across_nodes_that_cannot_see_the_driver(
    nodes, node_env, s3_server, demo_data, tmp_path
):
    client, port = s3_server["client"], s3_server["port"]
    client.create_bucket(Bucket="multi")
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    root = f"s3://multi/store{query}"
    for name in ("corpus.jsonl", "topics.jsonl"):
        client.upload_file(str(demo_data / name), "multi", f"data/{name}")
    for w in sorted(write_stream(tmp_path / "stream", windows=1, rows_per_window=240, files_per_window=2, seed=3)[0].iterdir()):
        client.upload_file(str(w), "multi", f"landing/{w.name}")
    address = f"--address=127.0.0.1:{nodes.gcs_port}"
    spread = ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD", "train.epochs=1"]
    spread.append("export.on_register=never")
    private = tmp_path / "driver"

    def ok(*args: str, expect: str) -> str:
        out = driver(nodes, private, *args)
        assert out.returncode == 0 and expect in out.stdout + out.stderr, (args, out.stdout[-3000:], out.stderr[-3000:])
        return out.stdout

    pre = ok(
        "pretrain", "configs/gpt2/tiny_pretrain.yaml", f"storage.root={root}", f"data.path=s3://multi/data/corpus.jsonl{query}",
        "train.max_steps_per_epoch=10", *spread, address, expect="registered tiny-gpt2:1",
    )  # fmt: skip
    assert len({line.split(" on node ")[1][:12] for line in pre.splitlines() if "[lifelong] worker" in line}) == 2  # both nodes
    ok("models", "promote", "tiny-gpt2:1", "--root", root, expect="champion")
    ok(
        "finetune", "configs/gpt2/tiny_finetune.yaml", f"storage.root={root}", f"data.path=s3://multi/data/topics.jsonl{query}",
        *spread, address, expect="registered tiny-topics:1",
    )  # fmt: skip
    ok(
        "evaluate", "configs/gpt2/tiny_finetune.yaml", f"storage.root={root}", "--model", "tiny-topics:1",
        "--data", f"s3://multi/data/topics.jsonl{query}", address, expect="accuracy",
    )  # fmt: skip
    ok("models", "promote", "tiny-topics:1", "--root", root, expect="champion")
    ok(
        "continual", "configs/gpt2/tiny_continual.yaml", f"storage.root={root}", f"data.path=s3://multi/landing{query}",
        f"continual.landing=s3://multi/landing{query}", "continual.min_new_rows=100", *spread, "--once", address,
        expect="window 0",
    )  # fmt: skip
    registry = Registry(Storage(root))
    assert registry.versions("tiny-topics") == [1, 2]
    card = registry.card("tiny-topics", 2)
    assert card.stream.window == 0 and card.config["model"]["init_from"] == "tiny-topics:1"
    # Nodes with a fresh HOME trained with the DeepSpeed ops `make setup` built into the environment,
    # instead of compiling their own (minutes of a first run on every new node).
    compiled = [str(p) for env in node_env.values() for p in Path(env["HOME"]).rglob("*.so")]
    assert not compiled, compiled
