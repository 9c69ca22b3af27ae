"""A continual cycle in a process of its own that SIGKILLs itself at one step boundary.

    python tests/cycle_child.py RAY_ADDRESS STEP CONFIG [key=value ...]

Used by the fault-injection drill (tests/test_continual.py): the kill is real (no cleanup, no
finally blocks, the stream lock released only by the kernel); where it lands is chosen by
wrapping the library function that ends (or begins) that step, here in the test's helper, not
by any switch in the product code.
"""

import glob
import os
import signal
import sys
import threading
import time

from lifelong.config import load_config
from lifelong.continual import ledger, stream
from lifelong.continual.cycle import run_cycle
from lifelong.registry import Registry
from lifelong.runtime import connect
from lifelong.storage import Storage
from lifelong.train import driver


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after(owner, name, when=lambda *a, **k: True):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args, **kwargs):
            print(f"[child] killed after {name}", flush=True)
            die()
        return out

    setattr(owner, name, wrapped)


def before(owner, name):
    def wrapped(*args, **kwargs):
        print(f"[child] killed before {name}", flush=True)
        die()

    setattr(owner, name, wrapped)


def during_training(root: str) -> None:
    """Die once the window's run has written a checkpoint, while Ray Train is still running it."""

    def watch():
        while not glob.glob(os.path.join(root, "runs", "*-w*", "checkpoint_*", "state.json")):
            time.sleep(0.2)
        print("[child] killed during training (a checkpoint is on disk)", flush=True)
        die()

    threading.Thread(target=watch, daemon=True).start()


def during_search_trial(root: str, trial: int) -> None:
    """Die once trial `trial` of a continual.search has written a checkpoint (it is training)."""

    def watch():
        while not glob.glob(os.path.join(root, "runs", f"*-w*-s{trial}", "checkpoint_*", "state.json")):
            time.sleep(0.2)
        print(f"[child] killed during search trial {trial} (a checkpoint is on disk)", flush=True)
        die()

    threading.Thread(target=watch, daemon=True).start()


address, step, config_path, *overrides = sys.argv[1:]
config = load_config(config_path, overrides)
kills = {
    "after-scan": lambda: after(ledger.Ledger, "scan"),
    "after-read": lambda: after(ledger.Ledger, "check_pending"),
    "after-holdout": lambda: after(Storage, "write_table", when=lambda self, rel, table: "/holdouts/" in rel),
    "during-training": lambda: during_training(config.storage.root),
    "during-search-trial-1": lambda: during_search_trial(config.storage.root, 1),
    "after-register": lambda: after(driver, "register_best"),
    "after-promote": lambda: after(Registry, "move_alias"),
    "after-consume": lambda: after(ledger.Ledger, "consume"),
    "before-state": lambda: before(stream.Stream, "finish"),
    "after-state": lambda: after(stream.Stream, "finish"),
}
kills[step]()
connect(address)
outcome = run_cycle(config)
print(outcome.summary(), flush=True)
print(f"[child] the cycle ended without reaching '{step}'", flush=True)
sys.exit(3)
