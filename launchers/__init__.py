"""One module per backend; each exposes `launch(cfg, *, needs_reference, needs_deployment, log=print)`."""

import importlib


def get_launcher(name: str):
    """The launcher module for `infra.launcher` (`local` or `fireworks`)."""
    return importlib.import_module(f"launchers.{name}")
