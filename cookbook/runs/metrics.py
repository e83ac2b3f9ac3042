"""Per-step metric sinks: stdout, `{log_path}/metrics.jsonl`, and W&B.

W&B: no project → disabled (wandb is not even imported); a project without WANDB_API_KEY → offline;
`wandb.mode` forces a mode. The run id is kept in the run directory so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cookbook.config import WandBConfig
from cookbook.errors import UserError
from cookbook.runs.rundir import append_jsonl


def wandb_mode(cfg: WandBConfig) -> str:
    if cfg.mode == "disabled" or not cfg.project:
        return "disabled"
    if cfg.mode:
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def check_wandb_credentials(cfg: WandBConfig) -> None:
    if wandb_mode(cfg) == "online" and not os.environ.get("WANDB_API_KEY"):
        raise UserError("wandb=online needs WANDB_API_KEY in the environment (keys are never read from config "
                        "files). Fix: export WANDB_API_KEY=..., or use wandb=offline to log locally and "
                        "`wandb sync` later.")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# What a stdout line shows (every metric goes to metrics.jsonl and W&B).
ECHO_KEYS = ("loss", "reward", "accuracy", "exact_match", "margin", "train/lr")
ECHO_EVERY_S = 5.0


class MetricsLogger:
    def __init__(self, log_path: Path, wandb_cfg: WandBConfig, run_name: str, config: dict[str, Any],
                 echo: bool = True):
        self.path = Path(log_path) / "metrics.jsonl"
        self.echo = echo
        self.last: dict[str, Any] = {}
        self._echoed_at = 0.0
        self._wandb = None
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            check_wandb_credentials(wandb_cfg)
            self._wandb = _init_wandb(Path(log_path), wandb_cfg, mode, run_name, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        append_jsonl(self.path, record)
        self.last.update(record)
        # One line per few seconds (and every evaluation) keeps the console readable next to the progress bar.
        now = time.monotonic()
        if self.echo and (now - self._echoed_at >= ECHO_EVERY_S or any(k.startswith("eval/") for k in record)):
            from tqdm import tqdm

            self._echoed_at = now
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if k == "step" or any(part in k for part in ECHO_KEYS))
            tqdm.write(shown)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(log_path: Path, cfg: WandBConfig, mode: str, run_name: str, config: dict[str, Any]):
    import wandb

    id_file = log_path / "wandb_run_id"
    # Our own id (wandb.util.generate_id is gone from wandb >= 0.2x): 8 lowercase hex characters, a valid W&B id.
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name or run_name, id=run_id,
                      resume="allow", mode=mode, dir=str(log_path), config=config,
                      settings=wandb.Settings(console="off", silent=True))
