"""What a user sees: the platform's story on the console, library and Ray output in the log file
(lifelong.console), for a whole `make quickstart` and for each way output reaches a process."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_project

# Every way output reaches a driver: a C library writing to fd 1, print(), logging (Ray's and
# Python's), a warning, a child process, the platform's own line, an uncaught exception.
NOISY = """
import logging, os, subprocess, sys, warnings
from lifelong.console import quiet, say
print("log:", quiet(sys.argv[1], "drill"), flush=True)
os.write(1, b"C-level write\\n")
print("a library's print()")
logging.getLogger("ray.data").warning("a Ray Data warning")
logging.getLogger("some.library").warning("a library warning")
warnings.warn("a deprecation", FutureWarning)
subprocess.run([sys.executable, "-c", "print('a child process')"])
say("[lifelong] the platform's own line")
raise RuntimeError("boom")
"""

LIBRARY_LINES = ("C-level write", "a library's print()", "a Ray Data warning", "a library warning", "a deprecation", "a child process")


def run_noisy(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIFELONG_")}
    return subprocess.run(
        [sys.executable, "-c", NOISY, str(tmp_path / "store")], capture_output=True, text=True, timeout=120, env={**environ, **env}
    )


def test_a_quiet_command_keeps_its_story_on_the_console_and_the_rest_in_its_log_file(tmp_path):
    done = run_noisy(tmp_path)
    assert done.returncode == 1
    log = next((tmp_path / "store" / "logs").glob("*-drill-*.log"))
    shown = [line for line in done.stdout.splitlines() if line.strip()]
    assert shown == [f"logs: {tmp_path / 'store' / 'logs' / log.name}", "[lifelong] the platform's own line"], done.stdout
    # The error: one line on the terminal, its traceback in the file.
    assert done.stderr.strip().splitlines() == [f"error: RuntimeError: boom (traceback in {log})"], done.stderr
    text = log.read_text()
    for line in (*LIBRARY_LINES, "Traceback (most recent call last)"):
        assert line in text, (line, text)
    assert "the platform's own line" not in text


def test_lifelong_log_level_keeps_everything_on_the_console(tmp_path):
    done = run_noisy(tmp_path, LIFELONG_LOG_LEVEL="INFO")
    out = done.stdout + done.stderr
    for line in (*LIBRARY_LINES, "the platform's own line", "Traceback (most recent call last)"):
        assert line in out, (line, out)
    assert "log: None" in done.stdout and not (tmp_path / "store" / "logs").exists()


def test_lifelong_verbose_is_an_option_of_every_command(tmp_path):
    root = str(tmp_path / "store")
    for args in (["--verbose", "models", "list", "--root", root], ["-v", "models", "list", "--root", root]):
        done = subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    helped = subprocess.run([sys.executable, "-m", "lifelong.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert "--verbose" in helped.stdout and "logs/" in " ".join(helped.stdout.split())


# Rank 0's step lines, as Ray's log monitor hands them to the driver, move the training bar on a
# terminal; its other lines print above the bar; a sweep's trials' lines stay in the file.
ON_A_TERMINAL = """
import sys, time
from lifelong.console import SweepBar, _from_workers, quiet, training_bar
quiet(sys.argv[1], "bar")
with training_bar("run-a", 98):
    step = "[lifelong] epoch 1/2 step 20/49 loss 7.1521 lr 1.87e-03"
    _from_workers({"pid": 7, "lines": ["[lifelong] worker 0/1 on node abc (cpu)", step]})
    time.sleep(0.5)
    _from_workers({"pid": 7, "lines": ["not ours", "[lifelong] epoch 1 done: val_loss 6.4"]})
    _from_workers({"pid": 7, "lines": ["[lifelong] worker 0/1 on node abc (cpu)"]})  # said already
    time.sleep(0.5)
with SweepBar("sweep-b", 4, "val_loss") as bar:
    bar.show({"running": 0, "finished": 1, "stopped": 0, "errored": 0}, 0.25)
    _from_workers({"pid": 8, "lines": ["[lifelong] a trial's line"]})
    time.sleep(0.5)
_from_workers({"pid": 8, "lines": ["[lifelong] a trial's late line"]})
print("end", file=sys.__stdout__, flush=True)
"""


def test_on_a_terminal_step_lines_move_a_training_bar_and_a_sweep_shows_its_trials(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdout is the terminal
        os.environ["COLUMNS"] = "160"
        os.execv(sys.executable, [sys.executable, "-c", ON_A_TERMINAL, str(tmp_path / "store")])
    seen, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    os.waitpid(pid, 0)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert "training run-a" in screen and "step 20/98 loss 7.1521 lr 1.87e-03" in screen, screen
    assert screen.count("[lifelong] worker 0/1 on node abc (cpu)") == 1 and "[lifelong] epoch 1 done: val_loss 6.4" in screen, screen
    assert "sweep sweep-b" in screen and "1/4 trials: running 0, finished 1, stopped 0, errored 0; best val_loss 0.25" in screen, screen
    assert "a trial's" not in screen and "not ours" not in screen, screen


@pytest.mark.slow
def test_make_quickstart_reads_as_a_story_in_under_a_hundred_lines(tmp_path):
    """The whole lifecycle as a new user runs it (a fresh copy of the project, this environment): each
    stage's summary on the console, no library line among them, and the library lines in the log
    file whose path it printed first."""
    project = tmp_path / "project"
    copy_project(project)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LIFELONG_"))}
    # This checkout's environment by its own path (through a symlink DeepSpeed would compile its
    # ops again for that spelling of the path: lifelong.train.ops), and never its setup (-o: the
    # stamp counts as made; run from the copy, it would point the editable install at the copy).
    venv = f"{ROOT}/.venv"
    make = ["make", "--no-print-directory", "quickstart", f"VENV={venv}", "-o", f"{venv}/.installed"]
    done = subprocess.run(make, cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    echoed = done.stdout.splitlines()  # make echoes its command first
    lines = echoed[echoed.index(f"HF_HUB_OFFLINE=1 {venv}/bin/python jobs/quickstart.py") + 1 :]
    story = "\n".join(lines)
    assert len(lines) < 100, f"{len(lines)} lines:\n{story}"
    assert done.stderr == "", done.stderr[-3000:]
    for summary in (
        "registered tiny-gpt2:1",  # 1: pretraining
        "registered as tiny-topics:1 with alias champion",  # 2: the sweep
        "/v1/predict → version 1",  # 3: serving
        "cycle of stream 'quickstart-",  # 4: the cycles
        "the endpoint now serves version 4 (champion 4)",
        "accuracy matrix R[i][j]",  # 5: the summary
        "failed requests: 0",
        "quickstart done in",
    ):
        assert summary in story, (summary, story)
    for noise in ("Setting accelerator", "RayTrainWorker", "TrainController", "WARNING", "Traceback", "deprecated", "Loading"):
        assert noise not in story, (noise, story)
    log = project / lines[0].removeprefix("logs: ")
    text = log.read_text()
    for library in ("Setting accelerator to CPU", "(RayTrainWorker pid=", "(TrainController pid=", "Started a local Ray instance"):
        assert library in text, (library, text[-3000:])


def test_output_that_a_host_program_took_stays_its_own(tmp_path, capsys):
    """In a notebook, under a test's capture or inside another program (sys.stdout replaced), a
    command run in-process leaves the process's output where its host put it."""
    from lifelong.console import quiet, say

    assert quiet(str(tmp_path / "store"), "hosted") is None
    say("[lifelong] still here")
    assert "[lifelong] still here" in capsys.readouterr().out and not (tmp_path / "store" / "logs").exists()


def test_verbose_travels_with_a_submitted_job(monkeypatch):
    from lifelong.submit import job_env

    monkeypatch.delenv("LIFELONG_LOG_LEVEL", raising=False)
    assert "LIFELONG_LOG_LEVEL" not in job_env() and job_env()["PYTHONPATH"] == "platform"
    monkeypatch.setenv("LIFELONG_LOG_LEVEL", "INFO")
    assert job_env()["LIFELONG_LOG_LEVEL"] == "INFO"
