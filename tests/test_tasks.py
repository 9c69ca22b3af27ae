"""Task families (lifelong/tasks): one module per `model.task`, the same names in each, and no
module outside them that tests a task by its name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from conftest import ROOT
from lifelong.tasks import CONTRACT, TASKS, TaskName, task, task_of_architectures

PLATFORM = Path(ROOT) / "platform" / "lifelong"
NAMES = "|".join(re.escape(name) for name in get_args(TaskName))
# `x == "causal-lm"`, `"causal-lm" != x`, `x in ("causal-lm", …)`: a branch on the name.
BRANCH = re.compile(rf"""(==|!=|\bin\b)\s*[(\[{{]?\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)""")


def test_every_family_provides_the_whole_contract_under_its_own_name():
    assert set(TASKS) == set(get_args(TaskName))
    for name, module in TASKS.items():
        assert module.NAME == name
        assert [key for key in CONTRACT if not hasattr(module, key)] == [], name
        assert module.JOB in ("pretrain", "finetune") and (module.ENDPOINT is None or module.ENDPOINT.startswith("/v1/"))
        assert module.EXPORT_FORMATS[:1] in ((), ("onnx",))  # the int8 and TorchScript variants come after ONNX


def test_no_module_outside_the_families_branches_on_a_task_name():
    offenders = []
    for path in sorted(PLATFORM.rglob("*.py")):
        if path.parent.name == "tasks":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(PLATFORM)}:{number}: {line.strip()}")
    assert offenders == [], "ask lifelong.tasks.task(name) instead:\n" + "\n".join(offenders)


def test_the_branch_check_sees_the_shapes_it_forbids():
    for line in ('if task == "causal-lm":', "if 'sequence-classification' != card.task:", 'ok = t in ("causal-lm", "x")'):
        assert BRANCH.search(line), line
    for line in ("task(text_classification.NAME)", 'load_for_inference(model_dir, "causal-lm")'):
        assert not BRANCH.search(line), line


def test_an_unknown_task_is_one_message_naming_the_known_ones():
    from lifelong.errors import LifelongError

    with pytest.raises(
        LifelongError, match="unknown model.task 'object-detection': use one of causal-lm, sequence-classification, image-classification"
    ):
        task("object-detection")
    with pytest.raises(LifelongError, match="image-classification, masked-image-modeling$"):
        task("object-detection")


@pytest.mark.parametrize(
    "architectures, expected",
    [
        (["GPT2LMHeadModel"], "causal-lm"),
        (["LlamaForCausalLM"], "causal-lm"),
        (["GPT2ForSequenceClassification"], "sequence-classification"),
        (["BertForSequenceClassification"], "sequence-classification"),
        (["ViTForImageClassification"], "image-classification"),
        (["ResNetForImageClassification"], "image-classification"),
        (["ViTMAEForPreTraining"], "masked-image-modeling"),
        ([], "causal-lm"),  # a config.json without architectures: the config's default task
    ],
)
def test_a_bare_hf_directory_is_claimed_by_its_family(architectures, expected):
    assert task_of_architectures(architectures) == expected


def test_what_the_loop_averages_and_scores_per_family():
    import torch

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask, "labels": torch.tensor([2, 0])}
    logits = torch.tensor([[0.1, 0.2, 3.0], [1.0, 0.0, 0.0]])
    lm, clf = task("causal-lm"), task("sequence-classification")
    lm_batch = {**batch, "labels": torch.zeros(2, 4, dtype=torch.long)}
    assert lm.loss_weight(lm_batch) == 3  # real tokens after each row's first: 2 + 1
    lm_batch["labels"][0, :2] = -100  # an instruction row's prompt: no loss there
    assert lm.loss_weight(lm_batch) == 2
    assert clf.loss_weight(batch) == 2  # rows
    assert lm.predictions(logits) is None and clf.predictions(logits) == [2, 0]
    assert lm.metrics(np.log(4.0)) == pytest.approx({"loss": np.log(4.0), "perplexity": 4.0})
    scored = clf.metrics(0.5, [2, 0, 1, 1], [2, 0, 1, 0], 3)
    assert scored["accuracy"] == 0.75 and scored["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_configs_and_data_tasks_import_no_torch():
    """Configs load in the CLI before anything heavy, and Ray Data's tokenizing workers import
    the families: neither may pull in torch or transformers' models."""
    probe = "import sys, lifelong.config, lifelong.tasks; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_classifier_metrics_take_nan_probabilities_of_a_diverged_model():
    """A sweep trial at lr 1e30 reports NaN logits: the loop's loss check must name it, so mAP is NaN, not an error."""
    import math

    from lifelong.tasks import classify

    out = classify.metrics(float("nan"), [0, 1, 1], [0, 0, 0], 2, [[math.nan, math.nan]] * 3)
    assert math.isnan(out["map"]) and out["accuracy"] == pytest.approx(1 / 3)
    out = classify.metrics(0.5, [0, 1, 1, 0], [0, 1, 0, 0], 2, [[0.9, 0.1], [0.2, 0.8], [0.75, 0.25], [0.7, 0.3]])
    assert out["map"] == pytest.approx((1 + 2 / 3) / 2)  # each class: its positives ranked 1st and 3rd
