"""Named crash points for testing crash safety: `COOKBOOK_CRASH_AT=<point>` SIGKILLs the process there.

Points: `after_state_save` (driver: the DCP save finished, its index line not yet written) and `mid_dcp_save`
(trainer: tensors written, metadata not, directory not yet renamed into place). Unset, this does nothing.
"""

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("COOKBOOK_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
