"""Ray job: fine-tune from model.init_from on Ray Train + DeepSpeed, then register its best checkpoint.

    ray job submit --working-dir . -- python jobs/finetune.py configs/gpt2/tiny_finetune.yaml [key=value ...]
"""

import sys

from lifelong.cli import print_training_summary
from lifelong.config import load_config
from lifelong.errors import LifelongError
from lifelong.runtime import connect
from lifelong.train.driver import run_training

try:
    config = load_config(sys.argv[1], sys.argv[2:])
    connect(config.ray.address, config.ray.num_cpus)
    print_training_summary(run_training(config))
except LifelongError as e:
    sys.exit(f"error: {e}")
