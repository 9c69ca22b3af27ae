"""Jobs on a Ray cluster through Ray's Job Submission API (`JobSubmissionClient`).

    lifelong submit JOB CONFIG [overrides] --address http://HEAD:8265
        checks the config here, uploads the project as the job's working directory, runs
        `python jobs/JOB.py CONFIG overrides` on the cluster, streams its logs, exits with its status
    lifelong jobs list | logs ID [--follow] | stop ID

Token authentication (`RAY_AUTH_MODE=token` on the cluster): the token comes from
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where
`ray get-auth-token --generate` puts it). It is sent as a Bearer header and never printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pathspec

from lifelong.config import load_config
from lifelong.errors import LifelongError

PROJECT = Path(__file__).resolve().parents[2]
JOBS = {p.stem: p for p in (PROJECT / "jobs").glob("*.py")}
# What never travels, besides what .gitignore lists and `submit.exclude`: environments, local
# stores, results, caches, local data (a config's own data file is carried explicitly) and
# anything that looks like a secret.
EXCLUDES = [
    ".git/", ".venv/", "venv/", "env/", "lifelong-store/", "benchmarks/results/", "__pycache__/", ".pytest_cache/", "*.egg-info/",
    ".hypothesis/", ".ruff_cache/", "data/",
    ".env", ".env.*", "*.env", ".aws/", ".ray/", ".ssh/", "*.pem", "*.key", "*.p12", "*token*", "*secret*", "*credential*", ".netrc",
]  # fmt: skip
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# The flags each job script takes besides CONFIG and overrides.
JOB_FLAGS = {"tune": {"--resume", "--promote"}, "continual": {"--once", "--force"}, "pretrain": {"--resume"}, "finetune": {"--resume"}}


def job_args(job: str, argv: list[str]) -> tuple[str, set[str], list[str]]:
    """A job script's command line → (config path, its flags, overrides); the same rules
    `lifelong submit` checks before submitting, so a job never fails on what was accepted."""
    known = JOB_FLAGS.get(job, set())
    if len(argv) < 1 or argv[0].startswith("--"):
        raise LifelongError(f"usage: jobs/{job}.py CONFIG {' '.join(f'[{f}]' for f in sorted(known))} [key=value ...]")
    flags = {a for a in argv[1:] if a.startswith("--")}
    if flags - known:
        raise LifelongError(
            f"jobs/{job}.py does not take {', '.join(sorted(flags - known))} (its flags: {', '.join(sorted(known)) or 'none'})"
        )
    return argv[0], flags, [a for a in argv[1:] if not a.startswith("--")]


@dataclass
class Token:
    value: str
    source: str


def find_token() -> Token | None:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not address.startswith(("http://", "https://")):
        raise LifelongError(
            f"--address {address!r} is not a dashboard URL: jobs go to the head's dashboard, e.g. http://HEAD:8265 "
            "(RAY_ADDRESS holds a GCS address inside a cluster; pass --address explicitly)"
        )
    return address.rstrip("/")


def client(address: str | None):
    """A JobSubmissionClient for the cluster, with the token when there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise _auth_error(address, token, e) from None
    except ConnectionError as e:
        raise LifelongError(f"cannot reach the Ray dashboard at {address}: {str(e).splitlines()[0]}") from None


def _auth_error(address: str, token: Token | None, e: Exception) -> LifelongError:
    if token is None or str(e).startswith("Authentication required"):
        return LifelongError(
            f"the Ray cluster at {address} requires a token (token authentication is on) and none was found: "
            "set RAY_AUTH_TOKEN, or put the token in ~/.ray/auth_token (print it on the head with `ray get-auth-token`)"
        )
    return LifelongError(f"the Ray cluster at {address} refused the token from {token.source}: it is not this cluster's token")


def _call(address: str, fn, *args, **kwargs):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as e:
        raise _auth_error(address, find_token(), e) from None
    except RuntimeError as e:  # the SDK's wording for unknown jobs and refused requests
        raise LifelongError(f"{address}: {str(e).splitlines()[0]}") from None


def entrypoint(job: str, config_path: Path, overrides: list[str]) -> str:
    """Check what is submitted here, before anything travels: the job exists, the config is
    inside the project (it travels with it) and valid, and its storage root outlives the job."""
    if job not in JOBS:
        raise LifelongError(f"unknown job '{job}': one of {', '.join(sorted(JOBS))} (the scripts in jobs/)")
    path = config_path.expanduser().resolve()
    if not path.is_file():
        raise LifelongError(f"{config_path}: no such config file")
    try:
        rel = path.relative_to(PROJECT)
    except ValueError:
        raise LifelongError(
            f"{config_path} is outside the project ({PROJECT}), and only the project travels to the cluster: move it under configs/"
        ) from None
    _, flags, overrides = job_args(job, [str(config_path), *overrides])
    flags = sorted(flags)
    config = load_config(path, overrides, resolve_paths=False)  # relative paths resolve in the job's working directory
    root = config.storage.root
    if "://" not in root and not Path(root).expanduser().is_absolute():
        raise LifelongError(
            f"{config_path}: storage.root is the relative path {root!r}, which on a cluster would land in the job's temporary "
            "working directory and vanish with it: give an absolute path on a shared mount or an s3:// URI "
            "(e.g. storage.root=s3://bucket/lifelong)"
        )
    data = config.data.path if config.data is not None else None
    if data and "://" not in data and not Path(data).expanduser().is_absolute() and not (PROJECT / data).exists():
        raise LifelongError(
            f"{config_path}: data.path {data!r} is relative but not in the project, and only the project travels to the cluster: "
            "put the data under the project, or give an absolute path on a shared mount or a URI"
        )
    landing = config.continual.landing
    if job == "continual" and landing and "://" not in landing and not Path(landing).expanduser().is_absolute():
        raise LifelongError(
            f"{config_path}: continual.landing is the relative path {landing!r}, which on a cluster would be the job's temporary "
            "copy of the project: give an absolute path on a shared mount or a URI where new files land"
        )
    token_file = config.serve.auth.token_file
    if job == "serve" and token_file and not Path(token_file).expanduser().is_absolute():
        raise LifelongError(
            f"{config_path}: serve.auth.token_file {token_file!r} is relative, so it would have to travel with the project, "
            "and secrets never do: use serve.auth.token_env (a variable set on the cluster's nodes) or an absolute path "
            "that exists on them"
        )
    return f"python jobs/{job}.py " + shlex.join([str(rel), *flags, *overrides])


def upload_rules(project: Path, extra: list[str]) -> pathspec.PathSpec:
    """The rules for what stays behind: EXCLUDES, the project's .gitignore, `submit.exclude`."""
    gitignore = project / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    return pathspec.PathSpec.from_lines("gitignore", [*EXCLUDES, *lines, *extra])


def stage(project: Path, rules: pathspec.PathSpec, carry: list[Path]) -> tuple[Path, list[str]]:
    """A copy of what travels (hard links where possible): the project less what `rules` leave
    behind, plus `carry` (files a config names, e.g. its data). Returns (directory, files)."""
    staged = Path(tempfile.mkdtemp(prefix="lifelong-submit-"))
    files = [rel for rel in _walk(project, rules)] + [p.relative_to(project).as_posix() for p in carry]
    for rel in dict.fromkeys(files):
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(project / rel, target)
        except OSError:
            shutil.copy2(project / rel, target)
    return staged, sorted(set(files))


def _walk(project: Path, rules: pathspec.PathSpec):
    for here, dirs, names in os.walk(project):
        rel_dir = Path(here).relative_to(project).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if not rules.match_file(prefix + d + "/")]
        for name in names:
            if not rules.match_file(prefix + name) and not os.path.islink(os.path.join(here, name)):
                yield prefix + name


def carried_files(config_path: Path, overrides: list[str]) -> list[Path]:
    """Files inside the project that the config names and the rules would leave behind."""
    config = load_config(config_path.expanduser().resolve(), [o for o in overrides if not o.startswith("--")], resolve_paths=False)
    data = config.data.path if config.data is not None else None
    if not data or "://" in data or Path(data).expanduser().is_absolute():
        return []
    path = PROJECT / data
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return found


def submit(
    job: str,
    config_path: Path,
    overrides: list[str],
    address: str | None,
    *,
    wait: bool = True,
    submission_id: str | None = None,
    out=sys.stdout,
) -> tuple[str, str]:
    """Submit; with `wait`, stream the logs until the job ends. Returns (job id, final status)."""
    command = entrypoint(job, config_path, overrides)
    address = resolve_address(address)
    jobs = client(address)
    config = load_config(config_path.expanduser().resolve(), [o for o in overrides if not o.startswith("--")], resolve_paths=False)
    staged, files = stage(PROJECT, upload_rules(PROJECT, config.submit.exclude), carried_files(config_path, overrides))
    size = sum((staged / f).stat().st_size for f in files)
    print(f"[lifelong] uploading {len(files)} files ({size / 2**20:.1f} MiB) from {PROJECT}", file=out, flush=True)
    runtime_env = {
        "working_dir": str(staged),
        # The uploaded platform/ comes first, so the job runs the code that was submitted.
        "env_vars": {"PYTHONPATH": "platform", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
    }
    try:
        job_id = _call(
            address,
            jobs.submit_job,
            entrypoint=command,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"lifelong_job": job, "config": str(config_path)},
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"[lifelong] submitted {job_id} to {address}: {command}", file=out, flush=True)
    if not wait:
        return job_id, str(_call(address, jobs.get_job_status, job_id))
    status = follow(jobs, address, job_id, out)
    return job_id, status


def follow(jobs, address: str, job_id: str, out=sys.stdout) -> str:
    """Print the job's logs as they come; return its final status."""

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"\n[lifelong] stopped following; {job_id} keeps running (lifelong jobs stop {job_id} --address {address})",
            file=out,
            flush=True,
        )
        raise
    except Exception as e:  # the stream broke (dashboard restarted): the status still tells the end
        print(f"[lifelong] log stream ended early: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=out, flush=True)
    from ray.job_submission import JobStatus

    status = _call(address, jobs.get_job_status, job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = _call(address, jobs.get_job_status, job_id)
    info = _call(address, jobs.get_job_info, job_id)
    if status != JobStatus.SUCCEEDED and info.message:
        print(f"[lifelong] {job_id} {status}: {info.message}", file=out, flush=True)
    return str(status)
