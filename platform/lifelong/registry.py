"""The model registry on the storage root: immutable versions, atomically moved aliases.

    registry/<model>/versions/<n>/        weights (safetensors), tokenizer, model.onnx, card.json (last)
    registry/<model>/versions/<n>/exports/<format>.json  add-only records of later exports
    registry/<model>/aliases/<alias>.json the pointer: {version, seq, moved_at, ...}
    registry/<model>/history/<alias>/<seq>.json  one immutable file per move

A version exists once its card.json exists; it is written last and never rewritten, so a
reader never sees a half-written version. An alias move is a compare-and-swap of the pointer
(`Storage.replace_if`: flock on a local disk, If-Match on S3): of two writers that read the
same pointer, exactly one moves it and the other re-reads (or, when it asked to move from a
given version, gets `AliasConflict`). The winner then adds its event to the history; a move
whose writer died before that is recovered from the pointer, which holds the same event.

Exports made after registration (`lifelong export` on an older version) are the one thing
added to a version: new files plus an `exports/<format>.json` record created exclusively,
so nothing that existed is ever rewritten; `card()` shows those records under `exports`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError

import lifelong
from lifelong.errors import AliasConflict, RegistryError
from lifelong.storage import Storage, local_cache_dir
from lifelong.tasks import TaskName, task_of_architectures

# Whole-string patterns (fullmatch): `$` alone would also accept a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
VERSION_RE = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²'

# Only these travel into a version: weights as safetensors, configs and tokenizers as text.
# Pickled formats (.bin, .pt, .pkl) are never copied, so loading never unpickles.
# ONNX models above 2 GB keep their weights in an external `.onnx.data` file (raw tensors).
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".onnx", ".data", ".md"}


def format_of(filename: str) -> str | None:
    """Which model format a version file belongs to (for the per-format sizes on the card)."""
    if filename.endswith(".safetensors"):
        return "safetensors"
    if filename.startswith("model.int8.onnx"):
        return "onnx-int8"
    if filename.startswith("model.onnx"):
        return "onnx"
    if filename == "model.torchscript.pt":
        return "torchscript"
    return None


def format_sizes(sizes: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for filename, size in sizes.items():
        fmt = format_of(filename)
        if fmt:
            out[fmt] = out.get(fmt, 0) + size
    return out


# --- the card: what a version is, typed and checked when written and when read -----------------
class _Record(BaseModel):
    # Unknown keys are kept, not refused: a card written by a newer release still loads.
    model_config = ConfigDict(extra="allow", frozen=True)


class RunRecord(_Record):
    name: str
    checkpoint: str
    history: list[dict] = []
    precision: str | None = None


class StreamRecord(_Record):
    """The continual window a version was trained on (`lifelong continual`)."""

    name: str
    window: int
    files: list[str] = []
    strategy: str | None = None
    new_rows: int = 0
    replay_rows: int = 0
    champion_before: int | None = None
    held_by: str | None = None
    search: list[dict] = []  # continual.search: every trial (params, scores, run), the chosen one marked
    labels_added: list[str] = []  # classes it knows that the champion it started from did not (new_labels: grow)
    drift: dict | None = None  # continual.trigger drift|any: its window's drift from the one before (continual/drift.py)


class SweepRecord(_Record):
    """The sweep a version won (`lifelong tune`)."""

    name: str
    params: dict = {}
    path: str | None = None


class ExportRecord(_Record):
    """One format's export: its measurements (parity for ONNX, accuracy for int8) and files."""

    files: dict[str, int] = {}
    added_at: str | None = None
    parity_max_abs_diff: float | None = None
    opset: int | None = None
    max_length: int | None = None
    rows: int | None = None
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    accuracy_drop: float | None = None
    int8_refused: dict | None = None


class Card(_Record):
    """A version's card (card.json plus later export records): the one reader of its fields."""

    name: str
    version: int
    task: TaskName
    created_at: str
    code_version: str
    labels: list[str] | None = None
    metrics: dict[str, float] = {}
    config: dict = {}  # the run's JobConfig as JSON
    data: dict | None = None  # the DataReport of what it trained on
    parent: str | None = None  # NAME:VERSION it was fine-tuned from
    base: str | None = None  # NAME:VERSION whose weights its adapters (train.lora) apply to: it holds only those
    run: RunRecord | None = None
    stream: StreamRecord | None = None
    sweep: SweepRecord | None = None
    exports: dict[str, ExportRecord] = {}
    files: dict[str, int] = {}
    size_bytes: dict[str, int] = {}

    @property
    def max_length(self) -> int | None:
        """The sequence length it was trained for."""
        return (self.config.get("model") or {}).get("max_length")

    @property
    def data_config(self) -> dict:
        """The data section of the run's config (path, columns, labels)."""
        return self.config.get("data") or {}


def _card(fields: dict, where: str) -> Card:
    try:
        return Card.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'card'}: {err['msg']}" for err in e.errors()[:3])
        raise RegistryError(f"{where}: not a valid card ({problems})") from None


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: a local directory, plus its registry identity when it has one."""

    local_dir: Path
    name: str | None = None
    version: int | None = None
    card: Card | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}" if self.name else str(self.local_dir)

    @property
    def task(self) -> str:
        """The card's task; a bare directory's from its HF architecture name."""
        if self.card:
            return self.card.task
        return task_of_architectures(json.loads((self.local_dir / "config.json").read_text()).get("architectures") or [])


def parse_ref(text: str) -> ModelRef | None:
    """`NAME@ALIAS` or `NAME:VERSION`; None when the text is neither (e.g. a directory path)."""
    if "@" in text:
        name, _, alias = text.partition("@")
        if NAME_RE.fullmatch(name) and ALIAS_RE.fullmatch(alias):
            return ModelRef(name, alias=alias)
        raise RegistryError(f"{text!r} is not a model reference: use NAME@ALIAS or NAME:VERSION")
    name, sep, version = text.partition(":")
    if sep and NAME_RE.fullmatch(name):
        if VERSION_RE.fullmatch(version):
            return ModelRef(name, version=int(version))
        raise RegistryError(f"{text!r} is not a model reference: VERSION must be a number (NAME:VERSION, e.g. {name}:3)")
    return None


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"lifelong {lifelong.__version__}" + (f" ({sha})" if sha else "")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Registry:
    def __init__(self, storage: Storage):
        self.storage = storage

    # --- versions --------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise RegistryError(f"{name!r} is not a valid model name (a letter or digit, then letters, digits, '_', '.', '-')")

    def _check_model(self, name: str) -> None:
        """The name is valid and the model has at least one version."""
        self._check_name(name)
        if not self.versions(name):
            known = self.models()
            raise RegistryError(
                f"no model named '{name}' in {self.storage.root_uri}/registry"
                + (f"; models: {', '.join(known)}" if known else "; the registry is empty")
            )

    def models(self) -> list[str]:
        return [m for m in self.storage.listdir("registry") if NAME_RE.fullmatch(m)]

    def versions(self, name: str) -> list[int]:
        """Complete versions (those with a card), ascending."""
        nums = [int(v) for v in self.storage.listdir(f"registry/{name}/versions") if v.isdigit()]
        return sorted(n for n in nums if self.storage.exists(f"registry/{name}/versions/{n}/card.json"))

    def register_version(self, name: str, model_dir: str | Path, card: dict, extra_files: dict[str, Path] | None = None) -> int:
        """Copy a saved HF model directory (plus `extra_files`, e.g. an ONNX export, by their
        names in the version) into a new immutable version; returns its number.

        `card`: the `Card` fields the caller knows (task, labels, metrics, config, run, ...); the
        registry adds name, version, created_at, code_version, files and sizes, and checks the
        whole before anything is stored."""
        self._check_name(name)
        model_dir = Path(model_dir)
        files = {
            p.relative_to(model_dir).as_posix(): p
            for p in sorted(model_dir.rglob("*"))
            if p.is_file() and p.suffix in ALLOWED_SUFFIXES and p.name != "card.json"
        }
        files.update({rel: Path(src) for rel, src in (extra_files or {}).items()})
        if not any(rel.endswith(".safetensors") for rel in files):
            raise RegistryError(f"{model_dir} holds no .safetensors weights: nothing to register")
        sizes = {rel: src.stat().st_size for rel, src in files.items()}
        full_card = {
            **card,
            "name": name,
            "created_at": _now(),
            "code_version": code_version(),
            "files": sizes,
            "size_bytes": format_sizes(sizes),
        }
        _card({**full_card, "version": 0}, f"the card for a new version of {name}")  # one that would not load is never stored
        version = self._claim_version_number(name)
        full_card["version"] = version
        prefix = f"registry/{name}/versions/{version}"
        for rel, src in files.items():
            self.storage.write_file(f"{prefix}/{rel}", src)
        # The card goes last: from this moment the version exists, and it is never rewritten.
        data = json.dumps(full_card, indent=2, sort_keys=True, default=str).encode()
        if not self.storage.create_exclusive(f"{prefix}/card.json", data):
            raise RegistryError(f"{name}:{version} already has a card; versions are immutable")
        return version

    def _claim_version_number(self, name: str) -> int:
        # A number is claimed by creating its marker exclusively, so two concurrent
        # registrations never share a version (numbers of crashed writes are skipped).
        existing = [int(v) for v in self.storage.listdir(f"registry/{name}/versions") if v.isdigit()]
        n = max(existing, default=0) + 1
        while not self.storage.create_exclusive(f"registry/{name}/versions/{n}/.claimed", _now().encode()):
            n += 1
        return n

    def card(self, name: str, version: int) -> Card:
        path = f"registry/{name}/versions/{version}/card.json"
        if not self.storage.exists(path):
            known = self.versions(name)
            raise RegistryError(
                f"{name}:{version} does not exist in {self.storage.root_uri}/registry"
                + (f"; versions: {', '.join(map(str, known))}" if known else f"; no versions of '{name}'")
            )
        return _card(self._with_exports(name, version, self.storage.read_json(path)), self.storage.uri_of(path))

    def _with_exports(self, name: str, version: int, card: dict) -> dict:
        """The card as stored, with the records of exports added after it (exports/<fmt>.json)."""
        card = copy.deepcopy(card)
        for fname in self.storage.listdir(f"registry/{name}/versions/{version}/exports"):
            if fname.endswith(".json"):
                record = self.storage.read_json(f"registry/{name}/versions/{version}/exports/{fname}")
                fmt = fname[: -len(".json")]
                card.setdefault("exports", {})[fmt] = record
                card.setdefault("files", {}).update(record.get("files", {}))
                card.setdefault("size_bytes", {}).update(format_sizes(record.get("files", {})))
        return card

    def add_export(self, name: str, version: int, fmt: str, files: dict[str, Path], record: dict) -> dict:
        """Add an export (new files + its record) to an existing version; never rewrites.

        The record is created exclusively and last: files without a record are the remains
        of an interrupted export and may be replaced; a format with a record is final.
        """
        card = self.card(name, version)
        if fmt in card.exports:
            raise RegistryError(f"{name}:{version} already has a '{fmt}' export; versions are immutable")
        prefix = f"registry/{name}/versions/{version}"
        clashes = [rel for rel in files if rel in card.files]
        if clashes:
            raise RegistryError(f"{name}:{version} already has {', '.join(clashes)}; versions are immutable")
        with self.storage.lock(f"{prefix}/exports/{fmt}"):
            for rel, src in files.items():
                self.storage.write_file(f"{prefix}/{rel}", src)
            full = {**record, "files": {rel: Path(src).stat().st_size for rel, src in files.items()}, "added_at": _now()}
            data = json.dumps(full, indent=2, sort_keys=True, default=str).encode()
            if not self.storage.create_exclusive(f"{prefix}/exports/{fmt}.json", data):
                raise RegistryError(f"{name}:{version} already has a '{fmt}' export; versions are immutable")
        return full

    def find_versions(self, name: str, match: Callable[[Card], bool]) -> list[int]:
        """Versions whose card satisfies `match(card)`, ascending."""
        return [v for v in self.versions(name) if match(self.card(name, v))]

    def local_dir(self, name: str, version: int) -> Path:
        """A local directory holding the version's files (the storage itself when local)."""
        self.card(name, version)  # the version must exist (a clear error otherwise)
        prefix = f"registry/{name}/versions/{version}"
        if self.storage.is_local:
            return Path(self.storage.path(prefix))
        # Versions are immutable (exports only add files), so a cached copy of this very card
        # that holds every file the card and its export records list is current.
        stored = self.storage.read_json(f"{prefix}/card.json")
        cache = self._cache_dir(name, version)
        if not _cached(cache, stored, self._with_exports(name, version, stored)):
            self.storage.download_dir_into(prefix, cache)
            _prune_cache(cache)
        os.utime(cache)  # most recently used: the last a prune removes
        return cache

    def model_dir(self, name: str, version: int) -> Path:
        """A local directory holding the version as one loadable HF model: its own files, or for an
        adapter-only version (card `base`) its base's model with the adapters merged in, made
        once per machine (one process merges, the others wait for it) and kept with the cached
        versions, keyed by the card (a store made anew does not get an old merge back); a base
        that is itself adapters is merged first."""
        card = self.card(name, version)
        if card.base is None:
            return self.local_dir(name, version)
        digest = hashlib.sha256(f"{self.storage.root_uri}|{card.created_at}|{card.base}".encode()).hexdigest()[:12]
        merged = local_cache_dir("merged", self._root_key, name) / f"{version}-{digest}"
        with FileLock(str(merged) + ".lock"):
            if not (merged / "config.json").is_file():
                from lifelong.models import merge_adapter

                base = self.resolve(card.base)
                tmp = merged.parent / f".tmp-{version}-{os.getpid()}-{time.monotonic_ns()}"
                try:
                    merge_adapter(base.local_dir, self.local_dir(name, version), tmp, card.task, card.labels)
                    tmp.rename(merged)  # whole or not at all
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                _prune_cache(merged)
        os.utime(merged)
        return merged

    def preprocessor_dir(self, text: str) -> Path:
        """A local directory with the tokenizer (or image processor) of a version: its own, or for an
        adapter-only version its base's (the adapters change no token)."""
        resolved = self.resolve(text, weights=False)
        while resolved.card is not None and resolved.card.base:
            resolved = self.resolve(resolved.card.base, weights=False)
        return resolved.local_dir

    @property
    def _root_key(self) -> str:
        # A hash of the whole root (endpoint included): two stores never share a cache.
        return hashlib.sha256(self.storage.root_uri.encode()).hexdigest()[:20]

    def _cache_dir(self, name: str, version: int) -> Path:
        return local_cache_dir("registry", self._root_key, name) / str(version)

    # --- aliases ---------------------------------------------------------------------------
    def aliases(self, name: str) -> dict[str, dict]:
        out = {}
        for fname in self.storage.listdir(f"registry/{name}/aliases"):
            if fname.endswith(".json"):
                out[fname[: -len(".json")]] = self.storage.read_json(f"registry/{name}/aliases/{fname}")
        return out

    def alias_version(self, name: str, alias: str) -> int:
        return int(self.alias_pointer(name, alias)["version"])

    def alias_pointer(self, name: str, alias: str) -> dict:
        """The alias's pointer: {version, seq, previous, kind, reason, moved_at}."""
        path = f"registry/{name}/aliases/{alias}.json"
        if not self.storage.exists(path):
            have = sorted(self.aliases(name))
            raise RegistryError(
                f"'{name}@{alias}' does not exist"
                + (f"; aliases of {name}: {', '.join(have)}" if have else f"; '{name}' has no aliases yet")
                + f" (set one with: lifelong models promote {name}:VERSION --alias {alias})"
            )
        return self.storage.read_json(path)

    def move_alias(
        self, name: str, alias: str, version: int, *, reason: str = "", kind: str = "promote", expect: int | None | type(...) = ...
    ) -> dict:
        """Point `alias` at `version` atomically and log the move; returns the event.

        `expect`: the version the caller saw the alias at (None: unset). If another writer moved
        it meanwhile, raise `AliasConflict` instead of overwriting their move.
        """
        if not ALIAS_RE.fullmatch(alias):
            raise RegistryError(f"{alias!r} is not a valid alias name (a letter, then letters, digits, '_', '-')")
        self._check_name(name)
        self.card(name, version)  # the version must exist
        pointer_path = f"registry/{name}/aliases/{alias}.json"
        for _ in range(100):
            read = self.storage.read_versioned(pointer_path)
            current = json.loads(read[0]) if read else None
            held = current["version"] if current else None
            if expect is not ... and held != expect:
                if current is None:
                    raise AliasConflict(f"{name}@{alias} is not set; this move expected it at {expect}")
                raise AliasConflict(
                    f"{name}@{alias} was moved to {held} by another writer (seq {current['seq']}, "
                    f"{current['kind']} at {current['moved_at']}); this move expected it at {expect}"
                )
            if current:
                self._record_event(name, alias, current)  # a mover that died before logging its event
            event = {
                "alias": alias,
                "version": version,
                "previous": held,
                "seq": (current["seq"] if current else 0) + 1,
                "kind": kind,
                "reason": reason,
                "moved_at": _now(),
            }
            data = json.dumps(event, indent=2, sort_keys=True).encode()
            if self.storage.replace_if(pointer_path, data, read[1] if read else None):
                self._record_event(name, alias, event)
                from lifelong import notify  # its config and console are light, but not needed to read a registry

                notify.event("alias.moved", model=name, root=self.storage.uri_of(), **event)
                return event
        raise RegistryError(f"{name}@{alias}: gave up after 100 concurrent moves by other writers")

    def _record_event(self, name: str, alias: str, event: dict) -> None:
        rel = f"registry/{name}/history/{alias}/{event['seq']:08d}.json"
        data = json.dumps(event, indent=2, sort_keys=True).encode()
        if not self.storage.create_exclusive(rel, data):
            existing = self.storage.read_json(rel)
            if existing != event:  # left by an interrupted move of the old history-first layout
                self.storage.write_bytes(rel, data)

    def history(self, name: str, alias: str | None = None) -> list[dict]:
        aliases = (
            [alias]
            if alias
            else sorted(
                set(self.storage.listdir(f"registry/{name}/history"))
                | {a[: -len(".json")] for a in self.storage.listdir(f"registry/{name}/aliases") if a.endswith(".json")}
            )
        )
        events = []
        for a in aliases:
            pointer = f"registry/{name}/aliases/{a}.json"
            current = self.storage.read_json(pointer) if self.storage.exists(pointer) else None
            applied = current["seq"] if current else 0
            logged = {}
            for fname in self.storage.listdir(f"registry/{name}/history/{a}"):
                if fname.endswith(".json"):
                    event = self.storage.read_json(f"registry/{name}/history/{a}/{fname}")
                    if event["seq"] <= applied:
                        logged[event["seq"]] = event
            if current and current["seq"] not in logged:
                logged[current["seq"]] = current  # its mover died between the pointer and the log
            events += logged.values()
        # One alias's events are ordered by its own sequence (writers' clocks may disagree);
        # several aliases are interleaved by time, each still in sequence.
        if alias:
            return sorted(events, key=lambda e: e["seq"])
        return sorted(events, key=lambda e: (e["moved_at"], e["alias"], e["seq"]))

    def rollback(self, name: str, alias: str = "champion", reason: str = "") -> dict:
        """Move `alias` back to the version it held before its latest promotion.

        Repeated rollbacks walk further back: promotions push onto a stack, rollbacks pop.
        """
        self._check_model(name)
        if not ALIAS_RE.fullmatch(alias):
            raise RegistryError(f"{alias!r} is not a valid alias name (a letter, then letters, digits, '_', '-')")
        stack: list[int] = []
        for event in self.history(name, alias):
            if event["kind"] == "rollback" and stack:
                stack.pop()
            else:
                stack.append(event["version"])
        if len(stack) < 2:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to (history: {stack or 'empty'})")
        return self.move_alias(name, alias, stack[-2], reason=reason or "rollback", kind="rollback")

    # --- references ------------------------------------------------------------------------
    def check_ref(self, text: str) -> None:
        """Raise what `resolve` would for a reference that names nothing, without fetching any file
        (a typo fails in a second, before Ray starts)."""
        ref = parse_ref(text)
        if ref is None:
            self.resolve(text)  # a directory: nothing to fetch
        else:
            self.card(ref.name, ref.version if ref.alias is None else self.alias_version(ref.name, ref.alias))

    def resolve(self, text: str, weights: bool = True) -> ResolvedModel:
        """NAME@ALIAS, NAME:VERSION, or a local HF model directory. `local_dir` is a loadable model
        (`model_dir`: an adapter-only version merged into its base); with `weights=False` it is the
        version's own files (for its card, its reference or its files, no merge)."""
        ref = parse_ref(text)
        if ref is None:
            path = Path(text).expanduser()
            if (path / "config.json").is_file():
                return ResolvedModel(local_dir=path.resolve())
            raise RegistryError(
                f"'{text}' is neither a model reference (NAME@ALIAS, NAME:VERSION) nor an HF model directory (a folder with config.json)"
            )
        version = ref.version if ref.alias is None else self.alias_version(ref.name, ref.alias)
        card = self.card(ref.name, version)
        local = self.model_dir(ref.name, version) if weights else self.local_dir(ref.name, version)
        return ResolvedModel(local_dir=local, name=ref.name, version=version, card=card)


def _cached(cache: Path, stored: dict, card: dict) -> bool:
    """Whether `cache` holds the stored card.json and every file the card (with its export
    records) lists, at the listed sizes."""
    try:
        if json.loads((cache / "card.json").read_text()) != stored:
            return False
        return all((cache / rel).stat().st_size == size for rel, size in card.get("files", {}).items())
    except (OSError, ValueError):
        return False


def _prune_cache(keep_dir: Path) -> None:
    """Keep the LIFELONG_CACHE_VERSIONS (8) most recently used cached versions of every remote
    registry on this machine; older ones are deleted (a process that has one loaded keeps its
    open files; a later use downloads it again)."""
    keep = int(os.environ.get("LIFELONG_CACHE_VERSIONS", "8"))
    cached = [d for d in keep_dir.parents[2].glob("*/*/*") if d.is_dir() and not d.name.startswith(".tmp-")]
    cached.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in [d for d in cached if d != keep_dir][max(keep - 1, 0) :]:
        shutil.rmtree(old, ignore_errors=True)
