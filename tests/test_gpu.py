"""The CUDA path of serving: the same version on the GPU gives the CPU's predictions, through
PyTorch and (where onnxruntime-gpu is installed) ONNX Runtime's CUDA provider, and a Serve
replica that asks for a GPU answers over HTTP. Skipped without a CUDA GPU (training on GPUs:
tests/test_train.py::test_same_config_trains_on_gpus_with_nccl). Run them all with `make test-gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LABELS, register_tiny
from lifelong.registry import Registry
from lifelong.storage import Storage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TEXTS = ["stocks fell as the bank raised rates", "the striker scored twice", "rain and wind all night"]


@pytest.fixture(scope="module")
def version(tiny_tokenizer, topic_rows, tmp_path_factory):
    registry = Registry(Storage(str(tmp_path_factory.mktemp("gpu-store"))))
    v = register_tiny(registry, "gpu-topics", tiny_tokenizer, tmp_path_factory.mktemp("gpu-work"), seed=3, rows=topic_rows[:200])
    registry.move_alias("gpu-topics", "champion", v)
    return registry, v


def test_pytorch_on_cuda_predicts_what_the_cpu_predicts(version):
    from lifelong.inference import Classifier

    registry, v = version
    model_dir = registry.local_dir("gpu-topics", v)
    card = registry.card("gpu-topics", v)
    cpu = Classifier(model_dir, "torch", card.max_length).probabilities(TEXTS)[0]
    gpu = Classifier(model_dir, "torch", card.max_length, device="cuda")
    assert next(gpu.logits.model.parameters()).is_cuda
    np.testing.assert_allclose(gpu.probabilities(TEXTS)[0], cpu, atol=1e-4)


def test_onnx_runtime_cuda_provider_predicts_what_the_cpu_predicts(version):
    import onnxruntime as ort

    from lifelong.inference import Classifier

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here is CPU-only: install onnxruntime-gpu for the CUDA provider")
    registry, v = version
    model_dir, card = registry.local_dir("gpu-topics", v), registry.card("gpu-topics", v)
    gpu = Classifier(model_dir, "onnx", card.max_length, device="cuda")
    assert gpu.logits.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(
        gpu.probabilities(TEXTS)[0], Classifier(model_dir, "onnx", card.max_length).probabilities(TEXTS)[0], atol=1e-4
    )


def test_a_serve_replica_on_a_gpu_answers(ray_session, serve_port, version):
    import httpx
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.serve import deploy

    registry, v = version
    config = absolute_paths(
        validate_config(
            {
                "name": "gpu-topics",
                "storage": {"root": registry.storage.base},
                "serve": {"port": serve_port, "num_replicas": 1, "gpus_per_replica": 0.5, "backend": "torch", "route_prefix": "/gpu"},
            }
        )
    )
    url = deploy(config)
    try:
        r = httpx.post(f"{url}/v1/predict", json={"texts": TEXTS}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == v and [p["label"] in LABELS for p in body["predictions"]] == [True] * 3
    finally:
        serve.delete(config.serve_app_name)
