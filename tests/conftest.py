"""One local Ray per test session, demo data, and a pretrained tiny GPT-2 shared by the slow tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from lifelong.runtime import connect

    # Logical CPUs above the 2 cores, so 2 training workers and the data tasks coexist.
    connect(num_cpus=6)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from lifelong.synth import write_text_corpus, write_topic_dataset

    d = tmp_path_factory.mktemp("demo")
    write_text_corpus(d / "corpus.jsonl", max_rows=1200)
    write_topic_dataset(d / "topics.jsonl", 800, seed=0)
    return d


def make_config(path: str, *overrides: str):
    from lifelong.config import load_config

    return load_config(os.path.join(CONFIGS, path), list(overrides))


@pytest.fixture(scope="session")
def pretrained(ray_session, demo_data, tmp_path_factory):
    """A tiny GPT-2 pretrained with 2 DeepSpeed workers (ZeRO-2) for 2 epochs, registered."""
    from lifelong.train.driver import run_training

    root = tmp_path_factory.mktemp("store")
    config = make_config(
        "gpt2/tiny_pretrain.yaml", f"data.path={demo_data / 'corpus.jsonl'}", f"storage.root={root}",
        "train.epochs=2", "train.max_steps_per_epoch=40", "train.deepspeed.zero_stage=2", "scaling.num_workers=2",
    )
    outcome = run_training(config)
    return {"outcome": outcome, "root": root, "config": config}
