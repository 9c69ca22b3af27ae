"""`model.task: image-classification`: ViT and ResNet classifiers (HF Transformers vision models)
over images: trained from scratch from model.architecture + model.hf_config, or fine-tuned from a
version or an HF directory (`init_from`), whole, its last blocks, or only its head (a linear
probe: `model.train_last_n_layers: 0`). Rows are encoded images; the run's image processor (its
size, mean and std) is the "tokenizer" of the run and is saved in every version.

    image bytes ─▶ decode (Pillow) ─▶ RGB ─▶ image processor (resize, rescale, normalize) ─▶ pixel_values
"""

from __future__ import annotations

import functools
import io

import numpy as np

from lifelong.tasks.classify import (  # noqa: F401  (the classifier half of the contract)
    GATE_METRICS,
    HOLDOUT_METRIC,
    backend,
    comparable,
    confusion,
    grown_from,
    loss_weight,
    metrics,
    model_labels,
    predictions,
    probabilities,
    probabilities_problem,
    scored,
    serving_model,
)

NAME = "image-classification"
CONTENT = "image"
UNIT = "images"
LABELLED = True
PRETRAINS = True  # `lifelong pretrain` trains one from scratch; `lifelong finetune` from init_from
JOB = "finetune"
CONTINUAL = True
MOE = ()
LORA = {"modules_to_save": ["classifier"]}  # the head trained and saved whole beside the adapters
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")
EXPORT_ON_REGISTER = True
ENDPOINT = "/v1/predict"
reference_metrics = None  # answers are labels, not generated text
PREPROCESSOR_FILES = ("preprocessor_config.json",)
FORWARD_KWARGS: dict = {}
# From scratch: images resized to model.hf_config.image_size (default below), each channel
# normalized to [-1, 1] (the mean/std of a ViT trained from scratch).
DEFAULT_IMAGE_SIZE = 224


def check(config) -> None:
    d = config.data
    if d is None:
        return
    if not d.labels:
        raise ValueError(
            f"model.task is {NAME} but data.labels is missing: set it to the class names (the sub-folder names of an "
            "image folder, or the values of data.label_column in table files), e.g. data.labels=[cat, dog]"
        )


def claims(architectures: list[str]) -> bool:
    return any("ForImageClassification" in a for a in architectures)


def image_size(cfg) -> int:
    return int(cfg.hf_config.get("image_size", DEFAULT_IMAGE_SIZE))


def fresh_preprocessor(config, train_rows, out_dir: str) -> None:
    """An image processor for a model trained from scratch, saved in `out_dir`."""
    from transformers import ViTImageProcessor

    size = image_size(config.model)
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(out_dir)


def load_preprocessor(ref):
    return cached_processor(ref)


@functools.lru_cache(maxsize=4)
def cached_processor(ref):
    """Loaded once per process (a TokenizerRef resolves where it runs, or a local directory)."""
    from transformers import AutoImageProcessor

    from lifelong.data import TokenizerRef

    directory = ref.local_dir() if isinstance(ref, TokenizerRef) else str(ref)
    return AutoImageProcessor.from_pretrained(directory)


def decode(data: bytes):
    """Encoded bytes as an RGB Pillow image (validation has already read it whole)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def pixel_values(processor, images: list) -> np.ndarray:
    return processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)


def tokenize(batch, tokenizer, max_length: int, pack: bool = False) -> dict[str, np.ndarray]:
    """Rows (image bytes, label) as pixel values by the run's image processor."""
    from lifelong.data import REPLAYED

    processor = cached_processor(tokenizer)
    out = {
        "pixel_values": pixel_values(processor, [decode(b) for b in batch.column("image").to_pylist()]),
        "labels": batch.column("label").to_numpy().astype(np.int64),
    }
    if REPLAYED in batch.column_names:
        out[REPLAYED] = batch.column(REPLAYED).to_numpy().astype(np.int64)
    return out


def batch_dtypes():
    import torch

    from lifelong.data import REPLAYED

    return {"pixel_values": torch.float32, "labels": torch.long, REPLAYED: torch.long}


def model_inputs(batch, dtype, augment=None) -> dict:
    """The forward's inputs, pixels in the model's dtype; `augment` (a DataConfig) flips and crops
    training images, each row its own draw."""
    return {"pixel_values": pixels_in(batch, dtype, augment), "labels": batch["labels"]}


def pixels_in(batch, dtype, augment=None):
    pixels = batch["pixel_values"]
    if augment is not None:
        pixels = augmented(pixels, augment.augment_flip, augment.augment_crop_padding)
    return pixels.to(dtype)


def augmented(pixels, flip: bool, padding: int):
    import torch
    import torch.nn.functional as F

    if flip:
        mirror = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
        pixels = torch.where(mirror[:, None, None, None], pixels.flip(-1), pixels)
    if padding:
        n, _, h, w = pixels.shape
        padded = F.pad(pixels, (padding, padding, padding, padding), mode="reflect")
        dy = torch.randint(0, 2 * padding + 1, (n,)).tolist()
        dx = torch.randint(0, 2 * padding + 1, (n,)).tolist()
        pixels = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    return pixels


def batch_units(batch) -> int:
    return int(batch["pixel_values"].shape[0])


def auto_class():
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification


def build(cfg, tokenizer, init_dir=None, labels=None):
    """A classifier over `labels`: its body from `init_dir` (a new head where the label set
    differs; its own head grown where `labels` extends it), else fresh from model.architecture +
    model.hf_config."""
    from transformers import AutoConfig

    from lifelong.errors import ConfigError

    assert labels, "classification needs labels"
    label_kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if init_dir is None:
        try:
            config = AutoConfig.for_model(cfg.architecture, **{"image_size": image_size(cfg), **cfg.hf_config}, **label_kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.architecture='{cfg.architecture}' / model.hf_config: {e}") from None
        return auto_class().from_config(config)
    try:
        if grown := grown_from(auto_class(), init_dir, labels):  # the same classes and new ones: the old head kept
            return grown
        return auto_class().from_pretrained(str(init_dir), use_safetensors=True, config=classifier_config(init_dir, label_kwargs))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot start a {len(labels)}-label image classifier from {init_dir}: {e}") from None


def classifier_config(init_dir, label_kwargs: dict):
    """The classifier's config for a start from `init_dir`: its own, or for a ViT-MAE encoder
    (masked-image-modeling) a ViT of the same shape, whose weights it then holds under the same
    names (the MAE's decoder is left behind; the head is new)."""
    from transformers import AutoConfig, ViTConfig

    config = AutoConfig.from_pretrained(str(init_dir))
    if config.model_type != "vit_mae":
        for key, value in label_kwargs.items():
            setattr(config, key, value)
        return config
    shared = {k: v for k, v in config.to_dict().items() if k in ViTConfig().to_dict() and k not in ("model_type", "architectures")}
    return ViTConfig(**{**shared, **label_kwargs})


def score(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    return scored(model(pixel_values=torch.as_tensor(batch["pixel_values"])).logits, torch.as_tensor(batch["labels"]))


def encoder(model_dir, max_length: int | None = None):
    from lifelong.inference import ImageEncoder

    return ImageEncoder(model_dir)


def processor_size(model_dir) -> tuple[int, int]:
    size = cached_processor(str(model_dir)).size
    return (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2


def export_inputs(model_dir, max_length: int | None, padded: bool):
    """Example pixel values at the processor's size; the batch axis stays dynamic."""
    import torch

    h, w = processor_size(model_dir)
    pixels = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixels}, {"pixel_values": {0: torch.export.Dim("batch")}}


def parity_samples(rows: list[dict] | None) -> list[bytes]:
    """Images to compare an export with PyTorch on: validation rows', or seeded noise pictures."""
    if rows:
        return [r["image"] for r in rows[:15]]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for size in (32, 48, 20):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def parity_groups(samples: list[bytes]) -> list[list[bytes]]:
    return [samples, samples[:1]]


def smoke_test(model) -> str | None:
    return probabilities_problem(model, parity_samples(None))


def predicted(model, model_dir, table, max_length: int) -> tuple[list[int], list[float]]:
    """Its predicted class and confidence per row of a table (content, ...): what continual.trigger=drift compares."""
    from lifelong.tasks.classify import predicted_classes

    return predicted_classes(tokenize, score, CONTENT, model, model_dir, table, max_length)


def holdout_counts(model, model_dir, table, max_length: int) -> dict[str, list[int]]:
    """Its answers on a continual window's holdout (content, label name), per class."""
    from lifelong.tasks.classify import count_by_class

    return count_by_class(tokenize, score, CONTENT, model, model_dir, table, max_length)
