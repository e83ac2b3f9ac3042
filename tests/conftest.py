"""Shared test settings: offline, quiet, W&B off unless a test turns it on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TINKER_TELEMETRY", "0")

REPO = Path(__file__).resolve().parents[1]
# Trainer storage and the warm-start cache for tests: inside the checkout (gitignored), kept between test sessions.
os.environ.setdefault("COOKBOOK_PLATFORM_ROOT", str(REPO / ".test-platform"))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            module: str = "cookbook.train") -> subprocess.CompletedProcess:
    """Run `python -m cookbook.train ARGS` in a subprocess and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def pytest_terminal_summary(terminalreporter, config):
    """The learning proofs' table of step-0 vs end metrics (tests/test_learning.py), after the test results."""
    table = getattr(config, "learning_table", None)
    if table:
        terminalreporter.write_line("\n" + table)


def prompt_and_answers(row: dict) -> tuple[str, list[str]]:
    """(user prompt, [assistant answers]) of a bundled row in any of its schemas."""
    if "messages" in row:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        return row["messages"][0]["content"], answers or [row["ground_truth"]]
    if "chosen" in row:
        return row["chosen"]["messages"][0]["content"], [row["chosen"]["messages"][1]["content"],
                                                         row["rejected"]["messages"][1]["content"]]
    if "samples" in row:
        best = sorted(row["samples"], key=lambda x: -x.get("score", x.get("evals", {}).get("score", 0)))
        return best[0]["messages"][0]["content"], [x["messages"][1]["content"] for x in best]
    return row["input"]["messages"][0]["content"], [row["preferred_output"][0]["content"],
                                                    row["non_preferred_output"][0]["content"]]
