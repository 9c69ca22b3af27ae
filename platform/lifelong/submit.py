"""Jobs on a Ray cluster through Ray's Job Submission API (`JobSubmissionClient`).

    lifelong submit JOB CONFIG [overrides] --address http://HEAD:8265 [--project DIR] [--carry-data]
        checks the config here, uploads the project (the current directory unless --project)
        as the job's working directory, runs `python jobs/JOB.py CONFIG overrides` on the
        cluster, streams its logs, exits with its status
    lifelong jobs list | logs ID [--follow] | stop ID

What travels is decided before anything does, with Ray's own upload rules (`Upload`): the
.gitignore and .rayignore files at every level (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), the
platform's excludes and `submit.exclude`, Ray's package size limit. Every file the job needs
(its script, its config, the local files the config names) is checked against that set; one that
would stay behind is refused naming the rule that drops it, or with `--carry-data` travels anyway
(never one that looks like a secret).

Token authentication (`RAY_AUTH_MODE=token` on the cluster): the token comes from
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where
`ray get-auth-token --generate` puts it). It is sent as a Bearer header and never printed.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lifelong.commands import check_config
from lifelong.config import JobConfig, load_config
from lifelong.console import LOG_LEVEL_ENV
from lifelong.errors import LifelongError

# What never travels, besides what .gitignore / .rayignore list and `submit.exclude`:
# environments, local stores, results and caches ...
EXCLUDES = [
    ".git/", ".venv/", "venv/", "env/", "lifelong-store/", "benchmarks/results/", "__pycache__/", ".pytest_cache/", "*.egg-info/",
    ".hypothesis/", ".ruff_cache/",
]  # fmt: skip
# ... and anything that looks like a secret, even with --carry-data (a tokenizer is not one).
SECRETS = [
    ".env", ".env.*", "*.env", ".aws/", ".ray/", ".ssh/", "*.pem", "*.key", "*.p12", ".netrc",
    "*token*", "!*tokenizer*", "!*tokenizer*/**", "*secret*", "*credential*",
]  # fmt: skip
SECRETS_RULE = "lifelong submit's secrets rule"
IGNORE_FILES = (".gitignore", ".rayignore")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# The flags each job script takes besides CONFIG and overrides.
JOB_FLAGS = {"tune": {"--resume", "--promote"}, "continual": {"--once", "--force"}, "pretrain": {"--resume"}, "finetune": {"--resume"}}


def job_args(job: str, argv: list[str]) -> tuple[str, set[str], list[str]]:
    """A job script's command line → (config path, its flags, overrides); the same rules
    `lifelong submit` checks before submitting, so a job never fails on what was accepted."""
    known = JOB_FLAGS.get(job, set())
    if len(argv) < 1 or argv[0].startswith("--"):
        raise LifelongError(f"usage: {' '.join([f'jobs/{job}.py CONFIG', *(f'[{f}]' for f in sorted(known)), '[key=value ...]'])}")
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


def project_dir(project: Path | None) -> Path:
    """The project that travels: `--project`, else the current directory; it holds jobs/."""
    root = (project or Path.cwd()).expanduser().resolve()
    if not (root / "jobs").is_dir():
        raise LifelongError(
            f"{root} is not a lifelong project (it has no jobs/ directory): run `lifelong submit` in the project's "
            "directory, or pass --project DIR"
        )
    return root


@dataclass(frozen=True)
class Rule:
    """One line of an ignore list: where it is written and what it says."""

    where: str
    pattern: str

    @property
    def secret(self) -> bool:
        return self.where == SECRETS_RULE

    def __str__(self) -> str:
        return f"{self.where} '{self.pattern.strip()}'"


class Upload:
    """What Ray uploads as a job's working directory from `project`: its own traversal
    (`ray._private.runtime_env.packaging._dir_travel`, the function its zip uses) with the
    .gitignore and .rayignore files at every level (.gitignore unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, as Ray decides) and the excludes, so what is checked
    here is what would travel."""

    def __init__(self, project: Path, exclude: list[str]):
        self.project = project
        self.lists = [
            ("lifelong submit's default excludes", EXCLUDES),
            (SECRETS_RULE, SECRETS),
            ("submit.exclude in the config", [e for e in exclude if e.strip()]),
        ]
        self.include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
        self.files = self._travel()

    def _travel(self) -> list[str]:
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

        files = []

        def keep(path: Path) -> None:
            if path.is_file():
                files.append(path.relative_to(self.project).as_posix())

        excludes = [_get_excludes(self.project, [line for _, lines in self.lists for line in lines])]
        _dir_travel(self.project, excludes, keep, include_gitignore=self.include_gitignore, logger=_QUIET)
        return sorted(files)

    def rule_for(self, rel: str) -> Rule | None:
        """The rule that leaves `rel` (relative to the project) behind; None when it travels.
        Ray checks each directory on the way down, then the file, against the excludes and the
        ignore files of every directory above it; the first list that matches decides."""
        path, above = self.project, [self.project]
        for part in rel.split("/"):
            path = path / part
            for describe, lines, base in self._lists(above):
                deciding = _deciding_line(lines, path.relative_to(base).as_posix())
                if deciding is not None:
                    return Rule(describe(deciding), lines[deciding])
            above.append(path)
        return None

    def _lists(self, directories: list[Path]):
        """(describe a line by its index, the lines, the directory they are relative to) for the
        excludes and for each ignore file in `directories`."""
        for label, lines in self.lists:
            yield (lambda i, label=label: label), lines, self.project
        for directory in directories:
            for name in IGNORE_FILES:
                ignore = directory / name
                if ignore.is_file() and (name != ".gitignore" or self.include_gitignore):
                    rel = ignore.relative_to(self.project).as_posix()
                    yield (lambda i, rel=rel: f"{rel} line {i + 1}"), ignore.read_text().splitlines(keepends=True), directory


def _deciding_line(lines: list[str], rel: str) -> int | None:
    """The index of the line that excludes `rel`, with the pathspec Ray vendors (0.8; its
    matching differs from today's pathspec): the last line that matches decides, as there."""
    from ray._private.runtime_env.packaging import PathSpec

    deciding = None
    for i, line in enumerate(lines):
        [pattern] = PathSpec.from_lines("gitwildmatch", [line]).patterns or [None]
        if pattern is not None and pattern.include is not None and rel in pattern.match((rel,)):
            deciding = i if pattern.include else None
    return deciding


_QUIET = logging.getLogger("lifelong.submit.upload")
_QUIET.setLevel(logging.WARNING)


@dataclass
class Plan:
    """A submission checked here: the command the cluster runs, and what travels."""

    project: Path
    command: str
    files: list[str]
    carried: list[str]

    @cached_property
    def bytes(self) -> int:
        return sum((self.project / f).stat().st_size for f in self.files)


def plan(job: str, config_path: Path, overrides: list[str], project: Path | None = None, carry_data: bool = False) -> Plan:
    """Check what is submitted here, before anything travels: the job exists, the config is
    inside the project and valid, its storage root outlives the job, and every file the job
    needs travels with it (or is carried with `carry_data`) within Ray's size limit."""
    project = project_dir(project)
    jobs = {p.stem for p in (project / "jobs").glob("*.py")}
    if job not in jobs:
        raise LifelongError(f"unknown job '{job}': one of {', '.join(sorted(jobs))} (the scripts in {project / 'jobs'})")
    path = config_path.expanduser().resolve()
    if not path.is_file():
        raise LifelongError(f"{config_path}: no such config file")
    try:
        rel = path.relative_to(project).as_posix()
    except ValueError:
        raise LifelongError(
            f"{config_path} is outside the project ({project}), and only the project travels to the cluster: move it under configs/"
        ) from None
    _, flags, overrides = job_args(job, [str(config_path), *overrides])
    config = load_config(path, overrides, resolve_paths=False)  # relative paths resolve in the job's working directory
    check_config(job, config_path, config)  # what the job itself would refuse first, refused here
    _check_paths(job, config_path, config)
    upload = Upload(project, config.submit.exclude)
    travels = set(upload.files)
    for needed in (f"jobs/{job}.py", rel):
        if needed not in travels:
            raise LifelongError(
                f"{needed} would not reach the cluster: {upload.rule_for(needed)} leaves it behind, and the job cannot run "
                "without it: change that rule"
            )
    carried = []
    for key, value, files in _local_files(config, project):
        if not files:
            raise LifelongError(
                f"{config_path}: {key} {value!r} is relative but not in the project, and only the project travels to the cluster: "
                "put it under the project, or give an absolute path on a shared mount or a URI"
            )
        behind = [f for f in files if f not in travels]
        if not behind:
            continue
        rule = upload.rule_for(behind[0])
        more = f" (and {len(behind) - 1} more of its files)" if len(behind) > 1 else ""
        if rule.secret:
            raise LifelongError(
                f"{config_path}: {key} {value!r}: {behind[0]}{more} looks like a secret ({rule}), and secrets never travel: "
                "rename it, or put it on the storage root or a URI"
            )
        if not carry_data:
            size = sum((project / f).stat().st_size for f in behind)
            raise LifelongError(
                f"{config_path}: {key} {value!r} would not reach the cluster: {rule} leaves {behind[0]}{more} behind (Ray's upload "
                f"follows .gitignore, .rayignore and the excludes). Add --carry-data to upload it with the job ({_mib(size)}), "
                f"or give {key} as a URI (s3://...) or an absolute path that every node can read"
            )
        carried += behind
    command = f"python jobs/{job}.py " + shlex.join([rel, *sorted(flags), *overrides])
    checked = Plan(project, command, sorted({*travels, *carried}), sorted(set(carried)))
    _check_size(checked)
    return checked


def _check_paths(job: str, config_path: Path, config: JobConfig) -> None:
    root = config.storage.root
    if "://" not in root and not Path(root).expanduser().is_absolute():
        raise LifelongError(
            f"{config_path}: storage.root is the relative path {root!r}, which on a cluster would land in the job's temporary "
            "working directory and vanish with it: give an absolute path on a shared mount or an s3:// URI "
            "(e.g. storage.root=s3://bucket/lifelong)"
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


def _local_files(config: JobConfig, project: Path) -> list[tuple[str, str, list[str]]]:
    """(key, value, files relative to the project) for each relative local path the config names:
    the data (a file, a directory or a glob), a tokenizer directory, an `init_from` directory."""
    named = [("data.path", config.data.path if config.data is not None else None), ("model.tokenizer", config.model.tokenizer)]
    init_from = config.model.init_from
    if init_from and (project / init_from).exists():
        named.append(("model.init_from", init_from))
    found = []
    for key, value in named:
        if not value or "://" in value or Path(value).expanduser().is_absolute():
            continue
        paths = [Path(p) for p in glob.glob(str(project / value))] if glob.has_magic(value) else [project / value]
        files = []
        for p in paths:
            files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        found.append((key, value, [f.resolve().relative_to(project).as_posix() for f in files]))
    return found


def _check_size(plan: Plan) -> None:
    """Ray refuses a working directory whose zip reaches its gRPC message limit (512 MiB)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    if plan.bytes < GCS_STORAGE_MAX_SIZE:
        return
    staged = stage(plan)
    try:
        from ray._private.runtime_env.packaging import create_package

        package = staged.with_suffix(".zip")
        create_package(str(staged), package, include_gitignore=True, logger=_QUIET)
        zipped = package.stat().st_size
        package.unlink()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if zipped >= GCS_STORAGE_MAX_SIZE:
        biggest = sorted(plan.files, key=lambda f: -(plan.project / f).stat().st_size)[:3]
        raise LifelongError(
            f"what would travel is {_mib(zipped)} zipped, over Ray's {_mib(GCS_STORAGE_MAX_SIZE)} limit for a job's working "
            f"directory; the largest files: {', '.join(f'{f} ({_mib((plan.project / f).stat().st_size)})' for f in biggest)}. "
            "Leave them behind with submit.exclude or .rayignore, and put data on the storage root or a URI"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 / 10 else f"{size / 2**10:.1f} KiB"


def stage(plan: Plan) -> Path:
    """A copy of what travels (hard links where possible), without the ignore files: they were
    applied already, and applied again on the copy they would drop what is carried."""
    staged = Path(tempfile.mkdtemp(prefix="lifelong-submit-"))
    for rel in plan.files:
        if Path(rel).name in IGNORE_FILES:
            continue
        source, target = (plan.project / rel).resolve(), staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return staged


def job_env() -> dict[str, str]:
    """The job's environment variables: the uploaded platform/ first on its path (the job runs the
    code that was submitted); with `lifelong --verbose submit …` (LIFELONG_LOG_LEVEL), its log
    keeps the libraries' and Ray's lines too."""
    env = {"PYTHONPATH": "platform", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if os.environ.get(LOG_LEVEL_ENV):
        env[LOG_LEVEL_ENV] = os.environ[LOG_LEVEL_ENV]
    return env


def submit(
    job: str,
    config_path: Path,
    overrides: list[str],
    address: str | None,
    *,
    project: Path | None = None,
    carry_data: bool = False,
    wait: bool = True,
    submission_id: str | None = None,
    out=sys.stdout,
) -> tuple[str, str]:
    """Submit; with `wait`, stream the logs until the job ends. Returns (job id, final status)."""
    checked = plan(job, config_path, overrides, project, carry_data)
    address = resolve_address(address)
    jobs = client(address)
    carried = f", {len(checked.carried)} of them carried (--carry-data)" if checked.carried else ""
    print(f"[lifelong] uploading {len(checked.files)} files ({_mib(checked.bytes)}) from {checked.project}{carried}", file=out, flush=True)
    staged = stage(checked)
    runtime_env = {"working_dir": str(staged), "env_vars": job_env()}
    try:
        job_id = _call(
            address,
            jobs.submit_job,
            entrypoint=checked.command,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"lifelong_job": job, "config": str(config_path)},
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"[lifelong] submitted {job_id} to {address}: {checked.command}", file=out, flush=True)
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
