"""The embedded control plane: the subset of the Fireworks REST contract the official training SDK uses.

    python -m cookbook.local.control_plane --root DIR [--storage DIR] [--catalog FILE.json ...] \
        [--port N] [--port-file F] [--parent-pid PID]                            (key: $COOKBOOK_PLATFORM_KEY)

Creating a trainer job spawns a trainer service process; creating a deployment spawns an inference server. Both are
reached through this server: the trainer gateway (`/training/v1/rlorTrainerJobs/{a}/{job}/api/v1/*`), hot load
(routed by the `fireworks-deployment` header) and completions (routed by `model`). Shapes and base-model aliases come
from `cookbook.local.catalog` (+ `--catalog` files). Layout: `--root` holds `logs/` and `run/` (port files) of this
platform; `--storage` holds `jobs/<job>/{checkpoints,sampler}/` (the trainers' stores) and `models/<id>/` (promoted).

It serves the requests the SDK sends (trainer jobs, training shapes, checkpoints, deployments, hot load, completions)
and rejects what the real service rejects, answering
`{"error": {"code": <HTTP status>, "status": <gRPC code name>, "message": "..."}}`. Rules of thumb where the real
behaviour is not documented (each marked "unknown" where it is applied): the strict-but-reasonable choice; a missing
resource named in the URL is 404, a missing or malformed resource named inside a request body is 400.
"""

# The package, by concern (the docstring above is also the CLI's --help):
#   validation.py   error shape (ApiError, _error), resource-name patterns, request-body and query-parameter checks
#   children.py     ControlPlaneBase: state, child processes (Child, start/watch/stop, commands), shared checks, proxy
#   jobs.py         TrainerJobs: training shapes, trainer jobs (create/get/delete/resume), the trainer gateway
#   checkpoints.py  Checkpoints: checkpoint listing and promotion
#   deployments.py  Deployments: create/get/patch/delete, hot-load and completions routing
#   app.py          ControlPlane (the three combined), build_app (routes, error handlers, lifespan), main (the CLI)

from cookbook.local.control_plane.app import ControlPlane, build_app, main
from cookbook.local.control_plane.children import Child, torch_threads
from cookbook.local.control_plane.validation import ApiError

__all__ = ["ApiError", "Child", "ControlPlane", "build_app", "main", "torch_threads"]
