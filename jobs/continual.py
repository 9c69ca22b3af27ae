"""Ray job: continual learning on the landing zone (one cycle with --once, else a polling loop).

ray job submit --working-dir . -- python jobs/continual.py configs/gpt2/tiny_continual.yaml --once [key=value ...]

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.config import load_config
from lifelong.continual.cycle import check_continual
from lifelong.continual.daemon import run_cycles
from lifelong.errors import LifelongError
from lifelong.runtime import connect
from lifelong.submit import job_args

try:
    path, flags, overrides = job_args("continual", sys.argv[1:])
    config = load_config(path, overrides)
    check_continual(config)
    connect(config.ray.address, config.ray.num_cpus)
    run_cycles(config, once="--once" in flags, force="--force" in flags, show=lambda text: print(text, flush=True))
except LifelongError as e:
    sys.exit(f"error: {e}")
