"""The lifecycle so far, in one process on an embedded local Ray (what `make quickstart` runs).

generate demo data → pretrain a tiny GPT-2 (2 DeepSpeed workers) → promote it → fine-tune a
topic classifier from it (exported to ONNX when registered) → promote → evaluate the champion
→ serve it on Ray Serve and ask it over HTTP → list the registry.
"""

import json
import sys
import time
import urllib.request
from pathlib import Path

from ray import serve

from lifelong.cli import console, models_list, print_training_summary
from lifelong.config import load_config
from lifelong.evaluate import evaluate_model
from lifelong.registry import Registry
from lifelong.runtime import connect
from lifelong.serve import deploy
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

console.rule("1/4 pretrain a tiny GPT-2 with 2 DeepSpeed workers (ZeRO-2)")
lm = run_training(pretrain)
print_training_summary(lm)
registry.move_alias(lm.model, "champion", lm.version, reason="quickstart pretrain")

console.rule("2/4 fine-tune a topic classifier from tiny-gpt2@champion")
clf = run_training(finetune)
print_training_summary(clf)
registry.move_alias(clf.model, "champion", clf.version, reason="quickstart finetune")

console.rule("3/4 evaluate tiny-topics@champion without training it")
result = evaluate_model(finetune, f"{clf.model}@champion")
console.print({k: round(v, 4) for k, v in result.metrics.items()})

console.rule("4/4 serve tiny-topics@champion (ONNX Runtime, 2 replicas) and ask it over HTTP")
served = load_config("configs/gpt2/tiny_serve.yaml")
url = deploy(served)
question = json.dumps({"texts": ["the stock market and the bank", "a storm with rain in the forecast"]}).encode()
request = urllib.request.Request(f"{url}/v1/predict", data=question, headers={"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
console.print(f"POST {url}/v1/predict →", {"version": answer["version"], "labels": [p["label"] for p in answer["predictions"]]})
serve.delete(served.serve_app_name)

models_list(root=pretrain.storage.root)
console.print(f"[bold green]quickstart done[/] in {time.monotonic() - started:.0f} s. Next: "
              "lifelong serve configs/gpt2/tiny_serve.yaml · lifelong models list")
sys.exit(0)
