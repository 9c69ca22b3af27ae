"""The whole lifecycle in one process on an embedded local Ray (what `make quickstart` runs).

pretrain a tiny GPT-2 (2 DeepSpeed workers) → a small Optuna sweep fine-tunes it into a 4-topic
classifier; the best trial becomes the champion → Ray Serve serves the champion (ONNX Runtime,
2 replicas) while a client keeps asking → windows of drifting data land one after another;
each continual cycle retrains the champion on the new rows + replay, gates it, promotes it and
the endpoint swaps → a final summary: versions, the continual-learning matrix, what the
endpoint answered with, failed requests.

Every run has its own run, sweep and stream names, so earlier runs stay in the store.
"""

import collections
import shutil
import threading
import time
from pathlib import Path

from lifelong.console import console, fail, quiet, say

# Before the heavy imports: what torch, DeepSpeed and Ray print from here on goes to the log file.
quiet("lifelong-store", "quickstart")

import httpx  # noqa: E402
from ray import serve  # noqa: E402

from lifelong.commands import print_sweep_summary, print_training_summary  # noqa: E402
from lifelong.config import load_config  # noqa: E402
from lifelong.continual.cycle import run_cycle  # noqa: E402
from lifelong.continual.report import write_report  # noqa: E402
from lifelong.registry import Registry  # noqa: E402
from lifelong.runtime import connect  # noqa: E402
from lifelong.serve import deploy  # noqa: E402
from lifelong.storage import Storage  # noqa: E402
from lifelong.synth import write_stream, write_text_corpus, write_topic_dataset  # noqa: E402
from lifelong.train.driver import run_training  # noqa: E402
from lifelong.tune import needs_state_api, run_sweep  # noqa: E402

WINDOWS = 3
started = time.monotonic()
stamp = time.strftime("%Y%m%d-%H%M%S")
data = Path("data/demo")
if not (data / "topics.jsonl").exists():
    write_text_corpus(data / "corpus.jsonl")
    write_topic_dataset(data / "topics.jsonl", 1200, seed=0)
stream_dir = data / "stream"
if not (stream_dir / f"window-{WINDOWS - 1:03d}").exists():
    write_stream(stream_dir, windows=WINDOWS, rows_per_window=240, files_per_window=2, seed=0)
landing = (data / f"landing-{stamp}").resolve()
landing.mkdir(parents=True)

pretrain = load_config("configs/gpt2/tiny_pretrain.yaml", [f"run_name=quickstart-pretrain-{stamp}"])
sweep = load_config(
    "configs/gpt2/tiny_tune.yaml", [f"tune.sweep_name=quickstart-{stamp}", "tune.num_samples=4", "tune.startup_trials=2", "train.epochs=3"]
)
cycles = load_config(
    "configs/gpt2/tiny_continual.yaml",
    [
        f"data.path={landing}",
        f"continual.landing={landing}",
        f"continual.stream=quickstart-{stamp}",
        "continual.min_new_rows=100",
        "train.epochs=3",
        "train.lr=3e-3",
        "scaling.num_workers=1",
    ],
)
served = load_config("configs/gpt2/tiny_serve.yaml", ["serve.poll_interval_s=0.5"])
where = connect(num_cpus=4, dashboard=needs_state_api(sweep))  # for multi-worker trials: ASHA frees stopped ones through it
console.print(f"[bold]quickstart[/] on {where}; storage root {pretrain.storage.root}")
registry = Registry(Storage(pretrain.storage.root))

console.rule("1/5 pretrain a tiny GPT-2 with 2 DeepSpeed workers (ZeRO-2)")
lm = run_training(pretrain)
print_training_summary(lm, hint=False)  # promoted next
registry.move_alias(lm.model, "champion", lm.version, reason="quickstart pretrain")

console.rule("2/5 sweep: Optuna TPE + ASHA fine-tune tiny-gpt2@champion into a topic classifier (4 trials)")
best = run_sweep(sweep, promote=True)
print_sweep_summary(best)
if best.version is None:
    fail(f"quickstart stopped: no trial of the sweep finished, so there is nothing to serve (trials: {best.csv})")

console.rule("3/5 serve tiny-topics@champion (ONNX Runtime, 2 replicas); a client asks every 0.1 s")
url = deploy(served)
answers, stop = [], threading.Event()


def ask() -> None:
    texts = ["the stock market and the bank", "a storm with rain in the forecast", "the team won the final"]
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set() and len(answers) < 50000:
            try:
                r = client.post("/v1/predict", json={"texts": texts})
                answers.append((r.status_code, r.json()["version"] if r.status_code == 200 else r.text[:200]))
            except httpx.HTTPError as e:
                answers.append((type(e).__name__, str(e)[:200]))
            stop.wait(0.1)


def serving() -> int:
    return httpx.post(url + "/v1/predict", json={"texts": ["x"]}, timeout=30).json()["version"]


client = threading.Thread(target=ask, daemon=True)
client.start()
console.print(f"POST {url}/v1/predict → version {serving()}")

outcomes = []
try:
    for w in range(WINDOWS):
        console.rule(f"4/5 window {w} of {WINDOWS} lands in {landing}: a continual cycle (replay) retrains, gates, promotes")
        for f in sorted((stream_dir / f"window-{w:03d}").iterdir()):
            shutil.copy(f, landing / f"window-{w:03d}-{f.name}")
        outcome = run_cycle(cycles)
        outcomes.append(outcome)
        say(outcome.summary())
        champion = registry.alias_version(cycles.name, "champion")
        deadline = time.monotonic() + 60
        while serving() != champion and time.monotonic() < deadline:
            time.sleep(0.25)
        console.print(f"the endpoint now serves version {serving()} (champion {champion})")
finally:
    stop.set()
    client.join()
    serve.delete(served.serve_app_name)

console.rule("5/5 summary")
made = [f"{best.version} by sweep {best.name}"] + [f"{o.version} by the cycle of window {w} ({o.status})" for w, o in enumerate(outcomes)]
say(f"{cycles.name} versions made by this run: " + "; ".join(made))
report = write_report(cycles)
say(report.text)
console.print(f"plots: {report.matrix_png}, {report.metrics_png}", soft_wrap=True)
by_version = collections.Counter(v for status, v in answers if status == 200)
failed = [a for a in answers if a[0] != 200]
console.print(
    f"the endpoint answered {len(answers)} requests: "
    + ", ".join(f"version {v}: {n}" for v, n in sorted(by_version.items()))
    + f"; failed requests: {len(failed)}"
    + (f" (first: {failed[0]})" if failed else "")
)
console.print(
    f"[bold green]quickstart done[/] in {time.monotonic() - started:.0f} s. Next: lifelong continual "
    f"configs/gpt2/tiny_continual.yaml · lifelong models list · lifelong continual report CONFIG"
)
raise SystemExit(1 if failed else 0)
