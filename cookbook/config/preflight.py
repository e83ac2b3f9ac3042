"""Compose and validate every job of a command line before Hydra launches anything."""

from __future__ import annotations

import os

from cookbook.config.compose import compose, to_run_config
from cookbook.config import RunConfig
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
        run = to_run_config(compose(overrides))
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
    if run.infra.launcher == "fireworks" and not run.dry_run and not os.environ.get("FIREWORKS_API_KEY"):
        raise UserError(
            f"The training shape {run.infra.training_shape_id} runs on Fireworks and needs FIREWORKS_API_KEY in the "
            f"environment (keys are never read from config files). Fix: export FIREWORKS_API_KEY=..., or run "
            f"locally instead with infra=local-tiny (the default), or add dry_run=true to see the plan without "
            f"credentials.")
    check_wandb_credentials(run.wandb)
