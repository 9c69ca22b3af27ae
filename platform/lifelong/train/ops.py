"""DeepSpeed's compiled CPU ops, built once per environment instead of once per HOME.

DeepSpeed compiles the C++ ops it uses on CPU (the shared-memory all-reduce of multi-worker runs,
the fused AdamW every run steps with, the CPU Adam of `offload_optimizer`) the first time a
process needs them, a minute or more each on a small machine, into ~/.cache/torch_extensions.
A node with a fresh HOME (a container, a CI runner, a second user) paid that again inside its
first training run. `python -m lifelong.train.ops` builds them into the environment itself
(`make setup` and the cluster image run it), and training workers load them from there.

Two things make a build that exists get compiled again, and both are pinned here: the directory
(one per spelling of the environment's path, below) and the ninja that checks it. ninja keeps a
hash of every command it ran in the build's log and reruns a command whose hash differs, and
releases hash differently (1.11 and 1.12+): a build checked by another ninja than the one that
made it is compiled again whole, and back again when the first one checks it next. Which ninja
torch runs is whichever comes first on PATH (a system one for `make setup`, the environment's
own under `ray start` from its bin directory), so both here put the environment's own first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

# Next to the interpreter and the packages the ops are compiled against: a new torch or
# DeepSpeed comes with a new environment, and with it a new build. One build per spelling of
# the environment's path (a symlink, a second mount): the include paths in an op's build file
# are spelled as Python found its packages, and a build file that changes is rebuilt, so two
# spellings sharing one directory would recompile each other's ops on every switch.
EXTENSIONS_ROOT = Path(sys.prefix) / "var" / "torch_extensions"
EXTENSIONS_DIR = EXTENSIONS_ROOT / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
# DeepSpeed's op builder names (deepspeed.ops.op_builder.cpu): what every run uses on CPU, and
# the CPU Adam that only `train.deepspeed.offload_optimizer` does (`--offload` builds it too).
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
OFFLOAD_OPS = ("CPUAdamBuilder",)


def use_prebuilt() -> None:
    """Point this process's DeepSpeed at the environment's built ops, where the environment has
    them (`build` ran) and is writable (an op built later lands there too, once per spelling of
    its path); an explicit TORCH_EXTENSIONS_DIR wins."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and EXTENSIONS_ROOT.is_dir() and os.access(EXTENSIONS_ROOT, os.W_OK):
        EXTENSIONS_DIR.mkdir(exist_ok=True)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS_DIR)
    _own_ninja_first()
    _cpu_info_once()


def _cpu_info_once() -> None:
    """DeepSpeed derives an op's compiler flags from py-cpuinfo each time it loads the op (twice
    an op), and py-cpuinfo asks a new Python process each time: ~1.2 s a question here, 2-4 per
    training worker's start (measured 2026-12-03). The answer is kept, per process and in a file
    per CPU (vendor, model and flags as the kernel lists them) next to the ops, and given again."""
    try:
        import cpuinfo
    except ImportError:
        return
    ask = getattr(cpuinfo.get_cpu_info, "__wrapped__", cpuinfo.get_cpu_info)  # py-cpuinfo's own
    kept = _cpu_info_file()

    @functools.cache
    def get_cpu_info() -> dict:
        if kept is None:
            return ask()
        try:
            return json.loads(kept.read_text())
        except (OSError, ValueError):  # not kept yet (or cut short): asked, then kept
            info = ask()
        try:
            part = kept.with_suffix(f".{os.getpid()}.part")
            part.write_text(json.dumps(info))
            part.replace(kept)
        except OSError:  # not writable: this process keeps it
            pass
        return info

    get_cpu_info.__wrapped__ = ask
    cpuinfo.get_cpu_info = get_cpu_info


def _cpu_info_file() -> Path | None:
    """Where py-cpuinfo's answer for this machine's CPU is kept; None where the kernel lists no
    CPU to key it by (then each process asks once)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    keys = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features", "CPU part")
    described = sorted({line for line in lines if line.split(":", 1)[0].strip() in keys})
    if not described:
        return None
    key = hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)) / f"cpuinfo-{key}.json"


def _own_ninja_first() -> None:
    """The environment's ninja (the `ninja` package DeepSpeed requires) first on this process's
    PATH, for the builds and checks torch runs from here (see the module's docstring)."""
    try:
        import ninja
    except ImportError:  # none in the environment: the system's, for builds and checks alike
        return
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [ninja.BIN_DIR]:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, *path])


def build(names: tuple[str, ...] = CPU_OPS) -> list[str]:
    """Build the CPU ops into EXTENSIONS_DIR (already built ones load in a second). Returns what
    it built; on an accelerator other than the CPU it builds nothing (those compile on first use)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    Path(os.environ["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)
    _own_ninja_first()
    _cpu_info_once()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is not None:
            builder.load(verbose=False)
            built.append(name)
    return built


if __name__ == "__main__":
    names = build(CPU_OPS + OFFLOAD_OPS if "--offload" in sys.argv[1:] else CPU_OPS)
    where = os.environ["TORCH_EXTENSIONS_DIR"]
    print(f"DeepSpeed CPU ops built in {where}: {', '.join(names)}" if names else "no CPU ops to build on this accelerator")
