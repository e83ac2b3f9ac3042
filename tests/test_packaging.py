"""The wheel works on its own: configs, bundled data and launchers ship inside it, found without a checkout.

The wheel is built from a copy of the sources (so the build leaves nothing in the checkout), installed into a
temporary target directory, and the CLI is run from a directory outside the checkout with only that target on
PYTHONPATH, so the `cookbook` imported is the installed one and its configs come from `pkg://cookbook.conf`.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "cookbook", "conf", "launchers")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    wheels, target = tmp / "wheels", tmp / "target"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # No build isolation: the build backend (setuptools) is taken from this environment, so no index is needed.
    build = subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                           capture_output=True, text=True, cwd=tmp, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("cookbook-*.whl")
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, cwd=tmp, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    outside = tmp / "elsewhere"
    outside.mkdir()
    return wheel, target, outside


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_contains_configs_data_and_launchers(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("cookbook/conf/config.yaml", "cookbook/conf/infra/local-tiny.yaml",
                     "cookbook/conf/recipe/grpo.yaml", "cookbook/conf/hydra/launcher/local_parallel.yaml",
                     "cookbook/conf/sweep/local_lr.yaml", "cookbook/datasets/bundled/sft_arith_train.jsonl",
                     "cookbook/datasets/bundled/pref_eval.jsonl", "launchers/__init__.py", "launchers/local.py",
                     "launchers/fireworks.py", "cookbook/local/trainer/__init__.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "conf/")) for n in names)  # configs only under cookbook/conf


def test_installed_package_is_the_one_imported_and_finds_its_configs(installed):
    _, target, outside = installed
    probe = ("import cookbook, launchers, launchers.local, cookbook.config.compose as c\n"
             "from importlib import resources\n"
             "print(cookbook.__file__); print(launchers.__file__); print(c.CONFIG_PATH)\n"
             "data = resources.files('cookbook.datasets').joinpath('bundled')\n"
             "print(sorted(p.name for p in data.iterdir() if p.name.endswith('.jsonl')))\n"
             "from cookbook.datasets.rows import resolve_dataset; print(resolve_dataset('bundled:sft_arith_train'))\n")
    result = run_installed(target, outside, "-c", probe)
    assert result.returncode == 0, result.stderr
    cookbook_file, launchers_file, config_path, data, bundled = result.stdout.splitlines()[:5]
    assert Path(cookbook_file).is_relative_to(target) and Path(launchers_file).is_relative_to(target)
    assert config_path == "pkg://cookbook.conf"
    for name in ("sft_arith_train.jsonl", "sft_arith_eval.jsonl", "grpo_arith_train.jsonl", "pref_train.jsonl"):
        assert name in data
    assert Path(bundled).is_relative_to(target) and Path(bundled).exists()


def test_installed_cli_composes_and_lists_options_from_outside_the_checkout(installed):
    _, target, outside = installed
    job = run_installed(target, outside, "-m", "cookbook.train", "+recipe=sft", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "training_shape_id: accounts/local/trainingShapes/local-tiny" in job.stdout
    assert "dataset: bundled:sft_arith_train" in job.stdout
    help_ = run_installed(target, outside, "-m", "cookbook.train", "--help")
    assert help_.returncode == 0, help_.stderr
    for words in ("infra: local-small, local-tiny, qwen3-8b-h200, qwen3p5-9b", "recipe: dpo, grpo, orpo, sft",
                  "wandb: disabled, offline, online"):
        assert words in help_.stdout
    # A user mistake is still the friendly exit-2 paragraph, and a dry run plans from the packaged configs.
    missing = run_installed(target, outside, "-m", "cookbook.train")
    assert missing.returncode == 2 and "dpo, grpo, orpo, sft" in missing.stderr
    dry = run_installed(target, outside, "-m", "cookbook.train", "+recipe=grpo", "infra=qwen3-8b-h200",
                        "dry_run=true", f"log_path={outside / 'run'}")
    assert dry.returncode == 0, dry.stderr
    assert "qwen3-8b-128k-h200" in dry.stdout
    assert not (outside / "sweeps").exists()
