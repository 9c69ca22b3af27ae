"""DeepSpeed's CPU ops are loaded from the environment that `make setup` built them into, from a
fresh HOME too, each spelling of the environment's path has a build of its own, and no ninja
that comes first on a process's PATH makes it compile them again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CODE = (
    "import os; from lifelong.train import ops; ops.use_prebuilt(); "
    "d = os.environ['TORCH_EXTENSIONS_DIR']; print(d); print(sorted(p.name for p in __import__('pathlib').Path(d).rglob('*.so')))"
)


def extensions_dir(python: str, home: Path) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["HOME"] = str(home)
    done = subprocess.run([python, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, built = done.stdout.strip().splitlines()[-2:]
    return where, built


def test_a_fresh_home_loads_the_ops_setup_built_and_another_spelling_of_the_environment_builds_its_own(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    prefix = Path(sys.prefix)
    where, built = extensions_dir(str(prefix / "bin" / "python"), home)
    assert Path(where).parent == prefix / "var" / "torch_extensions"
    assert built == "['deepspeed_shm_comm.so', 'fused_adam.so']"  # what `make setup` built, found without HOME

    # The same environment through a symlink: its own directory, so neither rebuilds the other's ops.
    (tmp_path / "linked").symlink_to(prefix)
    other, _ = extensions_dir(str(tmp_path / "linked" / "bin" / "python"), home)
    try:
        assert Path(other).parent.resolve() == (prefix / "var" / "torch_extensions").resolve() and Path(other).name != Path(where).name
    finally:
        os.rmdir(other)  # empty: nothing was built through this spelling
    assert not (home / ".cache").exists()


def ninja_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


def test_a_build_is_not_compiled_again_whichever_ninja_comes_first_on_path(tmp_path):
    """ninja hashes the commands it ran into the build's log, differently from one release to the
    next: a build checked by another ninja than the one that made it used to be compiled again
    (seen: the suite's processes and its clusters' nodes, one with the system's ninja first on
    PATH and one with the environment's, recompiled both ops at every switch, ~70 s each)."""
    import ninja

    from lifelong.train import ops

    own = os.path.join(ninja.BIN_DIR, "ninja")
    elsewhere = [d for d in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin") if d and d != ninja.BIN_DIR]
    other = shutil.which("ninja", path=os.pathsep.join(elsewhere))
    if other is None or ninja_version(other) == ninja_version(own):
        pytest.skip(f"needs a second ninja of another release than the environment's {ninja_version(own)} (found: {other})")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["HOME"] = str(tmp_path)
    load = (
        "from lifelong.train import ops; ops.use_prebuilt(); "
        "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
    )
    first = {
        "system's ninja first": os.pathsep.join([os.path.dirname(other), env["PATH"]]),
        "environment's first": os.pathsep.join([ninja.BIN_DIR, env["PATH"]]),
    }
    done = subprocess.run([sys.executable, "-m", "lifelong.train.ops"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]  # as `make setup` runs it (a no-op where built)
    built = ops.EXTENSIONS_DIR / "deepspeed_shm_comm"
    before = ((built / "deepspeed_shm_comm.so").stat().st_mtime_ns, (built / ".ninja_log").read_text())
    for name, path in first.items():
        done = subprocess.run([sys.executable, "-c", load], env={**env, "PATH": path}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        after = ((built / "deepspeed_shm_comm.so").stat().st_mtime_ns, (built / ".ninja_log").read_text())
        assert after == before, f"with the {name} on PATH the op was compiled again"


ASKED = """
import sys, cpuinfo.cpuinfo
asked, own = [], cpuinfo.cpuinfo.get_cpu_info_json
cpuinfo.cpuinfo.get_cpu_info_json = lambda: asked.append(1) or own()  # where py-cpuinfo starts its process
if sys.argv[1] == "kept":
    from lifelong.train import ops
    ops.use_prebuilt()
from deepspeed.ops.op_builder.cpu import FusedAdamBuilder
flags = FusedAdamBuilder().cxx_args()  # what DeepSpeed works out each time it loads the op
print(len(asked), flags)
"""


def test_a_worker_asks_py_cpuinfo_once_per_cpu_not_twice_per_op(tmp_path):
    """DeepSpeed asks py-cpuinfo (a new Python process a question) twice each time it loads an
    op. The first worker on a CPU asks once and keeps the answer next to the ops; the next asks
    none; the flags (which decide whether a built op is built again) are those asked anew."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}

    def run(mode: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-c", ASKED, mode], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        asked, flags = done.stdout.strip().splitlines()[-1].split(" ", 1)
        return int(asked), flags

    first, second, unkept = run("kept"), run("kept"), run("asked")
    assert (first[0], second[0], unkept[0]) == (1, 0, 2)
    assert first[1] == second[1] == unkept[1] and "native" in unkept[1]
    assert [p.name for p in tmp_path.glob("cpuinfo-*.json")] != []
