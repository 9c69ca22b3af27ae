"""MLflow tracking when its server is not there: a run refused before it trains, and a server
lost under a run that goes on. What a tracked run, sweep and cycle log is read back from a real
`mlflow server` in tests/test_train.py, tests/test_tune.py and tests/test_continual.py."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import MlflowServer, make_config
from lifelong.runtime import free_port


def test_a_run_whose_mlflow_server_is_unreachable_stops_before_it_trains(pretrained, demo_data):
    from lifelong.errors import LifelongError
    from lifelong.train.driver import run_training

    root = pretrained["root"]
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = make_config(
        "gpt2/tiny_finetune.yaml",
        f"data.path={demo_data / 'topics.jsonl'}",
        f"storage.root={root}",
        f"model.init_from=tiny-gpt2:{pretrained['outcome'].version}",
        "run_name=untracked",
        f"tracking.mlflow.uri={uri}",
    )
    with pytest.raises(LifelongError) as refused:
        run_training(config)
    message = str(refused.value)
    assert message.startswith(f"cannot log to MLflow at {uri} (tracking.mlflow.uri): ") and "\n" not in message
    assert [p.name for p in (root / "runs" / "untracked").iterdir()] == ["lifelong-run.json"]  # its name taken, nothing trained


def test_an_mlflow_server_killed_under_a_run_costs_it_its_tracking_not_its_training(tmp_path, capsys):
    from lifelong.config import validate_config
    from lifelong.tracking import MlflowRun

    server = MlflowServer(tmp_path / "mlflow")
    try:
        raw = {"name": "drill", "storage": {"root": str(tmp_path / "store")}, "tracking": {"mlflow": {"uri": server.uri}}}
        config = validate_config(raw)
        run = MlflowRun.of(config, "drill-run")
        run.metrics({"train/loss": 1.5}, 1)
        run.flush()  # metrics go out from a thread
        assert server.history(server.runs("drill")["drill-run"], "train/loss") == [(1, 1.5)]
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        run.metrics({"train/loss": 1.25}, 2)  # does not raise
        run.metrics({"train/loss": 1.0}, 3)
        run.end("FINISHED")
    finally:
        server.stop()
    warned = [line for line in capsys.readouterr().out.splitlines() if "MLflow" in line]
    assert len(warned) == 1 and f"MLflow at {server.uri} failed" in warned[0] and "no longer tracked" in warned[0]
    assert run.run_id is None
