"""Named fault points for testing crash safety and fault handling. Unset, they do nothing.

`COOKBOOK_CRASH_AT=<point>[@<n>]` SIGKILLs the process at that point (at its n-th occurrence in the process, the
first by default); `COOKBOOK_CORRUPT_AT=<point>[@<n>]` makes `should_fail` answer True there once. Points:
- `after_state_save` (driver): the DCP save finished, its index line not yet written;
- `mid_dcp_save` (trainer): tensors written, metadata not, directory not yet renamed into place;
- `mid_forward_backward` (trainer): inside a forward_backward, after the forward;
- `mid_rollout` (deployment): a completion request has arrived and is about to be decoded;
- `sampler_snapshot` (trainer, COOKBOOK_CORRUPT_AT): a sampler snapshot was written; its bytes get damaged.
The variables pass from the driver to the platform's processes with the environment.
"""

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def _fires(variable: str, name: str) -> bool:
    spec = os.environ.get(variable, "")
    point, _, nth = spec.partition("@")
    if point != name:
        return False
    _seen[(variable, name)] += 1
    return _seen[(variable, name)] == int(nth or 1)


def crash_point(name: str) -> None:
    if _fires("COOKBOOK_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)


def should_fail(name: str) -> bool:
    """True once, at the configured occurrence of `name` under COOKBOOK_CORRUPT_AT."""
    return _fires("COOKBOOK_CORRUPT_AT", name)
