"""Config: every shipped config loads; wrong keys, types and combinations fail early and clearly."""

import glob
import os
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, ROOT
from lifelong.config import load_config, probe_values
from lifelong.errors import ConfigError

SHIPPED = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_shipped_config_loads_and_names_its_command(path):
    config = load_config(path)
    assert config.name
    first = open(path).readline()
    assert first.startswith("# lifelong "), f"{path}: the first line must be the command that runs it"
    assert os.path.relpath(path, ROOT) in first


def test_override_sets_nested_keys_with_yaml_types():
    config = load_config(SHIPPED[0], ["train.lr=3e-4", "train.deepspeed.zero_stage=3", "train.epochs=5"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.deepspeed.zero_stage == 3
    assert config.train.epochs == 5


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(CONFIGS, "gpt2/tiny_pretrain.yaml"), ["train.lrr=0.1"])
    msg = str(e.value)
    assert "tiny_pretrain.yaml" in msg and "train.lrr" in msg and "did you mean 'train.lr'" in msg
    assert "command-line override" in msg


def test_wrong_type_names_the_key_and_value(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndata: {path: d.jsonl}\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "train.epochs" in str(e.value) and "'many'" in str(e.value) and "bad.yaml" in str(e.value)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("name: x\nmodel: {task: sequence-classification, init_from: m@champion}\ndata: {path: d}\n", "data.label_column"),
        ("name: x\ndata: {path: d}\ntrain: {precision: fp16}\nscaling: {use_gpu: false}\n", "fp16 needs CUDA"),
        ("name: x\ndata: {path: d}\nmodel: {train_last_n_layers: 1}\n", "model.init_from"),
        ("name: x\ndata: {path: d, labels: [a, a], label_column: y}\n", "duplicates"),
        ("name: 'bad name'\ndata: {path: d}\n", "name"),
        ("data: {path: d}\n", "name: required key is missing"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: x\nserve: {max_batch_size: 32, max_ongoing_requests: 8}\n", "serve.max_ongoing_requests=8 is below"),
        ("name: x\nserve: {backend: tensorrt}\n", "serve.backend"),
        ("name: x\nserve: {autoscaling: {min_replicas: 3, max_replicas: 2}}\n", "min_replicas"),
        ("name: x\nserve: {portt: 80}\n", "did you mean 'serve.port'"),
        ("name: x\nexport: {parity_tolerance: 0}\n", "export.parity_tolerance"),
        ("name: x\ntracking: {mlflow: {uri: 'http://host:5000 /x'}}\n", "tracking.mlflow.uri"),
        ("name: x\ntracking: {mlflow: {experiment: topics}}\n", "tracking.mlflow.uri: required key is missing"),
        ("name: x\ntracking: {mlflow: {uri: 'http://h:5000', experment: t}}\n", "did you mean 'tracking.mlflow.experiment'"),
        ("name: x\ntrain: {lora: {rnk: 4}}\n", "train.lora.rnk: unknown key; known keys here: r, alpha"),  # an optional section
    ],
)
def test_impossible_configs_are_refused(tmp_path, yaml_text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert expected in str(e.value)


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(SHIPPED[0], ["train.lr"])
    with pytest.raises(ConfigError, match="override 'train.lr.max=1': 'train.lr' is a value, not a section"):
        load_config(SHIPPED[0], ["train.lr.max=1"])


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join(CONFIGS, "gpt2/tiny_pretrain.yaml"))
    assert config.storage.root == str(tmp_path / "lifelong-store")
    assert config.data.path == str(tmp_path / "data/demo/corpus.jsonl")


def test_cli_reports_bad_config_before_starting_ray(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndata: {path: d.jsonl}\ntrain: {zero: 1}\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lifelong.cli", "pretrain", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.zero: unknown key" in proc.stderr and "bad.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # failed before any Ray work
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "space, expected",
    [
        ("{train.lrr: {uniform: [0, 1]}}", "'train.lrr' is not a config key"),
        ("{train.batch_size: {choice: []}}", "choice needs a non-empty list"),
        ("{train.lr: {uniform: [0.1, 0.01]}}", "low 0.1 must be below high 0.01"),
        ("{train.lr: {loguniform: [0, 0.1]}}", "a log range cannot reach 0"),
        ("{train.lr: {gauss: [1, 2]}}", "give exactly one of loguniform, uniform, randint, choice"),
        ("{train.batch_size: {uniform: [1.5, 4.5]}}", "the value 1.5 makes an invalid config"),
        ("{train.epochs: {randint: [1.0, 3.5]}}", "randint needs integer bounds"),
    ],
)
def test_invalid_search_spaces_are_refused_naming_the_key(tmp_path, space, expected):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"name: x\ndata: {{path: d}}\ntune:\n  space: {space}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert expected in str(e.value) and "tune.space." in str(e.value)


def test_a_valid_search_space_loads():
    config = load_config(SHIPPED[0], ["tune.space={train.lr: {loguniform: [1e-5, 1e-2]}, train.batch_size: {choice: [8, 16]}}"])
    assert probe_values(config.tune.space["train.batch_size"]) == [8, 16]


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice: at line 3 and at line 5"):
        load_config(path)
