"""The deployment's decode engine and its continuous batcher.

Sequences join and leave the running batch at every decode step: a request that arrives while others decode is
prefilled at once and decodes with them from the next step, and a finished sequence frees its slot for the next
one (`Batcher`). The forward pass (`cookbook.local.decoder.SlotDecoder`) keeps every shape a sequence's numbers
depend on fixed by that sequence alone, so a request gets the same tokens and logprobs, bit for bit, whether it is
decoded alone or among others: GRPO runs that differ only in what was batched together sample identically.

Every sequence reports two logprobs per token (`cookbook.local.token_sampling` picks the tokens): `logprob`, the
model's log-softmax at temperature 1 (what the trainer's forward computes, so after a weight sync they agree to
~1e-6), and `sampling_logprob`, the log-probability under the distribution actually sampled from (after temperature
/ top-k / top-p), which is the behaviour policy an importance-sampling loss needs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cookbook.local.decoder import Prompt, SlotDecoder
from cookbook.local.token_sampling import pick_tokens, row_rng


@dataclass
class SeqRequest:
    """One sequence to decode (a request with `n` samples becomes `n` of these)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: frozenset[int] = frozenset()
    stop_strs: tuple[str, ...] = ()
    seed: int | None = None
    echo: bool = False
    # Outputs, filled by the engine.
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    stop_text_cut: int | None = None  # with a stop string: characters of the decoded text to keep
    # Filled by the batcher, reported as perf metrics: sequences in flight when it started decoding, seconds queued
    # and decoding.
    batch_size: int = 0
    queue_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class _Live:
    seq: SeqRequest
    slot: int
    budget: int
    rng: random.Random


class Engine:
    """Sequences in flight, one per KV-cache slot. `admit` gives a sequence a slot; `step` runs one forward in
    which the newly admitted are prefilled (and get their first token) and every other sequence gets its next token.
    Not thread-safe: one thread drives it (the batcher's)."""

    def __init__(self, model, tokenizer, device: str = "cpu", slots: int = 64, block: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.decoder = SlotDecoder(model, slots=-(-slots // block) * block, block=block)
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self.max_positions = self.decoder.context
        self._free = list(range(self.decoder.slots))  # a heap: the lowest free slot first keeps fewer chunks busy
        self._live: dict[int, _Live] = {}  # slot -> sequence with at least one token
        self._new: list[_Live] = []  # admitted, to prefill at the next step
        self._filler = random.Random(0)  # the draws of rows with no sequence

    @property
    def idle(self) -> bool:
        return not self._live and not self._new

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._live) + len(self._new)

    def admit(self, s: SeqRequest) -> bool:
        """Give `s` a slot (it is prefilled at the next step); True when there is nothing to compute for it."""
        budget = max(0, min(s.max_tokens, self.max_positions - len(s.prompt)))  # never decode past the context
        if budget == 0 and not s.echo:
            s.finish_reason = "length"
            return True
        slot = heapq.heappop(self._free)
        self.decoder.clear(slot)
        self._new.append(_Live(s, slot, budget, row_rng(s.seed)))
        return False

    def reset(self) -> None:
        """Drop every sequence in flight."""
        self._live.clear()
        self._new.clear()
        self._free = list(range(self.decoder.slots))

    def step(self) -> list[SeqRequest]:
        """One forward: prefill the newly admitted (and pick their first token), one more token for every other
        sequence in flight. The sequences that finished."""
        block = self.decoder.block
        chunks = sorted({slot // block for slot in self._live})
        rows = [self._live.get(slot) for c in chunks for slot in range(c * block, (c + 1) * block)]
        new, self._new = self._new, []
        # A prompt is prefilled once per step however many new sequences share it (a request's n samples): the
        # others get a copy of its cache, which is what prefilling it again would write, bit for bit.
        first: dict[tuple[tuple[int, ...], bool], int] = {}
        for i, live in enumerate(new):
            first.setdefault((tuple(live.seq.prompt), live.seq.echo), i)
        unique = sorted(set(first.values()))
        decoded, prompts = self.decoder.run(
            chunks, [r.seq.tokens[-1] if r else self.pad_id for r in rows],
            [len(r.seq.prompt) + len(r.seq.tokens) - 1 if r else -1 for r in rows],
            [Prompt(new[i].slot, new[i].seq.prompt, new[i].seq.echo) for i in unique])
        logits_of = dict(zip(unique, prompts))
        done = []
        for i in range(len(chunks)):  # tokens are picked block by block: the same shapes alone or together
            at = slice(i * block, (i + 1) * block)
            done += self._pick(rows[at], decoded[at])
        for i, live in enumerate(new):
            s = live.seq
            source = first[(tuple(s.prompt), s.echo)]
            logits = logits_of[source]
            if source != i:
                self.decoder.copy_prompt(new[source].slot, live.slot, len(s.prompt))
            if s.echo:
                logp = torch.log_softmax(logits[:-1], -1)
                targets = torch.tensor(s.prompt[1:], dtype=torch.long, device=logp.device)
                s.prompt_logprobs = logp.gather(1, targets[:, None])[:, 0].tolist() if len(targets) else []
            self._live[live.slot] = live
            if live.budget == 0:
                s.finish_reason = "length"
                done.append(live)
            else:
                done += self._pick([live], logits[-1:])
        for live in done:
            del self._live[live.slot]
            heapq.heappush(self._free, live.slot)
        return [live.seq for live in done]

    def generate(self, seqs: list[SeqRequest]) -> None:
        """Decode `seqs` to the end on this thread (as many at once as there are slots)."""
        waiting = collections.deque(seqs)
        while waiting or not self.idle:
            while waiting and self._free:
                self.admit(waiting.popleft())
            if not self.idle:
                self.step()

    def _pick(self, rows: list[_Live | None], logits: torch.Tensor) -> list[_Live]:
        """Pick a token for every row of `logits` (`None` rows have no sequence); the rows now finished."""
        picked = pick_tokens(logits, [r.seq.temperature if r else 1.0 for r in rows],
                             [r.seq.top_p if r else 1.0 for r in rows], [r.seq.top_k if r else 0 for r in rows],
                             [r.rng if r else self._filler for r in rows])
        tokens, lps, slps = picked.tokens.tolist(), picked.logprobs.tolist(), picked.sampling_logprobs.tolist()
        done = []
        for i, live in enumerate(rows):
            if live is None:
                continue
            s, t = live.seq, tokens[i]
            s.tokens.append(t)
            s.logprobs.append(lps[i])
            s.sampling_logprobs.append(slps[i])
            if t in s.stop_ids or s.stop_strs and self._hit_stop_str(s):
                s.finish_reason = "stop"
            elif len(s.tokens) >= live.budget:
                s.finish_reason = "length"
            else:
                continue
            done.append(live)
        return done

    def _hit_stop_str(self, s: SeqRequest) -> bool:
        """Does the decoded completion now contain a stop string? Only a match ending in the newest token is new, so
        decode just a tail long enough to hold the longest stop string (a token decodes to >= 1 character, or to a
        piece of a multi-byte one: 4 tokens per character covers that) and decode everything only on a hit."""
        longest = max(len(stop) for stop in s.stop_strs)
        tail = self.tokenizer.decode(s.tokens[-(4 * longest + 4):], skip_special_tokens=False)
        if not any(stop in tail for stop in s.stop_strs):
            return False
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=False)
        hits = [text.find(stop) for stop in s.stop_strs if stop in text]
        if hits:
            s.stop_text_cut = min(hits)
            return True
        return False


GATHER_GAP_S, GATHER_MAX_S = 0.002, 0.01


@dataclass(eq=False)
class _Request:
    seqs: list[SeqRequest]
    settle: Callable[[Exception | None], None]
    submitted: float
    unfinished: int = 0  # sequences not finished yet
    pending: collections.deque | None = None  # sequences not admitted yet; None until the first is


class Batcher:
    """Continuous batching on one background thread: requests are admitted as slots free up and decode together.

    Work is taken in arrival order. A weight swap (`swap`) is work too: the requests before it finish on the old
    weights, the ones after it start on the new, and no sequence ever sees both.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    async def submit(self, seqs: list[SeqRequest]) -> list[SeqRequest]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        def settle(error: Exception | None) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, error)
            except RuntimeError:  # the caller's loop is gone (it stopped waiting): nobody to tell
                pass

        self._q.put(_Request(seqs, settle, time.perf_counter()))
        await fut
        return seqs

    def swap(self, change: Callable[[], Any]) -> None:
        """Run `change` (e.g. load new weights into the model) on the decode thread between requests; blocks until
        it ran and raises what it raised."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((change, done))
        done.result()

    def _run(self) -> None:
        engine, waiting = self.engine, collections.deque()
        started: dict[int, tuple[_Request, float]] = {}  # id(seq) -> its request, when it started decoding
        while True:
            if engine.idle and not waiting:
                waiting.append(self._q.get())
                if isinstance(waiting[0], _Request):  # a weight swap goes at once
                    self._gather(waiting)
            while True:  # everything that has arrived, in order
                try:
                    waiting.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                admitted = self._admit(waiting, started)
                finished = engine.step() if not engine.idle else []
            except Exception as e:  # report to every waiter rather than kill the thread
                self._fail_all(waiting, started, e)
                continue
            for s in admitted + finished:
                request, t0 = started.pop(id(s))
                s.decode_s = time.perf_counter() - t0
                request.unfinished -= 1
                if request.unfinished == 0:
                    request.settle(None)

    def _gather(self, waiting: collections.deque) -> None:
        """Concurrent requests reach this process a fraction of a millisecond apart (client tasks, the gateway hop).
        Starting an idle engine on the first alone would prefill the rest in later steps and stagger them by a step
        each, so keep collecting while requests keep coming within GATHER_GAP_S of each other (at most
        GATHER_MAX_S). A running engine never waits: new requests join at its next step."""
        deadline = time.monotonic() + GATHER_MAX_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                waiting.append(self._q.get(timeout=min(GATHER_GAP_S, left)))
            except queue.Empty:
                return

    def _admit(self, waiting: collections.deque, started: dict) -> list[SeqRequest]:
        """Start what the free slots allow, in order; a weight swap waits until nothing is in flight. The sequences
        that finished at admission."""
        engine, done = self.engine, []
        while waiting:
            head = waiting[0]
            if isinstance(head, tuple):  # a weight swap
                if not engine.idle:
                    break
                change, fut = waiting.popleft()
                try:
                    fut.set_result(change())
                except Exception as e:
                    fut.set_exception(e)
                continue
            if not engine.free_slots:
                break
            if head.pending is None:
                head.unfinished, head.pending = len(head.seqs), collections.deque(head.seqs)
            s = head.pending.popleft()
            if not head.pending:
                waiting.popleft()
            now = time.perf_counter()
            s.queue_s, s.batch_size = now - head.submitted, engine.in_flight + 1
            started[id(s)] = (head, now)
            if engine.admit(s):
                done.append(s)
        return done

    def _fail_all(self, waiting: collections.deque, started: dict, error: Exception) -> None:
        """A decode failed: fail every request in flight (the engine's slots are reset) and let the rest go on."""
        requests = {id(r): r for r, _ in started.values()}
        started.clear()
        for request in requests.values():
            request.settle(error)
            if request in waiting:
                waiting.remove(request)
        self.engine.reset()


def _settle(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
