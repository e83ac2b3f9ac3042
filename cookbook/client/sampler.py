"""Rollouts from the deployment, through the official SDK's `DeploymentSampler`.

The SDK sampler speaks the completions contract the real service expects — token ids in, `raw_output` token ids
out, stop sequences as strings (integer stop ids are decoded with the tokenizer), per-token raw and sampling
logprobs, retries of 404/425 right after a hot load and of transient errors. It is async and sends one streaming
request per completion; `CompletionSampler` gives the recipes a blocking `sample_many` on top, running every request of a
batch concurrently on one private event loop so the deployment can batch them.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from fireworks.training.sdk import DeploymentSampler, SampledCompletion


@dataclass
class Completion:
    tokens: list[int]
    # The model's log-softmax at temperature 1 per token: what the trainer's forward computes for the same tokens.
    logprobs: list[float]
    finish_reason: str  # "length" or "stop"
    # Log-probability under the distribution actually sampled from (after temperature / top-p / top-k): the
    # behaviour policy for importance-sampling corrections. Equal to `logprobs` at temperature 1, top-p 1.
    sampling_logprobs: list[float] = field(default_factory=list)
    text: str = ""


class CompletionSampler:
    def __init__(self, deployment_sampler: "DeploymentSampler", timeout_s: float = 600, max_connections: int = 256):
        self.deployment_sampler = deployment_sampler
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sampler-loop", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._use_aiohttp(max_connections), self._loop).result()

    async def _use_aiohttp(self, max_connections: int) -> None:
        """Give the SDK sampler an aiohttp-backed httpx client (the vendor's own `DefaultAioHttpClient` transport).
        httpx's default async pool scans every idle connection for each queued request; a GRPO step's 128 concurrent
        completions on reused keep-alive connections spent ~2.5 s of a 2.9 s rollout there (profiled), with aiohttp
        0.1 s. The SDK adopts a client set on it on the loop that first uses it, which is this one."""
        import httpx
        from httpx_aiohttp import HttpxAiohttpClient

        self.deployment_sampler._async_client = HttpxAiohttpClient(
            timeout=httpx.Timeout(connect=30.0, read=self.timeout_s, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    def sample(self, prompt_tokens: Sequence[int], n: int = 1, max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
               ) -> list[Completion]:
        """`n` completions of one prompt (seeds `seed`, `seed+1`, ...). `stop_token_ids=None` stops at the model's EOS;
        a stop token is kept in `tokens` (the policy must learn to emit it)."""
        return self.sample_many([prompt_tokens], n, max_tokens, temperature, top_p, stop_token_ids, seed)[0]

    def sample_many(self, prompts: Sequence[Sequence[int]], n: int = 1, max_tokens: int = 16,
                    temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                    seed: int | None = None) -> list[list[Completion]]:
        """`n` completions for every prompt, all requests in flight together; results in prompt order. With a seed,
        completion j of prompt i uses seed `seed + i*n + j`, so every completion has its own reproducible stream."""
        stop = list(stop_token_ids) if stop_token_ids else None

        async def one(prompt: Sequence[int], request_seed: int | None) -> Completion:
            extra = {} if request_seed is None else {"seed": request_seed}
            completions = await self.deployment_sampler.sample_with_prompt_tokens(
                list(prompt), n=1, max_tokens=max_tokens, temperature=temperature, stop=stop, top_p=top_p, top_k=0,
                logprobs=True, http_timeout=self.timeout_s, **extra)
            if len(completions) != 1:
                raise RuntimeError(f"the deployment returned {len(completions)} completions for one request")
            return _completion(completions[0])

        async def batch() -> list[Completion]:
            return await asyncio.gather(*(one(p, None if seed is None else seed + i * n + j)
                                          for i, p in enumerate(prompts) for j in range(n)))

        flat = asyncio.run_coroutine_threadsafe(batch(), self._loop).result()
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        async def close_http() -> None:
            client = self.deployment_sampler._async_client  # owned by this loop; close it here, not from another
            if client is not None and not client.is_closed:
                await client.aclose()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(close_http(), self._loop).result(timeout=5)
            except Exception:  # teardown is best effort
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self.deployment_sampler.close()


def _completion(c: "SampledCompletion") -> Completion:
    return Completion(tokens=list(c.full_tokens[c.prompt_len:]), logprobs=list(c.inference_logprobs or []),
                      finish_reason=c.finish_reason, sampling_logprobs=[float(x) for x in c.sampling_logprobs or []],
                      text=c.text)
