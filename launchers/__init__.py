"""One module per backend. Each exposes `launch(cfg, *, needs_reference, needs_deployment, log=print,
while_starting=None)`, a context manager yielding the run's `Session` (`while_starting(tokenizer)`: the driver's own
start-up work, run while the trainers and the deployment start), and `check_credentials(cfg)`, run before anything
is launched."""

import importlib


def get_launcher(name: str):
    """The launcher module for `infra.launcher` (`local` or `fireworks`)."""
    return importlib.import_module(f"launchers.{name}")
