"""`lifelong continual CONFIG` (and jobs/continual.py): cycles until stopped.

A cycle that fails (the store unreachable, the landing zone unmounted, a training run that
crashed) is reported in one line, its traceback goes to a log file, and the daemon waits
longer before the next try (doubling up to 10 poll intervals), then goes on. Its window stays
unfinished on the storage root, so the next cycle carries it on; nothing is lost by failing.
"""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from lifelong import notify
from lifelong.config import JobConfig
from lifelong.continual.cycle import run_cycle, stream_name
from lifelong.errors import LifelongError, first_line
from lifelong.storage import local_cache_dir


def backoff(poll_interval_s: float, failures: int) -> float:
    """Seconds to wait after `failures` failed cycles in a row (0: the plain poll interval)."""
    return min(poll_interval_s * 2**failures, poll_interval_s * 10) if failures else poll_interval_s


def run_cycles(config: JobConfig, *, once: bool = False, force: bool = False, show=print, sleep=time.sleep) -> None:
    """One cycle (`once`: its errors propagate), or cycles every poll interval until interrupted."""
    failures, last_wait = 0, None
    log = local_cache_dir("logs") / f"continual-{stream_name(config)}.log"
    while True:
        if once:
            try:
                outcome = run_cycle(config, force=force)
            except Exception as e:
                _failed(config, e, 1)
                raise
            show(outcome.summary())
            return
        try:
            outcome = run_cycle(config, force=force)
            failures = 0
            # Polls that find nothing new and wait for the same reason are said once, not every poll.
            wait = _same_wait(outcome)
            if wait is None or wait != last_wait:
                show(outcome.summary())
            last_wait = wait
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            failures += 1
            first = first_line(e, 400)
            if isinstance(e, LifelongError):  # a message for people: it says what and where
                said = first
            else:  # a bug or an unexpected failure: the traceback is kept for whoever looks into it
                _log(log, e)
                said = f"{type(e).__name__}: {first} (traceback in {log})"
            _failed(config, e, failures)
            show(
                f"cycle failed ({failures} in a row): {said}\n  next try in {backoff(config.continual.poll_interval_s, failures):.0f} s; "
                "the stream carries on where it stopped"
            )
        sleep(backoff(config.continual.poll_interval_s, failures))


def _failed(config: JobConfig, error: Exception, in_a_row: int) -> None:
    notify.event(
        "cycle.failed",
        config.notify,
        model=config.name,
        stream=stream_name(config),
        error=f"{type(error).__name__}: {first_line(error, 400)}",
        failures_in_a_row=in_a_row,
    )


def _same_wait(outcome) -> tuple | None:
    """What makes a waiting poll worth printing again (None: the cycle did something)."""
    if outcome.status != "waiting" or outcome.quarantined or any(" 0 new file(s)" not in f" {line}" for line in outcome.scan[:1]):
        return None
    return (outcome.reason.split(" (")[0], tuple(outcome.scan[1:]))


def _log(path: Path, error: Exception) -> None:
    with open(path, "a") as f:
        f.write(f"--- {datetime.now(timezone.utc).isoformat()} ---\n")
        f.write("".join(traceback.format_exception(error)))
