"""`python -m cookbook.train +recipe=<sft|grpo|dpo|orpo> [overrides]` — the one entry point.

Kept import-light: `--cfg job`, `--help` and user-error paths never import torch or transformers.
Every job is composed and validated before Hydra starts anything, so a user mistake exits with code 2 and
one readable paragraph (Hydra itself would print a traceback and exit 1), also for every job of a sweep.
A sweep (`-m`) runs every job even when some fail, then lists the failures (cookbook/runs/sweep.py) and exits 1.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cookbook.config import register_configs
from cookbook.config.compose import CONFIG_PATH, register_resolvers
from cookbook.errors import InfraError, UserError

USER_ERROR_EXIT = 2
INFRA_ERROR_EXIT = 1
SWEEP_FAILED_EXIT = 1


def main() -> None:
    register_configs()
    register_resolvers()
    try:
        from cookbook.config.preflight import preflight

        preflight(sys.argv[1:])
    except UserError as exc:
        _exit_user_error(exc)
    from cookbook.runs import sweep

    try:
        _hydra_main()
    except KeyboardInterrupt:
        # The launcher has already stopped every platform process; the status file says "cancelled".
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # Hydra skips on_multirun_end when a job raised; finish() then writes the summary (no-op otherwise).
        failed = sweep.finish()
    if failed:
        sys.exit(SWEEP_FAILED_EXIT)  # the failed jobs were listed above; the sweep itself ran to the end


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cookbook.runs.runner import run_job

    hydra_cfg = HydraConfig.get()
    try:
        return run_job(cfg, hydra_cfg)
    except (UserError, InfraError) as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # SystemExit would abort the whole sweep; the job is recorded as failed instead
        _exit_with_message(exc, USER_ERROR_EXIT if isinstance(exc, UserError) else INFRA_ERROR_EXIT)


def _exit_user_error(exc: UserError) -> None:
    _exit_with_message(exc, USER_ERROR_EXIT)


def _exit_with_message(exc: Exception, code: int) -> None:
    """One readable paragraph, no traceback: the message names what failed and the fix."""
    from cookbook.runs.rundir import redact

    print(f"error: {redact(str(exc))}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
