"""Ray job: a hyperparameter sweep (Ray Tune + Optuna + ASHA) over Ray Train + DeepSpeed trials.

ray job submit --working-dir . -- python jobs/tune.py configs/gpt2/tiny_tune.yaml [--resume] [--promote] [key=value ...]

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.cli import print_sweep_summary
from lifelong.config import load_config
from lifelong.errors import LifelongError
from lifelong.runtime import connect
from lifelong.submit import job_args
from lifelong.tune import needs_state_api, run_sweep

try:
    path, flags, overrides = job_args("tune", sys.argv[1:])
    config = load_config(path, overrides)
    connect(config.ray.address, config.ray.num_cpus, dashboard=needs_state_api(config))
    print_sweep_summary(run_sweep(config, resume="--resume" in flags, promote="--promote" in flags))
except LifelongError as e:
    sys.exit(f"error: {e}")
