"""Ray job: a hyperparameter sweep (Ray Tune + Optuna + ASHA) over Ray Train + DeepSpeed trials.

ray job submit --working-dir . -- python jobs/tune.py configs/gpt2/tiny_tune.yaml [--resume] [--promote] [key=value ...]

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.commands import tune
from lifelong.console import fail
from lifelong.errors import LifelongError
from lifelong.submit import job_args

try:
    path, flags, overrides = job_args("tune", sys.argv[1:])
    tune(path, overrides, resume="--resume" in flags, promote="--promote" in flags)
except LifelongError as e:
    fail(str(e))
