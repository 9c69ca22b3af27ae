"""`lifelong ui` in a real headless Chromium (Debian's, driven by Playwright): every page loads
without a console error and shows what the store holds; promote and rollback move the alias only
with the token; bad paths, versions and arguments get one message. Screenshots of each page go to
the test's directory (and to $LIFELONG_UI_SCREENSHOTS, which docs/ui/ was made with)."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import answering, make_config, register_tiny
from lifelong.runtime import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BIN = Path(sys.executable).parent
TOKEN = "ui-test-token-7f3a"


def _summary(window: int, candidate: list[float], champion: list[float], status: str, version: int, before: int, reason: str) -> dict:
    """A finished window as a cycle records it (lifelong.continual.cycle → Stream.finish)."""
    return {
        "window": window,
        "candidate": candidate,
        "champion": champion,
        "row": candidate if status == "promoted" else champion,
        "status": status,
        "reason": reason,
        "version": version,
        "champion_before": before,
        "new_rows": 240,
        "replay_rows": 120 * window,
        "files": [],
        "finished_at": 1_796_000_000.0 + 600 * window,
    }


@pytest.fixture(scope="module")
def store(ray_session, tiny_tokenizer, demo_data, tmp_path_factory):
    """A store as the platform leaves it: three registered versions and alias moves with reasons,
    a stream with three finished windows and a ledger that quarantined a broken file, a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from lifelong.continual.ledger import Ledger
    from lifelong.continual.stream import Stream
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    base = tmp_path_factory.mktemp("ui")
    root = base / "store"
    storage = Storage(str(root))
    registry = Registry(storage)
    accuracy = {1: 0.71, 2: 0.83, 3: 0.79}
    for seed, acc in accuracy.items():
        metrics = {"val_accuracy": acc, "val_loss": 1 - acc}
        register_tiny(registry, "topics", tiny_tokenizer, base / "work", seed=seed, export=False, metrics=metrics)
    registry.move_alias("topics", "champion", 1, reason="first model")
    registry.move_alias("topics", "champion", 2, reason="window 1: promoted over 1")
    registry.move_alias("topics", "challenger", 3, reason="sweep demo-sweep's best")

    stream = Stream(storage, "topics")
    windows = [
        _summary(0, [0.71], [0.71], "promoted", 1, None, "the stream's first model"),
        _summary(1, [0.69, 0.83], [0.71, 0.25], "promoted", 2, 1, "new window 0.830 vs 0.250, forgetting 0.020 (limit 0.15)"),
        _summary(2, [0.52, 0.80, 0.79], [0.69, 0.83, 0.31], "rejected", 3, 2, "forgetting 0.170 over the limit 0.15"),
    ]
    for w in windows:
        stream.finish(w, baseline_value=0.25, start_version=1)
    landing = base / "landing"
    landing.mkdir()
    rows = [json.loads(line) for line in (demo_data / "topics.jsonl").read_text().splitlines()[:60]]
    (landing / "batch-001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (landing / "batch-002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    (landing / "batch-003.jsonl").write_text('{"text": "cut off mid-wri\n')
    data = make_config("gpt2/tiny_continual.yaml", f"storage.root={root}", f"continual.landing={landing}").data
    report = Ledger(storage, "topics").scan(str(landing), data)
    (quarantined,) = report.quarantined

    sweep_dir = root / "tune" / "demo-sweep"
    sweep_dir.mkdir(parents=True)
    table = pd.DataFrame(
        {
            "trial": ["a1b2c_00000", "a1b2c_00001", "a1b2c_00002"],
            "status": ["finished", "finished", "errored"],
            "train.lr": [3e-3, 1e-4, 1e30],
            "epochs": [3, 1, 0],
            "stopped_early": [False, True, False],
            "best_val_loss": [0.41, 0.93, float("nan")],
        }
    )
    table.to_csv(sweep_dir / "trials.csv", index=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([1, 2, 3], [0.8, 0.55, 0.41], label="a1b2c_00000")
    ax.plot([1], [0.93], label="a1b2c_00001")
    ax.legend()
    fig.savefig(sweep_dir / "curves.png")
    plt.close(fig)
    return {"root": root, "registry": registry, "accuracy": accuracy, "windows": windows, "quarantined": quarantined, "table": table}


class Endpoint(BaseHTTPRequestHandler):
    """Stands in for a serving endpoint's /v1/model (the dashboard only reads that JSON; the real
    endpoint's answer is tested in tests/test_serve.py)."""

    def do_GET(self):
        served = {"model": "topics", "alias": "champion", "version": 2, "task": "sequence-classification", "backend": "onnx"}
        body = json.dumps(served).encode()
        self.send_response(200 if self.path == "/v1/model" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def dashboard(store, tmp_path_factory):
    """`lifelong ui` as a user starts it (its own process group, ours to end), with a token and an endpoint."""
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    token_file = tmp_path_factory.mktemp("ui-token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LIFELONG_LOG_LEVEL"}
    command = [str(BIN / "lifelong"), "ui", "--root", str(store["root"]), "--port", str(port), "--token-file", str(token_file)]
    proc = subprocess.Popen(
        [*command, "--endpoint", f"http://127.0.0.1:{endpoint.server_port}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    answering(f"{url}/healthz", proc, 60, lambda: str(proc.communicate(timeout=10) if proc.poll() is not None else ""))
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    endpoint.shutdown()
    assert f"lifelong ui: {url}/" in out and "promote/rollback with the token" in out, out + err


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: make setup installs Debian's chromium where it may run apt-get (root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def visit(browser, url: str, shots: Path, name: str):
    """The page after it loaded, its console errors (none expected) and a full-page screenshot."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    response = page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    if os.environ.get("LIFELONG_UI_SCREENSHOTS"):
        keep = Path(os.environ["LIFELONG_UI_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{name}.png", keep / f"{name}.png")
    return page, response, problems


def cells(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"{selector} tr", "rows => rows.map(r => Array.from(r.children).map(c => c.innerText.trim()))")


def test_every_page_loads_clean_in_chromium_and_shows_what_the_store_holds(store, dashboard, browser, tmp_path):
    shots = tmp_path / "shots"
    registry = store["registry"]

    page, response, problems = visit(browser, f"{dashboard}/", shots, "overview")
    assert response.status == 200 and problems == []
    models = cells(page, "#models")
    assert models[1][:4] == ["topics", "sequence-classification", "3", "challenger → 3champion → 2"]
    assert cells(page, "#streams")[1][:2] == ["topics", "3"] and "rejected" in cells(page, "#streams")[1][2]
    assert cells(page, "#sweeps")[1] == ["demo-sweep", "3", "finished 2, errored 1"]

    page, response, problems = visit(browser, f"{dashboard}/models/topics", shots, "model")
    assert response.status == 200 and problems == []
    versions = cells(page, "#versions")
    assert [r[0] for r in versions[1:]] == ["3", "2", "1"] and versions[2][1] == "champion" and versions[1][1] == "challenger"
    assert f"accuracy {store['accuracy'][2]:.4g}" in versions[2][4]
    history = cells(page, "#history")
    assert [(r[1], r[2], r[4]) for r in history[1:]] == [
        ("challenger", "– → 3", "sweep demo-sweep's best"),
        ("champion", "1 → 2", "window 1: promoted over 1"),
        ("champion", "– → 1", "first model"),
    ]

    page, response, problems = visit(browser, f"{dashboard}/models/topics/2", shots, "version")
    assert response.status == 200 and problems == []
    metrics = dict((r[0], r[1]) for r in cells(page, "#metrics"))
    assert metrics["val_accuracy"] == f"{store['accuracy'][2]:.6g}" and metrics["seed"] == "2"

    page, response, problems = visit(browser, f"{dashboard}/streams/topics", shots, "stream")
    assert response.status == 200 and problems == []
    cycles = cells(page, "#cycles")
    recorded = [(str(w["window"]), w["status"], str(w["version"]), w["reason"]) for w in reversed(store["windows"])]
    assert [(r[0], r[2], r[3], r[7]) for r in cycles[1:]] == recorded
    heat = cells(page, "#heatmap")
    assert heat[1:] == [[str(w["window"]), *(f"{v:.3f}" for v in w["row"]), *[""] * (3 - len(w["row"]))] for w in store["windows"]]
    assert page.locator("#chart svg polyline").count() == 4  # ACC, BWT, FWT, forgetting
    ledger = {r[1].rsplit("/", 1)[-1]: r for r in cells(page, "#ledger")[1:]}
    assert ledger["batch-003.jsonl"][3] == "quarantined" and ledger["batch-003.jsonl"][5] == store["quarantined"].reason
    assert ledger["batch-001.jsonl"][3] == "pending" and ledger["batch-001.jsonl"][4] == "30"

    page, response, problems = visit(browser, f"{dashboard}/sweeps/demo-sweep", shots, "sweep")
    assert response.status == 200 and problems == []
    trials = cells(page, "#trials")
    assert [r[0] for r in trials[1:]] == list(store["table"]["trial"]) and trials[3][-1] == ""  # NaN shown empty
    assert page.eval_on_selector("#curves", "img => img.complete && img.naturalWidth") > 100

    page, response, problems = visit(browser, f"{dashboard}/live", shots, "live")
    assert response.status == 200 and problems == []
    live = dict((r[0], r[1]) for r in cells(page, "#live"))
    assert live["model"] == "topics" and live["version"] == "2" and live["alias"] == "champion"
    assert registry.alias_version("topics", "champion") == 2  # reading changed nothing


def test_promote_and_rollback_move_the_alias_only_with_the_token(store, dashboard, browser, tmp_path):
    registry = store["registry"]
    page, _, problems = visit(browser, f"{dashboard}/models/topics", tmp_path, "model")
    form = page.locator("#promote")
    form.locator("input[name=version]").fill("3")
    form.locator("input[name=reason]").fill("by hand in the dashboard")
    form.locator("input[name=token]").fill("not-the-token")
    with page.expect_navigation():
        form.locator("button").click()
    assert "wrong token: nothing was changed" in page.inner_text("#message")
    assert registry.alias_version("topics", "champion") == 2
    assert len(problems) == 1 and "status of 403" in problems[0]  # the refusal, as the browser saw it
    problems.clear()

    page.goto(f"{dashboard}/models/topics")
    form = page.locator("#promote")
    form.locator("input[name=version]").fill("3")
    form.locator("input[name=reason]").fill("by hand in the dashboard")
    form.locator("input[name=token]").fill(TOKEN)
    with page.expect_navigation():
        form.locator("button").click()
    assert page.inner_text("#moved") == "moved: champion:2-3"
    assert registry.alias_version("topics", "champion") == 3
    assert registry.history("topics", "champion")[-1]["reason"] == "by hand in the dashboard"
    assert cells(page, "#history")[1][2:5] == ["2 → 3", "promote", "by hand in the dashboard"]

    form = page.locator("#rollback")
    form.locator("input[name=token]").fill(TOKEN)
    with page.expect_navigation():
        form.locator("button").click()
    assert page.inner_text("#moved") == "moved: champion:3-2"
    assert registry.alias_version("topics", "champion") == 2
    assert problems == []


def test_bad_paths_versions_and_requests_get_one_message_and_change_nothing(store, dashboard):
    from fastapi.testclient import TestClient

    from lifelong.ui import create_app

    registry = store["registry"]
    for path, text in [
        ("/models/nope", "no model 'nope'"),
        ("/models/topics/abc", "no version 'abc' of model 'topics'"),
        ("/models/topics/99", "no version '99' of model 'topics'"),
        ("/streams/nope", "no stream 'nope'"),
        ("/sweeps/nope", "no sweep 'nope'"),
    ]:
        got = httpx.get(f"{dashboard}{path}")
        assert got.status_code == 404 and text in html.unescape(got.text), path
    refused = httpx.post(f"{dashboard}/models/topics/promote", data={"version": "99", "alias": "champion", "token": TOKEN})
    assert refused.status_code == 400 and "topics" in refused.text and "99" in refused.text, refused.text
    refused = httpx.post(f"{dashboard}/models/topics/promote", data={"version": "2", "alias": "no such alias!", "token": TOKEN})
    assert refused.status_code == 400 and "not a valid alias name" in refused.text
    assert registry.alias_version("topics", "champion") == 2

    read_only = TestClient(create_app(str(store["root"])))  # started without --token-file
    assert 'id="promote"' not in read_only.get("/models/topics").text
    denied = read_only.post("/models/topics/promote", data={"version": "3", "token": ""})
    assert denied.status_code == 403 and "read-only" in denied.text
    assert read_only.get("/live").status_code == 200 and "No endpoint configured" in read_only.get("/live").text
    assert registry.alias_version("topics", "champion") == 2

    for args, text in [
        (["--root", str(store["root"] / "missing")], "no store there"),
        (["--root", str(store["root"]), "--endpoint", "ftp://host"], "give an http:// or https:// URL"),
        (["--root", str(store["root"]), "--token-file", str(store["root"] / "no-token")], "no such file"),
    ]:
        run = subprocess.run([str(BIN / "lifelong"), "ui", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and text in run.stderr and "Traceback" not in run.stderr + run.stdout, (args, run.stderr)
