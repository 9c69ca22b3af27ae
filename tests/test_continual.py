"""Continual cycles on real Ray Train, Serve and storage: files consumed once, gates, promotion,
hot-swap while a client keeps asking, crash recovery, quarantine."""

import shutil
import threading
import time

import httpx
import pytest

from conftest import make_config, register_tiny
from lifelong.continual.cycle import run_cycle
from lifelong.continual.ledger import Ledger
from lifelong.continual.replay import ReplayBuffer
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.synth import write_stream

pytestmark = pytest.mark.slow


def cl_config(root, landing, name, *extra):
    return make_config(
        "gpt2/tiny_continual.yaml", f"name={name}", f"storage.root={root}", f"data.path={landing}",
        f"continual.landing={landing}", f"model.init_from={name}@champion", "scaling.num_workers=2",
        "train.epochs=3", "train.lr=3e-3", "continual.min_new_rows=100", "continual.gates.max_forgetting=0.15", *extra,
    )


def drop(window_dir, landing):
    for f in sorted(window_dir.iterdir()):
        shutil.copy(f, landing / f"{window_dir.name}-{f.name}")


def expected_decision(outcome, config) -> str:
    cand, champ = outcome.accuracy["candidate"], outcome.accuracy["champion"]
    forgetting = sum(b - a for a, b in zip(cand[:-1], champ[:-1])) / len(cand[:-1]) if len(cand) > 1 else 0.0
    ok = cand[-1] >= champ[-1] - config.continual.gates.new_window_tolerance and forgetting <= config.continual.gates.max_forgetting
    return "promoted" if ok else "rejected"


@pytest.fixture
def stream(ray_session, tiny_tokenizer, topic_rows, tmp_path):
    root, landing = tmp_path / "store", tmp_path / "landing"
    landing.mkdir()
    registry = Registry(Storage(str(root)))
    v1 = register_tiny(registry, "cl-topics", tiny_tokenizer, tmp_path / "work", seed=3, rows=topic_rows[:100])
    registry.move_alias("cl-topics", "champion", v1)
    windows = write_stream(tmp_path / "windows", windows=2, rows_per_window=240, files_per_window=2, seed=0)
    return {"root": root, "landing": landing, "registry": registry, "v1": v1, "windows": windows}


def test_two_cycles_consume_their_files_gate_promote_and_swap_under_load(stream, serve_port):
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.serve import deploy

    root, landing, registry = stream["root"], stream["landing"], stream["registry"]
    config = cl_config(root, landing, "cl-topics")
    url = deploy(absolute_paths(validate_config({"name": "cl-topics", "storage": {"root": str(root)}, "serve": {
        "port": serve_port, "num_replicas": 2, "poll_interval_s": 0.3, "route_prefix": "/cl", "app_name": "cl-topics"}})))
    results, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set() and len(results) < 20000:
                try:
                    r = client.post("/v1/predict", json={"texts": ["rain storm tonight", "stocks fell"]})
                    results.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    results.append((repr(e), None))
                stop.wait(0.05)

    client = threading.Thread(target=load)
    client.start()
    try:
        drop(stream["windows"][0], landing)
        (landing / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
        first = run_cycle(config)
        print(first.summary())
        assert first.window == 0 and first.version is not None and first.status == expected_decision(first, config)
        ledger = Ledger(Storage(str(root)), "cl-topics")
        records = {r["path"].rsplit("/", 1)[-1]: r for r in ledger.records()}
        assert records["broken.parquet"]["state"] == "quarantined" and "unreadable as parquet" in records["broken.parquet"]["reason"]
        window0 = [r for n, r in records.items() if n.startswith("window-000")]
        assert len(window0) == 2 and all(r["state"] == "consumed" and r["consumed_by"] == f"cl-topics:{first.version}" for r in window0)
        assert ReplayBuffer(Storage(str(root)), "cl-topics", 4000).state()["files"] == sorted(first.files)

        drop(stream["windows"][1], landing)
        second = run_cycle(config)
        print(second.summary())
        assert second.window == 1 and second.replay_rows > 0 and second.status == expected_decision(second, config)
        assert sorted(second.files) == sorted(r["sha256"] for r in Ledger(Storage(str(root)), "cl-topics").records()
                                             if r["path"].rsplit("/", 1)[-1].startswith("window-001"))
        assert run_cycle(config).status == "waiting"  # nothing new: no third version

        champion = registry.alias_version("cl-topics", "champion")
        promoted = [o.version for o in (first, second) if o.status == "promoted"]
        assert champion == (promoted[-1] if promoted else stream["v1"])
        for o in (first, second):
            if o.status == "rejected":
                assert registry.aliases("cl-topics")["challenger"]["version"] == o.version or o is first
        # The endpoint ends on the champion, having lost no request on the way.
        served = lambda: httpx.post(url + "/v1/predict", json={"texts": ["x"]}, timeout=30).json()["version"]
        deadline = time.monotonic() + 60
        while served() != champion and time.monotonic() < deadline:
            time.sleep(0.3)
        assert served() == champion
    finally:
        stop.set()
        client.join()
        serve.delete("cl-topics")
    assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
    assert {v for _, v in results} == {stream["v1"], *promoted}


def test_a_cycle_that_dies_before_registering_or_before_marking_counts_each_file_once(stream, monkeypatch):
    import lifelong.continual.cycle as cycle_mod
    import lifelong.train.driver as driver

    root, landing, registry = stream["root"], stream["landing"], stream["registry"]
    config = cl_config(root, landing, "cl-topics", "train.epochs=1", "export.on_register=never")
    drop(stream["windows"][0], landing)
    waiting = run_cycle(cl_config(root, landing, "cl-topics", "continual.min_new_rows=100000"))
    assert waiting.status == "waiting" and "240 new rows pending, a cycle starts at 100000" in waiting.reason

    real_register = driver.register_best
    monkeypatch.setattr(driver, "register_best", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed after training")))
    with pytest.raises(KeyboardInterrupt):
        run_cycle(config)
    monkeypatch.setattr(driver, "register_best", real_register)
    ledger = Ledger(Storage(str(root)), "cl-topics")
    assert ledger.counts() == {"pending": 2, "consumed": 0, "quarantined": 0} and registry.versions("cl-topics") == [stream["v1"]]

    # Dies again, now after registering but before the files are marked.
    real_consume = Ledger.consume
    monkeypatch.setattr(Ledger, "consume", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed before marking")))
    with pytest.raises(KeyboardInterrupt):
        run_cycle(config)
    monkeypatch.setattr(Ledger, "consume", real_consume)
    versions = registry.versions("cl-topics")
    assert len(versions) == 2 and ledger.counts()["pending"] == 2

    outcome = run_cycle(config)  # finishes that cycle: no retraining, no new version
    assert outcome.version == versions[-1] and registry.versions("cl-topics") == versions
    assert ledger.counts() == {"pending": 0, "consumed": 2, "quarantined": 0}
    assert {r["consumed_by"] for r in ledger.records()} == {f"cl-topics:{versions[-1]}"}
    assert cycle_mod.Stream(Storage(str(root)), "cl-topics").state()["windows"][0]["version"] == versions[-1]


@pytest.mark.timeout(1200)
def test_replay_forgets_less_than_naive_on_the_drifting_stream(ray_session, tiny_tokenizer, topic_rows, tmp_path):
    """Class-incremental windows (2 of 4 classes each): after window 1, naive retraining on the new
    rows alone loses window 0; replay keeps it. Same seeds, same starting model, forked after window 0."""
    margins = {}
    for seed in (0, 1):
        base = tmp_path / f"seed{seed}"
        landing = base / "landing"
        landing.mkdir(parents=True)
        registry = Registry(Storage(str(base / "replay")))
        registry.move_alias("cl-topics", "champion", register_tiny(registry, "cl-topics", tiny_tokenizer, base / "work", seed=seed, rows=topic_rows[:60]))
        windows = write_stream(base / "windows", windows=2, rows_per_window=200, files_per_window=1, seed=seed)
        common = ("scaling.num_workers=1", "train.epochs=2", f"train.seed={seed}", "continual.gates.max_forgetting=1.0",
                  "export.on_register=never")
        drop(windows[0], landing)
        print(run_cycle(cl_config(base / "replay", landing, "cl-topics", *common)).summary())
        shutil.copytree(base / "replay", base / "naive")  # both continue from the same champion and ledger
        drop(windows[1], landing)
        forgetting = {}
        for strategy in ("replay", "naive"):
            outcome = run_cycle(cl_config(base / strategy, landing, "cl-topics", *common, f"continual.strategy={strategy}"))
            print(outcome.summary())
            assert (outcome.replay_rows > 0) == (strategy == "replay")
            forgetting[strategy] = outcome.accuracy["champion"][0] - outcome.accuracy["candidate"][0]
        margins[seed] = forgetting
    assert all(f["naive"] - f["replay"] >= 0.3 for f in margins.values()), margins
