"""`model.task: masked-image-modeling`: self-supervised ViT-MAE pretraining on unlabelled images
(`lifelong pretrain`): a random `model.hf_config.mask_ratio` of each image's patches is hidden and
the model learns to rebuild their pixels (its loss is the reconstruction error on the hidden
patches). A version is an encoder to fine-tune from: an image-classification run with
`model.init_from` pointing at it starts its ViT from the MAE's encoder (a new head). Not served.

Rows are images as for image classification (folders' names, if any, are ignored: no labels).
"""

from __future__ import annotations

import numpy as np

from lifelong.tasks.image_classification import (  # noqa: F401  (the image half of the contract)
    CONTENT,
    FORWARD_KWARGS,
    PREPROCESSOR_FILES,
    UNIT,
    batch_units,
    encoder,
    export_inputs,
    fresh_preprocessor,
    load_preprocessor,
    parity_groups,
    parity_samples,
    pixels_in,
)

NAME = "masked-image-modeling"
LABELLED = False
PRETRAINS = True
JOB = "pretrain"
CONTINUAL = False
HOLDOUT_METRIC = None  # no continual cycles: nothing scores a holdout
GATE_METRICS = ()
reference_metrics = None  # nothing generated
holdout_counts = None
model_labels = None
MOE = ()
LORA = None
EXPORT_FORMATS = ()
EXPORT_ON_REGISTER = False
ENDPOINT = None  # an encoder to fine-tune from, not a model to serve


def check(config) -> None:
    if config.model.architecture != "vit_mae" and not config.model.init_from:
        raise ValueError(f"model.task={NAME} trains ViT-MAE: set model.architecture=vit_mae (with model.hf_config: mask_ratio, ...)")


def claims(architectures: list[str]) -> bool:
    return any(a.startswith("ViTMAE") for a in architectures)


def tokenize(batch, tokenizer, max_length: int, pack: bool = False) -> dict[str, np.ndarray]:
    from lifelong.tasks.image_classification import cached_processor, decode, pixel_values

    return {"pixel_values": pixel_values(cached_processor(tokenizer), [decode(b) for b in batch.column("image").to_pylist()])}


def batch_dtypes():
    import torch

    return {"pixel_values": torch.float32}


def model_inputs(batch, dtype, augment=None) -> dict:
    return {"pixel_values": pixels_in(batch, dtype, augment)}


def auto_class():
    from transformers import ViTMAEForPreTraining

    return ViTMAEForPreTraining


def build(cfg, tokenizer, init_dir=None, labels=None):
    """From `init_dir` (continued pretraining), else fresh from model.hf_config (image_size, patch_size, mask_ratio, ...)."""
    from transformers import AutoConfig

    from lifelong.errors import ConfigError
    from lifelong.tasks.image_classification import image_size

    if init_dir is not None:
        return auto_class().from_pretrained(str(init_dir), use_safetensors=True)
    try:
        config = AutoConfig.for_model(cfg.architecture, **{"image_size": image_size(cfg), **cfg.hf_config})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.architecture='{cfg.architecture}' / model.hf_config: {e}") from None
    return with_sincos_positions(auto_class()(config))


def with_sincos_positions(model):
    """MAE's fixed 2-D sine-cosine position embeddings, encoder's and decoder's. Built from a config,
    transformers 5 leaves both at zero (`_init_weights` marks the patch projection initialized
    before the embeddings' own `initialize_weights` runs, which then returns early, and zeroes the
    decoder's outright): every hidden patch would look alike and the model could only learn the
    mean pixel. Their own initializers are run again, with the marks cleared."""
    embeddings, decoder = model.vit.embeddings, model.decoder
    for param in (embeddings.position_embeddings, embeddings.patch_embeddings.projection, decoder.decoder_pos_embed, decoder.mask_token):
        if hasattr(param, "_is_hf_initialized"):
            delattr(param, "_is_hf_initialized")
    embeddings.initialize_weights()
    decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    return model


def loss_weight(batch) -> int:
    return int(batch["pixel_values"].shape[0])


def predictions(logits):
    return None


def probabilities(logits):
    return None


def confusion(labels, preds, num_labels: int):
    return None


def metrics(loss: float, labels=None, preds=None, num_labels: int = 0, probs=None) -> dict[str, float]:
    """The reconstruction loss (mean squared error on the hidden patches, normalized pixels)."""
    return {"loss": loss}


def score(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    pixels = torch.as_tensor(batch["pixel_values"])
    n = len(pixels)
    loss = float(model(pixel_values=pixels).loss)
    return {"loss_sum": np.full(n, loss), "count": np.ones(n), "pred": np.full(n, -1), "label": np.full(n, -1)}


def comparable(batch, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return a, b


def backend(configured: str) -> str:
    return "torch"


def serving_model(model_dir, backend: str, max_length: int | None, threads: int, device: str):
    from lifelong.inference import BackendError

    raise BackendError(f"{model_dir} holds a {NAME} encoder: fine-tune a classifier from it (model.init_from) and serve that")


def smoke_test(model) -> str | None:
    return None
