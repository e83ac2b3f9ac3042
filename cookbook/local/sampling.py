"""The deployment's decode engine: a hand-written KV-cache loop over a left-padded batch, and a batcher thread.

Why hand-written: for the small embedded models it is faster than transformers' `generate`, and it yields the
per-token logprobs directly. Every sequence reports two logprobs per token (`cookbook.local.token_sampling` picks the
tokens): `logprob`, the model's log-softmax at temperature 1 (what the trainer's forward computes, so after a weight
sync they agree to ~1e-6), and `sampling_logprob`, the log-probability under the distribution actually sampled from
(after temperature / top-k / top-p), which is the behaviour policy an importance-sampling loss needs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

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
    # Filled by the batcher, reported as perf metrics: sequences decoded together, seconds queued and decoding.
    batch_size: int = 0
    queue_s: float = 0.0
    decode_s: float = 0.0


class Engine:
    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.lock = threading.Lock()  # held while decoding and while swapping weights

    @torch.inference_mode()
    def generate(self, seqs: list[SeqRequest]) -> None:
        """Decode all `seqs` together; results are written into each SeqRequest."""
        dev = self.device
        B = len(seqs)
        lens = [len(s.prompt) for s in seqs]
        L = max(lens)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - lens[i]:] = torch.tensor(s.prompt, dtype=torch.long)
            mask[i, L - lens[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(s.echo for s in seqs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=0 if echo else 1)
        cache = out.cache
        if echo:
            self._prompt_logprobs(seqs, out.logits, lens, L)
        logits = out.logits[:, -1].float()
        # Never decode past the model's positions: those sequences finish with "length".
        budgets = [max(0, min(s.max_tokens, self.max_positions - lens[i])) for i, s in enumerate(seqs)]
        rngs = [row_rng(s.seed) for s in seqs]
        temps = torch.tensor([s.temperature for s in seqs], device=dev)
        top_ps = torch.tensor([s.top_p for s in seqs], device=dev)
        top_ks = [s.top_k for s in seqs]
        live = [b > 0 for b in budgets]
        cur = pos[:, -1:].clone()
        texts = [""] * B
        for _ in range(max(budgets, default=0)):
            tok, lp, slp = pick_tokens(logits, temps, top_ps, top_ks, rngs)
            tok_l, lp_l, slp_l = tok.tolist(), lp.tolist(), slp.tolist()
            for i, s in enumerate(seqs):
                if not live[i]:
                    continue
                t = tok_l[i]
                s.tokens.append(t)
                s.logprobs.append(lp_l[i])
                s.sampling_logprobs.append(slp_l[i])
                if t in s.stop_ids:
                    s.finish_reason, live[i] = "stop", False
                elif s.stop_strs and self._hit_stop_str(s, texts, i):
                    s.finish_reason, live[i] = "stop", False
                elif len(s.tokens) >= budgets[i]:
                    s.finish_reason, live[i] = "length", False
            if not any(live):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            cur = cur + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=cur, cache=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[:, -1].float()

    def _hit_stop_str(self, s: SeqRequest, texts: list[str], i: int) -> bool:
        """Does the decoded completion now contain a stop string? Only a match ending in the newest token is new, so
        decode just a tail long enough to hold the longest stop string (a token decodes to >= 1 character, or to a
        piece of a multi-byte one: 4 tokens per character covers that) and decode everything only on a hit."""
        longest = max(len(stop) for stop in s.stop_strs)
        tail = self.tokenizer.decode(s.tokens[-(4 * longest + 4):], skip_special_tokens=False)
        if not any(stop in tail for stop in s.stop_strs):
            return False
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=False)
        texts[i] = text
        hits = [text.find(stop) for stop in s.stop_strs if stop in text]
        if hits:
            s.stop_text_cut = min(hits)
            return True
        return False

    @staticmethod
    def _prompt_logprobs(seqs, logits, lens, L) -> None:
        logp = torch.log_softmax(logits.float(), -1)
        for i, s in enumerate(seqs):
            if not s.echo:
                continue
            start = L - lens[i]
            targets = torch.tensor(s.prompt[1:], dtype=torch.long, device=logp.device)
            rows = logp[i, start:L - 1]
            s.prompt_logprobs = rows.gather(1, targets[:, None])[:, 0].tolist() if len(targets) else []


class Batcher:
    """Collects concurrent requests into padded batches decoded on one background thread.

    Requests that arrive while a batch decodes wait for the next one; each batch takes whole requests up to
    `max_batch` sequences, so 64 concurrent single-sample requests become one batch of 64.
    """

    def __init__(self, engine: Engine, max_batch: int = 64, gap_s: float = 0.01, max_wait_s: float = 0.05):
        self.engine = engine
        self.max_batch = max_batch
        # Concurrent requests reach this process milliseconds apart (client threads, the control-plane hop). Without
        # a gather window the first one would decode alone while the rest wait for all of it; so keep collecting
        # while requests keep arriving within `gap_s` of each other, for at most `max_wait_s`.
        self.gap_s = gap_s
        self.max_wait_s = max_wait_s
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    async def submit(self, seqs: list[SeqRequest]) -> list[SeqRequest]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((seqs, loop, fut, time.perf_counter()))
        await fut
        return seqs

    def _run(self) -> None:
        carry = None
        while True:
            batch = [carry] if carry else [self._q.get()]
            carry = None
            size = len(batch[0][0])
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:
                    item = self._q.get(timeout=max(0.0, min(self.gap_s, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if size + len(item[0]) > self.max_batch:
                    carry = item
                    break
                batch.append(item)
                size += len(item[0])
            seqs = [s for item in batch for s in item[0]]
            error = None
            try:
                with self.engine.lock:
                    start = time.perf_counter()
                    self.engine.generate(seqs)
                    took = time.perf_counter() - start
                for item in batch:
                    for s in item[0]:
                        s.batch_size, s.queue_s, s.decode_s = len(seqs), start - item[3], took
            except Exception as e:  # report to every waiter rather than kill the thread
                error = e
            for _, loop, fut, _ in batch:
                loop.call_soon_threadsafe(_settle, fut, error)


def _settle(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
