"""One module per backend. Each exposes `launch(cfg, *, needs_reference, needs_deployment, log=print)`, a context
manager yielding the run's `Session`, and `check_credentials(cfg)`, run before anything is launched."""

import importlib


def get_launcher(name: str):
    """The launcher module for `infra.launcher` (`local` or `fireworks`)."""
    return importlib.import_module(f"launchers.{name}")
