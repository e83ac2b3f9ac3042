"""The `fireworks` launcher: the same session as `local`, pointed at the Fireworks control plane.

URL: `https://api.fireworks.ai`, or `$FIREWORKS_BASE_URL`. Key: `$FIREWORKS_API_KEY` only (never config or files).
Nothing is started on this machine; trainer jobs and the deployment are created on Fireworks through the official
SDK from the shapes in `cfg.infra` / `cfg.deploy`, and deleted (deployment scaled to zero, then deleted) when the
block exits.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

from cookbook.config import RunConfig
from cookbook.errors import UserError

if TYPE_CHECKING:  # preflight imports this module to check credentials: it must stay import-light
    from cookbook.client.session import Session

DEFAULT_BASE_URL = "https://api.fireworks.ai"


def _poll_interval_s() -> float:
    # Fireworks provisioning takes minutes, so 5 s polls; tests pointing this launcher at a local control plane
    # shorten it with FIREWORKS_POLL_INTERVAL_S.
    return float(os.environ.get("FIREWORKS_POLL_INTERVAL_S") or 5.0)


def check_credentials(cfg: RunConfig) -> None:
    """Before anything is launched (preflight, and each job of a sweep): Fireworks needs a key in the environment."""
    credentials(cfg)


def credentials(cfg: RunConfig) -> tuple[str, str]:
    """(control-plane URL, API key), both from the environment only."""
    api_key = os.environ.get("FIREWORKS_API_KEY", "").strip()
    if not api_key:
        raise UserError(f"The training shape {cfg.infra.training_shape_id} runs on Fireworks and needs FIREWORKS_API_KEY in the "
                        f"environment (keys are never read from config files). Fix: export FIREWORKS_API_KEY=..., or "
                        f"run locally instead with infra=local-tiny (the default), or add dry_run=true to see the "
                        f"plan without credentials.")
    return os.environ.get("FIREWORKS_BASE_URL", "").strip() or DEFAULT_BASE_URL, api_key


@contextlib.contextmanager
def launch(cfg: RunConfig, *, needs_reference: bool, needs_deployment: bool,
           log: Callable[[str], None] = print, while_starting: Callable[[Any], None] | None = None
           ) -> Iterator[Session]:
    from cookbook.client.session import build_session

    base_url, api_key = credentials(cfg)
    with contextlib.ExitStack() as stack:
        log(f"[launch] Fireworks control plane at {base_url}")
        yield build_session(cfg, base_url, api_key, needs_reference=needs_reference,
                            needs_deployment=needs_deployment, stack=stack, log=log, poll_interval_s=_poll_interval_s(),
                            while_starting=while_starting)
