"""Ray job: continual learning on the landing zone (one cycle with --once, else a polling loop).

ray job submit --working-dir . -- python jobs/continual.py configs/gpt2/tiny_continual.yaml --once [key=value ...]

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.commands import continual
from lifelong.console import fail
from lifelong.errors import LifelongError
from lifelong.submit import job_args

try:
    path, flags, overrides = job_args("continual", sys.argv[1:])
    continual(path, overrides, once="--once" in flags, force="--force" in flags)
except LifelongError as e:
    fail(str(e))
