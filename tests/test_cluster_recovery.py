"""A persistent cluster (`ray start --head`, 2 CPUs) outliving the runs on it: a training worker
killed mid-run, the group restarted on the same CPUs, and the next run afterwards. Whatever a
dead worker or run leaves behind (split coordinators, data executors, placement groups) must
not hold the CPUs the next worker group needs for its data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from test_cluster import BIN, LocalCluster, client_env, pretrain_args

from conftest import ROOT
from lifelong.registry import Registry
from lifelong.storage import Storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def committed_epochs(run_dir) -> list[int]:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return []
    return [r["metrics"]["epoch"] for r in snapshot["checkpoint_results"]]


def train_workers(cluster: LocalCluster) -> list[psutil.Process]:
    """The cluster's training worker processes (its node's session, not this test's own Ray)."""
    head = cluster.procs["head"].pid
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and os.getsid(p.pid) == head:
                out.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return out


def free_cpus(cluster: LocalCluster, env: dict) -> float:
    code = (
        f"import ray; ray.init(address='127.0.0.1:{cluster.gcs_port}', logging_level='ERROR'); "
        "print(ray.available_resources().get('CPU', 0))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return float(done.stdout.strip().splitlines()[-1])


def test_a_killed_worker_or_driver_on_a_persistent_cluster_resumes_and_holds_nothing(demo_data, tmp_path):
    cluster = LocalCluster(token=uuid.uuid4().hex)
    try:
        cluster.start(workers=())  # one node, 2 CPUs: both training workers take them all
        env = {**client_env(cluster, cluster.token, tmp_path), "RAY_AUTH_MODE": "token"}
        address = f"127.0.0.1:{cluster.gcs_port}"
        root = tmp_path / "store"

        def pretrain(run: str, epochs: int):
            args = pretrain_args(
                root,
                demo_data / "corpus.jsonl",
                f"run_name={run}",
                f"train.epochs={epochs}",
                "train.max_steps_per_epoch=30",
                "scaling.num_workers=2",
                "train.max_failures=2",
            )
            log = open(tmp_path / f"{run}.log", "w")
            return subprocess.Popen(
                [str(BIN / "lifelong"), "pretrain", *args, "--address", address],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ), log

        def wait_for_checkpoint(proc, run: str, timeout: float = 300) -> None:
            deadline = time.monotonic() + timeout
            while not committed_epochs(root / "runs" / run):
                assert proc.poll() is None, (tmp_path / f"{run}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 5 minutes: the workers never got their data"
                time.sleep(0.5)

        def finish(proc, log, run: str, timeout: float) -> str:
            try:
                proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                log.close()
            out = (tmp_path / f"{run}.log").read_text()
            assert proc.returncode == 0, out[-4000:]
            return out

        # 1. A training worker killed mid-run: the group restarts on the same CPUs and resumes.
        first, log = pretrain("killed", epochs=4)
        wait_for_checkpoint(first, "killed")
        assert max(committed_epochs(root / "runs" / "killed")) < 4, "the run ended before a worker could be killed"
        train_workers(cluster)[0].send_signal(signal.SIGKILL)
        out = finish(first, log, "killed", timeout=400)
        assert "resumed from epoch" in out, out[-4000:]
        registry = Registry(Storage(str(root)))
        assert [h["epoch"] for h in registry.card("tiny-gpt2", 1).run.history] == [1, 2, 3, 4]

        # 2. A driver killed mid-run (a lost laptop): whatever its run held is released, and the
        #    same command again resumes from the last checkpoint, in normal time.
        second, log = pretrain("dropped", epochs=3)
        wait_for_checkpoint(second, "dropped")
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        log.close()
        done_before = max(committed_epochs(root / "runs" / "dropped"))
        t0 = time.monotonic()
        third, log = pretrain("dropped", epochs=3)
        out = finish(third, log, "dropped", timeout=300)
        print(f"the resumed run took {time.monotonic() - t0:.0f} s")
        assert "resuming it from its checkpoints" in out and f"resumed from epoch {done_before}" in out, out[-4000:]
        assert [h["epoch"] for h in registry.card("tiny-gpt2", 2).run.history] == [1, 2, 3]
        deadline = time.monotonic() + 60
        while free_cpus(cluster, env) < 2.0:  # nothing left holding the node's CPUs
            assert time.monotonic() < deadline, "CPUs still held after the runs ended"
            time.sleep(2)
    finally:
        cluster.stop()
