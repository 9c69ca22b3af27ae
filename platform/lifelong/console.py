"""What a command shows: the platform's own story on the console, everything else in a log file.

Every command calls `quiet(root, name)` before its heavy imports. From then on the process's
standard output and error (file descriptors 1 and 2, so C++ libraries and child processes write
there too) go to `logs/<time>-<name>-<pid>.log` under the storage root, and only `console`
(the story) and `errors` (one line per error) keep the terminal. Ray forwards every worker's
output to the driver; `quiet` listens there too: a worker's `[lifelong]` line is shown (a step
line moves the training bar instead), the rest stays in the file. An uncaught exception leaves
its traceback in the file and one line on the terminal.

`--verbose` or LIFELONG_LOG_LEVEL=INFO (or DEBUG) keeps everything on the console as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

LOG_LEVEL_ENV = "LIFELONG_LOG_LEVEL"
PREFIX = "[lifelong] "
# What rank 0 writes every few optimizer steps (train/loop.py): it moves the training bar.
STEP = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+) loss (\S+) lr (\S+)")

# Long lines stay whole (logs get grepped); tables still fit the width.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


@dataclass
class _State:
    log: Path | None = None  # the log file, once quiet
    progress: Progress | None = None  # the live display, on a terminal
    bar: tuple[Progress, int] | None = None  # the training run's line on it
    cycle: tuple | None = None  # the running cycle's line on it, and its title
    sweep: SweepBar | None = None  # the running sweep: its trials' workers' lines stay in the file
    trial_pids: set = field(default_factory=set)  # the workers that spoke during a sweep
    said: dict = field(default_factory=dict)  # pid → the lines shown from it


_state = _State()


def say(text: str) -> None:
    """One line of the platform's story (as written: `[haproxy]` is not markup)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def detail(text: str) -> None:
    """A line for the log file: on the console only with --verbose (or before `quiet`)."""
    print(text, flush=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """End a script with one line on the terminal's stderr (`sys.exit(text)` writes to fd 2,
    which `quiet` gave to the log file)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def library_level() -> int:
    """The level Ray's own loggers log at: LIFELONG_LOG_LEVEL's; INFO into a log file; else
    WARNING (a process that is not quiet, such as a test's, keeps its console for itself)."""
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if level:
        return getattr(logging, level, logging.INFO)
    return logging.INFO if _state.log is not None else logging.WARNING


def log_dir(root: str) -> Path:
    """`logs/` under a local storage root; for a URI root, LIFELONG_LOG_DIR or ~/.cache/lifelong/logs."""
    if os.environ.get("LIFELONG_LOG_DIR"):
        return Path(os.environ["LIFELONG_LOG_DIR"])
    if "://" in root and not root.startswith("file://"):
        return Path.home() / ".cache" / "lifelong" / "logs"
    return Path(root.removeprefix("file://")) / "logs"


def quiet(root: str, name: str) -> Path | None:
    """Send library, Ray and worker output to a log file (its path said once); returns it, or
    None when LIFELONG_LOG_LEVEL asks for everything on the console or this process's output is
    not its own (sys.stdout replaced: a notebook, a test's capture). Once per process."""
    if _state.log is not None:
        return _state.log
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if level:
        logging.basicConfig(level=getattr(logging, level, logging.INFO))
        return None
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return None  # output someone else already took (a notebook, a test's capture, a host program) stays theirs
    path = log_dir(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    console.file = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    errors.file = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _state.log = path
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a pipe or a file: tables need not fit 80 columns
        console.width = errors.width = 160
    # Ray Data's progress bars, redrawn many times a second, are noise in a file (the variable
    # reaches the Ray processes this one starts; the context, a Ray Data imported already).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "ray.data.context" in sys.modules:
        sys.modules["ray.data.context"].DataContext.get_current().enable_progress_bars = False
    sys.excepthook = _excepthook(sys.excepthook, path)
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.add_handler("lifelong_console", _from_workers)
    console.print(f"[dim]logs: {escape(str(path))}[/]", highlight=False)
    return path


def _excepthook(default, path: Path):
    def hook(kind, value, tb) -> None:
        default(kind, value, tb)  # the traceback, into the log file
        if not issubclass(kind, KeyboardInterrupt):
            errors.print(
                f"[bold red]error:[/] {escape(f'{kind.__name__}: {value}'.splitlines()[0][:500])} (traceback in {path})",
                highlight=False,
                soft_wrap=True,
            )

    return hook


def _from_workers(data: dict) -> None:
    """Ray's log monitor hands the driver each batch of a worker's lines (all of them also go to
    the log file through Ray's own handler)."""
    if data.get("is_err"):
        return
    pid = data.get("pid")
    for line in data.get("lines", ()):
        if not line.startswith(PREFIX):
            continue
        step = STEP.match(line, len(PREFIX))
        if step:
            _step(*step.groups())
        elif _state.sweep is not None or pid in _state.trial_pids:
            _state.trial_pids.add(pid)  # a trial's lines arrive late too, after the sweep's end
        elif _state.cycle is not None:
            continue  # the cycle's summary says what its training came to
        elif line not in _state.said.setdefault(pid, set()):  # a warm actor's set-up lines, each cycle: said once
            _state.said[pid].add(line)
            say(line)


def _step(epoch: str, epochs: str, step: str, steps: str, loss: str, lr: str) -> None:
    if _state.bar is None:
        return
    progress, task = _state.bar
    per_epoch, total = int(steps), int(epochs) * int(steps)
    done = (int(epoch) - 1) * per_epoch + int(step)
    progress.update(task, total=total, completed=done, shown=f"step {done}/{total} loss {loss} lr {lr}")


@contextlib.contextmanager
def _task(description: str, total: int | None):
    """A line on the one live display (started here when none is): on a terminal, when quiet;
    yields (progress, task), else None."""
    if _state.log is None or not console.is_terminal:
        yield None
        return
    own = _state.progress is None
    if own:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[shown]}"))
        _state.progress = Progress(
            *columns, TimeRemainingColumn(), console=console, transient=True, redirect_stdout=False, redirect_stderr=False
        )
        _state.progress.start()
    progress = _state.progress
    task = progress.add_task(description, total=total, shown="")
    try:
        yield progress, task
    finally:
        progress.remove_task(task)
        if own:
            progress.stop()
            _state.progress = None


@contextlib.contextmanager
def training_bar(run: str, total_steps: int):
    """On a terminal: a bar of the run's optimizer steps with the latest loss, learning rate and
    the time left (rank 0's step lines move it); elsewhere the epoch lines tell the story."""
    with _task(f"training {run}", total_steps) as bar:
        _state.bar = bar
        try:
            yield
        finally:
            _state.bar = None


@contextlib.contextmanager
def cycle_bar(title: str):
    """On a terminal: the cycle's current phase (`phase`) on the live display."""
    with _task(title, None) as bar:
        _state.cycle = (bar, title)
        try:
            yield
        finally:
            _state.cycle = None


def phase(text: str) -> None:
    """The running cycle's phase: on its line on a terminal, and in the log file."""
    if _state.cycle is None:
        return
    bar, title = _state.cycle
    detail(f"[lifelong] {title}: {text}")
    if bar is not None:
        bar[0].update(bar[1], shown=text)


def sweep_bar() -> SweepBar:
    """The running sweep's bar (Tune's callbacks are pickled with its state: they look it up)."""
    return _state.sweep or SweepBar("", 0, "")


class SweepBar:
    """A sweep's trials on a terminal: done, running, stopped early, errored and the best so far
    (the counts are its Tune callback's). While it runs, the trials' workers' own lines stay in
    the log file."""

    def __init__(self, name: str, trials: int, metric: str):
        self.name, self.trials, self.metric = name, trials, metric
        self._bar = None

    def __enter__(self) -> SweepBar:
        _state.sweep = self
        self._context = _task(f"sweep {self.name}", self.trials)
        self._bar = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        _state.sweep = None
        self._context.__exit__(*exc)

    def show(self, counts: dict, best: float | None) -> None:
        if self._bar is None:
            return
        done = counts["finished"] + counts["stopped"] + counts["errored"]
        shown = f"{done}/{self.trials} trials: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        if best is not None:
            shown += f"; best {self.metric} {best:.4g}"
        self._bar[0].update(self._bar[1], completed=done, shown=shown)
