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
from typing import Any, Callable

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
    return discard_soon(client, checkpoint_id)()


def discard_soon(client: Any, checkpoint_id: str) -> Callable[[], bool]:
    """Send the deletion of `checkpoint_id` now and return the wait for its answer (True when done), so a caller
    on a hot path can collect it later. Clients without `submit_delete_checkpoint` delete when the wait is called."""
    state = _state(client)
    if state.off:
        return lambda: False
    submit = getattr(client, "submit_delete_checkpoint", None)
    if submit is None:
        return lambda: _settle(state, checkpoint_id, lambda: client.delete_checkpoint(checkpoint_id,
                                                                                     timeout=DELETE_TIMEOUT_S))
    try:
        pending = submit(checkpoint_id)
    except Exception as e:  # noqa: BLE001 - never fail a run over storage
        error = e  # `e` itself is unbound when the except block ends
        return lambda: _settle(state, checkpoint_id, lambda: _raise(error))
    return lambda: _settle(state, checkpoint_id, lambda: pending.result(DELETE_TIMEOUT_S))


def _settle(state: _ClientState, checkpoint_id: str, wait: Callable[[], Any]) -> bool:
    if state.off:
        return False
    try:
        wait()
        return True
    except Exception as e:  # noqa: BLE001 - never fail a run over storage
        state.off = f"{type(e).__name__}: {e}"
        print(f"[retention] could not delete {checkpoint_id} ({state.off[:300]}); old checkpoints and snapshots are "
              "kept for the rest of this run", file=sys.stderr)
        return False


def _raise(error: Exception) -> None:
    raise error
