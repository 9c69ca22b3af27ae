"""Ray job: deploy the Serve app that follows serve.alias; it keeps running after this job ends.

ray job submit --working-dir . -- python jobs/serve.py configs/gpt2/tiny_serve.yaml serve.host=0.0.0.0

`lifelong submit JOB CONFIG … --address http://HEAD:8265` checks first that everything the job
needs travels (by hand, `ray job submit --working-dir .` leaves git-ignored files behind, the
demo data among them: give data.path as a URI or a path every node reads).
"""

import sys

from lifelong.commands import serve
from lifelong.console import fail
from lifelong.errors import LifelongError
from lifelong.submit import job_args

try:
    path, _, overrides = job_args("serve", sys.argv[1:])
    serve(path, overrides)
except LifelongError as e:
    fail(str(e))
