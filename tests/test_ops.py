"""DeepSpeed's CPU ops are loaded from the environment that `make setup` built them into, from a
fresh HOME too, and each spelling of the environment's path has a build of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
