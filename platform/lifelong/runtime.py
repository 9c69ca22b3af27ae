"""Connecting to Ray: an existing cluster (--address / RAY_ADDRESS) or an embedded local one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import ray

from lifelong.console import library_level, say
from lifelong.errors import LifelongError, first_line


def connect(
    address: str | None = None, num_cpus: int | None = None, min_cpus: float = 0, dashboard: bool = False, dashboard_port: int | None = None
) -> str:
    """Join a cluster when an address is given (argument, then RAY_ADDRESS); else start one here.

    An embedded Ray gets more logical CPUs than the machine's cores when needed, so that the
    training workers and the Ray Data tasks feeding them can all be scheduled. `dashboard`
    starts its dashboard too: sweeps of multi-worker trials need the state API it serves,
    without which Ray Train cannot free the workers of a trial that the scheduler stopped early.
    `dashboard_port` places it; by default it takes a free port, never Ray's 8265, which belongs
    to a cluster's head (cluster/local.sh binds it, and `lifelong submit --address` names it): an
    embedded sweep that took it would keep a local cluster from starting.
    Returns a short description of what it connected to.
    """
    if ray.is_initialized():
        return "the Ray session already running in this process"
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Data's own progress bars would interleave with the training progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if address:
        _reachable(address)
        try:
            ray.init(address=address, logging_level=library_level())
        except ConnectionError as e:
            raise LifelongError(
                f"no Ray cluster answers at {address} ({first_line(e, 200)}): check --address / RAY_ADDRESS "
                "(the GCS address, host:6379, or ray://host:10001), that the cluster is up, and RAY_AUTH_TOKEN if it requires a token"
            ) from None
        return f"Ray cluster at {address}"
    cpus = num_cpus or max(os.cpu_count() or 1, int(min_cpus) + 2, 4)
    if dashboard and dashboard_port is None:
        dashboard_port = free_port()
    for attempt in range(1, START_ATTEMPTS + 1):
        before = _children()
        try:
            ray.init(
                num_cpus=cpus,
                include_dashboard=dashboard,
                dashboard_port=dashboard_port,
                logging_level=library_level(),
                _system_config=EMBEDDED_SYSTEM_CONFIG,
            )
            break
        except Exception as e:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e):
                raise
            for pid in _children() - before:  # the half-started GCS and raylet of this attempt
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            load = os.getloadavg()[0]
            if attempt == START_ATTEMPTS:
                raise LifelongError(
                    f"the embedded Ray did not start: its raylet did not register within Ray's 30 s, {START_ATTEMPTS} times "
                    f"(load average {load:.1f} on {os.cpu_count()} CPUs): the machine is too busy; try again when it is not"
                ) from None
            say(f"[lifelong] the embedded Ray did not start within Ray's 30 s (load average {load:.1f}): starting it again")
    # Nothing preempts this machine's own Ray: Ray Train's preemption watcher (an actor per run,
    # ~2.7 CPU-s of a 2-worker tiny run here) watches for nothing. Ray Train hands the setting on
    # to its controller; a value the user set wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return f"an embedded local Ray ({cpus} logical CPUs)"


# Ray starts a worker process per logical CPU when the first driver connects, whether or not
# anything will run there: `lifelong evaluate` left 4 of them idle (4.5 of its 20 CPU-s, measured
# 2026-12-03). An embedded Ray starts each worker when a task or actor first needs it.
EMBEDDED_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


# Ray gives a local node's raylet a fixed 30 s to register; on a machine loaded far past its
# cores (seen under `make test`: load 9-12 on 2 cores) it can miss that, once.
START_ATTEMPTS = 3


def _children() -> set[int]:
    """This process's child processes (Linux /proc; elsewhere none are known)."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == me:
                    out.add(int(entry))
    return out


def free_port() -> int:
    """A TCP port nothing on this machine listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(address: str) -> None:
    """Refuse an address nothing listens on in seconds (ray.init retries it for minutes)."""
    if address == "auto" or address.startswith(("http://", "https://")):
        if address != "auto":
            raise LifelongError(
                f"--address / RAY_ADDRESS {address} is a dashboard URL: this command joins the cluster itself and needs "
                "the GCS address (host:6379) or ray://host:10001; 'lifelong submit' and 'lifelong jobs' take the dashboard URL"
            )
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise LifelongError(
            f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}): check --address / RAY_ADDRESS, "
            "that the cluster is up and reachable from here, and RAY_AUTH_TOKEN if it requires a token"
        ) from None


# How long tasks may be outstanding before `gather` says so (and again after each as long).
WAIT_NOTICE_S = 60.0


def gather(refs: list, what: str) -> list:
    """ray.get(refs), saying so on the console while they are outstanding: tasks that no free CPU
    can take (every one held by other work, or reserved by a placement group that outlived its
    run) would otherwise wait silently, and a continual loop left alone would look hung."""
    pending, started = list(refs), time.monotonic()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_NOTICE_S)
        if pending:
            free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
            say(
                f"[lifelong] {what}: {len(pending)} of {len(refs)} task(s) not done after {time.monotonic() - started:.0f} s; "
                f"the cluster has {free:g} of {total:g} CPUs free now; still waiting"
            )
    return ray.get(refs)


def release_orphaned_workers(left_by: str) -> list[str]:
    """Give back what Ray Train runs of this driver left reserved when their controller died (a
    killed run, a trial that its sweep stopped): one line each, naming `left_by`. Returns them.

    Ray Train reserves a run's workers in a placement group created by the run's controller and
    relies on a cleaner actor, which asks the state API (the dashboard) whether the controller
    lives, to remove it if the controller dies. Without the dashboard (an embedded Ray here, many
    clusters) the cleaner never learns, and the reservation outlives the run for as long as this
    driver lives: a daemon's cycles, sweep after sweep in a notebook, would each lose CPUs for
    good. The GCS's own table tells it directly: a placement group of this job whose creating
    actor is dead is no one's. (The cleaner actor itself, holding no CPU, stays: Ray gives no way
    to end an actor this driver holds no handle to.)
    """
    return _release_orphans(_placement_groups(), left_by)[0] if ray.is_initialized() else []


def _release_orphans(groups: list, left_by: str) -> tuple[list[str], set[bytes]]:
    """Of `groups`, remove those whose creating actor is dead (one line each); returns what was
    released and the ids of the groups still held."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    released, held = [], set()
    for pg in groups:
        nil_creator = pg.creator_actor_id == b"\xff" * len(pg.creator_actor_id)
        if nil_creator or not pg.creator_actor_dead:
            held.add(pg.placement_group_id)
            continue
        cpus = sum(b.unit_resources.get("CPU", 0) for b in pg.bundles)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        released.append(f"placement group {pg.placement_group_id.hex()[:12]} ({cpus:g} CPUs)")
        say(f"[lifelong] released {released[-1]} left by {left_by}")
    return released, held


def _placement_groups() -> list:
    """This job's placement groups that are not removed and not detached, as the GCS records them."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job, out = ray.get_runtime_context().get_job_id(), []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.creator_job_id.hex() == job and not pg.is_detached and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            out.append(pg)
    return out


def reserved_groups() -> set[bytes]:
    """The ids of this job's placement groups now (for `release_when_settled`)."""
    return {pg.placement_group_id for pg in _placement_groups()} if ray.is_initialized() else set()


def release_when_settled(before: set[bytes], left_by: str, timeout: float = 30.0) -> list[str]:
    """After work whose Ray Train runs have all ended (a sweep): wait, at most `timeout` s, until
    every placement group this job made since `before` is removed by its controller or left by a
    dead one (released, one line each). A trial's controller ends after its trial does, and the
    GCS learns of its death later still: a check made the moment the sweep returned found it
    alive, and its 2 CPUs stayed held until something checked again (seen under `make test`)."""
    deadline, released = time.monotonic() + timeout, []
    while ray.is_initialized():
        done, held = _release_orphans(_placement_groups(), left_by)
        released += done
        if not held - before or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return released
