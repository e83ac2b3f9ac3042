"""One job: typed config → run directory → metric sinks → launcher session → recipe → status file."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cookbook.config import RunConfig
from cookbook.config.compose import recipe_name, to_run_config
from cookbook.config.preflight import check_credentials
from cookbook.errors import InfraError
from cookbook.runs.metrics import MetricsLogger
from cookbook.runs.rundir import prepare_run_dir, read_status, redact, write_status
from launchers import get_launcher


def run_job(cfg: DictConfig, hydra_cfg: Any) -> dict[str, Any]:
    from hydra.types import RunMode

    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run = to_run_config(cfg)
    check_credentials(run)
    log_path = Path(run.log_path or hydra_cfg.runtime.output_dir).resolve()
    run.log_path = str(log_path)
    recipe = recipe_name(run.recipe)
    infra = hydra_cfg.runtime.choices.get("infra") or "custom"
    overrides = list(hydra_cfg.overrides.task)
    if run.dry_run:
        return print_plan(run, recipe, infra, overrides)
    previous = read_status(log_path)
    if multirun and previous and previous.get("status") == "ok":
        print(f"[skip] {log_path.name}: finished in an earlier sweep run")
        return previous
    config_yaml = OmegaConf.to_yaml(OmegaConf.merge(cfg, {"log_path": str(log_path)}), resolve=True)
    attempt = prepare_run_dir(log_path, config_yaml, overrides)
    started = time.time()
    status: dict[str, Any] = {"status": "running", "recipe": recipe, "infra": infra, "overrides": overrides,
                              "attempt": attempt, "log_path": str(log_path)}
    write_status(log_path, status)
    logger = MetricsLogger(log_path, run.wandb, f"{recipe}-{infra}-{log_path.name}",
                           OmegaConf.to_container(cfg, resolve=True))
    try:
        result = execute(run, recipe, logger)
        status.update(status="ok", final_metrics=_final(logger.last, result))
        return status
    except KeyboardInterrupt:
        status.update(status="cancelled", error="interrupted (Ctrl-C)")
        raise
    except Exception as exc:
        status.update(status="failed", error=redact(f"{type(exc).__name__}: {exc}"), final_metrics=logger.last)
        if not multirun:
            raise
        # A raising job makes Hydra re-raise at the end of the sweep and stop writing its summary; record the
        # failure here (traceback included) and let the sweep go on.
        (log_path / "error.txt").write_text(redact(traceback.format_exc()))
        print(f"[failed] {log_path.name}: {status['error']}")
        return status
    finally:
        status["wall_time_s"] = round(time.time() - started, 2)
        write_status(log_path, status)
        logger.close()


def execute(run: RunConfig, recipe: str, logger: MetricsLogger) -> dict[str, Any]:
    from cookbook.runs.warmstart import plan_init

    # The SDK and tinker log at INFO on import and on every hot load; the run prints its own progress.
    for name in ("fireworks", "tinker"):
        logging.getLogger(name).setLevel(logging.WARNING)

    launcher = get_launcher(run.infra.launcher)
    check_inputs(run)  # fail fast on bad data or a bad reward path, before any trainer or deployment starts
    init = plan_init(run.recipe.init_from, run.base_model)
    if init.note:
        print(f"[{recipe}] {init.note}", file=sys.stderr)
    # The launcher provisions the starting model (the base model, or a warm start / model directory); the run's
    # identity for resume checks stays the configured base model.
    provisioned = dataclasses.replace(run, base_model=init.base_model)
    data = []

    def load_data(tokenizer: Any) -> None:
        # Imported here, not before launching: the platform starts meanwhile (the recipe imports the SDK).
        data.append(importlib.import_module(f"cookbook.recipes.{recipe}").load_data(run, tokenizer))

    with launcher.launch(provisioned, needs_reference=run.recipe.needs_reference,
                         needs_deployment=run.recipe.needs_deployment, while_starting=load_data) as session:
        session.init_state_path = init.state_path
        module = importlib.import_module(f"cookbook.recipes.{recipe}")
        try:
            # A launcher that did not call while_starting: the data is rendered now.
            return module.train(run, session, logger, data[0] if data else module.load_data(run, session.tokenizer))
        except Exception as exc:
            problem = session.explain_failure()
            if problem is None:
                raise  # the driver's own error: its traceback is the message
            raise InfraError(platform_failure(run, problem, session.logs_dir)) from exc


def platform_failure(run: RunConfig, problem: str, logs_dir: str | None) -> str:
    """One paragraph: what broke on the platform, where its logs are, and how to go on."""
    from cookbook.checkpoints import read_index

    records = read_index(run.log_path)
    resume = (f"The last checkpoint is {records[-1]['name']} (step {records[-1]['step']}): rerun the same command "
              f"(log_path={run.log_path}) to resume from it." if records else
              "No checkpoint was saved yet, so a rerun starts over (weight_sync.dcp_save_interval=N saves every N "
              "steps).")
    logs = f" Platform logs: {logs_dir}." if logs_dir else ""
    return f"The run stopped because {problem}.{logs} {resume}"


def check_inputs(run: RunConfig) -> None:
    from cookbook.datasets.load import load_rows
    from cookbook.datasets.rows import resolve_dataset

    cfg = run.recipe
    for spec in filter(None, (cfg.dataset, cfg.eval_dataset)):
        load_rows(resolve_dataset(spec), cfg.DATA_KIND)
    if hasattr(cfg, "reward_fn"):
        from cookbook.recipes.rewards import load_reward_fn

        load_reward_fn(cfg.reward_fn)


def _final(last: dict[str, Any], result: Any) -> dict[str, Any]:
    final = dict(last)
    if isinstance(result, dict):
        final.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None})
    return final


def plan(run: RunConfig, recipe: str, infra: str) -> dict[str, Any]:
    """What a run would create, computed from the config alone (no credentials, nothing started)."""
    from cookbook.client.session import deployment_id_for

    separate_ref = run.recipe.needs_reference and run.infra.ref_training_shape_id and not run.recipe.lora_rank

    return {
        "recipe": recipe, "infra": infra, "launcher": run.infra.launcher, "base_model": run.base_model,
        "policy_trainer": run.infra.training_shape_id,
        "reference": (("separate forward-only trainer" if separate_ref else "frozen base model on the policy trainer")
                      if run.recipe.needs_reference else None),
        "reference_trainer": run.infra.ref_training_shape_id if separate_ref else None,
        "deployment": (run.deploy.deployment_id or deployment_id_for(run.base_model))
        if run.recipe.needs_deployment else None,
        "log_path": run.log_path,
    }


def print_plan(run: RunConfig, recipe: str, infra: str, overrides: list[str]) -> dict[str, Any]:
    p = plan(run, recipe, infra)
    print(f"[dry-run] {' '.join(overrides) or '(defaults)'}")
    for key, value in p.items():
        print(f"  {key:18} {value if value is not None else '-'}")
    return {"status": "dry_run", **p}
