"""serve.ingress=haproxy: `lifelong serve` with Ray Serve's HAProxy ingress in front of the
replicas, on the embedded Ray it starts (Serve reads the mode when Ray's processes start): the
same API and token, nothing listening beyond loopback, a live swap through it without a failed
request, and nothing left running after Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import free_port, register_tiny, start_server
from lifelong.registry import Registry
from lifelong.serve import haproxy_binary
from lifelong.storage import Storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent
TOKEN = "haproxy-test-token"


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listeners(procs: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """(ip, port) → process name, for every TCP socket these processes listen on."""
    found = {}
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found[(c.laddr.ip, c.laddr.port)] = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_the_haproxy_ingress_keeps_the_token_and_loopback_and_swaps_live(tiny_tokenizer, topic_rows, tmp_path):
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary: lifelong[haproxy] installs one on Linux x86_64 (make setup does), or put haproxy on PATH")
    registry = Registry(Storage(str(tmp_path / "store")))
    v1 = register_tiny(registry, "topics", tiny_tokenizer, tmp_path, seed=1, rows=topic_rows[:64])
    v2 = register_tiny(registry, "topics", tiny_tokenizer, tmp_path, seed=2, rows=topic_rows[:64])
    registry.move_alias("topics", "champion", v1)
    port = free_port()
    config = tmp_path / "serve.yaml"
    serve = {"port": port, "ingress": "haproxy", "num_replicas": 1, "poll_interval_s": 0.5, "auth": {"token_env": "LIFELONG_TEST_TOKEN"}}
    config.write_text(yaml.safe_dump({"name": "topics", "storage": {"root": str(tmp_path / "store")}, "serve": serve}))
    env = {**os.environ, "LIFELONG_TEST_TOKEN": TOKEN, "RAY_ADDRESS": ""}
    server = start_server([str(BIN / "lifelong"), "serve", str(config)], env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(server.stdout), daemon=True)
    reader.start()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "".join(output)[-4000:]
            assert time.monotonic() < deadline, "not answering within 5 minutes"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)

        # The same API and token through HAProxy.
        assert httpx.post(url + "/v1/predict", json={"texts": ["stocks fell"]}, timeout=10).status_code == 401
        answer = httpx.post(url + "/v1/predict", json={"texts": ["stocks fell"]}, headers=auth, timeout=10).json()
        assert (answer["version"], len(answer["predictions"])) == (v1, 1), answer

        # HAProxy answers on serve.host:serve.port, and the API listens nowhere beyond loopback:
        # not HAProxy's frontend, not the replicas' own servers it forwards to. HAProxy's stats
        # page and metrics exporter, which Serve binds on every interface, are on the ports the
        # console names in its warning.
        deadline = time.monotonic() + 30  # (HAProxy restarts as the replicas it forwards to change)
        while (listening := listeners(tree(server.pid))).get(("127.0.0.1", port)) != "haproxy":
            assert time.monotonic() < deadline, listening
            time.sleep(0.5)
        deadline = time.monotonic() + 60  # printed once deployed, which may be after the first answer
        while "firewall them" not in (console := " ".join("".join(output).split())):  # (the console wraps lines)
            assert time.monotonic() < deadline, console[-3000:]
            time.sleep(0.5)
        warning = console[console.index("HAProxy's stats page") :].split("firewall them")[0]
        side = {int(p) for p in re.findall(r"on port (\d+)", warning)}
        assert len(side) == 2 and {p for (_, p), name in listening.items() if name == "haproxy" and p != port} == side, (listening, side)
        http = {addr for addr, name in listening.items() if (name == "haproxy" and addr[1] not in side) or 30000 <= addr[1] <= 31000}
        assert all(ip == "127.0.0.1" for ip, _ in http), http

        # A live swap through it: every request answered, by v1 then by v2.
        stop, seen, failures = threading.Event(), [], []

        def client() -> None:
            with httpx.Client(timeout=30, headers=auth) as c:
                while not stop.is_set():
                    r = c.post(url + "/v1/predict", json={"texts": ["rain tonight"]})
                    (seen.append(r.json()["version"]) if r.status_code == 200 else failures.append(r.status_code))

        thread = threading.Thread(target=client)
        thread.start()
        try:
            time.sleep(1)
            registry.move_alias("topics", "champion", v2)
            deadline = time.monotonic() + 60
            while not seen or seen[-1] != v2:
                assert time.monotonic() < deadline, f"still {seen[-1:]} a minute after the alias moved:\n" + "".join(output)[-3000:]
                time.sleep(0.2)
            time.sleep(1)
        finally:
            stop.set()
            thread.join(timeout=60)
        assert failures == [] and seen[0] == v1 and seen[-1] == v2, (failures, seen[:3], seen[-3:])
        assert seen == sorted(seen)  # once v2 answered, v1 never did again
    finally:
        procs = tree(server.pid)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        reader.join(timeout=30)
    out = "".join(output)
    assert server.returncode in (0, 130, -signal.SIGINT), out[-4000:]
    assert "through HAProxy" in " ".join(out.split()), out[-4000:]  # the console wraps long lines
    # Ctrl-C leaves nothing behind: HAProxy included (it would hold the port).
    deadline = time.monotonic() + 30
    while left := [p for p in procs if alive(p)]:
        assert time.monotonic() < deadline, [(p.pid, p.name()) for p in left]
        time.sleep(0.5)
