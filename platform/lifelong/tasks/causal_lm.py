"""`model.task: causal-lm`: GPT-style language models, pretrained from scratch on text and
served as continuations (`/v1/generate`). Scored by loss and perplexity over real tokens;
continually pretrained on windows of new text with relative perplexity gates (gates.py)."""

from __future__ import annotations

import math

import numpy as np

# What every text family shares (the task contract's text half).
from lifelong.tasks.text import (  # noqa: F401
    CONTENT,
    FORWARD_KWARGS,
    PREPROCESSOR_FILES,
    UNIT,
    batch_dtypes,
    batch_units,
    encoder,
    export_inputs,
    fresh_preprocessor,
    load_preprocessor,
    model_inputs,
    parity_groups,
    parity_samples,
)

NAME = "causal-lm"
LABELLED = False
PRETRAINS = True
JOB = "pretrain"
CONTINUAL = True
HOLDOUT_METRIC = "perplexity"
# Instruction streams (data.response_column) may gate on the answers to each holdout's prompts.
GATE_METRICS = ("perplexity", "bleu", "chrf", "exact_match")
MOE = ("gpt2",)  # the architectures whose MLPs it can replace
LORA = {"task_type": "CAUSAL_LM"}
EXPORT_FORMATS = ("onnx",)
EXPORT_ON_REGISTER = False
ENDPOINT = "/v1/generate"
SMOKE_PROMPT = "a smoke test before this version serves"


def check(config) -> None:
    """Text, and a tokenizer given or trained on it; instruction data fine-tunes (`init_from`)."""
    d = config.data
    if d is not None and d.response_column and not config.model.init_from:
        raise ValueError(
            "data.prompt_column/response_column fine-tune a language model on instructions: set model.init_from "
            "(a pretrained version to start from, e.g. tiny-gpt2@champion)"
        )


def claims(architectures: list[str]) -> bool:
    return any("CausalLM" in a or "LMHead" in a for a in architectures)


def tokenize(batch, tokenizer, max_length: int, pack: bool = False) -> dict[str, np.ndarray]:
    """Pack the batch's texts (each ended by EOS) into full blocks of max_length tokens (the
    remainder shorter than a block is dropped). A continual cycle's `replayed` marks travel
    along: the rows of each mark are packed apart, and each block carries its rows' mark.
    Instruction rows (a response column) are one padded row per block, or with `pack` several."""
    from lifelong.data import REPLAYED, RESPONSE, cached_tokenizer

    tok = cached_tokenizer(tokenizer)
    texts = batch.column("text").to_pylist()
    if RESPONSE in batch.column_names:
        responses = batch.column(RESPONSE).to_pylist()

        def encode(rows) -> dict[str, np.ndarray]:
            return instruction_rows([texts[i] for i in rows], [responses[i] for i in rows], tok, max_length, pack)
    else:
        ids = tok(texts, add_special_tokens=False)["input_ids"]

        def encode(rows) -> dict[str, np.ndarray]:
            return _blocks(_packed([ids[i] for i in rows], tok.eos_token_id), max_length)

    if REPLAYED not in batch.column_names:
        return encode(range(len(texts)))
    marks = batch.column(REPLAYED).to_numpy()
    parts = []
    for mark in np.unique(marks):
        blocks = encode(np.flatnonzero(marks == mark))
        parts.append({**blocks, REPLAYED: np.full(len(blocks["input_ids"]), mark, dtype=np.int64)})
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def instruction_prompt(tok, prompt: str) -> str:
    """What the model reads before its response: the prompt through the tokenizer's chat template
    (one user turn, the assistant's turn opened) when it has one, else the prompt itself."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def instruction_rows(prompts: list[str], responses: list[str], tok, max_length: int, pack: bool = False) -> dict[str, np.ndarray]:
    """One row per (prompt, response), padded to max_length: prompt tokens then the response's and
    EOS; labels -100 (no loss) on the prompt and the padding, so the loss counts only what the
    model should answer. A response longer than the row is cut (one prompt token kept); a prompt
    too long for what is left keeps its end. With `pack`, rows follow each other in a block while
    they fit whole (a row that does not starts the next block) and only each block's end is padded."""
    prompt_ids = tok([instruction_prompt(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]
    response_ids = tok(responses, add_special_tokens=False)["input_ids"]
    blocks: list[tuple[list[int], list[int]]] = []  # (ids, labels) of each block
    for p, r in zip(prompt_ids, response_ids):
        r = (r + [tok.eos_token_id])[: max_length - 1]
        p = p[-(max_length - len(r)) :] if p else [tok.eos_token_id]
        row_ids, row_labels = p + r, [-100] * len(p) + r
        if pack and blocks and len(blocks[-1][0]) + len(row_ids) <= max_length:
            blocks[-1][0].extend(row_ids)
            blocks[-1][1].extend(row_labels)
        else:
            blocks.append((row_ids, row_labels))
    ids = np.full((len(blocks), max_length), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(blocks), max_length), dtype=np.int64)
    labels = np.full((len(blocks), max_length), -100, dtype=np.int64)
    for i, (block_ids, block_labels) in enumerate(blocks):
        ids[i, : len(block_ids)] = block_ids
        mask[i, : len(block_ids)] = 1
        labels[i, : len(block_ids)] = block_labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(ids: list[list[int]], eos: int) -> np.ndarray:
    return np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int64)


def _blocks(stream: np.ndarray, max_length: int, pad_tail: int | None = None) -> dict[str, np.ndarray]:
    """Full blocks of the token stream; with `pad_tail` (a pad id), the remainder too, padded
    (its padding masked out)."""
    n_blocks = len(stream) // max_length
    blocks = stream[: n_blocks * max_length].reshape(n_blocks, max_length)
    mask = np.ones_like(blocks)
    tail = stream[n_blocks * max_length :]
    if pad_tail is not None and len(tail):
        last = np.full((1, max_length), pad_tail, dtype=np.int64)
        last[0, : len(tail)] = tail
        last_mask = np.zeros((1, max_length), dtype=np.int64)
        last_mask[0, : len(tail)] = 1
        blocks, mask = np.concatenate([blocks, last]), np.concatenate([mask, last_mask])
    return {"input_ids": blocks, "attention_mask": mask, "labels": blocks.copy()}


def holdout_counts(
    model, model_dir, table, max_length: int, generate: tuple[int, int] | None = None, batch_size: int = 32
) -> dict[str, float]:
    """Its next-token loss summed over every token of a continual window's holdout texts (packed
    as in training, the last block padded rather than dropped), and the tokens it predicted: the
    window's perplexity is exp(loss_sum / tokens). An instruction holdout (a response column):
    over its responses' tokens, one row each as trained; with `generate` (rows, max_new_tokens)
    also the greedy answers to its first rows' prompts scored against their responses
    (`reference_metrics`: bleu, chrf, exact_match)."""
    import torch

    from lifelong.data import RESPONSE, cached_tokenizer

    tok = cached_tokenizer(str(model_dir))
    texts = table.column(CONTENT).to_pylist()
    responses = table.column(RESPONSE).to_pylist() if RESPONSE in table.column_names else None
    if responses is not None:
        blocks = instruction_rows(texts, responses, tok, max_length)
    else:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        blocks = _blocks(_packed(ids, tok.eos_token_id), max_length, pad_tail=tok.eos_token_id)
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(blocks["input_ids"]), batch_size):
            part = {k: v[start : start + batch_size] for k, v in blocks.items()}
            scored = score(model, part)
            loss_sum += float(scored["loss_sum"].sum())
            tokens += float(scored["count"].sum())
    counts = {"loss_sum": loss_sum, "tokens": tokens}
    if generate and responses is not None:
        rows, max_new_tokens = generate
        counts.update(reference_metrics(model, tok, texts[:rows], responses[:rows], max_new_tokens))
    return counts


def reference_metrics(model, tokenizer, prompts: list[str], references: list[str], max_new_tokens: int) -> dict[str, float]:
    """The loaded `model` answers each instruction prompt (greedy; the prompt's tail kept where
    prompt and answer would pass its positions) and the answers are scored against the
    references: corpus BLEU and chrF (sacrebleu, 0–100) and exact match (the share of answers
    equal to their reference, whitespace trimmed)."""
    import sacrebleu
    import torch

    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    device = next(model.parameters()).device
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(instruction_prompt(tokenizer, prompt))["input_ids"][-max(1, positions - max_new_tokens) :]
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=min(max_new_tokens, positions - len(ids)),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers.append(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).strip())
    refs = [r.strip() for r in references]
    return {
        "bleu": sacrebleu.corpus_bleu(answers, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(answers, [refs]).score,
        "exact_match": sum(a == r for a, r in zip(answers, refs)) / max(len(refs), 1),
        "generated": float(len(answers)),
    }


def model_labels(model) -> list[str]:
    return []  # no label set: every window is scored on all its text


def auto_class():
    from transformers import AutoModelForCausalLM

    import lifelong.moe  # noqa: F401  (registers the MoE GPT-2 with the Auto classes)

    return AutoModelForCausalLM


def build(cfg, tokenizer, init_dir=None, labels=None):
    """From `init_dir` weights, else fresh from model.architecture + model.hf_config."""
    from lifelong.models import fresh_config

    if init_dir is not None:
        return auto_class().from_pretrained(str(init_dir), use_safetensors=True)
    if cfg.moe is not None:
        from lifelong.moe import moe_config

        return auto_class().from_config(moe_config(fresh_config(cfg, tokenizer), cfg.moe))
    return auto_class().from_config(fresh_config(cfg, tokenizer))


def loss_weight(batch) -> int:
    """The tokens the loss counts: every labelled token but each row's first (a packed block:
    every real token; an instruction row: its response)."""
    return int(((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)).sum())


def predictions(logits):
    return None


def probabilities(logits):
    return None


def confusion(labels, preds, num_labels: int):
    return None


def metrics(loss: float, labels=None, preds=None, num_labels: int = 0, probs=None) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def score(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row sums of next-token cross-entropy over real tokens (padding does not count)."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(batch["input_ids"])
    mask = torch.as_tensor(batch["attention_mask"])
    labels = torch.as_tensor(batch["labels"])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    target_mask = (mask[:, 1:].bool() & (labels[:, 1:] != -100)).float()  # real, labelled tokens (an instruction's response)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return {
        "loss_sum": (ce * target_mask).sum(1).numpy(),
        "count": target_mask.sum(1).numpy(),
        "pred": np.full(len(ids), -1),
        "label": np.full(len(ids), -1),
    }


def row_losses(model, model_dir, table, max_length: int, batch_size: int = 32) -> list[float]:
    """Its mean next-token loss on each row's text (cut to max_length tokens): what
    continual.trigger=drift compares for a language model."""
    import torch

    from lifelong.data import cached_tokenizer

    tok = cached_tokenizer(str(model_dir))
    texts = table.column(CONTENT).to_pylist()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start : start + batch_size], truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
            scored = score(model, {**enc, "labels": enc["input_ids"]})
            out += (scored["loss_sum"] / np.maximum(scored["count"], 1)).tolist()
    return out


def comparable(batch, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padded positions are not predictions: only real tokens' logits must agree."""
    keep = batch.attention_mask.astype(bool)
    return a[keep], b[keep]


def backend(configured: str) -> str:
    """Generation runs in PyTorch whatever serve.backend names (the ONNX graph has no KV cache)."""
    return "torch"


def serving_model(model_dir, backend: str, max_length: int | None, threads: int, device: str):
    from lifelong.inference import Generator

    return Generator(model_dir, max_length, threads=threads, device=device)


def smoke_test(model) -> str | None:
    out = model.generate(SMOKE_PROMPT, max_new_tokens=2)
    return None if isinstance(out["text"], str) else f"generate returned {out!r}"
