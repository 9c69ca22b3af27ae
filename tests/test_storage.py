"""Storage on a local root: locks that say who holds them and do not wait forever."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from lifelong.errors import LifelongError
from lifelong.storage import Storage

HOLD = """
import sys, time
from lifelong.storage import Storage
with Storage(sys.argv[1]).lock("streams/s/cycle"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_wait_is_bounded_and_names_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "platform")}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LifelongError) as caught:
            with Storage(str(tmp_path)).lock("streams/s/cycle", wait_s=1):
                pass
        assert f"{socket.gethostname()}:{child.pid}" in str(caught.value) and "still held" in str(caught.value)
        assert time.monotonic() - started < 5
    finally:
        child.kill()
        child.wait()
    with Storage(str(tmp_path)).lock("streams/s/cycle", wait_s=5) as hold:  # free again once its holder is gone
        hold.check()


def test_a_directory_created_while_it_is_listed_lists_as_empty_or_whole(tmp_path):
    """Two registrations of a new model race like this (CI saw one fail): one lists the versions
    directory while the other creates it; the listing must be empty or whole, never an error."""
    import threading

    store = Storage(str(tmp_path / "root"))
    failures = []

    def create(i):
        (tmp_path / "root" / f"d{i}").mkdir()
        (tmp_path / "root" / f"d{i}" / "1").mkdir()

    for i in range(3000):
        t = threading.Thread(target=create, args=(i,))
        t.start()
        try:
            assert store.listdir(f"d{i}") in ([], ["1"])
        except FileNotFoundError as e:
            failures.append(str(e))
        t.join()
    assert failures == [], f"{len(failures)} of 3000 listings failed, e.g. {failures[0]}"
