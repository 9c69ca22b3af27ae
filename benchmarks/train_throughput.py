"""Training throughput: the platform's 2-worker DeepSpeed run against a plain PyTorch loop.

    python benchmarks/train_throughput.py            # full: 3 repetitions (the README quotes this)
    python benchmarks/train_throughput.py --quick    # 1 repetition, fewer steps

Same model config, tokenizer, data, global batch (2 workers x 16 = 32 sequences) and machine,
alternating platform and baseline in one run. The platform figure is the steady-state epoch
(epoch 2: epoch 1 includes the data pipeline's spin-up and DeepSpeed's op JIT) as reported
by the workers, with data streaming from Ray Data. The baseline is a single process with all
cores (torch threads = cores), AdamW, data pre-tokenized in memory, bf16 via autocast.
Model-FLOP utilisation uses 6N + 12·L·d·T FLOPs per token against the 2048² matmul peak
measured here in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SIZES = {
    # name: (hf_config, vocab, seq_len, steps per epoch for the platform, baseline steps)
    "tiny": ({"n_layer": 2, "n_embd": 64, "n_head": 2}, 2000, 64, 40, 40),
    "small": ({"n_layer": 6, "n_embd": 384, "n_head": 6}, 8000, 64, 12, 12),
}
GLOBAL_BATCH, WORKERS = 32, 2


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started)


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)
    return 6 * non_embedding + 12 * cfg.n_layer * cfg.n_embd * seq_len


def baseline_tokens_per_s(model_cfg, tokenizer_dir: str, corpus: Path, seq_len: int, precision: str, steps: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    ids = [t for seq in tok(texts, add_special_tokens=False)["input_ids"] for t in (*seq, tok.eos_token_id)]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_positions=seq_len, **model_cfg)
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warmup = 3
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        batch = blocks[(step * GLOBAL_BATCH) % (len(blocks) - GLOBAL_BATCH) :][:GLOBAL_BATCH]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * GLOBAL_BATCH * seq_len / (time.perf_counter() - started)


def platform_tokens_per_s(size: str, precision: str, root: Path, corpus: Path, tokenizer_dir: str, steps: int, rep: int) -> float:
    from conftest import make_config
    from lifelong.train.driver import run_training

    model_cfg, _, seq_len, _, _ = SIZES[size]
    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"name=bench-{size}",
        f"run_name=bench-{size}-{precision}-{rep}",
        f"data.path={corpus}",
        f"storage.root={root}",
        f"model.tokenizer={tokenizer_dir}",
        f"model.hf_config={json.dumps(model_cfg)}",
        f"model.max_length={seq_len}",
        f"train.precision={precision}",
        "train.epochs=2",
        f"train.max_steps_per_epoch={steps}",
        f"train.batch_size={GLOBAL_BATCH // WORKERS}",
        f"scaling.num_workers={WORKERS}",
        "train.log_every_steps=1000",
    )
    outcome = run_training(config)
    return outcome.metrics["train_tokens_per_s"]  # epoch 2, the best (=last) checkpoint's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)

    from transformers import AutoConfig, AutoModelForCausalLM

    from lifelong.models import train_tokenizer
    from lifelong.runtime import connect
    from lifelong.synth import write_text_corpus

    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-"))
    corpus = work / "corpus.jsonl"
    write_text_corpus(corpus)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    connect(num_cpus=4)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    figures, raw = [], {}
    for size in args.sizes.split(","):
        model_cfg, vocab, seq_len, platform_steps, baseline_steps = SIZES[size]
        if args.quick:
            platform_steps, baseline_steps = max(4, platform_steps // 2), max(4, baseline_steps // 2)
        tok_dir = work / f"tok-{size}"
        train_tokenizer(iter(texts), vocab, tok_dir)
        probe = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=vocab, n_positions=seq_len, **model_cfg))
        params, fpt = sum(p.numel() for p in probe.parameters()), flops_per_token(probe, seq_len)
        for precision in args.precisions.split(","):
            ours, base = [], []
            for rep in range(reps):  # alternate, so drift on a shared machine hits both alike
                base.append(baseline_tokens_per_s(model_cfg, str(tok_dir), corpus, seq_len, precision, baseline_steps))
                ours.append(platform_tokens_per_s(size, precision, work / "store", corpus, str(tok_dir), platform_steps, rep))
                print(f"{size} {precision} rep {rep}: platform {ours[-1]:.0f} tok/s, baseline {base[-1]:.0f} tok/s", flush=True)
            p, b = statistics.median(ours), statistics.median(base)
            raw[f"{size}_{precision}"] = {"platform": ours, "baseline": base, "params": params}
            figures.append(
                {
                    "name": f"{size}_{precision}_platform_vs_pytorch_throughput",
                    "value": round(p / b, 3),
                    "unit": "x",
                    "target": ">= 0.8" if size == "small" else None,
                    "met": (p / b >= 0.8) if size == "small" else None,
                    "platform": round(p),
                    "baseline": round(b),
                    "baseline_unit": "tokens/s",
                    "params": params,
                    "platform_mfu": round(p * fpt / peaks[precision], 4),
                    "baseline_mfu": round(b * fpt / peaks[precision], 4),
                }
            )
    result = {
        "benchmark": "train_throughput",
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "date": date.today().isoformat(),
        "peak_flops": {k: round(v) for k, v in peaks.items()},
        "setup": f"platform: {WORKERS} Ray Train workers x 1 CPU, DeepSpeed ZeRO-2, batch {GLOBAL_BATCH // WORKERS}/worker; "
        f"baseline: 1 process, {os.cpu_count()} threads, batch {GLOBAL_BATCH}; seq len per size; medians of {reps}",
        "figures": figures,
        "raw": raw,
    }
    out = HERE / "results" / ("train_throughput_quick.json" if args.quick else "train_throughput.json")
    result["command"] = result["command"].strip()
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
