"""LoRA adapters against full fine-tuning: the same instruction data, the same base, the same loop.

    python benchmarks/lora.py            # seeds 0, 1, 2 (the README quotes this)
    python benchmarks/lora.py --quick    # seed 0

The base is the README's tiny GPT-2 (configs/gpt2/tiny_pretrain.yaml: 2 layers, 64 dims, a byte-level
BPE of 2,000 tokens, pretrained with 2 DeepSpeed workers on CPython's docs from the demo data).
From it, per seed, on one local Ray:

- full: configs/gpt2/tiny_sft.yaml (every weight trains; the version holds the whole model).
- lora: configs/gpt2/tiny_lora.yaml (rank-8 adapters on the attention and MLP projections, the
  token embeddings and the head; the version holds the adapters and names its base).

Both take 4 epochs of the demo's 1,200 synthetic prompt/response rows with 2 workers (ZeRO-2), each
at its config's learning rate. Measured: trainable parameters (the loop's count), the update's
wall time (`run_training`, data preparation to registered version) and its training time (the
epochs' own seconds), the registry bytes of the version, and BLEU / chrF of greedy answers to 60
held-out prompts of another seed (`lifelong evaluate`). Medians over the seeds. Also: the
trainable share with the same adapters on a GPT-2 of the 124M-parameter shape (built with random
weights, not trained), where the embeddings weigh less than in the tiny model.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS = 4


def base_model(root: Path, data: Path) -> str:
    from lifelong.config import load_config
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.train.driver import run_training

    config = load_config(str(ROOT / "configs/gpt2/tiny_pretrain.yaml"), [f"storage.root={root}", f"data.path={data / 'corpus.jsonl'}"])
    outcome = run_training(config)
    Registry(Storage(str(root))).move_alias("tiny-gpt2", "champion", outcome.version)
    return outcome.ref


def update(kind: str, root: Path, data: Path, held_out: Path, base: str, seed: int) -> dict:
    from lifelong.config import load_config
    from lifelong.evaluate import evaluate_model
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.train.driver import run_training

    config = load_config(
        str(ROOT / f"configs/gpt2/{'tiny_lora' if kind == 'lora' else 'tiny_sft'}.yaml"),
        [
            f"storage.root={root}",
            f"data.path={data / 'instructions.jsonl'}",
            f"model.init_from={base}",
            f"train.epochs={EPOCHS}",
            f"train.seed={seed}",
            f"name=bench-{kind}",
        ],
    )
    started = time.perf_counter()
    outcome = run_training(config)
    wall = time.perf_counter() - started
    card = Registry(Storage(str(root))).card(outcome.model, outcome.version)
    scores = evaluate_model(config, outcome.ref, str(held_out), generate_rows=60).metrics
    out = {
        "trainable_params": trainable(config),
        "update_wall_s": wall,
        "train_s": sum(h["epoch_seconds"] for h in card.run.history),
        "version_bytes": sum(card.files.values()),
        "files": sorted(card.files),
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "loss": scores["loss"],
    }
    print(f"seed {seed} {kind}: {out}", flush=True)
    return out


def trainable(config) -> int:
    """What the loop trains: the model from init_from, with adapters when train.lora is set."""
    from lifelong.models import build_model, load_tokenizer, with_lora
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    base_dir = Registry(Storage(config.storage.root)).resolve(config.model.init_from).local_dir
    model = build_model(config.model, load_tokenizer(base_dir), init_dir=base_dir)
    if config.train.lora:
        model = with_lora(model, config.train.lora, "CAUSAL_LM", config.model.init_from)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gpt2_small_share() -> dict:
    """The same adapters on a GPT-2 of the 124M shape (12 layers, 768 dims, 50,257 tokens)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lifelong.config import load_config
    from lifelong.models import with_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    total = sum(p.numel() for p in model.parameters())
    lora = load_config(str(ROOT / "configs/gpt2/tiny_lora.yaml")).train.lora
    adapted = with_lora(model, lora, "CAUSAL_LM", "gpt2:1")
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return {"total_params": total, "adapter_params": adapters, "share": adapters / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]

    from lifelong.runtime import connect
    from lifelong.synth import write_instruction_dataset, write_text_corpus

    connect()
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    data = work / "data"
    write_text_corpus(data / "corpus.jsonl")
    write_instruction_dataset(data / "instructions.jsonl", 1200, seed=0)
    write_instruction_dataset(work / "held_out.jsonl", 60, seed=1)
    root = work / "store"
    base = base_model(root, data)
    runs = {"full": [], "lora": []}
    for seed in seeds:
        for kind in ("full", "lora"):
            runs[kind].append(update(kind, root, data, work / "held_out.jsonl", base, seed))
    med = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "files"} for kind, rs in runs.items()}
    big = gpt2_small_share()
    full, lora = med["full"], med["lora"]
    figures = [
        {
            "name": "lora_trainable_params",
            "value": round(lora["trainable_params"] / full["trainable_params"], 3),
            "unit": f"of full fine-tuning's trainable parameters (GPT-2 124M shape: {100 * big['share']:.1f}% of its weights)",
            "target": None,
            "met": True,
            "platform": lora["trainable_params"],
            "baseline": full["trainable_params"],
            "baseline_unit": "parameters (LoRA vs full)",
        },
        {
            "name": "lora_version_bytes",
            "value": round(full["version_bytes"] / lora["version_bytes"], 1),
            "unit": "x fewer registry bytes per version",
            "target": None,
            "met": True,
            "platform": lora["version_bytes"],
            "baseline": full["version_bytes"],
            "baseline_unit": "bytes (LoRA vs full)",
        },
        {
            "name": "lora_update_wall",
            "value": round(lora["update_wall_s"] / full["update_wall_s"], 2),
            "unit": f"x full fine-tuning's time to a registered version (epochs alone {lora['train_s']:.1f} vs {full['train_s']:.1f} s)",
            "target": None,
            "met": True,
            "platform": round(lora["update_wall_s"], 1),
            "baseline": round(full["update_wall_s"], 1),
            "baseline_unit": "s (LoRA vs full)",
        },
        {
            "name": "lora_bleu",
            "value": round(lora["bleu"], 1),
            "unit": f"BLEU on 60 held-out prompts (full: {full['bleu']:.1f}; chrF {lora['chrf']:.1f} vs {full['chrf']:.1f})",
            "target": None,
            "met": True,
            "platform": round(lora["bleu"], 1),
            "baseline": round(full["bleu"], 1),
            "baseline_unit": "BLEU (LoRA vs full)",
        },
    ]
    result = {
        "benchmark": "lora",
        "command": " ".join(["python benchmarks/lora.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"base": base, "epochs": EPOCHS, "seeds": seeds, "workers": 2, "instructions": 1200, "held_out": 60},
        "medians": med,
        "runs": runs,
        "gpt2_124m_shape": big,
        "figures": figures,
    }
    from continual import write_result

    write_result(result, "lora", args.quick)


if __name__ == "__main__":
    main()
