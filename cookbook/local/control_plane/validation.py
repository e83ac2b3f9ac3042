"""Request validation and the error shape every answer of the control plane uses.

Errors are raised as `ApiError(status, message)` anywhere below a route and answered by `build_app` as
`{"error": {"code": <HTTP status>, "status": <gRPC code name>, "message": "..."}}` (`_error`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from cookbook.local import catalog as catalog_mod

ACCOUNT = catalog_mod.LOCAL_ACCOUNT
GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 425: "UNAVAILABLE", 503: "UNAVAILABLE"}
RESOURCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # trainer job, deployment and model ids
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the trainer's checkpoint names
JOB_NAME = re.compile(r"^accounts/([^/]+)/rlorTrainerJobs/([^/]+)$")
MODEL_NAME = re.compile(r"^accounts/([^/]+)/models/([^/]+)$")
DEPLOYMENT_NAME = re.compile(r"^accounts/([^/]+)/deployments/([^/]+)$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "status": GRPC_STATUS.get(status, "UNKNOWN"), "message": message}},
                        status_code=status)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_type(obj: dict, key: str, kind: str, where: str) -> None:
    if key not in obj or obj[key] is None:
        return
    v = obj[key]
    ok = {"int": _is_int(v), "bool": isinstance(v, bool), "str": isinstance(v, str),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool), "dict": isinstance(v, dict),
          "list[str]": isinstance(v, list) and all(isinstance(x, str) for x in v),
          "dict[str,str]": isinstance(v, dict) and all(isinstance(x, str) for x in v.values())}[kind]
    if not ok:
        raise ApiError(400, f"{where}.{key} must be {kind.replace('str', 'string').replace('dict', 'object')}, "
                            f"got {v!r}")


def _reject_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ApiError(400, f"invalid {where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() not in ("true", "false", "1", "0"):
        raise ApiError(400, f"query parameter {name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body

