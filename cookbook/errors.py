"""The one exception type for user mistakes (config, data, credentials).

The CLI turns it into exit code 2 and one readable paragraph without a traceback; anything else is an
internal error and keeps its traceback (exit 1).
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the field or line and the fix."""


class DataError(UserError):
    """A dataset problem; the message names the file (and line where there is one)."""


class InfraError(Exception):
    """The platform (control plane, trainer, deployment) failed in a way the message fully explains — e.g. an
    unreachable control plane. The CLI prints the message without a traceback and exits 1."""
