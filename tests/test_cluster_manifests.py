"""cluster/: the ray-up config and the KubeRay manifests parse, and everything they name exists
in the project (job scripts, config files and their overrides, the Serve import path, the paths
the image copies), at the Ray version the project installs."""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from conftest import ROOT
from lifelong.config import load_config
from lifelong.submit import JOB_FLAGS

CLUSTER = Path(ROOT) / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
IMAGE_WORKDIR = "/home/ray/lifelong"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def check_job_command(command: str) -> None:
    """`python jobs/JOB.py CONFIG [flags] [overrides]` runs here as it would in the image's workdir."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].startswith("jobs/"), command
    job = Path(argv[1]).stem
    assert (Path(ROOT) / argv[1]).is_file(), f"{argv[1]} does not exist"
    config, rest = argv[2], argv[3:]
    assert (Path(ROOT) / config).is_file(), f"{config} does not exist"
    flags = {a for a in rest if a.startswith("--")}
    assert flags <= JOB_FLAGS.get(job, set()), f"jobs/{job}.py takes no {flags - JOB_FLAGS.get(job, set())}"
    check_names_what_exists(load_config(Path(ROOT) / config, [a for a in rest if not a.startswith("--")], resolve_paths=False), command)


def image_contents() -> list[str]:
    """What the Dockerfile copies into the image's working directory."""
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    return [src for line in lines if line.startswith("COPY") for src in line.split()[1:-1] if not src.startswith("--")]


def check_names_what_exists(config, where: str) -> None:
    """Every path the config names is a URI on storage (s3://…) or exists in the image: a job
    reads them on the cluster, where nothing but the image and the storage root is."""
    assert config.storage.root.startswith("s3://"), f"{where}: storage.root {config.storage.root} is not on shared storage"
    named = {
        "data.path": config.data.path if config.data else None,
        "model.tokenizer": config.model.tokenizer,
        "model.init_from": config.model.init_from if config.model.init_from and "/" in config.model.init_from else None,
        "continual.landing": config.continual.landing,
        "serve.auth.token_file": config.serve.auth.token_file,
    }
    image = image_contents()
    for key, value in named.items():
        if not value or "://" in value:
            continue
        in_image = any(value == src or value.startswith(src.rstrip("/") + "/") for src in image) and (Path(ROOT) / value).exists()
        assert in_image, f"{where}: {key} {value!r} is neither in the image (it copies {', '.join(image)}) nor a storage URI"


def test_every_manifest_parses_and_names_things_that_exist():
    kinds = {}
    for path in KUBERAY:
        for doc in docs(path):
            kinds.setdefault(doc["kind"], []).append(path.name)
            spec = doc["spec"]
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
            assert cluster["rayVersion"] == ray.__version__, (
                f"{path.name}: rayVersion {cluster['rayVersion']} vs installed {ray.__version__}"
            )
            pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
            for pod in pods:
                for container in pod["spec"]["containers"]:
                    assert container["workingDir"] == IMAGE_WORKDIR, path.name
                    names = {e["name"] for e in container["env"]}
                    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= names, f"{path.name}: token auth is not on in {container['name']}"
            if doc["kind"] == "RayJob":
                check_job_command(spec["entrypoint"])
                env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
                assert env["PYTHONPATH"] == f"{IMAGE_WORKDIR}/platform"
    assert set(kinds) == {"RayCluster", "RayJob", "RayService"}
    jobs = {Path(shlex.split(d["spec"]["entrypoint"])[1]).stem for p in KUBERAY for d in docs(p) if d["kind"] == "RayJob"}
    assert jobs == {"pretrain", "tune", "continual"}


def test_the_rayservice_serve_config_builds_from_the_project():
    [service] = [d for p in KUBERAY for d in docs(p) if d["kind"] == "RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    args = app["args"]
    config = load_config(Path(ROOT) / args["config"], args["overrides"], resolve_paths=False)
    assert config.serve.alias == "champion" and config.storage.root.startswith("s3://")
    check_names_what_exists(config, "rayservice.yaml")
    assert app["runtime_env"]["env_vars"]["PYTHONPATH"] == f"{IMAGE_WORKDIR}/platform"
    # It binds 0.0.0.0, so /v1 needs the token, which comes from a Kubernetes secret on every node.
    assert serve_config["http_options"]["host"] == "0.0.0.0" and config.serve.auth.token_env
    groups = [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env[config.serve.auth.token_env]["valueFrom"]["secretKeyRef"]["name"] == "lifelong-serve-token"
    # Bad args are refused with a message naming what is missing, before anything loads.
    from lifelong.errors import LifelongError

    with pytest.raises(LifelongError, match="args need 'config'"):
        builder({})


def test_the_image_copies_what_the_jobs_need():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_WORKDIR}" in text
    sources = image_contents()
    assert {"platform", "jobs", "configs", "pyproject.toml"} <= set(sources), sources
    assert all((Path(ROOT) / s).exists() for s in sources), sources
    from_line = next(line for line in text.splitlines() if line.startswith("FROM"))
    assert f"rayproject/ray:{ray.__version__}-" in from_line


def test_the_ray_up_config_is_complete():
    [cfg] = docs(CLUSTER / "ray-up.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] for t in workers)
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]
    assert any("gpu" in name for name in cfg["available_node_types"])
    mounts = cfg["file_mounts"]
    assert "." in mounts.values()  # the project travels to every node...
    assert any(re.search(r"pip install .*-e ~/lifelong", c) for c in cfg["setup_commands"])  # ...and is installed there
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any(src == "~/.ray/auth_token" for src in mounts.values())  # every node gets the token


def test_the_local_cluster_script_is_valid_bash():
    import subprocess

    done = subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    usage = subprocess.run(["bash", str(CLUSTER / "local.sh"), "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_the_local_cluster_binds_no_ephemeral_port_and_refuses_a_taken_one_by_name(tmp_path):
    """CI once saw `cluster/local.sh start 1` die after 30 s: its head's metrics port (52500) lay in
    the kernel's ephemeral range, where another process's connection or another Ray's listener had
    it. Its fixed ports now lie below that range, and a taken one is refused at once, by name."""
    import contextlib
    import socket
    import subprocess
    import time

    script = str(CLUSTER / "local.sh")
    listed = subprocess.run(["bash", script, "ports", "1"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    ports = [int(p) for p in listed.stdout.split()]
    assert {6380, 8265} <= set(ports) and len(ports) == 7
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < low, f"{ports} reach into the ephemeral range from {low}"

    def held(port: int) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return True
            return False

    metrics = ports[4]
    state = tmp_path / "llc"
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # held already: by another local cluster (the README's, below)
            holder.bind(("127.0.0.1", metrics))
            holder.listen()
        assert held(metrics)
        # The first port it binds that is held: the metrics port, unless another local cluster (the
        # README's, run beside this module under `make test`) holds one listed before it.
        first_held = next(p for p in ports if held(p))
        started = time.monotonic()
        done = subprocess.run(
            ["bash", script, "start", "1"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "LIFELONG_LOCAL_CLUSTER": str(state)},
        )  # fmt: skip
    assert done.returncode == 1 and time.monotonic() - started < 20
    assert f"port {first_held} is taken" in done.stderr, done.stderr
    assert not list(state.glob("*.pid"))  # nothing was started


def test_an_embedded_ray_with_a_dashboard_leaves_the_cluster_port_free():
    """An embedded Ray's dashboard (a sweep of multi-worker trials starts one) took Ray's default
    8265 whenever it was free, and `cluster/local.sh start` then refused with "port 8265 is taken"
    while the sweep ran. It now takes a free port."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 8265))
        except OSError:
            pytest.skip("something on this machine holds 8265 already, so no embedded dashboard could take it")
    code = (
        "import ray; from lifelong.runtime import connect; connect(num_cpus=1, dashboard=True); "
        "print('dashboard', ray._private.worker.global_worker.node.webui_url)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    url = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("dashboard "))
    assert url.startswith("127.0.0.1:") and not url.endswith(":8265"), url


def test_the_grafana_dashboard_charts_every_metric_the_platform_records_and_no_other():
    """cluster/grafana/lifelong.json: each query names metrics lifelong.metrics defines (as Ray
    exports them: `ray_` first; a histogram as its _bucket, _count or _sum), and every one is charted."""
    import json

    from lifelong.metrics import METRICS

    dashboard = json.loads((Path(ROOT) / "cluster" / "grafana" / "lifelong.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\bray_lifelong_\w+", target["expr"]):
                base = name.removeprefix("ray_")
                if METRICS.get(re.sub(r"_(bucket|count|sum)$", "", base), ("",))[0] == "histogram":
                    base = re.sub(r"_(bucket|count|sum)$", "", base)
                assert base in METRICS, (panel["title"], name)
                queried.add(base)
    assert queried == set(METRICS)
