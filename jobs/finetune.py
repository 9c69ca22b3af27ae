"""Ray job: fine-tune from model.init_from on Ray Train + DeepSpeed, then register its best checkpoint.

ray job submit --working-dir . -- python jobs/finetune.py configs/gpt2/tiny_finetune.yaml [--resume] [key=value ...]

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.commands import train
from lifelong.console import fail
from lifelong.errors import LifelongError
from lifelong.submit import job_args

try:
    path, flags, overrides = job_args("finetune", sys.argv[1:])
    train("finetune", path, overrides, resume="--resume" in flags)
except LifelongError as e:
    fail(str(e))
