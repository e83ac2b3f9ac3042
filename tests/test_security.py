"""API keys never reach a file a run writes, its console output, or a command line visible in `ps`.

Fake secrets go into the environment of real CLI runs: a short local SFT run with W&B offline (so the wandb files
are written too) and a dry run on a Fireworks shape (the path that reads FIREWORKS_API_KEY). Then every file under
the run directory (`.hydra/`, `wandb/`, platform logs, checkpoints index, attempts), every file of the platform's
storage root (trainer stores, snapshots, registries) and the captured stdout/stderr are searched for the secret
values. During the local run, the command lines of the platform's processes
(control plane, trainer, deployment) are read from /proc while they are alive: the per-run platform key must
travel through the environment, never argv.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

SECRETS = {
    "FIREWORKS_API_KEY": "fw-SECRET-1234567890abcdef",
    "WANDB_API_KEY": "wandbSECRET0123456789abcdef0123456789abcd",  # 40 characters, the shape of a real key
    "TINKER_API_KEY": "tml-SECRETtinker0123456789abcdef",
    "HF_TOKEN": "hf_SECRETtoken0123456789",
}
PLATFORM_KEY = re.compile(r"fw_local_[0-9a-f]{32}")


def _env(**extra: str) -> dict[str, str]:
    # W&B must really run (offline) in this test: conftest disables it for every other test.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **SECRETS, **extra}


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _assert_no_secret(where: str, data: bytes, also: tuple[str, ...] = ()) -> None:
    for value in (*SECRETS.values(), *also):
        assert value.encode() not in data, f"{where} contains the secret {value[:8]}..."


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _platform_key(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"COOKBOOK_PLATFORM_KEY="):
            return entry.split(b"=", 1)[1].decode()
    return None


def test_local_run_with_wandb_offline_leaks_no_secret(tmp_path):
    run_dir, storage = tmp_path / "run", tmp_path / "storage"  # a storage root of its own: all of it is this run's
    cmd = [sys.executable, "-m", "cookbook.train", "+recipe=sft", "wandb=offline", "max_steps=3",
           "recipe.batch_size=8", "recipe.max_eval_rows=8", f"log_path={run_dir}"]  # `.hydra/` goes to log_path
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(COOKBOOK_PLATFORM_ROOT=str(storage)), stdout=out, stderr=err)
        # While the run is alive, read the command lines of its platform processes (found by the run directory
        # in their argv) and the per-run key from their environment.
        seen: dict[int, str] = {}
        keys: set[str] = set()
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in seen:
                    line = _cmdline(int(entry))
                    if str(run_dir) in line:
                        seen[int(entry)] = line
                        key = _platform_key(int(entry))
                        if key:
                            keys.add(key)
            time.sleep(0.05)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    stdout, stderr = out_path.read_bytes(), err_path.read_bytes()
    assert rc == 0, stderr.decode(errors="replace")[-3000:]

    # The platform's processes were observed (control plane, trainer, deployment) and got the key from the env.
    roles = " ".join(seen.values())
    for module in ("control_plane", "trainer", "deployment"):
        assert module in roles, f"no live {module} process seen; command lines: {list(seen.values())}"
    assert len(keys) == 1, f"expected one per-run platform key in the children's environment, got {len(keys)}"
    (key,) = keys
    assert PLATFORM_KEY.fullmatch(key)
    for pid, line in seen.items():
        assert key not in line and not PLATFORM_KEY.search(line), f"platform key in argv of pid {pid}: {line}"
        for value in SECRETS.values():
            assert value not in line

    # Every file the run wrote, and the console.
    files = _files_under(run_dir)
    names = {p.relative_to(run_dir).parts[0] for p in files}
    assert {".hydra", "wandb", "platform", "status.json", "metrics.jsonl", "checkpoints.jsonl"} <= names, names
    assert any(p.suffix == ".wandb" for p in files), "W&B offline wrote no run file"
    for path in files:
        _assert_no_secret(str(path.relative_to(run_dir)), path.read_bytes(), also=(key,))
    stored = _files_under(storage)
    assert any(p.name == "meta.json" for p in stored) and any(p.name == "snapshot.json" for p in stored), stored
    for path in stored:
        _assert_no_secret(f"storage/{path.relative_to(storage)}", path.read_bytes(), also=(key,))
    _assert_no_secret("stdout", stdout, also=(key,))
    _assert_no_secret("stderr", stderr, also=(key,))


def test_fireworks_dry_run_leaks_no_secret(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cookbook.train", "+recipe=grpo", "infra=qwen3-8b-h200", "recipe.kl_beta=0.01",
         "dry_run=true", f"log_path={run_dir}"],
        cwd=REPO, env=_env(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"[dry-run]" in result.stdout and b"qwen3-8b-128k-h200" in result.stdout
    _assert_no_secret("stdout", result.stdout)
    _assert_no_secret("stderr", result.stderr)
    for path in _files_under(tmp_path):
        _assert_no_secret(str(path.relative_to(tmp_path)), path.read_bytes())
