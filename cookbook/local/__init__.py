"""The embedded platform: a local stand-in for the Fireworks control plane, trainer service and deployment, driven
by the same official SDK. Only `launchers/` and `scripts/` import it; the rest of the package never does."""
