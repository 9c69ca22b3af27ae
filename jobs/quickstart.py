"""The lifecycle so far, in one process on an embedded local Ray (what `make quickstart` runs).

generate demo data → pretrain a tiny GPT-2 (2 DeepSpeed workers) → promote it → fine-tune a
topic classifier from it → promote → evaluate the champion → list the registry.
"""

import sys
import time
from pathlib import Path

from lifelong.cli import console, models_list, print_training_summary
from lifelong.config import load_config
from lifelong.evaluate import evaluate_model
from lifelong.registry import Registry
from lifelong.runtime import connect
from lifelong.storage import Storage
from lifelong.synth import write_text_corpus, write_topic_dataset
from lifelong.train.driver import run_training

started = time.monotonic()
data = Path("data/demo")
if not (data / "topics.jsonl").exists():
    write_text_corpus(data / "corpus.jsonl")
    write_topic_dataset(data / "topics.jsonl", 1200, seed=0)
stamp = time.strftime("%Y%m%d-%H%M%S")  # a new run each time: earlier runs stay in the store
pretrain = load_config("configs/gpt2/tiny_pretrain.yaml", [f"run_name=quickstart-pretrain-{stamp}"])
finetune = load_config("configs/gpt2/tiny_finetune.yaml", [f"run_name=quickstart-finetune-{stamp}"])
console.print(f"[bold]quickstart[/] on {connect(num_cpus=4)}; storage root {pretrain.storage.root}")
registry = Registry(Storage(pretrain.storage.root))

console.rule("1/3 pretrain a tiny GPT-2 with 2 DeepSpeed workers (ZeRO-2)")
lm = run_training(pretrain)
print_training_summary(lm)
registry.move_alias(lm.model, "champion", lm.version, reason="quickstart pretrain")

console.rule("2/3 fine-tune a topic classifier from tiny-gpt2@champion")
clf = run_training(finetune)
print_training_summary(clf)
registry.move_alias(clf.model, "champion", clf.version, reason="quickstart finetune")

console.rule("3/3 evaluate tiny-topics@champion without training it")
result = evaluate_model(finetune, f"{clf.model}@champion")
console.print({k: round(v, 4) for k, v in result.metrics.items()})

models_list(root=pretrain.storage.root)
console.print(f"[bold green]quickstart done[/] in {time.monotonic() - started:.0f} s. Next: "
              "lifelong models list · lifelong evaluate configs/gpt2/tiny_finetune.yaml --model tiny-topics@champion")
sys.exit(0)
