"""The CLI through subprocesses: printing paths, user errors (exit 2, one paragraph), dry runs, sweeps."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli


def test_cfg_job_prints_the_typed_config_quickly_without_torch():
    start = time.perf_counter()
    result = run_cli("+recipe=sft", "--cfg", "job")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "learning_rate:" in result.stdout and "training_shape_id: accounts/local/trainingShapes/local-tiny" in result.stdout
    assert elapsed < 5.0  # the target is < 1.5 s on an idle machine; generous here for busy CI neighbours
    probe = ("import sys; sys.argv=['train', '+recipe=sft', '--cfg', 'job']\n"
             "from cookbook.train import main\nmain()\n"
             "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    check = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("infra", ["local-tiny", "qwen3-8b-h200"])
def test_preflight_checks_every_job_without_heavy_imports(tmp_path, infra):
    """Preflight runs the launcher's credential check and then finds the bad log_path (a file): exit 2, and neither
    torch, transformers nor the Fireworks SDK was imported on the way."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    probe = (f"import sys; sys.argv=['train', '+recipe=sft', 'infra={infra}', 'log_path={not_a_dir}']\n"
             "from cookbook.train import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'fireworks') if m in sys.modules)\n"
             "print(code, heavy)\n")
    env = {**os.environ, "FIREWORKS_API_KEY": "fw_test_key"}
    check = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env)
    assert check.stdout.strip().splitlines()[-1] == "2 []", check.stdout + check.stderr
    assert f"log_path={not_a_dir}" in check.stderr


def test_help_lists_groups_and_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("infra: local-small, local-tiny, qwen3-8b-h200, qwen3p5-9b", "recipe: dpo, grpo, orpo, sft",
                 "wandb: disabled, offline, online"):
        assert word in result.stdout


@pytest.mark.parametrize("args,words", [
    ([], ["No recipe chosen", "dpo, grpo, orpo, sft"]),
    (["+recipe=sft", "infra=qwen3-8b"], ["not an option", "local-tiny"]),
    (["+recipe=sft", "+lerning_rate=1"], ["lerning_rate", "recipe.learning_rate"]),
    (["+recipe=grpo", "recipe.group_size=1"], ["recipe.group_size"]),
    (["+recipe=dpo", "recipe.beta=0.9"], ["recipe.beta"]),
    (["+recipe=sft", "deploy.sample_timeout=soon"], ["deploy.sample_timeout", "soon"]),
    (["-m", "+recipe=sft", "infra=local-tiny,nope"], ["infra=nope", "not an option"]),
])
def test_user_errors_exit_2_with_one_paragraph_and_no_traceback(args, words):
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    for word in words:
        assert word in message


def test_log_path_that_is_a_file_is_a_user_error(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run directory")
    result = run_cli("+recipe=sft", f"log_path={existing}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and str(existing) in message and "Fix:" in message
    assert existing.read_text() == "not a run directory"


def test_fireworks_shape_without_key_explains_how_to_run_locally():
    env = {k: v for k, v in os.environ.items() if k != "FIREWORKS_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "cookbook.train", "+recipe=grpo", "infra=qwen3-8b-h200"],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 2
    assert "FIREWORKS_API_KEY" in result.stderr and "infra=local-tiny" in result.stderr


def test_unreachable_control_plane_fails_fast_naming_the_url(tmp_path):
    """The SDK retries a refused connection silently for minutes; the run fails within 30 s instead: exit 1 and one
    paragraph naming the URL (no traceback)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "FIREWORKS_API_KEY": "fw_test_key", "FIREWORKS_BASE_URL": url}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cookbook.train", "+recipe=grpo", "infra=qwen3-8b-h200",
                             f"log_path={tmp_path}/run"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert elapsed < 30, elapsed
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and url in message and "FIREWORKS_BASE_URL" in message
    assert "Traceback" not in result.stderr
    assert "fw_test_key" not in result.stderr + result.stdout


def test_dry_run_plans_fireworks_shapes_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FIREWORKS_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "cookbook.train", "-m", "+recipe=grpo", "recipe.kl_beta=0.01",
         "infra=qwen3-8b-h200,qwen3p5-9b", "dry_run=true", f"hydra.sweep.dir={tmp_path}/sweep"],
        capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("[dry-run] +recipe") == 2
    assert "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200-forward" in out
    assert "accounts/fireworks/trainingShapes/qwen3p5-9b-256k" in out
    assert "qwen3-8b-cookbook" in out  # the deployment that would be created


def test_multirun_job_directories_are_readable_and_flat(tmp_path):
    result = run_cli("-m", "+recipe=sft", "infra=local-tiny,local-small", "recipe.init_from=a/b",
                     "dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all("/" not in j for j in jobs)
    assert jobs[0].startswith("0_") and "infra=local-small" in jobs[1]
