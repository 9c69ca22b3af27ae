"""Continual pretraining of a language model: how much a window's perplexity rises after later
windows are learned, with replay against naive retraining on the new text alone.

    python benchmarks/continual_lm.py            # 4 windows (every paragraph), seeds 0, 1, 2 (the README quotes this)
    python benchmarks/continual_lm.py --quick    # 3 windows of 300 paragraphs, seed 0

The stream is REAL text (`lifelong data doc-stream`): CPython's documentation, one part per
window (statements, expressions, the data model, the built-in types). Every strategy starts from
the same tiny GPT-2 (2 layers, 64 dims, random weights, seeded; a byte-level BPE of 1,000 tokens
trained on the first window, as a real stream would) and trains with
configs/gpt2/tiny_lm_continual.yaml (1 DeepSpeed worker; epochs and learning rate below), one
after the other on one local Ray:

- replay: `run_cycle` for every window (new text + as many replayed paragraphs from the reservoir).
- naive: the same from window 1 on (forked from replay's store after window 0), new text only.

The gates are opened (every candidate is promoted) so that the strategies themselves are
compared. The figure is the past windows' perplexity increase at the end: the mean over every
window but the last of (its final perplexity - its perplexity right after it was learned) /
the latter (minus the perplexity matrix's backward transfer, lifelong.continual.metrics); the
figures are medians over the seeds.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

from continual import parse_args, run_seeds, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS, LR = 12, "3e-3"


def config(root: Path, landing: Path, strategy: str, seed: int):
    from lifelong.config import load_config

    return load_config(
        ROOT / "configs/gpt2/tiny_lm_continual.yaml",
        [
            "name=doc-lm",
            "model.init_from=doc-lm@champion",
            f"storage.root={root}",
            f"data.path={landing}",
            f"continual.landing={landing}",
            f"continual.strategy={strategy}",
            "continual.min_new_rows=1",
            "continual.gates.min_relative_improvement=-0.99",
            "continual.gates.max_relative_increase=1000",
            "scaling.num_workers=1",
            f"train.epochs={EPOCHS}",
            f"train.lr={LR}",
            f"train.seed={seed}",
        ],
    )


def starting_model(registry, cfg, tokenizer_dir: str, work: Path, seed: int) -> int:
    """A tiny GPT-2 with random weights (seeded), registered as version 1."""
    import torch

    from lifelong.config import ModelConfig
    from lifelong.models import build_model, load_tokenizer

    torch.manual_seed(seed)
    model_cfg = ModelConfig(
        task="causal-lm", hf_config={"n_layer": 2, "n_embd": 64, "n_head": 2}, max_length=cfg.model.max_length, tokenizer=tokenizer_dir
    )
    out = work / "start"
    build_model(model_cfg, load_tokenizer(tokenizer_dir)).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    card = {"task": "causal-lm", "metrics": {}, "config": {"model": model_cfg.model_dump(mode="json")}}
    return registry.register_version(cfg.name, out, card)


def past_increase(R: list[list[float]]) -> float:
    """Mean relative rise of every past window's perplexity from right after it was learned to the end."""
    T = len(R)
    return sum((R[T - 1][j] - R[j][j]) / R[j][j] for j in range(T - 1)) / (T - 1)


def run_seed(seed: int, windows: int, rows: int | None) -> dict:
    from lifelong.continual.cycle import run_cycle
    from lifelong.continual.gates import accuracy_matrix
    from lifelong.continual.stream import Stream
    from lifelong.models import train_tokenizer
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.synth import write_doc_stream

    work = Path(tempfile.mkdtemp(prefix="continual-lm-bench-"))
    dirs = write_doc_stream(work / "windows", windows=windows, files_per_window=2, max_rows=rows, seed=seed)
    first = [json.loads(line)["text"] for f in dirs[0].glob("*.jsonl") for line in f.read_text().splitlines()]
    tokenizer_dir = str(work / "tokenizer")
    train_tokenizer(first, 1000, tokenizer_dir)
    landing, stores = work / "landing", {"replay": work / "replay", "naive": work / "naive"}
    landing.mkdir()
    registry = Registry(Storage(str(stores["replay"])))
    cfg = config(stores["replay"], landing, "replay", seed)
    registry.move_alias(cfg.name, "champion", starting_model(registry, cfg, tokenizer_dir, work, seed))

    cycles = {s: [] for s in stores}
    for w, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            shutil.copy(f, landing / f"window-{w:03d}-{f.name}")
        for strategy in stores if w else ("replay",):
            outcome = run_cycle(config(stores[strategy], landing, strategy, seed))
            print(outcome.summary(), flush=True)
            cycles[strategy].append(
                {
                    "window": w,
                    "seconds": outcome.seconds,
                    "new_rows": outcome.new_rows,
                    "replay_rows": outcome.replay_rows,
                    "perplexity": outcome.accuracy,
                }
            )
        if w == 0:
            shutil.copytree(stores["replay"], stores["naive"])
    cycles["naive"].insert(0, cycles["replay"][0])
    result = {"seed": seed, "cycles": cycles}
    for s, store in stores.items():
        state = Stream(Storage(str(store)), cfg.name).state()
        R = accuracy_matrix(state["windows"])
        result[s] = {
            "perplexity_matrix": R,
            "past_increase": past_increase(R),
            "metrics": state["windows"][-1]["metrics"],
            "cycle_seconds": [c["seconds"] for c in cycles[s]],
        }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    args, windows, rows, seeds = parse_args(__doc__, quick=(3, 300), full=(4, None))
    runs, med = run_seeds(run_seed, seeds, windows, rows)
    increase = {s: med(lambda r, s=s: r[s]["past_increase"]) for s in ("replay", "naive")}
    average = {s: med(lambda r, s=s: r[s]["metrics"]["average_perplexity"]) for s in ("replay", "naive")}
    less = med(lambda r: 1 - r["replay"]["past_increase"] / r["naive"]["past_increase"] if r["naive"]["past_increase"] > 0 else 0.0)
    seconds = {s: med(lambda r, s=s: r[s]["cycle_seconds"][-1]) for s in ("replay", "naive")}
    n = f"median of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    figures = [
        {
            "name": "continual_lm_past_perplexity_increase",
            "value": round(100 * less, 1),
            "unit": f"% less past-window perplexity increase with replay ({n})",
            "target": ">= 50",
            "met": bool(less >= 0.5),
            "platform": round(increase["replay"], 3),
            "baseline": round(increase["naive"], 3),
            "baseline_unit": f"mean relative perplexity increase of the past windows, replay vs naive ({windows} windows)",
        },
    ]
    result = {
        "benchmark": "continual_lm",
        "command": " ".join(["python benchmarks/continual_lm.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": "2 CPU cores, no GPU",
        "date": date.today().isoformat(),
        "setup": {"windows": windows, "paragraphs_per_window": rows or "all", "seeds": seeds, "epochs": EPOCHS, "lr": LR, "workers": 1},
        "summary": {"past_increase": increase, "average_perplexity": average, "last_cycle_seconds": seconds},
        "figures": figures,
        "runs": runs,
    }
    print(json.dumps(result["summary"], indent=2))
    write_result(result, "continual_lm", args.quick)


if __name__ == "__main__":
    main()
