"""Best-effort deletion of checkpoints a run no longer needs (old sampler snapshots, DCP checkpoints beyond
`weight_sync.dcp_keep_last`), through `ReconnectableClient.delete_checkpoint`.

Whether Fireworks' trainers serve tinker's checkpoint DELETE is not known (the embedded trainer does), so retention
must never cost a run: the first failure prints one warning and turns deletion off for the rest of that client's
run — a service without the call would otherwise fail (and the SDK retry 5xx answers for minutes) at every sync.
Storage then grows as it did before retention; locally `python -m cookbook.local storage --prune` reclaims it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

DELETE_TIMEOUT_S = 30.0


@dataclass
class _ClientState:
    off: str | None = None  # the error that turned deletion off


# One state per client, shared by its weight syncer and its checkpointer; it goes when the client goes.
_states: "weakref.WeakKeyDictionary[Any, _ClientState]" = weakref.WeakKeyDictionary()


def _state(client: Any) -> _ClientState:
    try:
        return _states.setdefault(client, _ClientState())
    except TypeError:  # a client object that cannot be weakly referenced: no retention, nothing deleted
        return _ClientState(off="unsupported client")


def discard(client: Any, checkpoint_id: str) -> bool:
    """Delete `checkpoint_id` (`weights/<name>` or `sampler_weights/<name>`) of `client`'s model; True when done."""
    state = _state(client)
    if state.off:
        return False
    try:
        client.delete_checkpoint(checkpoint_id, timeout=DELETE_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - never fail a run over storage
        state.off = f"{type(e).__name__}: {e}"
        print(f"[retention] could not delete {checkpoint_id} ({state.off[:300]}); old checkpoints and snapshots are "
              "kept for the rest of this run", file=sys.stderr)
        return False
