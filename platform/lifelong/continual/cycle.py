"""One continual-learning cycle: new files → retrain from the champion (+ replay) → gates → promote.

    lock the stream ; an unfinished window (a cycle that stopped)? → carry it on from its step
    scan the landing zone → ledger (copied, hashed, parsed and validated once per file)
    check pending files under the config (bad ones quarantined, per file) → enough rows? else wait
    open window k (the journal, stream.py): files (oldest first, up to max_rows_per_cycle)
      open        holdout_k ← the files' validation rows ; train ← their train rows + a replay
                  sample ; DeepSpeed from the pinned champion (one worker: in the driver's
                  warm trainer actor; more: a Ray Train run) → register (card: stream,
                  window, files)
      registered  candidate, champion and the stream's first model score every finished
                  window's holdout and the new one → gates (gates.py) → decision recorded
      decided     champion moves to the candidate (or challenger, with the reason)
      promoted    the window's train rows join the replay buffer
      replayed    the files are consumed by the version (ledger)
      consumed    state.json gains the window → done

Every step can be repeated: the run name depends on the window and its files (a re-started
cycle resumes the same run from its checkpoints), `register_best` does not register the same checkpoint
twice, the alias move checks where the alias is, the buffer and the ledger skip what they hold.
A window whose training fails `continual.max_attempts` times is given up: its files are
quarantined with the error (requeue them once the cause is fixed).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from lifelong import metrics, notify, tracking
from lifelong.config import JobConfig
from lifelong.console import cycle_bar, phase
from lifelong.console import say as console_say
from lifelong.continual.drift import line as drift_line
from lifelong.continual.drift import measurable as drift_measurable
from lifelong.continual.drift import measure as measure_drift
from lifelong.continual.gates import REFERENCE_METRICS, gate, gated_values, window_value
from lifelong.continual.ledger import FileRecord, Ledger
from lifelong.continual.replay import ReplayBuffer
from lifelong.continual.search import Fitted, shown_params
from lifelong.continual.stream import Decision, Stream, Window, rows_schema, window_rows
from lifelong.data import REPLAYED, RESPONSE, DataReport, FileReport, validation_fingerprint
from lifelong.errors import AliasConflict, ConfigError, LifelongError, first_line
from lifelong.feedback import join_feedback
from lifelong.registry import Registry
from lifelong.runtime import gather
from lifelong.storage import Storage, is_uri
from lifelong.tasks import holdout_metric, task, with_capability


@dataclass(frozen=True)
class CycleOutcome:
    """What one cycle did, for the console and for callers (built once, at the end)."""

    stream: str
    status: str = "waiting"  # waiting | promoted | passed | rejected
    reason: str = ""
    window: int | None = None
    version: int | None = None
    champion_before: int | None = None
    files: list[str] = field(default_factory=list)
    new_rows: int = 0
    replay_rows: int = 0
    accuracy: dict = field(default_factory=dict)  # {"candidate": [...], "champion": [...]} per window (the task's metric)
    metric: str = "accuracy"  # what those lists hold: accuracy, perplexity
    metrics: dict = field(default_factory=dict)
    scan: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) set aside by this cycle
    quarantined_total: int = 0
    recovered: bool = False
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)
    search: list[dict] = field(default_factory=list)  # continual.search: every trial, the chosen one marked

    def summary(self) -> str:
        head = f"cycle of stream '{self.stream}': {self.status}" + (f" (window {self.window})" if self.window is not None else "")
        lines = [head + (" — finished a cycle that had stopped" if self.recovered else "")]
        lines += [f"  landing zone: {line}" for line in self.scan]
        lines += [f"  quarantined: {path}: {reason}" for path, reason in self.quarantined]
        if self.quarantined_total:
            lines.append(
                f"  {self.quarantined_total} file(s) quarantined in this stream: `lifelong continual ledger CONFIG --state quarantined` "
                "lists them; `lifelong continual requeue CONFIG --all` retries them once fixed"
            )
        if self.status == "waiting":
            lines.append(f"  {self.reason}")
            return "\n".join(lines)
        lines.append(
            f"  trained on {len(self.files)} new file(s), {self.new_rows} new rows + {self.replay_rows} replayed, "
            f"from version {self.champion_before}, in {self.seconds:.0f} s → version {self.version}"
        )
        cand, champ = self.accuracy.get("candidate", []), self.accuracy.get("champion", [])
        lines.append(
            f"  {self.metric} per window: " + "  ".join(f"w{j}: {c:.3f} (champion {b:.3f})" for j, (c, b) in enumerate(zip(cand, champ)))
        )
        chosen = next((t for t in self.search if t.get("chosen")), None)
        if chosen:
            lines.append(
                f"  search: {len(self.search)} trials; chose trial {chosen['trial'] + 1} {shown_params(chosen['params'])}: "
                f"gain {chosen['gain']:+.3f} on the new window, forgetting {chosen['forgetting']:.3f}"
            )
        if self.phases:
            lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.phases.items()))
        lines.append(f"  decision: {self.status}: {self.reason}")
        if self.metrics:
            shown = {k: v for k, v in self.metrics.items() if k != "windows"}
            lines.append("  CL metrics: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} -" for k, v in shown.items()))
        return "\n".join(lines)


def row_columns(config: JobConfig) -> tuple[str, bool]:
    """What a window's rows hold: the content column's kind, and whether responses follow."""
    return config.data.content, config.data.response_column is not None


def stream_name(config: JobConfig) -> str:
    return config.continual.stream or config.name


def check_continual(config: JobConfig) -> None:
    """What a cycle needs from the config and the landing zone, refused before Ray starts (once
    per command)."""
    from lifelong.storage import filesystem_for

    check_stream(config)
    landing = config.continual.landing
    if is_uri(landing):
        filesystem_for(landing)  # a malformed URI gets its one-line message here
    elif config.serve.log_predictions is not None and not Path(landing).expanduser().exists():
        Path(landing).expanduser().mkdir(parents=True)  # where the cycles land the labels users send
    elif not Path(landing).expanduser().is_dir():
        raise LifelongError(f"continual.landing '{landing}' is not a directory: create it (new data files are dropped there)")


def check_stream(config: JobConfig) -> None:
    """What a cycle needs from the config alone (`lifelong submit continual` checks it here; the
    landing zone may exist only on the cluster)."""
    if not config.continual.landing:
        raise LifelongError("continual.landing is not set: name the directory or URI where new data files arrive")
    family = task(config.model.task)
    if not family.CONTINUAL:
        raise LifelongError(
            f"continual learning gates on each window's holdout: it is built for model.task={' or '.join(with_capability('CONTINUAL'))} "
            f"(got {config.model.task})"
        )
    if family.LABELLED and (not config.data or not config.data.labels):
        raise LifelongError(
            "continual learning needs data.labels (and data.label_column for table files): every landing file is checked against them"
        )
    metric = config.continual.gates.metric
    if metric and metric not in family.GATE_METRICS:
        raise LifelongError(f"continual.gates.metric={metric}: a {family.NAME} stream gates on {' or '.join(family.GATE_METRICS)}")
    if metric in REFERENCE_METRICS and not (config.data and config.data.response_column):
        raise LifelongError(
            f"continual.gates.metric={metric} scores answers against each holdout's responses: it needs instruction data "
            "(data.prompt_column and data.response_column)"
        )
    if config.serve.log_predictions is not None and not family.LABELLED and not (config.data and config.data.response_column):
        raise LifelongError(
            "serve.log_predictions: a cycle lands the labels users send as training rows, which a language model takes as "
            "instruction data: set data.prompt_column and data.response_column (the label being the right answer)"
        )
    if config.continual.trigger != "rows" and not drift_measurable(family):
        raise LifelongError(
            f"continual.trigger={config.continual.trigger}: drift is measured on the champion's answers (a classifier's classes, "
            f"a language model's losses), which a {family.NAME} model does not give: use continual.trigger=rows"
        )
    if not family.LABELLED and config.continual.new_labels == "grow":
        raise LifelongError(f"continual.new_labels: grow is for classifiers; a {family.NAME} stream has no labels (remove the key)")


def run_cycle(config: JobConfig, force: bool = False) -> CycleOutcome:
    """One cycle (the lock keeps a second one on the same stream out). `force` ignores min_new_rows."""
    check_continual(config)  # cheap; callers that start Ray check it before that too
    c, data_cfg = config.continual, config.require_data("continual learning")
    storage = Storage(config.storage.root)
    registry = Registry(storage)
    name = stream_name(config)
    started = time.perf_counter()
    with storage.lock(f"streams/{name}/cycle") as hold:
        stream, ledger = Stream(storage, name, hold), Ledger(storage, name)
        window = stream.unfinished()
        scan_lines, quarantined = [], []
        if window is not None:
            say(f"carrying on window {window.window} of stream '{name}' from step '{window.status}' (its cycle had stopped)")
        else:
            t0 = time.perf_counter()
            if data_cfg.labels:
                data_cfg = data_cfg.with_labels(stream.labels(data_cfg.labels), c.new_labels == "grow")
            # serve.log_predictions: the labels users sent for served answers land as a file first.
            joined = join_feedback(config, storage, name) if config.serve.log_predictions is not None else None
            scan = ledger.scan(c.landing, data_cfg)
            set_aside = scan.quarantined + ledger.check_pending(data_cfg, c.landing)
            scan_lines = scan.lines() + ([joined.line()] if joined and (joined.rows or joined.recovered) else [])
            if data_cfg.grow_labels:
                added = stream.grow_labels(data_cfg.labels, [n for r in ledger.pending() if r.check for n in r.check.new_labels])
                if added:  # the pending files are judged again against the grown set (their new labels' rows kept now)
                    data_cfg = data_cfg.with_labels(data_cfg.labels + added, True)
                    set_aside += ledger.check_pending(data_cfg, c.landing)
                    scan_lines.append(f"new labels {added}: the stream's label set is now {data_cfg.labels}")
            quarantined = [(r.path, r.reason) for r in set_aside]  # the summary lists them
            picked = pick_files(ledger.pending(), c.max_rows_per_cycle)
            # continual.trigger drift|any: how far the pending rows moved from the last window's.
            drift = (
                measure_drift(config, storage, registry, stream, ledger, picked, validation_fingerprint(data_cfg))
                if c.trigger != "rows" and not force
                else None
            )
            if drift:
                scan_lines.append(drift_line(drift))
            waiting = why_wait(picked, c, force, drift)
            if waiting:
                return _measured(
                    ledger,
                    CycleOutcome(
                        name,
                        reason=waiting,
                        scan=scan_lines,
                        quarantined=quarantined,
                        quarantined_total=_count_quarantined(ledger, quarantined),
                        seconds=time.perf_counter() - started,
                    ),
                )
            champion = registry.resolve(f"{config.name}@champion", weights=False)
            window = stream.open_window(
                files=[r.sha256 for r in picked],
                paths=[r.path for r in picked],
                fingerprint=validation_fingerprint(data_cfg),
                labels=data_cfg.labels,
                champion_before=champion.version,
                new_rows=sum(r.rows for r in picked),
                drift=drift,
                phases={"scan": time.perf_counter() - t0},
            )
        with cycle_bar(f"cycle window {window.window} of '{name}'"):
            window = advance(config, storage, registry, stream, ledger, window)
        d = window.decision
        outcome = CycleOutcome(
            name,
            status=d.status,
            reason=d.reason,
            window=window.window,
            version=window.version,
            champion_before=window.champion_before,
            files=window.files,
            new_rows=window.new_rows,
            replay_rows=window.replay_rows,
            accuracy={"candidate": d.candidate, "champion": d.champion},
            metric=holdout_metric(config),
            metrics=stream.finished()[-1].get("metrics", {}),
            scan=scan_lines,
            quarantined=quarantined,
            quarantined_total=_count_quarantined(ledger, quarantined),
            recovered=not scan_lines,
            seconds=time.perf_counter() - started,
            phases=window.phases,
            search=window.search,
        )
        tracking.cycle(config, outcome)
        return _measured(ledger, outcome)


def _measured(ledger: Ledger, outcome: CycleOutcome) -> CycleOutcome:
    """Its Prometheus metrics recorded (lifelong.metrics); the ledger is counted after a trained window only."""
    metrics.cycle(outcome, ledger.counts() if outcome.window is not None else None)
    return outcome


def say(message: str) -> None:
    console_say(f"[lifelong] {message}")


def pick_files(pending: list[FileRecord], max_rows: int) -> list[FileRecord]:
    """Pending files with valid rows, oldest first, up to `max_rows` (at least one file): the
    rest waits for the next cycle, so a backlog never lands on the driver at once."""
    picked, rows = [], 0
    for record in pending:
        if not record.rows:
            continue
        if picked and rows + record.rows > max_rows:
            break
        picked.append(record)
        rows += record.rows
    return picked


def why_wait(picked: list[FileRecord], c, force: bool, drift: dict | None = None) -> str:
    """Why this cycle does not train (empty: it does). `drift`: the pending rows' drift from the
    last window (continual.trigger drift|any; None: none measured, no window trained yet)."""
    if not picked:
        return "no new files with valid rows pending"
    rows = sum(r.rows for r in picked)
    splits = {}
    for r in picked:
        for split, n in r.check.splits.items():
            splits[split] = splits.get(split, 0) + n
    waited = time.time() - min(r.first_seen for r in picked)
    aged = bool(c.max_wait_s and waited >= c.max_wait_s)
    enough = rows >= c.min_new_rows
    drifted = bool(drift and drift["drifted"])
    if c.trigger == "drift" and drift is not None:
        start = drifted or aged  # rows alone hold back: nothing moved
    elif c.trigger == "any":
        start = enough or drifted or aged
    else:  # rows, or drift before any window was trained (nothing to compare with: the first starts on rows)
        start = enough or aged
    if not force and not start:
        after = f" or after {c.max_wait_s:.0f} s ({waited:.0f} s so far)" if c.max_wait_s else ""
        if c.trigger == "drift" and drift is not None:
            return f"waiting: {rows} new rows pending that did not drift from window {drift['window']} (continual.trigger=drift){after}"
        if c.trigger == "any" and drift is not None:
            return (
                f"waiting: {rows} new rows pending, no drift from window {drift['window']}; "
                f"a cycle starts at {c.min_new_rows} rows, on drift{after}"
            )
        return f"waiting: {rows} new rows pending, a cycle starts at {c.min_new_rows}" + after
    if not splits.get("validation") or not splits.get("train"):
        return f"waiting: the new rows do not yet give both a training and a holdout split ({splits})"
    return ""


def _count_quarantined(ledger: Ledger, fresh: list) -> int:
    # Only when something was set aside now: counting reads the whole ledger, which polls avoid.
    return ledger.counts()["quarantined"] if fresh else 0


# --- the steps of a window ------------------------------------------------------------------------
def advance(config: JobConfig, storage: Storage, registry: Registry, stream: Stream, ledger: Ledger, window: Window) -> Window:
    """Carry the window from its recorded step to done; each step is recorded when it is through."""
    config = window_config(config, window)
    if window.status == "open":
        phase("preparing the data")
        window = _train_and_register(config, storage, registry, stream, ledger, window)
    if window.status == "registered":
        phase(f"evaluating version {window.version} and the champion on every window")
        window = _decide(config, storage, stream, window)
    if window.status == "decided":
        phase(f"applying the decision: {window.decision.status}")
        window = _apply_decision(config, registry, stream, window)
    if window.status == "promoted":
        phase("adding the window's rows to the replay buffer")
        t0 = time.perf_counter()
        train, _ = window_rows(storage, [ledger.rows_rel(h, window.fingerprint) for h in window.files], *row_columns(config))
        # The buffer is filled under both strategies, so that a stream can switch to replay later.
        ReplayBuffer(storage, stream.name, config.continual.replay_capacity, seed=config.train.seed).add(train, window.files)
        window = stream.update(window, status="replayed", phases={**window.phases, "replay": time.perf_counter() - t0})
    if window.status == "replayed":
        stream.check()
        ledger.consume(window.files, f"{config.name}:{window.version}")
        window = stream.update(window, status="consumed")
    if window.status == "consumed":
        d = window.decision
        summary = {
            "window": window.window,
            "files": window.files,
            "version": window.version,
            "status": d.status,
            "reason": d.reason,
            "champion_before": window.champion_before,
            "row": d.candidate if d.status == "promoted" else d.champion,  # the model serving after this window
            "candidate": d.candidate,
            "champion": d.champion,
            "new_rows": window.new_rows,
            "replay_rows": window.replay_rows,
            "finished_at": time.time(),
        }
        stream.finish(summary, d.baseline, d.start_version, holdout_metric(config))
        window = stream.update(window, status="done", finished_at=time.time())
        prune_runs(storage, stream, config.continual.keep_runs)
    return window


def window_config(config: JobConfig, window: Window) -> JobConfig:
    """The config a window trains and is judged under: its label set (a stream's grown one)."""
    if not window.labels or window.labels == config.data.labels:
        return config
    return config.model_copy(update={"data": config.data.with_labels(window.labels, config.data.grow_labels)})


def prune_runs(storage: Storage, stream: Stream, keep: int) -> list[str]:
    """Delete the Ray Train runs (checkpoints) of finished windows but the `keep` most recent;
    their versions are in the registry. Returns the run names deleted."""
    done = [w for w in stream.journal() if w.status in ("done", "failed")]
    gone = []
    for w in done[:-keep]:
        rel = f"runs/{run_name(stream.name, w)}"
        if storage.exists(rel):
            storage.fs.delete_dir(storage.path(rel))
            gone.append(rel)
    return gone


def _train_and_register(config: JobConfig, storage: Storage, registry: Registry, stream: Stream, ledger: Ledger, window: Window) -> Window:
    """Window k's holdout and training set, DeepSpeed from the pinned champion (one candidate, or
    the best of a `continual.search`), a version."""
    from lifelong.continual.search import search
    from lifelong.train.driver import register_best

    c, k = config.continual, window.window
    run = run_name(stream.name, window)
    t0 = time.perf_counter()
    content, labels = config.data.content, config.data.labels
    train, holdout = window_rows(storage, [ledger.rows_rel(h, window.fingerprint) for h in window.files], *row_columns(config))
    # The holdout, kept for every later cycle's evaluation (label names: every model is scored
    # against its own label set; an instruction's response). Rewritten on every attempt: it
    # follows from the window's files.
    kept = {content: holdout.column(content)}
    if labels:
        kept["label"] = pa.array([labels[i] for i in holdout.column("label").to_pylist()], pa.string())
    if RESPONSE in holdout.column_names:
        kept[RESPONSE] = holdout.column(RESPONSE)
    storage.write_table(stream.holdout_rel(k), pa.table(kept))
    champion_ref = f"{config.name}:{window.champion_before}"
    registered = _registered_for(registry, config.name, stream.name, k) if window.train_started else None
    if registered is not None:  # the cycle stopped between registering and recording it
        say(f"cycle window {k}: already registered as {config.name}:{registered}")
        card = registry.card(config.name, registered).stream
        return stream.update(
            window, status="registered", version=registered, replay_rows=card.replay_rows, search=card.search, search_pending=None
        )
    window = stream.update(window, train_started=time.time())
    known_before = registry.card(config.name, window.champion_before).labels or labels or []
    report = window_report(ledger, window, train.num_rows, holdout.num_rows)
    spent = {"prepare": time.perf_counter() - t0, "train": 0.0}

    def fit(trial_config: JobConfig, trial_run: str) -> Fitted:
        return _fit(trial_config, storage, registry, stream, window, train, holdout, report, trial_run, champion_ref, spent)

    def record(trials: list[dict], pending: dict | None) -> None:
        nonlocal window
        window = stream.update(window, search=trials, search_pending=pending)

    try:
        if c.search:
            windows = [w["window"] for w in stream.finished()] + [k]

            def accuracies(model) -> list[float]:
                t = time.perf_counter()
                scored = holdout_values(config, storage, stream, [model if isinstance(model, str) else _best(model)], windows)[0]
                spent["score"] = spent.get("score", 0.0) + time.perf_counter() - t
                return scored

            champion = accuracies(champion_ref)
            fitted, trials = search(config, window, stream.journal(), record, fit, accuracies, champion, run, say)
        else:
            fitted, trials = fit(config, run), []
        t2 = time.perf_counter()
        stream.check()  # training is long: register only while the cycle lock is still ours
        trained = register_best(
            fitted.prep,
            fitted.result,
            fitted.run,
            extra_card={
                "stream": {
                    "name": stream.name,
                    "window": k,
                    "files": window.files,
                    "strategy": c.strategy,
                    "new_rows": window.new_rows,
                    "replay_rows": fitted.replay_rows,
                    "champion_before": window.champion_before,
                    "labels_added": [n for n in labels or [] if n not in known_before],
                    **({"drift": window.drift} if getattr(window, "drift", None) else {}),
                    "held_by": stream.hold.fence if stream.hold else None,
                    **({"search": trials} if trials else {}),
                }
            },
        )
    except ConfigError:
        raise  # the config's to fix, not the window's: no attempt counted, nothing quarantined
    except Exception as e:
        raise _failed(config, stream, ledger, window, e) from None
    phases = {**window.phases, **spent, "register": time.perf_counter() - t2}
    return stream.update(
        window,
        status="registered",
        version=trained.version,
        replay_rows=fitted.replay_rows,
        search=trials,
        search_pending=None,
        phases=phases,
    )


def _fit(
    config: JobConfig,
    storage: Storage,
    registry: Registry,
    stream: Stream,
    window: Window,
    train: pa.Table,
    holdout: pa.Table,
    report: DataReport,
    run: str,
    champion_ref: str,
    spent: dict,
) -> Fitted:
    """One candidate: the window's train rows plus a replay sample (config.continual.replay_ratio),
    trained from the champion under `config` as run `run` (resumed from its checkpoints)."""
    from lifelong.train.driver import prepare_data_from_tables, prepare_run

    c, k = config.continual, window.window
    t0 = time.perf_counter()
    parts, replay_rows, weights, weighted, refreshed = [train], 0, None, "", ""
    sampled_rows = 0
    samples = []
    if c.strategy == "replay":
        buffer = ReplayBuffer(storage, stream.name, c.replay_capacity, seed=config.train.seed)
        count = config.train.epochs if c.replay_refresh == "epoch" else 1
        samples = buffer.samples(round(c.replay_ratio * train.num_rows), count, seed=config.train.seed + k)
        if samples:
            replay_rows = samples[0].num_rows
            sampled_rows = sum(sample.num_rows for sample in samples)
            schema = rows_schema(*row_columns(config))
            parts += [sample.select(schema.names).cast(schema) for sample in samples]
            state = buffer.state()
            if count > 1:
                refreshed = f" per epoch ({count} samples of the buffer's {state['rows']} rows)"
            if c.replay_weighting == "history":
                seen = state["seen"]
                weights = history_weights(train.num_rows, replay_rows, seen)
                weighted = f" (weighted {weights['replayed'] / weights['new']:.1f}x, standing for the {seen} rows trained on before)"
    if (c.distill_weight or weights or len(samples) > 1) and replay_rows:
        # The loop trains epoch e on the new rows (0) and sample e's rows (e, counted from 1) of this
        # column, and weighs and distills the replayed ones (train/loop.py).
        parts = [p.append_column(REPLAYED, pa.repeat(pa.scalar(i, pa.int64()), p.num_rows)) for i, p in enumerate(parts)]
    cycle_config = config.model_copy(update={"run_name": run, "model": config.model.model_copy(update={"init_from": champion_ref})})
    say(
        f"cycle window {k}: {window.new_rows} new rows ({len(window.files)} files) + {replay_rows} replayed{refreshed}{weighted}, "
        f"from {champion_ref}, run '{run}'" + (f" (attempt {window.attempts + 1})" if window.attempts else "")
    )
    data = prepare_data_from_tables(cycle_config, storage, registry, pa.concat_tables(parts), holdout, report)
    # One epoch trains on the new rows and one sample: its share of the examples (rows, or packed
    # blocks of a language model's text, which the rows' share estimates).
    epoch_examples = None
    if len(samples) > 1:
        epoch_examples = round(data.train_examples * (train.num_rows + replay_rows) / (train.num_rows + sampled_rows))
    prep = replace(prepare_run(cycle_config, data, epoch_examples=epoch_examples), row_weights=weights, replay_samples=max(len(samples), 1))
    tracking.begin(cycle_config, run, parent=tracking.cycle_run(stream.name, k))  # MLflow: under the cycle's run
    t1 = time.perf_counter()
    result = _train(prep, run)
    spent["prepare"] += t1 - t0
    spent["train"] += time.perf_counter() - t1
    if result.error:
        raise LifelongError(f"cycle training run '{run}' failed: {result.error}")
    return Fitted(prep, result, run, replay_rows)


def history_weights(new: int, replayed: int, seen: int) -> dict[str, float]:
    """Loss weights under which `replayed` rows stand for the `seen` rows trained on before, so the
    window's `new` rows keep the share of the loss they would have among all rows, new / (new + seen),
    as in full retraining; the mean weight over the cycle's rows stays 1 (the learning rate means
    what it says)."""
    w_new = (new + replayed) / (new + seen)
    return {"new": w_new, "replayed": w_new * seen / replayed}


def _best(fitted: Fitted):
    """A fitted candidate's best checkpoint (by the config's checkpoint score), to be scored."""
    from lifelong.train.driver import best_checkpoint

    ckpt = fitted.prep.config.train.checkpoint
    best = best_checkpoint(fitted.result, ckpt.score_attribute, ckpt.score_order)
    if best is None:
        raise LifelongError(f"training run '{fitted.run}' reported no checkpoint")
    return best[0]


def _train(prep, run: str):
    """A one-worker window trains in this driver's warm actor (no Ray Train start-up per cycle);
    more workers, in a Ray Train run (train/driver.py, fit). Either resumes the run from its checkpoints."""
    from lifelong.train.driver import fit

    phase("training")
    return fit(prep, run)


def _registered_for(registry: Registry, model: str, stream: str, k: int) -> int | None:
    found = registry.find_versions(model, lambda card: card.stream is not None and (card.stream.name, card.stream.window) == (stream, k))
    return found[-1] if found else None


def run_name(stream: str, window: Window) -> str:
    """Window k's Ray Train run: a re-started cycle resumes it (same window, same files)."""
    files_key = hashlib.sha256("".join(sorted(window.files)).encode()).hexdigest()[:10]
    return f"{stream}-w{window.window:03d}-{files_key}"


def window_report(ledger: Ledger, window: Window, train_rows: int, holdout_rows: int) -> DataReport:
    """What the window's version trained on, for its card: the files as the ledger recorded them."""
    files, dropped = [], {}
    for digest in window.files:
        r = ledger.record(digest)
        check = r.check
        files.append(
            FileReport(
                r.path,
                r.format,
                "ok",
                rows=check.rows,
                size=r.size or 0,
                sha256=digest,
                read=check.read,
                dropped=check.dropped,
                splits=check.splits,
            )
        )
        for reason, n in check.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return DataReport(f"stream {ledger.stream}", files, dropped, {"train": train_rows, "validation": holdout_rows})


def _failed(config: JobConfig, stream: Stream, ledger: Ledger, window: Window, error: Exception) -> LifelongError:
    """Count a failed attempt; after max_attempts, give the window up and quarantine its files."""
    attempts = window.attempts + 1
    why = first_line(error)
    limit = config.continual.max_attempts
    k = window.window
    if attempts < limit:
        stream.update(window, attempts=attempts, last_error=why)
        return LifelongError(f"cycle window {k}: training failed (attempt {attempts} of {limit}): {why}; the next cycle tries again")
    stream.update(window, attempts=attempts, last_error=why, status="failed", failed_at=time.time())
    for digest in window.files:
        ledger.quarantine(
            digest, f"window {k} failed to train {attempts} times: {why}; fix the cause, then `lifelong continual requeue CONFIG --all`"
        )
    return LifelongError(
        f"cycle window {k} failed to train {attempts} times ({why}): its {len(window.files)} file(s) are "
        "quarantined; fix the cause, then `lifelong continual requeue CONFIG --all`"
    )


def _decide(config: JobConfig, storage: Storage, stream: Stream, window: Window) -> Window:
    """Score candidate, champion and the stream's first model on every window's holdout; gate."""
    c = config.continual
    finished = stream.finished()
    start = stream.state().get("start_version") or window.champion_before
    refs = [f"{config.name}:{window.version}", f"{config.name}:{window.champion_before}"]
    if start != window.champion_before:
        refs.append(f"{config.name}:{start}")
    t0 = time.perf_counter()
    metric = holdout_metric(config)
    scores = holdout_scores(config, storage, stream, refs, [w["window"] for w in finished] + [window.window])
    cand, champ = ([window_value(metric, w) for w in scored["windows"]] for scored in scores[:2])
    gate_cand, gate_champ, note = gated_values(metric, scores[0], scores[1])
    decided = gate(metric, gate_cand, gate_champ, c.gates)
    status = ("promoted" if c.promote and not c.promotion else "passed") if decided.passed else "rejected"
    if decided.passed and c.promotion:
        note += f"; champion once it passes the live gates ({c.promotion.shadow_requests} shadow answers, continual.promotion)"
    baseline = window_value(metric, scores[-1]["windows"][-1])
    decision = Decision(status=status, reason=decided.reason + note, candidate=cand, champion=champ, baseline=baseline, start_version=start)
    return stream.update(window, status="decided", decision=decision, phases={**window.phases, "evaluate": time.perf_counter() - t0})


def _apply_decision(config: JobConfig, registry: Registry, stream: Stream, window: Window) -> Window:
    """Move the alias the decision names; a move someone made meanwhile wins (the candidate then
    becomes challenger). Repeating this after a crash finds the alias already moved."""
    name, version, d = config.name, window.version, window.decision
    alias = "champion" if d.status == "promoted" else "challenger"
    stream.check()
    if registry.aliases(name).get(alias, {}).get("version") != version:
        if d.status == "rejected":
            registry.move_alias(name, "challenger", version, reason=f"rejected by the gates: {d.reason}")
            _rejected(config, stream, window, d.reason)
        else:
            try:  # only from the champion the gates compared against
                registry.move_alias(
                    name,
                    alias,
                    version,
                    reason=f"passed the gates of window {window.window}: {d.reason}",
                    # a candidate for the endpoint's live gates (serve.shadow answers, then champion)
                    kind="candidate" if config.continual.promotion and alias == "challenger" else "promote",
                    expect=window.champion_before if alias == "champion" else ...,
                )
            except AliasConflict as e:
                d = d.model_copy(update={"status": "rejected", "reason": f"not promoted: {e}"})
                registry.move_alias(name, "challenger", version, reason=d.reason)
                _rejected(config, stream, window, d.reason)
    return stream.update(window, status="promoted", decision=d)


def _rejected(config: JobConfig, stream: Stream, window: Window, reason: str) -> None:
    d = window.decision
    notify.event(
        "gate.rejected",
        config.notify,
        model=config.name,
        stream=stream.name,
        window=window.window,
        version=window.version,
        champion=window.champion_before,
        reason=reason,
        candidate=d.candidate,
        champion_scores=d.champion,
    )


def holdout_values(config: JobConfig, storage: Storage, stream: Stream, refs: list, windows: list[int]) -> list[list[float]]:
    """The stream's metric (holdout_metric: accuracy, perplexity, bleu ...) of each model (a registry version NAME:VERSION, or
    a training checkpoint) on each window's holdout, every row counted (a class the model does not
    know is an error)."""
    metric = holdout_metric(config)
    scores = holdout_scores(config, storage, stream, refs, windows)
    return [[window_value(metric, counts) for counts in scored["windows"]] for scored in scores]


def holdout_scores(config: JobConfig, storage: Storage, stream: Stream, refs: list, windows: list[int]) -> list[dict]:
    """Each model's counts on each window's holdout, as its task counts them (`holdout_counts`:
    per class {label: [correct, rows]}, or a language model's summed loss and tokens):
    {"labels": the model's label set, "windows": [counts, ...]}. Each model is loaded once and
    scores every holdout. Holdouts of at most data.in_process_mb in all are scored here, one model
    after another: a Ray task per model started a worker that imported torch first, 8-16 s of
    every image cycle whose training took 1-4 s. Larger ones: a Ray task per model, side by side."""
    import ray

    d = config.data
    rels = [stream.holdout_rel(j) for j in windows]
    legacy = (d.text_column, d.label_column)
    # A gate on answers (bleu, chrf, exact_match): each model answers each holdout's first prompts.
    generate = (config.continual.gates.generate_rows, config.serve.max_new_tokens) if holdout_metric(config) in REFERENCE_METRICS else None
    jobs = [(storage, ref, rels, config.model.task, config.model.max_length, legacy, generate) for ref in refs]
    if sum(storage.fs.get_file_info(storage.path(rel)).size or 0 for rel in rels) <= d.in_process_mb * 2**20:
        return [_score_holdouts(*job) for job in jobs]
    score = ray.remote(num_cpus=1)(_score_holdouts)
    return gather([score.remote(*job) for job in jobs], "scoring the holdouts")


@contextlib.contextmanager
def _model_dir(storage: Storage, ref):
    """The HF directory of a registry version, or of a training checkpoint (its `hf/`)."""
    if isinstance(ref, str):
        yield Registry(storage).resolve(ref).local_dir
        return
    from lifelong.models import adapter_base, is_adapter, merge_adapter

    with ref.as_directory() as checkpoint_dir:
        hf = Path(checkpoint_dir) / "hf"
        if not is_adapter(hf):
            yield hf
            return
        with tempfile.TemporaryDirectory(prefix="lifelong-merged-") as merged:  # adapters (train.lora) on their base
            base = Registry(storage).resolve(adapter_base(hf))
            merge_adapter(base.local_dir, hf, merged, base.task, base.card.labels if base.card else None)
            yield Path(merged)


def _score_holdouts(
    storage: Storage,
    ref,
    rels: list[str],
    task_name: str,
    max_length: int,
    legacy_columns: tuple[str, str | None],
    generate: tuple[int, int] | None = None,
) -> dict:
    from lifelong.models import load_for_inference

    family = task(task_name)
    windows = []
    with _model_dir(storage, ref) as model_dir:
        model = load_for_inference(model_dir, task_name)
        for rel in rels:
            table = storage.read_table(rel)
            if family.LABELLED and "label" not in table.column_names:  # a holdout written before label sets could grow
                table = pa.table({family.CONTENT: table.column(legacy_columns[0]), "label": table.column(legacy_columns[1])})
            windows.append(family.holdout_counts(model, model_dir, table, max_length, **({"generate": generate} if generate else {})))
        return {"labels": family.model_labels(model), "windows": windows}
