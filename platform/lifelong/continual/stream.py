"""A stream's state on the storage root: the window journal, the holdouts, the finished windows.

    <root>/streams/<s>/windows/<k>.json              one record per window: the cycle's journal
    <root>/streams/<s>/holdouts/window-<k>.parquet   window k's holdout (its validation split)
    <root>/streams/<s>/state.json                    the finished windows and their accuracies (or perplexities)
    <root>/streams/<s>/labels.json                   the label set grown so far (continual.new_labels: grow)

A window is opened (its number taken, exclusively) before anything is trained, with the files it
will consume; every step of its cycle then moves its `status` forward:

    open → registered → decided → promoted → replayed → consumed → done      (or failed)

A cycle that stops anywhere (a crash, a kill, a failed training run) leaves its window unfinished;
the next cycle finds it and carries on from the recorded step, with the same files, holdout, run
name and version. So a window number is never reused, a holdout never belongs to another
window, and each window registers one version. `state.json` is written from the journal when a
window is done (the report and the gates read it).
"""

from __future__ import annotations

import json
import time
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from lifelong.continual.gates import accuracy_matrix
from lifelong.continual.metrics import cl_metrics
from lifelong.data import RESPONSE
from lifelong.storage import Hold, Storage


def rows_schema(content: str, instructions: bool = False) -> pa.Schema:
    """A window's rows: its content ("text" or encoded "image" bytes) and the label index; with
    `instructions` (data.response_column), the text is the prompt and its response follows."""
    fields = [(content, pa.binary() if content == "image" else pa.string()), ("label", pa.int64())]
    return pa.schema(fields + ([(RESPONSE, pa.string())] if instructions else []))


class Decision(BaseModel):
    status: Literal["promoted", "passed", "rejected"]
    reason: str
    candidate: list[float]  # accuracy per window (finished ones, then the new one)
    champion: list[float]
    baseline: float  # the stream's first model on the new window (forward transfer's reference)
    start_version: int


class Window(BaseModel):
    """One window's record in the journal (`windows/<k>.json`)."""

    model_config = ConfigDict(extra="allow")

    window: int
    status: Literal["open", "registered", "decided", "promoted", "replayed", "consumed", "done", "failed"] = "open"
    files: list[str]  # content hashes, oldest first
    paths: list[str] = Field(default_factory=list)
    fingerprint: str  # the validation rules its rows were checked under
    champion_before: int
    new_rows: int
    # The label set its rows' label indices point into (None: data.labels, as before growing sets).
    labels: list[str] | None = None
    replay_rows: int = 0
    attempts: int = 0
    last_error: str | None = None
    version: int | None = None
    decision: Decision | None = None
    phases: dict[str, float] = Field(default_factory=dict)
    opened_at: float = Field(default_factory=time.time)
    train_started: float | None = None
    finished_at: float | None = None
    failed_at: float | None = None
    held_by: str | None = None  # the cycle lock's holding that last wrote this record
    # continual.search: the trials scored so far, and the one asked and being trained (search.py).
    search: list[dict] = Field(default_factory=list)
    search_pending: dict | None = None


class Stream:
    """`hold`: the cycle lock's holding. Every journal and state write first checks it is still
    ours (LeaseLost otherwise) and names it in the record (`held_by`)."""

    def __init__(self, storage: Storage, name: str, hold: Hold | None = None):
        self.storage, self.name, self.hold = storage, name, hold
        self.dir = f"streams/{name}"

    def check(self) -> None:
        if self.hold is not None:
            self.hold.check()

    # --- finished windows ------------------------------------------------------------------
    def state(self) -> dict:
        rel = f"{self.dir}/state.json"
        return self.storage.read_json(rel) if self.storage.exists(rel) else {"windows": [], "baseline": []}

    def finished(self) -> list[dict]:
        return self.state()["windows"]

    def finish(self, summary: dict, baseline_value: float, start_version: int, metric: str = "accuracy") -> dict:
        """Add a finished window to state.json, with the CL metrics of the matrix so far (or
        replace it, when a cycle that stopped right here is repeated). `metric`: what the
        windows' lists hold (the task's HOLDOUT_METRIC)."""
        self.check()
        state = self.state()
        windows = [w for w in state["windows"] if w["window"] < summary["window"]]
        baseline = list(state.get("baseline", []))[: len(windows)] + [baseline_value]
        summary = {**summary, "metrics": cl_metrics(accuracy_matrix([*windows, summary]), baseline, metric)}
        new = {
            "windows": [*windows, summary],
            "baseline": baseline,
            "start_version": state.get("start_version") or start_version,
            "metric": metric,
        }
        self.storage.write_json(f"{self.dir}/state.json", new)
        return new

    # --- the journal -----------------------------------------------------------------------
    def _rel(self, k: int) -> str:
        return f"{self.dir}/windows/{k:06d}.json"

    def _names(self) -> list[str]:
        return sorted(n for n in self.storage.listdir(f"{self.dir}/windows") if n.endswith(".json"))

    def journal(self) -> list[Window]:
        return [Window.model_validate_json(self.storage.read_bytes(f"{self.dir}/windows/{n}")) for n in self._names()]

    def unfinished(self) -> Window | None:
        """The window a stopped cycle left behind, if any (at most one: cycles are serialised)."""
        names = self._names()
        if not names:
            return None
        last = Window.model_validate_json(self.storage.read_bytes(f"{self.dir}/windows/{names[-1]}"))
        return None if last.status in ("done", "failed") else last

    def open_window(self, **fields) -> Window:
        """Take the next window number (never one used before, finished or not) and record it."""
        self.check()
        taken = [w["window"] for w in self.finished()] + [int(n.split(".")[0]) for n in self._names()]
        record = Window(window=max(taken, default=-1) + 1, held_by=self.hold.fence if self.hold else None, **fields)
        while not self.storage.create_exclusive(self._rel(record.window), _dump(record)):  # under the cycle lock: never twice
            record.window += 1
        return record

    def update(self, window: Window, **changes) -> Window:
        """Record progress of the window (the cycle lock makes this the only writer)."""
        self.check()
        new = window.model_copy(update={**changes, "held_by": self.hold.fence if self.hold else window.held_by})
        self.storage.write_bytes(self._rel(new.window), _dump(new))
        return new

    # --- the label set (continual.new_labels: grow) -------------------------------------------
    def labels(self, configured: list[str]) -> list[str]:
        """The stream's labels: those it has grown (in the order they came), then any of the
        config's it does not hold yet. Indices never move: a set only grows at its end."""
        rel = f"{self.dir}/labels.json"
        grown = self.storage.read_json(rel)["labels"] if self.storage.exists(rel) else []
        return grown + [name for name in configured if name not in grown]

    def grow_labels(self, configured: list[str], new: list[str]) -> list[str]:
        """Add `new` labels at the end of the set; returns the ones that were new (the set is now
        `labels(configured)` followed by them)."""
        current = self.labels(configured)
        added = [name for name in dict.fromkeys(new) if name not in current]
        if added:
            self.check()
            self.storage.write_json(f"{self.dir}/labels.json", {"labels": current + added, "updated_at": time.time()})
        return added

    # --- holdouts --------------------------------------------------------------------------
    def holdout_rel(self, window: int) -> str:
        return f"{self.dir}/holdouts/window-{window:03d}.parquet"

    def holdout(self, window: int) -> pa.Table:
        return self.storage.read_table(self.holdout_rel(window))


def window_rows(storage: Storage, rows_rels: list[str], content: str, instructions: bool = False) -> tuple[pa.Table, pa.Table]:
    """A window's valid rows, read from what the ledger stored for its files: (train, holdout),
    each (content, label index[, response])."""
    schema = rows_schema(content, instructions)
    tables = [storage.read_table(rel) for rel in rows_rels]
    rows = pa.concat_tables(tables) if tables else schema.append(pa.field("split", pa.string())).empty_table()
    is_train = pc.equal(rows.column("split"), "train")
    train = rows.filter(is_train).select(schema.names).cast(schema)
    holdout = rows.filter(pc.invert(is_train)).select(schema.names).cast(schema)
    return train, holdout


def _dump(window: Window) -> bytes:
    return json.dumps(window.model_dump(mode="json"), indent=2, sort_keys=True).encode()
