"""Pure-tinker sampling sessions (what tinker's `asample` requests run on): a KV-cache loop with per-token logprobs.

The Fireworks flow samples from a separate deployment; this exists so the unmodified tinker 0.23 SDK works end to end
(`create_sampling_client`, `save_weights_and_get_sampling_client`, `compute_logprobs`). Tokens are picked by the
deployment's rule (`cookbook.local.token_sampling`), and each sequence's `logprobs` are its sampling logprobs: under
the distribution actually sampled from, so 0 for a greedy pick.
"""

from __future__ import annotations

import torch

from cookbook.local.token_sampling import pick_tokens, row_rng
from cookbook.local.trainer.losses import UserRequestError


class SamplingSession:
    def __init__(self, sampler_id: str, model, base_model: str, model_path: str | None, tokenizer):
        self.sampler_id, self.model, self.base_model, self.model_path = sampler_id, model.eval(), base_model, model_path
        self.tokenizer = tokenizer
        self.max_len = int(model.config.max_position_embeddings)
        self.vocab = int(model.config.vocab_size)
        eos = model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def info(self) -> dict:
        return {"sampler_id": self.sampler_id, "base_model": self.base_model, "model_path": self.model_path}

    def _stop_conditions(self, stop) -> tuple[set[int], list[str]]:
        if stop is None:
            return set(self.eos_ids), []
        items = [stop] if isinstance(stop, (str, int)) else list(stop)
        ids = {s for s in items if isinstance(s, int)} | set(self.eos_ids)
        return ids, [s for s in items if isinstance(s, str) and s]

    @torch.no_grad()
    def sample(self, body: dict) -> dict:
        prompt = []
        for chunk in (body.get("prompt") or {}).get("chunks", []):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise UserRequestError("only encoded_text prompt chunks are supported")
            prompt.extend(chunk.get("tokens", []))
        if not prompt:
            raise UserRequestError("empty prompt")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab for t in prompt):
            raise UserRequestError(f"prompt token outside the vocabulary [0, {self.vocab})")
        if len(prompt) >= self.max_len:
            raise UserRequestError(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.max_len}")
        params = body.get("sampling_params") or {}
        n = int(body.get("num_samples", 1))
        if n < 1:
            raise UserRequestError("num_samples must be >= 1")
        room = self.max_len - len(prompt)
        max_tokens = min(int(params.get("max_tokens") or room), room)
        temperature = float(params.get("temperature", 1.0))
        top_k, top_p = int(params.get("top_k", -1)), float(params.get("top_p", 1.0))
        if not top_p > 0:  # a token stays while the mass ranked above it is below top_p: with 0, none would
            raise UserRequestError(f"top_p must be > 0 (1 keeps every token), got {top_p}")
        stop_ids, stop_strs = self._stop_conditions(params.get("stop"))
        seed = params.get("seed")
        # Sample i draws from seed + i, as the deployment does for a request with n choices.
        rngs = [row_rng(None if seed is None else int(seed) + i) for i in range(n)]

        ids = torch.tensor([prompt] * n)
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.cache
        result: dict = {"type": "sample", "sequences": []}
        if body.get("prompt_logprobs"):
            lp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            result["prompt_logprobs"] = [None] + lp.tolist()
        logits = out.logits[:, -1].float()
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        active = torch.ones(n, dtype=torch.bool)
        for step in range(max_tokens):
            nxt, _, lp = pick_tokens(logits, [temperature] * n, [top_p] * n, [top_k] * n, rngs)
            for i in range(n):
                if not active[i]:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                logprobs[i].append(float(lp[i]))
                if t in stop_ids or (stop_strs and self._hits_stop_string(tokens[i], stop_strs)):
                    active[i] = False
                    reasons[i] = "stop"
            if not active.any() or step == max_tokens - 1:
                break
            out = self.model(input_ids=nxt[:, None], cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1].float()
        result["sequences"] = [{"tokens": t, "logprobs": lp, "stop_reason": r}
                               for t, lp, r in zip(tokens, logprobs, reasons)]
        return result

    def _hits_stop_string(self, toks: list[int], stops: list[str]) -> bool:
        if self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(toks[-32:])
        return any(tail.endswith(s) for s in stops)
