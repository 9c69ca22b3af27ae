"""Generation: tokens/s with the KV cache against without, and a stream's time to first token.

    python benchmarks/generate.py            # 5 repeats of each (the README quotes this)
    python benchmarks/generate.py --quick    # 2 repeats

A small GPT-2 (4 layers, 128 dims, 1,024 positions; random weights, seeded: speed does not
depend on what it learned) with a byte-level BPE of 1,000 tokens trained on CPython's docs, on
this machine's CPU with one intra-op thread as a serving replica runs it:

- KV cache: `Generator.generate` (the served path: HF generate, greedy) of 256 new tokens after a
  prompt of 32 and of 512 tokens, with `use_cache` on (each step feeds one new position and
  reuses the earlier keys and values) and off (each step runs the whole sequence again);
  tokens/s, medians of the repeats, and their ratio.
- Streaming: a Serve app (`lifelong.serve.deploy`, 1 replica, on loopback) asked for 256 new
  tokens after a 32-token prompt on `/v1/generate`, streamed (server-sent events: the time to the
  first event, and to the last) and not (the time to the response).
- Batching across requests: 8 clients at once, each asking `/v1/generate` for a greedy
  continuation of 64 tokens of its own prompt (8 to 60 tokens), round after round, against an app
  that batches them (serve.max_batch_size 16: waiting requests share one left-padded generate
  call) and one that does not (max_batch_size 1: each request generates alone in its own thread,
  as greedy requests did before); requests/s and tokens/s, medians of the rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 256


def build(work: Path) -> Path:
    from pydoc_data.topics import topics

    import torch

    from lifelong.config import ModelConfig
    from lifelong.models import build_model, load_tokenizer, train_tokenizer
    from lifelong.synth import doc_paragraphs

    tok_dir = work / "tokenizer"
    train_tokenizer(doc_paragraphs(sorted(topics)), 1000, str(tok_dir))
    torch.manual_seed(0)
    cfg = ModelConfig(task="causal-lm", hf_config={"n_layer": 4, "n_embd": 128, "n_head": 4}, max_length=1024, tokenizer=str(tok_dir))
    out = work / "model"
    build_model(cfg, load_tokenizer(tok_dir)).save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def prompt_of(generator, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens, from the docs."""
    from lifelong.synth import doc_paragraphs

    text = " ".join(doc_paragraphs(["class", "for", "with", "try", "function"]))
    ids = generator.encode.tokenizer(text)["input_ids"][:tokens]
    return generator.encode.tokenizer.decode(ids)


def kv_cache(model_dir: Path, repeats: int) -> dict:
    import torch

    from lifelong.inference import Generator

    torch.set_num_threads(1)
    g = Generator(model_dir, 1024, threads=1)
    out = {}
    for prompt_tokens in (32, 512):
        prompt = prompt_of(g, prompt_tokens)
        g.generate(prompt, 8)  # warm up
        rates = {}
        for cache in (True, False):
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                made = g.generate(prompt, NEW_TOKENS, use_cache=cache)["tokens"]
                runs.append(made / (time.perf_counter() - t))
            rates["with_cache" if cache else "without_cache"] = runs
        out[f"prompt_{prompt_tokens}"] = {
            "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "runs": rates,
            "speedup": statistics.median(rates["with_cache"]) / statistics.median(rates["without_cache"]),
        }
        print(f"prompt {prompt_tokens} tokens: {out[f'prompt_{prompt_tokens}']['tokens_per_s']}", flush=True)
    return out


def streaming(model_dir: Path, work: Path, repeats: int) -> dict:
    from ray import serve

    from lifelong.config import ModelConfig, absolute_paths, validate_config
    from lifelong.inference import Generator
    from lifelong.registry import Registry
    from lifelong.runtime import connect
    from lifelong.serve import deploy
    from lifelong.storage import Storage

    connect(num_cpus=4)
    root = work / "store"
    registry = Registry(Storage(str(root)))
    card = {"task": "causal-lm", "config": {"model": ModelConfig(task="causal-lm", max_length=1024).model_dump(mode="json")}}
    v = registry.register_version("gen-bench", model_dir, card)
    registry.move_alias("gen-bench", "champion", v)
    serve_cfg = {"port": 8431, "num_replicas": 1, "route_prefix": "/gen", "app_name": "gen-bench", "max_new_tokens": NEW_TOKENS}
    url = deploy(absolute_paths(validate_config({"name": "gen-bench", "storage": {"root": str(root)}, "serve": serve_cfg})))
    prompt = prompt_of(Generator(model_dir, 1024), 32)
    body = {"prompt": prompt, "max_new_tokens": NEW_TOKENS}
    first, last, whole = [], [], []
    try:
        with httpx.Client(timeout=120) as c:
            c.post(url + "/v1/generate", json={"prompt": prompt, "max_new_tokens": 8})  # warm up
            for _ in range(repeats):
                t = time.perf_counter()
                r = c.post(url + "/v1/generate", json=body)
                assert r.status_code == 200, r.text
                whole.append(time.perf_counter() - t)
                t = time.perf_counter()
                events = []
                with c.stream("POST", url + "/v1/generate", json={**body, "stream": True}) as s:
                    for line in s.iter_lines():
                        if line.startswith("data: "):
                            events.append((time.perf_counter() - t, json.loads(line[6:])))
                first.append(events[0][0])
                end = events[-1][1]
                last.append(time.perf_counter() - t)
                assert end.get("done"), end
    finally:
        serve.delete("gen-bench")
    med = statistics.median
    out = {
        "first_event_s": med(first),
        "last_event_s": med(last),
        "response_s": med(whole),
        "runs": {"first": first, "last": last, "whole": whole},
    }
    print(
        f"streaming: {out['first_event_s'] * 1000:.0f} ms to the first event, {out['last_event_s']:.2f} s to the last; "
        f"{out['response_s']:.2f} s unstreamed",
        flush=True,
    )
    return out


def batching(model_dir: Path, work: Path, rounds: int, clients: int = 8, new_tokens: int = 64) -> dict:
    import threading

    from ray import serve

    from lifelong.config import ModelConfig, absolute_paths, validate_config
    from lifelong.inference import Generator
    from lifelong.registry import Registry
    from lifelong.runtime import connect
    from lifelong.serve import deploy
    from lifelong.storage import Storage

    connect(num_cpus=4)
    root = work / "batch-store"
    registry = Registry(Storage(str(root)))
    card = {"task": "causal-lm", "config": {"model": ModelConfig(task="causal-lm", max_length=1024).model_dump(mode="json")}}
    registry.move_alias("gen-batch", "champion", registry.register_version("gen-batch", model_dir, card))
    g = Generator(model_dir, 1024)
    prompts = [prompt_of(g, 8 + 52 * i // (clients - 1)) for i in range(clients)]
    out = {}
    for label, size in (("batched", 16), ("unbatched", 1)):
        serve_cfg = {"port": 8431, "num_replicas": 1, "route_prefix": f"/{label}", "app_name": f"gen-{label}", "max_batch_size": size}
        url = deploy(absolute_paths(validate_config({"name": "gen-batch", "storage": {"root": str(root)}, "serve": serve_cfg})))
        per_round, tokens, together = [], [], []
        try:
            httpx.post(url + "/v1/generate", json={"prompt": prompts[0], "max_new_tokens": 8}, timeout=120)  # warm up
            for _ in range(rounds + 1):
                answers = [None] * clients

                def ask(i: int) -> None:
                    r = httpx.post(url + "/v1/generate", json={"prompt": prompts[i], "max_new_tokens": new_tokens}, timeout=300)
                    assert r.status_code == 200, r.text
                    answers[i] = (r.json()["tokens"], int(r.headers["X-Lifelong-Batch"]))

                threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                per_round.append(time.perf_counter() - t)
                tokens.append(sum(a[0] for a in answers))
                together.append(max(a[1] for a in answers))
        finally:
            serve.delete(f"gen-{label}")
        per_round, tokens, together = per_round[1:], tokens[1:], together[1:]  # the first round warms the path
        out[label] = {
            "requests_per_s": statistics.median(clients / s for s in per_round),
            "tokens_per_s": statistics.median(n / s for n, s in zip(tokens, per_round)),
            "largest_batch": max(together),
            "round_s": per_round,
        }
        print(f"{label}: {out[label]['requests_per_s']:.1f} requests/s, {out[label]['tokens_per_s']:.0f} tokens/s", flush=True)
    out["speedup"] = out["batched"]["requests_per_s"] / out["unbatched"]["requests_per_s"]
    out["setup"] = {"clients": clients, "new_tokens": new_tokens, "prompt_tokens": [8 + 52 * i // (clients - 1) for i in range(clients)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    model_dir = build(work)
    cache = kv_cache(model_dir, repeats)
    stream = streaming(model_dir, work, repeats)
    batched = batching(model_dir, work, repeats)
    short, long = cache["prompt_32"], cache["prompt_512"]
    figures = [
        {
            "name": "generate_kv_cache_speedup",
            "value": round(long["speedup"], 2),
            "unit": f"x tokens/s with the KV cache, 512-token prompt + {NEW_TOKENS} new (32-token prompt: {short['speedup']:.2f}x)",
            "target": None,
            "met": True,
            "platform": round(long["tokens_per_s"]["with_cache"], 1),
            "baseline": round(long["tokens_per_s"]["without_cache"], 1),
            "baseline_unit": "tokens/s (with vs without the cache)",
        },
        {
            "name": "generate_stream_first_token",
            "value": round(1000 * stream["first_event_s"], 1),
            "unit": f"ms to the first streamed event ({NEW_TOKENS} new tokens over HTTP; the last after {stream['last_event_s']:.2f} s)",
            "target": None,
            "met": True,
            "platform": round(stream["first_event_s"], 3),
            "baseline": round(stream["response_s"], 3),
            "baseline_unit": "s (first event streamed vs the whole response unstreamed)",
        },
        {
            "name": "generate_batching_speedup",
            "value": round(batched["speedup"], 2),
            "unit": f"x requests/s, 8 concurrent greedy requests of {batched['setup']['new_tokens']} tokens, batched vs each alone",
            "target": None,
            "met": True,
            "platform": round(batched["batched"]["requests_per_s"], 2),
            "baseline": round(batched["unbatched"]["requests_per_s"], 2),
            "baseline_unit": "requests/s (max_batch_size 16 vs 1, one replica)",
        },
    ]
    result = {
        "benchmark": "generate",
        "command": " ".join(["python benchmarks/generate.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"model": "GPT-2 4 layers, 128 dims, 1024 positions", "new_tokens": NEW_TOKENS, "repeats": repeats, "threads": 1},
        "kv_cache": cache,
        "streaming": stream,
        "batching": batched,
        "figures": figures,
    }
    from continual import write_result

    write_result(result, "generate", args.quick)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
