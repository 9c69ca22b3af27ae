"""The commands a user is shown, run as printed: every command of the README's user-guide table,
its local-cluster example and the first line of every shipped config, each a subprocess in a
fresh copy of the project (the files a clone has, plus this checkout's .venv), on the copy's own
empty storage root, in the order a user meets them, with each one's documented outcome asserted.

`test_every_shown_command_is_run` ties this module to the README and the configs: a command
shown there and not run here (or run here and no longer shown) fails it, so when the README or a
config changes, this module changes with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, answering, copy_project, start_server

README = Path(ROOT) / "README.md"
CONFIGS = sorted((Path(ROOT) / "configs").glob("*/*.yaml"))
CLUSTER = "--address http://127.0.0.1:8265"
SERVE = "exec lifelong serve configs/gpt2/tiny_serve.yaml"
SERVE_IMAGES = "exec lifelong serve configs/resnet/tiny_serve.yaml"
SERVE_LM = "exec lifelong serve configs/gpt2/tiny_lm_serve.yaml"
SERVE_VIT = "exec lifelong serve configs/vit/tiny_serve.yaml"
# The closed loop's endpoint: its config asks for the token in LIFELONG_SERVE_TOKEN (feedback needs one).
SERVE_LOOP = "export LIFELONG_SERVE_TOKEN=readme-loop-token && exec lifelong serve configs/gpt2/tiny_loop.yaml"
ON_CLUSTER = "storage.root=$PWD/lifelong-store continual.landing=$PWD/data/landing"
SPLIT_PRETRAIN = (
    'lifelong pretrain configs/resnet/tiny_scratch.yaml name=tiny-resnet-split \'data.labels=["0","1"]\' '
    "data.path=data/split-digits/window-000"
)
VIT_SPLIT = (
    'lifelong finetune configs/vit/tiny_finetune.yaml name=tiny-vit-split \'data.labels=["0","1"]\' data.path=data/split-digits/window-000'
)
UI = "echo s3cret > ui-token && exec lifelong ui --token-file ui-token --endpoint http://127.0.0.1:8000"
ON_S3 = "lifelong submit pretrain configs/gpt2/tiny_pretrain.yaml storage.root=s3://BUCKET/lifelong data.path=s3://BUCKET/corpus.jsonl"


@dataclass
class Step:
    shown: list[str]  # the commands as the README or a config prints them (placeholders and all)
    run: str  # what is typed, in the project's directory (bash)
    expect: tuple[str, ...] = ()  # lines of the documented outcome, in its output
    code: int = 0


# In the order a user meets them. A placeholder in the README (NAME, ALIAS, ID, BUCKET, HEAD) is
# given a value from the steps before; `{job}` is the id of the job submitted by the step before.
STEPS = [
    Step(["lifelong data demo data/demo"], "lifelong data demo data/demo", ("wrote data/demo/corpus.jsonl",)),
    # The README's local-cluster example, as printed, on the demo data: it registers tiny-gpt2:1.
    Step(["cluster/local.sh start 1"], "cluster/local.sh start 1", ("Ray cluster up: 2 nodes",)),
    Step(
        [
            ".venv/bin/lifelong submit pretrain configs/gpt2/tiny_pretrain.yaml storage.root=$PWD/lifelong-store --carry-data --address http://127.0.0.1:8265",
            f"{ON_S3} --address http://HEAD:8265",
            f"{ON_S3} --carry-data",
        ],
        ".venv/bin/lifelong submit pretrain configs/gpt2/tiny_pretrain.yaml storage.root=$PWD/lifelong-store --carry-data --address http://127.0.0.1:8265",
        ("1 of them carried (--carry-data)", "registered tiny-gpt2:1", "SUCCEEDED"),
    ),
    Step(
        [".venv/bin/lifelong jobs list --address http://127.0.0.1:8265", "lifelong jobs list", "lifelong jobs list --address"],
        ".venv/bin/lifelong jobs list --address http://127.0.0.1:8265",
        ("{job} │ SUCCEEDED",),
    ),
    Step(["lifelong jobs logs ID [--follow]"], f"lifelong jobs logs {{job}} {CLUSTER}", ("registered tiny-gpt2:1",)),
    # Stopped as the README's example stops it, and started again for the cycle jobs at the end:
    # an idle cluster kept up meanwhile took CPU from every command in between (and from the
    # test module run beside this one).
    Step(["cluster/local.sh stop"], "cluster/local.sh stop"),
    # The same config and data here: the same run, already registered by the cluster's job.
    Step(
        ["lifelong pretrain configs/gpt2/tiny_pretrain.yaml"],
        "lifelong pretrain configs/gpt2/tiny_pretrain.yaml",
        (
            "finished its 2 epoch(s) already: nothing to train",
            "the best checkpoint is already registered as tiny-gpt2:1",
            "lifelong models promote tiny-gpt2:1 --alias champion",
        ),
    ),
    Step(
        ["lifelong models promote NAME:3 --alias champion"],
        "lifelong models promote tiny-gpt2:1 --alias champion",
        ("tiny-gpt2@champion: None → 1",),
    ),
    Step(
        ["lifelong finetune configs/gpt2/tiny_finetune.yaml model.init_from=tiny-gpt2@champion"],
        "lifelong finetune configs/gpt2/tiny_finetune.yaml model.init_from=tiny-gpt2@champion",
        ("registered tiny-topics:1", "export onnx: parity_max_abs_diff="),
    ),
    # The config's own first line: the same config and data, so the same run and version.
    Step(
        ["lifelong finetune configs/gpt2/tiny_finetune.yaml"],
        "lifelong finetune configs/gpt2/tiny_finetune.yaml",
        ("finished its 3 epoch(s) already: nothing to train", "the best checkpoint is already registered as tiny-topics:1"),
    ),
    Step([], "lifelong models promote tiny-topics:1 --alias champion", ("tiny-topics@champion: None → 1",)),
    Step(
        ["lifelong evaluate configs/gpt2/tiny_finetune.yaml --model tiny-topics@champion --data data/demo/topics.jsonl"],
        "lifelong evaluate configs/gpt2/tiny_finetune.yaml --model tiny-topics@champion --data data/demo/topics.jsonl",
        ("accuracy",),
    ),
    # A smaller search than the config's (3 trials of 2 epochs), the rest as printed.
    Step(
        ["lifelong tune configs/gpt2/tiny_tune.yaml", "lifelong tune configs/gpt2/tiny_tune.yaml [--resume] [--promote]"],
        "lifelong tune configs/gpt2/tiny_tune.yaml tune.num_samples=3 train.epochs=2",
        ("registered as tiny-topics:2 with alias challenger",),
    ),
    Step(
        ["lifelong tune configs/gpt2/tiny_tune.yaml --resume", "lifelong tune configs/gpt2/tiny_tune.yaml --promote"],
        "lifelong tune configs/gpt2/tiny_tune.yaml tune.num_samples=3 train.epochs=2 --resume --promote",
        ("registered as tiny-topics:2 with alias champion",),
    ),
    Step(["lifelong export tiny-gpt2:1"], "lifelong export tiny-gpt2:1", ("tiny-gpt2:1 onnx: parity_max_abs_diff=",)),
    Step(["lifelong models list"], "lifelong models list", ("tiny-gpt2", "tiny-topics")),
    Step(["lifelong models show NAME@ALIAS"], "lifelong models show tiny-topics@champion", ('"version": 2',)),
    Step(["lifelong models rollback NAME"], "lifelong models rollback tiny-topics", ("tiny-topics@champion: rolled back 2 → 1",)),
    Step(["lifelong ui", "lifelong ui --token-file FILE", "lifelong ui --endpoint URL"], UI),
    # Continual pretraining of tiny-gpt2@champion on real text (one part of CPython's docs).
    Step(
        ["lifelong data doc-stream data/doc-stream"],
        "lifelong data doc-stream data/doc-stream",
        ("wrote 4 windows of CPython documentation",),
    ),
    Step(
        ["mkdir -p data/lm-landing && cp data/doc-stream/window-000/* data/lm-landing/"],
        "mkdir -p data/lm-landing && cp data/doc-stream/window-000/* data/lm-landing/",
    ),
    Step(
        [
            "lifelong continual configs/gpt2/tiny_lm_continual.yaml --once",
            "lifelong continual configs/gpt2/tiny_lm_continual.yaml [--once]",
        ],
        "lifelong continual configs/gpt2/tiny_lm_continual.yaml --once",
        ("cycle of stream 'tiny-gpt2'", "perplexity per window: w0:", "from version 1", "→ version 2"),
    ),
    # Served: the README's requests for a language model (curl, streamed and not, and the OpenAI client), then Ctrl-C.
    Step(["lifelong serve configs/gpt2/tiny_lm_serve.yaml"], SERVE_LM),
    # Instruction fine-tuning from tiny-gpt2@champion on the demo's prompt/response pairs, judged by BLEU.
    Step(["lifelong finetune configs/gpt2/tiny_sft.yaml"], "lifelong finetune configs/gpt2/tiny_sft.yaml", ("registered tiny-gpt2-sft:1",)),
    Step(
        ["lifelong evaluate configs/gpt2/tiny_sft.yaml --model tiny-gpt2-sft:1"],
        "lifelong evaluate configs/gpt2/tiny_sft.yaml --model tiny-gpt2-sft:1",
        ("bleu", "chrf", "exact_match"),
    ),
    # The SFT model keeps learning from instruction windows, gated on the BLEU of its answers.
    Step([], "lifelong models promote tiny-gpt2-sft:1 --alias champion", ("tiny-gpt2-sft@champion: None → 1",)),
    Step(
        ["lifelong data instruction-stream data/instruction-stream"],
        "lifelong data instruction-stream data/instruction-stream",
        ("wrote 2 windows of 400 prompt/response rows",),
    ),
    Step(
        ["mkdir -p data/sft-landing && cp data/instruction-stream/window-001/* data/sft-landing/"],
        "mkdir -p data/sft-landing && cp data/instruction-stream/window-001/* data/sft-landing/",
    ),
    Step(
        [
            "lifelong continual configs/gpt2/tiny_sft_continual.yaml --once",
            "lifelong continual configs/gpt2/tiny_sft_continual.yaml [--once]",
        ],
        "lifelong continual configs/gpt2/tiny_sft_continual.yaml --once",
        ("cycle of stream 'tiny-gpt2-sft'", "bleu per window: w0:", "from version 1", "→ version 2"),
    ),
    # The same answers taught through LoRA adapters on the same base: a version of adapters alone.
    Step(
        ["lifelong finetune configs/gpt2/tiny_lora.yaml"],
        "lifelong finetune configs/gpt2/tiny_lora.yaml",
        ("registered tiny-gpt2-lora:1",),
    ),
    Step(
        ["lifelong evaluate configs/gpt2/tiny_lora.yaml --model tiny-gpt2-lora:1"],
        "lifelong evaluate configs/gpt2/tiny_lora.yaml --model tiny-gpt2-lora:1",
        ("bleu", "chrf", "exact_match"),
    ),
    Step(
        ["lifelong pretrain configs/gpt2/tiny_moe_pretrain.yaml"],
        "lifelong pretrain configs/gpt2/tiny_moe_pretrain.yaml",
        ("registered tiny-gpt2-moe:1",),
    ),
    # Images: real handwritten digits in class folders, a ResNet and a ViT trained on them.
    Step(
        ["lifelong data image-stream data/digits --windows 1 --classes 10"],
        "lifelong data image-stream data/digits --windows 1 --classes 10",
        ("wrote 1 windows of 10 digits (1797 PNG images",),
    ),
    Step(
        ["lifelong pretrain configs/resnet/tiny_scratch.yaml"],
        "lifelong pretrain configs/resnet/tiny_scratch.yaml",
        ("1797 file(s) read, 0 quarantined", "registered tiny-resnet-digits:1", "export onnx: parity_max_abs_diff="),
    ),
    Step(
        ["lifelong pretrain configs/vit/tiny_mae_pretrain.yaml"],
        "lifelong pretrain configs/vit/tiny_mae_pretrain.yaml",
        ("registered tiny-vit-mae:1",),
    ),
    Step([], "lifelong models promote tiny-vit-mae:1 --alias champion", ("tiny-vit-mae@champion: None → 1",)),
    Step(
        ["lifelong finetune configs/vit/tiny_finetune.yaml"],
        "lifelong finetune configs/vit/tiny_finetune.yaml",
        ("registered tiny-vit-digits:1", "export onnx: parity_max_abs_diff="),
    ),
    # A small search of the ViT's fine-tuning (2 trials of 2 epochs: ASHA's grace period), then
    # the ViT served and asked as the ResNet is below.
    Step(
        ["lifelong tune configs/vit/tiny_tune.yaml", "lifelong tune configs/vit/tiny_tune.yaml [--resume] [--promote]"],
        "lifelong tune configs/vit/tiny_tune.yaml tune.num_samples=2 train.epochs=2",
        ("registered as tiny-vit-digits:2 with alias challenger",),
    ),
    Step([], "lifelong models promote tiny-vit-digits:1 --alias champion", ("tiny-vit-digits@champion: None → 1",)),
    Step(["lifelong serve configs/vit/tiny_serve.yaml"], SERVE_VIT),
    Step(
        ["lifelong evaluate configs/resnet/tiny_scratch.yaml --model tiny-resnet-digits:1 --confusion-matrix confusion.png"],
        "lifelong evaluate configs/resnet/tiny_scratch.yaml --model tiny-resnet-digits:1 --confusion-matrix confusion.png",
        ("map", "confusion matrix: confusion.png"),
    ),
    Step(
        ["lifelong predict tiny-resnet-digits:1 data/digits predictions/digits"],
        "lifelong predict tiny-resnet-digits:1 data/digits predictions/digits",
        ("1797 row(s) written to predictions/digits",),
    ),
    # Class-incremental: a ResNet over digits 0 and 1, then a window of 2 and 3 grows it.
    Step(
        ["lifelong data image-stream data/split-digits --windows 3 --classes 2"],
        "lifelong data image-stream data/split-digits --windows 3 --classes 2",
        ("wrote 3 windows of 2 digits",),
    ),
    Step(
        [SPLIT_PRETRAIN],
        SPLIT_PRETRAIN,
        ("registered tiny-resnet-split:1",),
    ),
    Step(
        ["lifelong models promote tiny-resnet-split:1 --alias champion"],
        "lifelong models promote tiny-resnet-split:1 --alias champion",
        ("tiny-resnet-split@champion: None → 1",),
    ),
    Step(
        ["mkdir -p data/digit-landing && cp -r data/split-digits/window-001 data/digit-landing/"],
        "mkdir -p data/digit-landing && cp -r data/split-digits/window-001 data/digit-landing/",
    ),
    Step(
        ["lifelong continual configs/resnet/tiny_continual.yaml --once", "lifelong continual configs/resnet/tiny_continual.yaml [--once]"],
        "lifelong continual configs/resnet/tiny_continual.yaml --once",
        ("new labels ['2', '3']", "cycle of stream 'tiny-resnet-split': promoted (window 0)", "→ version 2"),
    ),
    # The same stream for a ViT fine-tuned from the MAE encoder on digits 0 and 1.
    Step([VIT_SPLIT], VIT_SPLIT, ("registered tiny-vit-split:1",)),
    Step(
        ["lifelong models promote tiny-vit-split:1 --alias champion"],
        "lifelong models promote tiny-vit-split:1 --alias champion",
        ("tiny-vit-split@champion: None → 1",),
    ),
    Step(
        ["lifelong continual configs/vit/tiny_continual.yaml --once", "lifelong continual configs/vit/tiny_continual.yaml [--once]"],
        "lifelong continual configs/vit/tiny_continual.yaml --once",
        ("new labels ['2', '3']", "cycle of stream 'tiny-vit-split': promoted (window 0)", "→ version 2"),
    ),
    # A small search (2 trials of 1 epoch), the rest as printed; then the ResNet served and asked.
    Step(
        ["lifelong tune configs/resnet/tiny_tune.yaml", "lifelong tune configs/resnet/tiny_tune.yaml [--resume] [--promote]"],
        "lifelong tune configs/resnet/tiny_tune.yaml tune.num_samples=2 train.epochs=1",
        ("registered as tiny-resnet-digits:2 with alias challenger",),
    ),
    Step([], "lifelong models promote tiny-resnet-digits:1 --alias champion", ("tiny-resnet-digits@champion: None → 1",)),
    Step(
        ["lifelong finetune configs/resnet/tiny_finetune.yaml"],
        "lifelong finetune configs/resnet/tiny_finetune.yaml",
        ("330 of 21,914 parameters trainable", "registered tiny-resnet-probe:1"),
    ),
    Step(["lifelong serve configs/resnet/tiny_serve.yaml"], SERVE_IMAGES),
    # Served: the README's requests, then Ctrl-C (`serve_and_ask`).
    Step(["lifelong serve configs/gpt2/tiny_serve.yaml"], SERVE),
    Step(["lifelong data stream data/stream --windows 4"], "lifelong data stream data/stream --windows 4", ("wrote 4 windows",)),
    Step(
        ["mkdir -p data/landing && cp data/stream/window-000/* data/landing/"],
        "mkdir -p data/landing && cp data/stream/window-000/* data/landing/",
    ),
    Step(
        [
            "lifelong continual configs/gpt2/tiny_continual.yaml",
            "lifelong continual configs/gpt2/tiny_continual.yaml --once",
            "lifelong continual configs/gpt2/tiny_continual.yaml [--once]",
        ],
        "lifelong continual configs/gpt2/tiny_continual.yaml --once",
        ("cycle of stream 'tiny-topics': promoted (window 0)", "→ version 3"),
    ),
    Step(
        ["lifelong continual report configs/gpt2/tiny_continual.yaml"],
        "lifelong continual report configs/gpt2/tiny_continual.yaml",
        ("'consumed': 2", "report.json"),
    ),
    Step(
        ["lifelong continual ledger configs/gpt2/tiny_continual.yaml"],
        "lifelong continual ledger configs/gpt2/tiny_continual.yaml",
        ("consumed",),
    ),
    Step(
        ["lifelong continual ledger configs/gpt2/tiny_continual.yaml --state quarantined"],
        "lifelong continual ledger configs/gpt2/tiny_continual.yaml --state quarantined",
    ),
    Step(
        [
            "lifelong continual requeue configs/gpt2/tiny_continual.yaml --all",
            "lifelong continual requeue configs/gpt2/tiny_continual.yaml --hash HASH",
        ],
        "lifelong continual requeue configs/gpt2/tiny_continual.yaml --all",
    ),
    # The closed loop: the endpoint records a tenth of its answers and takes a label for each
    # (`close_the_loop`); the stream's first cycle lands the labelled rows, then waits for 200.
    Step(["lifelong serve configs/gpt2/tiny_loop.yaml"], SERVE_LOOP),
    Step(
        ["lifelong continual configs/gpt2/tiny_loop.yaml"],
        "lifelong continual configs/gpt2/tiny_loop.yaml --once",
        ("labelled row(s) landed as", "a cycle starts at 200"),
    ),
    # Back on the cluster: a cycle job (nothing new has landed: it says so and succeeds) ...
    Step(["cluster/local.sh start 1"], "cluster/local.sh start 1", ("Ray cluster up: 2 nodes",)),
    Step(
        ["lifelong submit continual CONFIG --once"],
        f"lifelong submit continual configs/gpt2/tiny_continual.yaml {ON_CLUSTER} --once {CLUSTER}",
        ("SUCCEEDED",),
    ),
    # ... and a daemon (no --once), which keeps running, so that `jobs stop` has a job to stop.
    Step([], f"lifelong submit continual configs/gpt2/tiny_continual.yaml {ON_CLUSTER} --no-wait {CLUSTER}", ("submitted",)),
    Step(["lifelong jobs stop ID"], f"lifelong jobs stop {{job}} {CLUSTER}", ("stop requested",)),
    Step(["cluster/local.sh stop"], "cluster/local.sh stop"),
]


def shown_in_readme() -> set[str]:
    """Every command the user-guide table shows (a row's own flags joined to its command), and
    the lines of the fenced block of the local-cluster example."""
    text = README.read_text()
    table = text.split("## User guide", 1)[1].split("\n\n", 2)[1]
    shown = set()
    for row in table.splitlines()[2:]:
        spans = re.findall(r"`([^`]+)`", row.split(" | ", 1)[1])
        commands = [("lifelong " + s if not s.startswith("lifelong") else s) for s in spans if not s.startswith("--")]
        base = commands[0].split(" --")[0]
        shown |= {*commands, *(f"{base} {s}" for s in spans if s.startswith("--"))}
    example = text.split("**Try it locally**", 1)[1].split("```", 2)[1]
    shown |= {line.strip() for line in example.splitlines() if line.strip()}
    continual = text.split("### Continual learning", 1)[1].split("### Clusters", 1)[0]
    blocks = continual.split("```")[1::2]
    shown |= {line.strip() for block in blocks for line in block.splitlines() if line.startswith(("mkdir", "lifelong"))}
    return shown


def shown_in_configs() -> set[str]:
    return {path.read_text().splitlines()[0].removeprefix("# ").strip() for path in CONFIGS}


def test_every_shown_command_is_run():
    """What the README and the configs show is what this module runs, no more and no less."""
    run = {s for step in STEPS for s in step.shown}
    shown = shown_in_readme() | shown_in_configs()
    assert shown - run == set(), f"shown but never run here: {sorted(shown - run)}"
    assert run - shown == set(), f"run here but no longer shown: {sorted(run - shown)}"


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory):
    """The project as a clone has it (tracked and unignored files), with this checkout's .venv
    linked in, a HOME of its own (no Ray token yet) and its own local-cluster state."""
    base = tmp_path_factory.mktemp("fresh")
    project = base / "project"
    copy_project(project)
    (project / ".venv").symlink_to(Path(ROOT) / ".venv")
    home = base / "home"
    home.mkdir()
    bin_dir = str(Path(ROOT) / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LIFELONG_"))}
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        LIFELONG_LOCAL_CLUSTER=tempfile.mkdtemp(prefix="llc-", dir="/tmp"),  # short: Ray's unix sockets live under it
    )
    yield project, env
    subprocess.run(["bash", "cluster/local.sh", "stop"], cwd=project, env=env, capture_output=True, timeout=120)
    shutil.rmtree(env["LIFELONG_LOCAL_CLUSTER"], ignore_errors=True)


def sh(command: str, project: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(4800)
def test_the_shown_commands_work_as_printed(fresh_project):
    project, env = fresh_project
    job = None
    for step in STEPS:
        if step.run in (SERVE, SERVE_IMAGES, SERVE_LM, SERVE_VIT):
            serve_and_ask(project, env, step.run)
            continue
        if step.run == UI:
            look_at_the_dashboard(project, env)
            continue
        if step.run == SERVE_LOOP:
            close_the_loop(project, env)
            continue
        command = step.run.format(job=job)
        started = time.monotonic()
        done = sh(command, project, env)
        print(f"[step] {time.monotonic() - started:6.1f} s  {command}", flush=True)  # where the test's time goes (-s)
        out = done.stdout + done.stderr
        assert done.returncode == step.code, f"{command} exited {done.returncode}:\n{out[-4000:]}"
        words = " ".join(out.split())  # the console wraps long lines at its width
        for line in (e.format(job=job) for e in step.expect):
            assert line in words, f"{command}: {line!r} not in its output:\n{out[-4000:]}"
        # The command's own errors are one line; Ray's actors log their own (prefixed "(Actor pid=…)").
        assert not re.search(r"^Traceback", out, re.MULTILINE), f"{command}:\n{out[-4000:]}"
        found = re.search(r"submitted (raysubmit_\w+)", out)
        job = found.group(1) if found else job
    registry = project / "lifelong-store" / "registry"
    names = (
        "tiny-gpt2",
        "tiny-gpt2-sft",
        "tiny-gpt2-lora",
        "tiny-gpt2-moe",
        "tiny-topics",
        "tiny-resnet-digits",
        "tiny-resnet-split",
        "tiny-resnet-probe",
        "tiny-vit-digits",
        "tiny-vit-split",
    )
    versions = {name: sorted(p.name for p in (registry / name / "versions").iterdir()) for name in names}
    assert versions == {  # tiny-gpt2:1 by the cluster's job, 2 by the continual-pretraining cycle
        "tiny-gpt2": ["1", "2"],
        "tiny-gpt2-sft": ["1", "2"],
        "tiny-gpt2-lora": ["1"],
        "tiny-gpt2-moe": ["1"],
        "tiny-topics": ["1", "2", "3"],
        "tiny-resnet-digits": ["1", "2"],
        "tiny-resnet-split": ["1", "2"],
        "tiny-resnet-probe": ["1"],
        "tiny-vit-digits": ["1", "2"],
        "tiny-vit-split": ["1", "2"],
    }


# Put first on PYTHONPATH, Python runs this in each process it starts: in the worker node's
# `ray start` it stops (SIGSTOP) the first raylet that Ray starts, the moment it exists.
FREEZE_A_RAYLET = """
import os, signal, sys
mark = os.environ["FROZEN_MARK"]
if sys.argv[1:2] == ["start"] and any(a.endswith("/ray-1") for a in sys.argv) and not os.path.exists(mark):
    import ray._private.services as services
    started = services.ConsolePopen.__init__
    def freeze(self, command, *args, **kwargs):
        started(self, command, *args, **kwargs)
        if command[0].endswith("/raylet") and not os.path.exists(mark):
            os.kill(self.pid, signal.SIGSTOP)
            open(mark, "w").write(str(self.pid))
    services.ConsolePopen.__init__ = freeze
"""


@pytest.mark.slow
def test_a_local_cluster_node_that_misses_rays_start_up_window_is_started_again(fresh_project, tmp_path):
    """`cluster/local.sh start` on a machine too busy for a node's raylet to register within Ray's
    fixed 30 s (seen on CI's 2 cores under `make test`): that node is started again, the stopped
    raylet ended with it, and the cluster comes up."""
    import psutil

    project, env = fresh_project
    (tmp_path / "sitecustomize.py").write_text(FREEZE_A_RAYLET)
    mark = tmp_path / "frozen"
    drill = {**env, "PYTHONPATH": str(tmp_path), "FROZEN_MARK": str(mark)}
    try:
        done = sh("cluster/local.sh start 1", project, drill, timeout=400)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert "node worker-1 did not start within Ray's 30 s" in out and "Ray cluster up: 2 nodes" in out, out[-4000:]
        frozen = int(mark.read_text())
        assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE
    finally:
        sh("cluster/local.sh stop", project, env, timeout=120)


def serve_and_ask(project: Path, env: dict, command: str) -> None:
    """`lifelong serve CONFIG`, the README's requests for it, then Ctrl-C."""
    server = start_server(["bash", "-c", command], cwd=project, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get("http://127.0.0.1:8000/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert server.poll() is None, server.stdout.read()[-4000:]
        if command == SERVE_LM:
            ask_the_language_model(project, env)
        for line in [] if command == SERVE_LM else serving_examples() if command == SERVE else image_serving_examples():
            done = sh(line, project, env, timeout=60)
            assert done.returncode == 0 and done.stdout.startswith("{"), (line, done.stdout, done.stderr)
            answer = json.loads(done.stdout)
            if command in (SERVE_IMAGES, SERVE_VIT):  # the digits ResNet or ViT, version 1: two uploads, then one base64 image
                digits = [str(d) for d in range(10)]
                model = "tiny-resnet-digits" if command == SERVE_IMAGES else "tiny-vit-digits"
                assert (answer["model"], answer["version"]) == (model, 1), (line, answer)
                assert len(answer["predictions"]) == (2 if "-F" in line else 1), (line, answer)
                assert all(sorted(p["probabilities"]) == digits for p in answer["predictions"]), (line, answer)
            elif "/v1/predict" in line:  # the champion, rolled back to 1
                assert (answer["model"], answer["version"], len(answer["predictions"])) == ("tiny-topics", 1, 2), (line, answer)
            elif "/v1/model" in line:
                assert answer["version"] == 1, (line, answer)
            else:  # /v1/generate on a classifier: refused, naming why
                assert "serves a sequence-classification model: use POST /v1/predict" in answer["error"], (line, answer)
    finally:
        out = stop_server(server)
    assert server.returncode in (0, 130, -signal.SIGINT), out[-4000:]


def stop_server(server) -> str:
    """Ctrl-C a server we started (its process group), as a user would (killed after 2 minutes); its output."""
    os.killpg(server.pid, signal.SIGINT)
    try:
        out, _ = server.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        out, _ = server.communicate()
    return out


def landed_rows(path: Path) -> list[dict]:
    """The rows of a data file as `lifelong data stream` writes them (JSONL, CSV or Parquet)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        return pacsv.read_csv(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def close_the_loop(project: Path, env: dict) -> None:
    """`lifelong serve configs/gpt2/tiny_loop.yaml`: 100 requests from the stream's first window,
    each answer followed by its right label; the answers recorded (a tenth, by request id) are on
    the store when the endpoint has stopped (Ctrl-C)."""
    server = start_server(["bash", "-c", SERVE_LOOP], cwd=project, env=env)
    headers = {"Authorization": "Bearer readme-loop-token"}
    recorded = 0
    try:
        answering("http://127.0.0.1:8000/healthz", server, 300, lambda: server.stdout.read()[-4000:] if server.poll() is not None else "")
        rows = [row for f in sorted((project / "data" / "stream" / "window-000").iterdir()) for row in landed_rows(f)]
        with httpx.Client(base_url="http://127.0.0.1:8000", headers=headers, timeout=30) as client:
            for row in rows[:100]:
                answer = client.post("/v1/predict", json={"texts": [row["text"]]})
                assert answer.status_code == 200, answer.text
                given = client.post("/v1/feedback", json={"request_id": answer.json()["request_id"], "label": row["label"]})
                assert given.status_code == 202, given.text
            info = client.get("/v1/model").json()
        recorded = info["prediction_log"]["recorded"]
        assert info["prediction_log"]["dropped"] == 0 and info["shadow"]["alias"] == "challenger", info
        store = project / "lifelong-store" / "predictions" / "tiny-topics"
        deadline = time.monotonic() + 30  # written within serve.log_predictions.flush_interval_s (5 s)
        while not (list(store.glob("answers/*/*.parquet")) and list(store.glob("feedback/*/*.parquet"))) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        out = stop_server(server)
    assert server.returncode in (0, 130, -signal.SIGINT), out[-4000:]
    answers = list((project / "lifelong-store" / "predictions" / "tiny-topics" / "answers").rglob("*.parquet"))
    labels = list((project / "lifelong-store" / "predictions" / "tiny-topics" / "feedback").rglob("*.parquet"))
    assert answers and labels and recorded > 0, (answers, labels, recorded)


def look_at_the_dashboard(project: Path, env: dict) -> None:
    """`lifelong ui …` on the store so far: the overview lists its models, a model's page the
    rollback just made, the live page says nothing serves yet; then Ctrl-C."""
    server = start_server(["bash", "-c", UI], cwd=project, env=env)
    try:
        answering("http://127.0.0.1:8270/healthz", server, 120, lambda: server.stdout.read()[-4000:] if server.poll() is not None else "")
        overview = httpx.get("http://127.0.0.1:8270/", timeout=30).text
        assert "tiny-gpt2" in overview and "tiny-topics" in overview, overview[-3000:]
        model = httpx.get("http://127.0.0.1:8270/models/tiny-topics", timeout=30).text
        assert "<td>rollback</td>" in model and 'id="promote"' in model, model[-3000:]  # the token allows actions
        live = httpx.get("http://127.0.0.1:8270/live", timeout=30)
        assert live.status_code == 200 and "ConnectError" in live.text, live.text[-2000:]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        out, _ = server.communicate(timeout=60)
    assert server.returncode in (0, 130, -signal.SIGINT) and "lifelong ui: http://127.0.0.1:8270/" in out, out[-4000:]


def ask_the_language_model(project: Path, env: dict) -> None:
    """The README's requests to tiny-gpt2@champion: curl, streamed and not, then its OpenAI-client snippet."""
    text = README.read_text().split("### Serving", 1)[1]
    blocks = text.split("```")[1::2]
    curl = next(b for b in blocks if b.strip().startswith(SERVE_LM.removeprefix("exec ")))
    for line in (line.strip() for line in curl.splitlines() if line.startswith("curl")):
        done = sh(line, project, env, timeout=60)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        if '"stream": true' in line:  # server-sent events, the last one the summary
            events = [json.loads(e[6:]) for e in done.stdout.splitlines() if e.startswith("data: ")]
            assert len(events) >= 2 and events[-1]["done"] and events[-1]["model"] == "tiny-gpt2", (line, done.stdout)
            continue
        answer = json.loads(done.stdout)
        kind = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}
        path = next((p for p in kind if p in line), None)
        if path:
            assert answer["object"] == kind[path] and answer["model"] == "tiny-gpt2" and answer["usage"]["completion_tokens"] <= 20, answer
        else:
            assert answer["model"] == "tiny-gpt2" and answer["version"] in (1, 2) and answer["tokens"] <= 20, (line, answer)
    snippet = next(b for b in blocks if b.startswith("python\n") and "from openai import OpenAI" in b).removeprefix("python\n")
    (project / "openai_snippet.py").write_text(snippet)
    done = sh(".venv/bin/python openai_snippet.py", project, env, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)


def image_serving_examples() -> list[str]:
    """The curl lines of the README's block that serves the digits ResNet."""
    text = README.read_text().split("### Serving", 1)[1]
    block = next(b for b in text.split("```")[1::2] if b.strip().startswith(SERVE_IMAGES.removeprefix("exec ")))
    return [line.strip() for line in block.splitlines() if line.startswith("curl")]


def serving_examples() -> list[str]:
    """The curl lines of the README's Serving section, without their comments."""
    text = README.read_text().split("### Serving", 1)[1]
    block = text.split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("curl")]
