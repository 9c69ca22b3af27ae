"""Ray job: a hyperparameter sweep (Ray Tune + Optuna + ASHA) over Ray Train + DeepSpeed trials.

    ray job submit --working-dir . -- python jobs/tune.py configs/gpt2/tiny_tune.yaml [--resume] [--promote] [key=value ...]
"""

import sys

from lifelong.cli import print_sweep_summary
from lifelong.config import load_config
from lifelong.errors import LifelongError
from lifelong.runtime import connect
from lifelong.tune import run_sweep

flags = {a for a in sys.argv[2:] if a.startswith("--")}
unknown = flags - {"--resume", "--promote"}
try:
    if len(sys.argv) < 2 or unknown:
        raise LifelongError(f"usage: jobs/tune.py CONFIG [--resume] [--promote] [key=value ...] (unknown: {', '.join(sorted(unknown))})")
    config = load_config(sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")])
    connect(config.ray.address, config.ray.num_cpus, dashboard=True)
    print_sweep_summary(run_sweep(config, resume="--resume" in flags, promote="--promote" in flags))
except LifelongError as e:
    sys.exit(f"error: {e}")
