"""Compose and validate every job of a command line before Hydra launches anything."""

from __future__ import annotations

import os

from cookbook.config import RunConfig
from cookbook.config.compose import compose, compose_run_config
from cookbook.errors import UserError
from cookbook.runs.metrics import check_wandb_credentials

# Flags under which Hydra only prints something; those paths must stay fast and never fail on a missing recipe.
_PASS_THROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


def preflight(argv: list[str]) -> list[RunConfig]:
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _PASS_THROUGH):
        return []
    if args.config_dir or args.config_path or args.config_name:
        return []  # a user-supplied config tree: let Hydra compose it directly
    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    runs = []
    for overrides in jobs:
        run = compose_run_config(overrides)
        check_credentials(run)
        check_log_path(run)
        runs.append(run)
    return runs


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper would produce, including saved sweeps' `hydra.sweeper.params`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose(plain, return_hydra_config=True).hydra.sweeper.get("params") or {}
    from_config = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    given = {o.get_key_element() for o in parsed}
    combined = [o for o in from_config if o.get_key_element() not in given] + parsed
    batches = BasicSweeper.split_arguments(combined, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def check_log_path(run: RunConfig) -> None:
    """The run directory must be a directory (or not exist yet); Hydra would fail on a file with a traceback."""
    if run.log_path and os.path.exists(run.log_path) and not os.path.isdir(run.log_path):
        raise UserError(f"log_path={run.log_path} exists and is not a directory, so the run cannot write its files "
                        f"there. Fix: choose a new log_path (a directory, created if missing), or move that file "
                        f"away.")


def check_credentials(run: RunConfig) -> None:
    from launchers import get_launcher

    if not run.dry_run:
        get_launcher(run.infra.launcher).check_credentials(run)
    check_wandb_credentials(run.wandb)
