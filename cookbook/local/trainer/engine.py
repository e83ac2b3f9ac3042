"""One trainable (or frozen) model: forward, forward_backward, AdamW steps, gradient-accumulation normalization.

All methods run on the service's single compute thread, strictly in the per-model seq_id order the app enforces,
so no locking is needed here.

`forward_backward_custom` in tinker 0.23 sends `/forward` and then `/forward_backward` (weights = −dL/dlogprobs)
for the same datums. To make that cost one forward instead of two, `/forward` on a trainable model keeps its
autograd graph (never calling backward, so parameters' `.grad` stays untouched) keyed by the exact token and
target lists; if the very next operation on that model is a `/forward_backward` with identical inputs, it
backpropagates through the cached graph. Any other operation drops the cache.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from cookbook import models
from cookbook.local.trainer.losses import (
    Datum,
    UserRequestError,
    check_loss,
    count_loss_tokens,
    datum_loss,
    parse_datums,
)
from cookbook.runs.faults import crash_point

log = logging.getLogger("cookbook.trainer")

# Token budget (padded tokens) per compute micro-batch; bounds activation memory for large requests.
MICRO_BATCH_TOKENS = 16384
# Larger /forward requests do not keep their graph for a following forward_backward (memory over speed).
FORWARD_CACHE_MAX_TOKENS = 65536
NORMALIZATIONS = ("num_loss_tokens", "num_sequences", "none")


def _tensor_data(t: torch.Tensor) -> dict:
    t = t.detach()
    return {"data": t.reshape(-1).tolist(), "dtype": "float32" if t.is_floating_point() else "int64",
            "shape": list(t.shape)}


class TrainModel:
    def __init__(self, model_id: str, base_model: str, *, seed: int, lora_rank: int = 0, lora_alpha: float = 32.0,
                 lora_seed: int | None = None, train_attn: bool = True, train_mlp: bool = True,
                 train_unembed: bool = True, base_only: bool = False, max_context_length: int | None = None):
        self.model_id, self.base_model, self.seed = model_id, base_model, seed
        self.lora_rank, self.lora_alpha, self.base_only = int(lora_rank), float(lora_alpha), base_only
        self.train_flags = {"train_attn": train_attn, "train_mlp": train_mlp, "train_unembed": train_unembed}
        base = models.load_model(base_model, seed=seed)
        self.vocab = models.vocab_size(base)
        self.max_len = min(max_context_length or models.max_len(base), models.max_len(base))
        if self.lora_rank > 0 and not base_only:
            self.model = self._wrap_lora(base, lora_seed if lora_seed is not None else seed)
        else:
            self.model = base
            base.requires_grad_(not base_only)
        self.model.eval()  # no dropout: the same inputs always give the same logprobs
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.AdamW | None = None  # created at the first optim_step
        self.step = 0
        self.loss_tokens = 0  # non-zero-weight tokens since the last optim_step
        self.loss_sequences = 0  # sequences with >= 1 such token
        self._fwd_cache: tuple[tuple, list[torch.Tensor]] | None = None
        self.last_snapshot: tuple[str, dict[str, torch.Tensor]] | None = None  # (identity, state) of the last export

    def _wrap_lora(self, base, seed: int):
        from peft import LoraConfig, get_peft_model

        targets = []
        if self.train_flags["train_attn"]:
            targets += ["q_proj", "k_proj", "v_proj", "o_proj"]
        if self.train_flags["train_mlp"]:
            targets += ["gate_proj", "up_proj", "down_proj"]
        # train_unembed is ignored: the embedded models tie lm_head to the embedding, and a merged lm_head adapter
        # would rewrite the input embedding too.
        if not targets:
            raise UserRequestError("LoRA needs train_attn or train_mlp")
        cfg = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=targets, lora_dropout=0.0,
                         bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(base, cfg)

    # ------------------------------------------------------------------ info
    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0 and not self.base_only

    def info(self) -> dict:
        return {"model_id": self.model_id, "type": "get_info", "is_lora": self.is_lora, "lora_rank": self.lora_rank,
                "model_name": self.base_model,
                "model_data": {"arch": "qwen3", "model_name": self.base_model, "tokenizer_id": self.base_model}}

    def merged_model(self):
        """A plain HF model with the current weights (LoRA merged) for sampler export and sampling."""
        import copy

        if self.is_lora:
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model

    # ------------------------------------------------------------------ compute
    def _logprobs(self, data: list[Datum], grad: bool) -> list[torch.Tensor]:
        """Per-datum target logprobs. Right padding needs no attention mask: a causal model never attends forward."""
        out: list[torch.Tensor] = []
        for chunk in self._micro_batches(data):
            width = max(len(d.tokens) for d in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            tgt = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, d in enumerate(chunk):
                ids[i, : len(d.tokens)] = torch.tensor(d.tokens)
                tgt[i, : len(d.tokens)] = d.inputs["target_tokens"]
            with torch.set_grad_enabled(grad):
                logits = self.model(input_ids=ids, use_cache=False).logits.float()
                lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                      reduction="none").reshape(tgt.shape)
            out.extend(lp[i, : len(d.tokens)] for i, d in enumerate(chunk))
        return out

    @staticmethod
    def _micro_batches(data: list[Datum]):
        chunk: list[Datum] = []
        width = 0
        for d in data:
            w = max(width, len(d.tokens))
            if chunk and w * (len(chunk) + 1) > MICRO_BATCH_TOKENS:
                yield chunk
                chunk, w = [], len(d.tokens)
            chunk.append(d)
            width = w
        if chunk:
            yield chunk

    @staticmethod
    def _cache_key(data: list[Datum]) -> tuple:
        return tuple((tuple(d.tokens), tuple(d.inputs["target_tokens"].tolist())) for d in data)

    def _parse(self, body: dict) -> tuple[list[Datum], str, dict | None]:
        data = parse_datums(body.get("data"), self.vocab, self.max_len)
        loss_fn = body.get("loss_fn")
        check_loss(loss_fn, data)
        return data, loss_fn, body.get("loss_fn_config")

    def _result(self, data, loss_fn, config, lps) -> dict:
        total = 0.0
        outputs = []
        for d, lp in zip(data, lps):
            lp = lp.detach()
            total += float(datum_loss(loss_fn, d, lp, config))
            outputs.append({"logprobs": _tensor_data(lp)})
        return {"loss_fn_output_type": "TorchLossReturn", "loss_fn_outputs": outputs, "metrics": {"loss:sum": total}}

    def forward(self, body: dict) -> dict:
        self._fwd_cache = None
        data, loss_fn, config = self._parse(body)
        keep_graph = bool(self.params) and sum(len(d.tokens) for d in data) <= FORWARD_CACHE_MAX_TOKENS
        lps = self._logprobs(data, grad=keep_graph)
        if keep_graph:
            self._fwd_cache = (self._cache_key(data), lps)
        return self._result(data, loss_fn, config, lps)

    def forward_backward(self, body: dict) -> dict:
        cache, self._fwd_cache = self._fwd_cache, None
        self._require_trainable("forward_backward")
        data, loss_fn, config = self._parse(body)
        if cache is not None and cache[0] == self._cache_key(data):
            lps = cache[1]
            crash_point("mid_forward_backward")
            torch.stack([datum_loss(loss_fn, d, lp, config) for d, lp in zip(data, lps)]).sum().backward()
        else:
            del cache
            lps = []
            for chunk in self._micro_batches(data):
                chunk_lps = self._logprobs(chunk, grad=True)
                crash_point("mid_forward_backward")
                torch.stack([datum_loss(loss_fn, d, lp, config) for d, lp in zip(chunk, chunk_lps)]).sum().backward()
                lps.extend(lp.detach() for lp in chunk_lps)
        for d in data:
            n = count_loss_tokens(loss_fn, d)
            self.loss_tokens += n
            self.loss_sequences += int(n > 0)
        return self._result(data, loss_fn, config, lps)

    def _require_trainable(self, op: str) -> None:
        if not self.params:
            raise UserRequestError(f"model {self.model_id} is a frozen base_only reference; {op} is not allowed")

    def optim_step(self, body: dict) -> dict:
        self._fwd_cache = None
        self._require_trainable("optim_step")
        adam = body.get("adam_params")
        if not isinstance(adam, dict):
            raise UserRequestError("optim_step needs `adam_params`")
        mode = body.get("grad_accumulation_normalization") or "none"
        if mode not in NORMALIZATIONS:
            raise UserRequestError(f"grad_accumulation_normalization must be one of {NORMALIZATIONS}, got {mode!r}")
        try:
            lr = float(adam.get("learning_rate", 1e-4))
            betas = (float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95)))
            eps, wd = float(adam.get("eps", 1e-12)), float(adam.get("weight_decay", 0.0))
            clip = float(adam.get("grad_clip_norm", 0.0))
        except (TypeError, ValueError) as e:
            raise UserRequestError(f"bad adam_params: {e}") from None
        divisor = {"num_loss_tokens": self.loss_tokens, "num_sequences": self.loss_sequences}.get(mode, 0)
        grads = [p.grad for p in self.params if p.grad is not None]
        if divisor > 0:  # before clipping, so the clip threshold applies to the normalized gradient
            torch._foreach_div_(grads, float(divisor))
        metrics = {"learning_rate:mean": lr}
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            metrics["grad_norm:mean"] = float(norm)
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, clip, norm)
        if self.optimizer is None:
            self.optimizer = self.new_optimizer()
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=betas, eps=eps, weight_decay=wd)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_tokens = self.loss_sequences = 0
        if any(not math.isfinite(v) for v in metrics.values()):
            log.warning("non-finite optimizer metrics on %s: %s", self.model_id, metrics)
        return {"metrics": metrics, "type": "optim_step"}

    def new_optimizer(self) -> torch.optim.AdamW:
        # foreach=False keeps the update bit-identical to a plain per-parameter torch loop in tests.
        return torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                 foreach=False)

    def reset_accumulation(self) -> None:
        self._fwd_cache = None
        self.loss_tokens = self.loss_sequences = 0
        for p in self.params:
            p.grad = None
