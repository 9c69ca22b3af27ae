"""One continual-learning cycle: new files → retrain from the champion (+ replay) → gates → promote.

    lock stream ; reconcile (finish a cycle whose version was registered before a crash)
    scan the landing zone → ledger (new / copies / rewrites) ; enough pending rows? else wait
    read the pending files (Ray tasks inspect, bad ones quarantined + marked) → validate → split
      holdout of the new window (the validation split) → streams/<s>/holdouts/window-<k>.parquet
      training rows = new train split (+ a replay sample, strategy replay)
    Ray Train + DeepSpeed from the champion's version (pinned) → register (card: stream, window, files)
    finish: evaluate candidate and champion on every window's holdout → gates → champion moves
      (or the candidate gets `challenger` with the reason) → replay buffer ← new rows →
      ledger: files consumed by the version → stream state (windows, accuracy matrix) written last

Every step before `finish` can be repeated without harm: the run name depends on the file set
(a re-started cycle resumes the same Ray Train run), and `register_best` does not register the
same checkpoint twice. `finish` is idempotent: the replay buffer and the ledger skip what they
already hold.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lifelong.config import JobConfig
from lifelong.continual.ledger import Ledger
from lifelong.continual.metrics import cl_metrics
from lifelong.continual.replay import ReplayBuffer
from lifelong.errors import AliasConflict, LifelongError
from lifelong.registry import Registry
from lifelong.storage import Storage


@dataclass
class CycleOutcome:
    stream: str
    window: int | None = None
    status: str = "waiting"  # waiting | promoted | rejected
    reason: str = ""
    version: int | None = None
    champion_before: int | None = None
    files: list[str] = field(default_factory=list)
    new_rows: int = 0
    replay_rows: int = 0
    accuracy: dict = field(default_factory=dict)  # {"candidate": [...], "champion": [...]} per window
    metrics: dict = field(default_factory=dict)
    scan: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds: read, train, register, evaluate, replay
    train_rows: pa.Table | None = field(default=None, repr=False)  # the new window's training rows

    def summary(self) -> str:
        lines = [f"cycle of stream '{self.stream}': {self.status}" + (f" (window {self.window})" if self.window is not None else "")]
        lines += [f"  landing zone: {line}" for line in self.scan]
        if self.status == "waiting":
            lines.append(f"  {self.reason}")
            return "\n".join(lines)
        lines.append(f"  trained on {len(self.files)} new file(s), {self.new_rows} new rows + {self.replay_rows} replayed, "
                     f"from version {self.champion_before}, in {self.seconds:.0f} s → version {self.version}")
        cand, champ = self.accuracy.get("candidate", []), self.accuracy.get("champion", [])
        lines.append("  accuracy per window: " + "  ".join(f"w{j}: {c:.3f} (champion {b:.3f})" for j, (c, b) in enumerate(zip(cand, champ))))
        if self.phases:
            lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.phases.items()))
        lines.append(f"  decision: {self.status}: {self.reason}")
        m = self.metrics
        if m:
            shown = {k: v for k, v in m.items() if k != "windows"}
            lines.append("  CL metrics: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} -" for k, v in shown.items()))
        return "\n".join(lines)


def stream_name(config: JobConfig) -> str:
    return config.continual.stream or config.name


class Stream:
    """The stream's state on the storage root: windows so far and the accuracy matrix."""

    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name
        self.dir = f"streams/{name}"

    def state(self) -> dict:
        rel = f"{self.dir}/state.json"
        return self.storage.read_json(rel) if self.storage.exists(rel) else {"windows": [], "baseline": []}

    def write_state(self, state: dict) -> None:
        self.storage.write_json(f"{self.dir}/state.json", state)

    def holdout_rel(self, window: int) -> str:
        return f"{self.dir}/holdouts/window-{window:03d}.parquet"

    def holdout(self, window: int) -> pa.Table:
        return pq.read_table(io.BytesIO(self.storage.read_bytes(self.holdout_rel(window))))


def check_continual(config: JobConfig) -> None:
    """What a cycle needs from the config, refused before Ray starts."""
    from lifelong.storage import is_uri

    landing = config.continual.landing
    if not landing:
        raise LifelongError("continual.landing is not set: name the directory or URI where new data files arrive")
    if not is_uri(landing) and not Path(landing).expanduser().is_dir():
        raise LifelongError(f"continual.landing '{landing}' is not a directory: create it (new data files are dropped there)")
    if config.model.task != "sequence-classification":
        raise LifelongError(f"continual learning gates on accuracy: it needs model.task=sequence-classification (got {config.model.task})")
    if not config.data or not config.data.labels:
        raise LifelongError("continual learning needs data.text_column, data.label_column and data.labels: "
                            "every landing file is checked against them")


def run_cycle(config: JobConfig, force: bool = False) -> CycleOutcome:
    """One cycle (the lock keeps a second one on the same stream out). `force` ignores min_new_rows."""
    c = config.continual
    check_continual(config)
    storage = Storage(config.storage.root)
    registry = Registry(storage)
    name = stream_name(config)
    started = time.perf_counter()
    with storage.lock(f"streams/{name}/cycle"):
        ledger, stream = Ledger(storage, name), Stream(storage, name)
        recovered = _unfinished_version(registry, config.name, ledger, name)
        if recovered is not None:
            print(f"[lifelong] finishing the cycle of {config.name}:{recovered} (registered before the last cycle stopped)", flush=True)
            card = registry.card(config.name, recovered)
            outcome = CycleOutcome(name, window=card["stream"]["window"], files=card["stream"]["files"],
                                   version=recovered, champion_before=card["stream"]["champion_before"],
                                   new_rows=card["stream"]["new_rows"], replay_rows=card["stream"]["replay_rows"])
            return _finish(config, storage, registry, ledger, stream, outcome, started)
        scan = ledger.scan(c.landing)
        pending = ledger.pending()
        outcome = CycleOutcome(name, scan=scan.lines())
        if not pending:
            outcome.reason = f"no new files in {c.landing}"
            return outcome
        t0 = time.perf_counter()
        validated, good = _read_pending(config, storage, ledger, pending, name)
        outcome.phases["read"] = time.perf_counter() - t0
        if validated is None:
            outcome.reason = "every pending file was quarantined"
            return outcome
        rows = validated.report.rows
        new_rows = sum(rows.values())
        oldest = min(r["first_seen"] for r in good)
        waited = time.time() - oldest
        if not force and new_rows < c.min_new_rows and not (c.max_wait_s and waited >= c.max_wait_s):
            outcome.reason = f"waiting: {new_rows} new rows pending, a cycle starts at {c.min_new_rows}" + (
                f" or after {c.max_wait_s:.0f} s ({waited:.0f} s so far)" if c.max_wait_s else "")
            return outcome
        if not rows.get("validation") or not rows.get("train"):
            outcome.reason = f"waiting: the new rows do not yet give both a training and a holdout split ({rows})"
            return outcome
        outcome.files = [r["sha256"] for r in good]
        outcome.new_rows = new_rows
        outcome.window = len(stream.state()["windows"])
        _train_and_register(config, storage, registry, stream, validated, outcome)
        return _finish(config, storage, registry, ledger, stream, outcome, started)


def _unfinished_version(registry: Registry, model: str, ledger: Ledger, stream: str) -> int | None:
    """A version registered by a cycle of this stream whose files are still pending."""
    pending = {r["sha256"] for r in ledger.pending()}
    if not pending or model not in registry.models():
        return None
    for version in registry.versions(model):
        info = (registry.card(model, version) or {}).get("stream") or {}
        if info.get("name") == stream and pending & set(info.get("files", [])):
            return version
    return None


def _read_pending(config: JobConfig, storage: Storage, ledger: Ledger, pending: list[dict], name: str):
    """Inspect and validate the pending files; quarantine (and mark) the bad ones."""
    from lifelong.data import read_validated
    from lifelong.errors import DataError

    paths = [r["path"] for r in pending]
    try:
        validated = read_validated(config.require_data("continual learning"), storage, f"streams/{name}", files=paths)
    except DataError as e:
        for record in pending:
            ledger.quarantine(record["sha256"], str(e).splitlines()[0][:300])
        print(f"[lifelong] {e}", flush=True)
        return None, []
    good = []
    for record, report in zip(pending, validated.report.files):
        if report.ok:
            ledger.set_rows(record["sha256"], report.rows)
            good.append(record)
        else:
            ledger.quarantine(record["sha256"], report.reason)
            print(f"[lifelong] quarantined {record['path']}: {report.reason}", flush=True)
    return validated, good


def _train_and_register(config: JobConfig, storage: Storage, registry: Registry, stream: Stream, validated, outcome: CycleOutcome) -> None:
    import ray.data

    from lifelong.data import tokenized
    from lifelong.train.driver import PreparedData, build_trainer, prepare_run, prepare_tokenizer, register_best

    c = config.continual
    prepare_started = time.perf_counter()
    champion = registry.resolve(f"{config.name}@champion")
    outcome.champion_before = champion.version
    labels = config.data.labels
    # One pass over the window's files; both splits are then tables on the driver (a window is
    # small next to the model, and what stays is bounded by the holdout and the replay buffer).
    window = _collect(validated.rows, columns=["text", "label", "split", "drop_reason"])
    window = window.filter(pc.equal(window.column("drop_reason"), ""))
    is_train = pc.equal(window.column("split"), "train")
    holdout = window.filter(pc.invert(is_train)).select(["text", "label"]).cast(ROWS)
    outcome.train_rows = window.filter(is_train).select(["text", "label"]).cast(ROWS)
    # The new window's holdout, kept for every later cycle's evaluation (label names, like user data).
    cols = config.data
    holdout_table = pa.table({cols.text_column: holdout.column("text"), cols.label_column: [labels[i] for i in holdout.column("label").to_pylist()]})
    sink = io.BytesIO()
    pq.write_table(holdout_table, sink)
    if not storage.exists(stream.holdout_rel(outcome.window)):
        storage.write_bytes(stream.holdout_rel(outcome.window), sink.getvalue())

    parts = [outcome.train_rows]
    if c.strategy == "replay":
        buffer = ReplayBuffer(storage, stream.name, c.replay_capacity, seed=config.train.seed)
        wanted = round(c.replay_ratio * outcome.train_rows.num_rows)
        sample = buffer.sample(wanted, seed=config.train.seed + outcome.window)
        if sample is not None:
            outcome.replay_rows = sample.num_rows
            parts.append(sample.select(["text", "label"]).cast(ROWS))
    train_rows = ray.data.from_arrow(pa.concat_tables(parts))

    files_key = hashlib.sha256("".join(sorted(outcome.files)).encode()).hexdigest()[:10]
    run_name = f"{stream.name}-w{outcome.window:03d}-{files_key}"
    cycle_config = config.model_copy(update={"run_name": run_name, "model": config.model.model_copy(update={"init_from": champion.ref})})
    tokenizer_dir = prepare_tokenizer(cycle_config, storage, registry, train_rows)
    max_length = config.model.max_length
    train_ds = tokenized(train_rows, config.model.task, tokenizer_dir, max_length).materialize()
    val_ds = tokenized(ray.data.from_arrow(holdout), config.model.task, tokenizer_dir, max_length).materialize()
    data = PreparedData(validated, validated.report, tokenizer_dir, train_ds, val_ds, train_ds.count(), val_ds.count())
    prep = prepare_run(cycle_config, data)
    print(f"[lifelong] cycle window {outcome.window}: {outcome.new_rows} new rows ({len(outcome.files)} files) + "
          f"{outcome.replay_rows} replayed, from {champion.ref}, run '{run_name}'", flush=True)
    t0 = time.perf_counter()
    outcome.phases["prepare"] = t0 - prepare_started
    result = build_trainer(prep, run_name).fit()
    outcome.phases["train"] = time.perf_counter() - t0
    if result.error:
        raise LifelongError(f"cycle training run '{run_name}' failed: {result.error}")
    trained = register_best(prep, result, run_name, extra_card={"stream": {
        "name": stream.name, "window": outcome.window, "files": outcome.files, "strategy": c.strategy,
        "new_rows": outcome.new_rows, "replay_rows": outcome.replay_rows, "champion_before": champion.version}})
    outcome.version = trained.version
    outcome.phases["register"] = time.perf_counter() - t0 - outcome.phases["train"]


def _finish(config: JobConfig, storage: Storage, registry: Registry, ledger: Ledger, stream: Stream, outcome: CycleOutcome, started: float) -> CycleOutcome:
    c = config.continual
    state = stream.state()
    windows = [w for w in state["windows"] if w["window"] < outcome.window]
    champion_ref = f"{config.name}:{outcome.champion_before}"
    candidate_ref = f"{config.name}:{outcome.version}"
    # The model the stream started from, on the new window (forward transfer's reference).
    start = state.get("start_version") or outcome.champion_before
    refs = [candidate_ref, champion_ref] + ([f"{config.name}:{start}"] if start != outcome.champion_before else [])
    t0 = time.perf_counter()
    scored = holdout_accuracies(config, storage, stream, refs, list(range(outcome.window + 1)))
    outcome.phases["evaluate"] = time.perf_counter() - t0
    cand, champ = scored[0], scored[1]
    outcome.accuracy = {"candidate": cand, "champion": champ}

    # Gates: as good on the new window (within the tolerance), forgetting on past windows bounded.
    new_gap = cand[-1] - champ[-1]
    forgetting = past_window_drop(cand, champ)
    reasons = []
    if new_gap < -c.gates.new_window_tolerance:
        reasons.append(f"new window accuracy {cand[-1]:.3f} is below the champion's {champ[-1]:.3f} by more than {c.gates.new_window_tolerance}")
    if forgetting > c.gates.max_forgetting:
        reasons.append(f"forgets {forgetting:.3f} of accuracy on past windows (limit {c.gates.max_forgetting})")
    if reasons:
        outcome.status, outcome.reason = "rejected", "; ".join(reasons)
        registry.move_alias(config.name, "challenger", outcome.version, reason=f"rejected by the gates: {outcome.reason}")
    else:
        outcome.status = "promoted" if c.promote else "passed"
        outcome.reason = f"new window {cand[-1]:.3f} vs {champ[-1]:.3f}, forgetting {forgetting:.3f} (limit {c.gates.max_forgetting})"
        alias = "champion" if c.promote else "challenger"
        if registry.aliases(config.name).get(alias, {}).get("version") != outcome.version:
            try:  # only from the champion the gates compared against: a move made meanwhile wins
                registry.move_alias(config.name, alias, outcome.version, reason=f"passed the gates of window {outcome.window}: {outcome.reason}",
                                    expect=outcome.champion_before if alias == "champion" else ...)
            except AliasConflict as e:
                outcome.status, outcome.reason = "rejected", f"not promoted: {e}"
                registry.move_alias(config.name, "challenger", outcome.version, reason=outcome.reason)

    # The model that serves after this window is the champion: its row of the accuracy matrix.
    serving = cand if outcome.status == "promoted" else champ
    # The buffer is filled under both strategies, so that a stream can switch to replay later.
    t0 = time.perf_counter()
    _add_to_replay(config, storage, stream, outcome)
    outcome.phases["replay"] = time.perf_counter() - t0
    ledger.consume(outcome.files, candidate_ref)
    baseline = list(state.get("baseline", []))[: outcome.window]
    baseline.append(scored[-1][-1])
    windows.append({"window": outcome.window, "files": outcome.files, "version": outcome.version, "status": outcome.status,
                    "reason": outcome.reason, "champion_before": outcome.champion_before, "row": serving,
                    "candidate": cand, "champion": champ, "new_rows": outcome.new_rows, "replay_rows": outcome.replay_rows,
                    "finished_at": time.time()})
    R = accuracy_matrix(windows)
    outcome.metrics = cl_metrics(R, baseline)
    windows[-1]["metrics"] = outcome.metrics
    stream.write_state({"windows": windows, "baseline": baseline, "start_version": start})  # last: the cycle is done
    outcome.seconds = time.perf_counter() - started
    return outcome


def past_window_drop(candidate: list[float], champion: list[float]) -> float:
    """The forgetting gate: the candidate's mean accuracy drop against the champion on the past
    windows (every window but the last, the new one)."""
    past = list(zip(candidate[:-1], champion[:-1]))
    return sum(b - a for a, b in past) / len(past) if past else 0.0


def accuracy_matrix(windows: list[dict]) -> list[list[float | None]]:
    """R[i][j] for the windows so far; R[i-1][i] is the champion-before-window-i on window i."""
    T = len(windows)
    R = [[None] * T for _ in range(T)]
    for i, w in enumerate(windows):
        for j, value in enumerate(w["row"]):
            R[i][j] = value
        if i + 1 < T:
            R[i][i + 1] = windows[i + 1]["champion"][i + 1]  # measured when window i+1 arrived
    return R


def holdout_accuracies(config: JobConfig, storage: Storage, stream: Stream, refs: list[str], windows: list[int]) -> list[list[float]]:
    """Accuracy of each model on each window's holdout: one Ray task per model (side by side),
    which loads it once and scores every holdout (they are small: a fraction of each window)."""
    import ray

    score = ray.remote(num_cpus=1)(_score_holdouts)
    cols = config.data
    rels = [stream.holdout_rel(j) for j in windows]
    return ray.get([score.remote(storage.root_uri, ref, rels, cols.text_column, cols.label_column, cols.labels,
                                 config.model.max_length) for ref in refs])


def _score_holdouts(storage_root: str, ref: str, rels: list[str], text_column: str, label_column: str,
                    labels: list[str], max_length: int, batch_size: int = 64) -> list[float]:
    import pandas as pd
    import torch

    from lifelong.data import tokenize_for_classification
    from lifelong.models import load_for_inference

    storage = Storage(storage_root)
    resolved = Registry(storage).resolve(ref)
    model = load_for_inference(resolved.local_dir, "sequence-classification")
    accuracies = []
    for rel in rels:
        table = pq.read_table(io.BytesIO(storage.read_bytes(rel)))
        rows = pd.DataFrame({"text": table.column(text_column).to_pylist(),
                             "label": [labels.index(v) for v in table.column(label_column).to_pylist()]})
        correct = 0
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                enc = tokenize_for_classification(rows.iloc[start:start + batch_size], str(resolved.local_dir), max_length)
                logits = model(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])).logits
                correct += int((logits.argmax(-1) == torch.tensor(enc["labels"])).sum())
        accuracies.append(correct / max(len(rows), 1))
    return accuracies


def _add_to_replay(config: JobConfig, storage: Storage, stream: Stream, outcome: CycleOutcome) -> None:
    """The new window's training rows join the replay buffer (once per file set)."""
    from lifelong.data import read_validated

    buffer = ReplayBuffer(storage, stream.name, config.continual.replay_capacity, seed=config.train.seed)
    if set(outcome.files) <= set(buffer.state()["files"]):
        return
    rows = outcome.train_rows
    if rows is None:  # finishing a cycle registered before a crash: read its files again
        ledger = Ledger(storage, stream.name)
        paths = [ledger.record(h)["path"] for h in outcome.files]
        validated = read_validated(config.require_data("continual learning"), storage, f"streams/{stream.name}", files=paths)
        rows = _collect(validated.split("train"))
    buffer.add(rows, outcome.files)


ROWS = pa.schema([("text", pa.string()), ("label", pa.int64())])


def _collect(ds, columns: list[str] = ("text", "label")) -> pa.Table:
    """Rows of a small dataset (a window) on the driver, as one table of `columns`."""
    import ray

    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    tables = [t.select(list(columns)) for t in tables if t.num_rows]
    if not tables:
        return ROWS.empty_table() if list(columns) == ["text", "label"] else pa.table({c: pa.array([], pa.string()) for c in columns})
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.cast(ROWS) if list(columns) == ["text", "label"] else table
