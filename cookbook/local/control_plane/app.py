"""The control plane's Starlette app (routes, error handlers, lifespan) and its command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cookbook.local import catalog as catalog_mod
from cookbook.local.catalog import Catalog
from cookbook.local.control_plane.checkpoints import Checkpoints
from cookbook.local.control_plane.deployments import Deployments
from cookbook.local.control_plane.jobs import TrainerJobs
from cookbook.local.control_plane.validation import ACCOUNT, ApiError, _error
from cookbook.local.procs import KeyAuthMiddleware, serve


class ControlPlane(TrainerJobs, Checkpoints, Deployments):
    """The whole control plane: trainer jobs, their checkpoints and deployments over the shared children."""


def build_app(root: Path, api_key: str, storage: Path | None = None, catalog: Catalog | None = None,
              spares: list[str] | None = None):
    cp = ControlPlane(root, api_key, storage, catalog)

    async def accounts(request: Request) -> Response:
        return JSONResponse({"accounts": [{"name": f"accounts/{ACCOUNT}", "displayName": "embedded platform"}]})

    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:  # unknown paths and methods, as JSON too
        status = getattr(exc, "status_code", 500)
        return _error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', '') or 'not supported'}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        cp.start_spares(spares or [])
        try:
            yield
        finally:
            cp.stop_all()  # children go down with the control plane
            await cp.http.aclose()

    a = "/v1/accounts/{account}"
    routes = [
        Route("/v1/accounts", accounts, methods=["GET"]),
        Route(a + "/trainingShapes/{shape}/versions", cp.shape_versions, methods=["GET"]),
        Route(a + "/trainingShapes/{shape}/versions/{version}", cp.shape_version, methods=["GET"]),
        Route(a + "/rlorTrainerJobs", cp.create_job, methods=["POST"]),
        Route(a + "/rlorTrainerJobs/{job_id}/checkpoints", cp.list_checkpoints, methods=["GET"]),
        Route(a + "/rlorTrainerJobs/{job_id}/checkpoints/{ckpt}", cp.promote, methods=["POST"]),
        Route(a + "/rlorTrainerJobs/{job_id}", cp.job, methods=["GET", "DELETE", "POST"]),
        Route(a + "/checkpoints/{ckpt}", cp.promote, methods=["POST"]),
        Route(a + "/deployments", cp.create_deployment, methods=["POST"]),
        Route(a + "/deployments/{dep_id}", cp.deployment, methods=["GET", "PATCH", "DELETE"]),
        Route("/training/v1/rlorTrainerJobs/{account}/{job_id}/api/v1/{rest:path}", cp.gateway,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/hot_load/v1/models/hot_load", cp.hot_load, methods=["GET", "POST"]),
        Route("/inference/v1/completions", cp.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: api_error, 404: http_error, 405: http_error})
    return KeyAuthMiddleware(app, api_key), cp


def main(argv: list[str] | None = None) -> None:
    # The help text is the package's docstring; the program name is how it is run (__main__.py).
    p = argparse.ArgumentParser(prog="python -m cookbook.local.control_plane",
                                description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="this platform's port files and logs")
    p.add_argument("--storage", help="trainer stores and promoted models (default: --root)")
    p.add_argument("--catalog", action="append", default=[],
                   help="a catalog file adding training shapes, deployment shapes and model aliases "
                        "(format: cookbook/local/catalog.py); repeatable")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY (keeps it out of `ps`)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--spare", action="append", default=[], choices=["trainer", "deployment"],
                   help="start a spare process of this kind at once; the next job or deployment of that kind starts "
                        "in it, its imports already done (repeatable)")
    args = p.parse_args(argv)
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        sys.exit("control plane: no API key (--api-key or COOKBOOK_PLATFORM_KEY)")
    try:
        cat = catalog_mod.load(args.catalog)
    except catalog_mod.CatalogError as e:
        sys.exit(f"control plane: {e}")
    app, cp = build_app(Path(args.root).resolve(), api_key, Path(args.storage).resolve() if args.storage else None,
                        cat, args.spare)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (lifespan stops the children); SIGHUP would not be.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        serve(app, args.port, args.port_file, args.parent_pid)
    finally:
        cp.stop_all()  # idempotent backstop if the lifespan did not run
