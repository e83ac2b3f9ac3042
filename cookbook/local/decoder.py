"""The deployment's forward pass: a decoder-only transformer over a fixed pool of KV-cache slots, run on a flat
batch of token rows in which every sequence's numbers are what they would be if it ran alone.

Batching normally changes results in the last bits: a matrix multiply picks its kernel (and so its summation order)
by the number of rows, and padding changes the length attention reduces over. Here:

- rows come in blocks of `block` (16): a decode step gives each busy chunk of 16 slots one block (one row per slot;
  a slot without a sequence gets a dummy row whose key/value go to a scratch slot and whose result is dropped), and
  a prompt gets as many blocks as it needs (padded at the end; causal attention keeps the padding out of the real
  rows). A matrix multiply over 16 * c rows computes each block as it would alone;
- attention runs per block (decode: 16 slots, one query each) or per prompt, over a prefix of the cache with a mask.
  The prefix (`attention_span`: whole blocks, at least 64) is the one shape that can depend on other sequences;
  torch's CPU attention kernel adds masked keys as exact zeros, so a row's result does not depend on how many masked
  keys follow its own.

Both kernel properties are checked in tests/test_sampling_engine.py (a request's tokens and logprobs alone and among
others, bit for bit), so a torch upgrade that broke them would fail there.

The layers are the model's own weights and modules (norms, projections, rotary embedding, MLP activation), applied
in the order of the Llama/Qwen family's decoder layer, so the logits are those of the model's own forward up to float
rounding. The query/key/value projections and the MLP's gate/up projections each run as one matrix multiply: their
weights are laid out one after another in one tensor that the model's parameters are views of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("qwen3", "qwen2", "llama", "mistral")


@dataclass
class Prompt:
    """A prompt to prefill into `slot`; `all_logits` also returns the logits of every prompt position (echo)."""

    slot: int
    tokens: list[int]
    all_logits: bool = False


class SlotDecoder:
    def __init__(self, model, slots: int = 64, block: int = 16, max_context: int = 4096):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"the embedded deployment decodes {', '.join(SUPPORTED)} models; this one is "
                             f"{model_type!r}")
        if slots % block:
            raise ValueError(f"slots ({slots}) must be a multiple of block ({block})")
        self.model, self.slots, self.block = model, slots, block
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.context = min(int(config.max_position_embeddings), max_context)
        param = next(model.parameters())
        self.device = param.device
        # One more slot than sequences: the scratch slot that dummy rows write to. Whole blocks of positions: a
        # prompt's padding may run past the context.
        self.cache_len = -(-self.context // block) * block
        shape = (slots + 1, self.kv_heads, self.cache_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=self.device) for _ in model.model.layers]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=self.device) for _ in model.model.layers]
        self.scratch = slots
        # Fewer, larger matrix multiplies: queries/keys/values in one, the MLP's gate and up in one.
        self.fused = [(_fused(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                       _fused(layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in model.model.layers]

    def attention_span(self, length: int) -> int:
        """How many cache positions attention reads for sequences up to `length` tokens: whole blocks, at least 64."""
        return min(max(64, -(-length // self.block) * self.block), self.cache_len)

    def clear(self, slot: int) -> None:
        """Forget what `slot` held (stale entries are masked out, but must not be inf/NaN: 0 * inf is NaN)."""
        for k, v in zip(self.keys, self.values):
            k[slot].zero_()
            v[slot].zero_()

    def copy_prompt(self, source: int, target: int, length: int) -> None:
        """Give slot `target` the cache slot `source` holds for a prompt of `length` tokens (with its padding)."""
        padded = -(-length // self.block) * self.block
        for k, v in zip(self.keys, self.values):
            k[target, :, :padded] = k[source, :, :padded]
            v[target, :, :padded] = v[source, :, :padded]

    @torch.inference_mode()
    def run(self, chunks: list[int], tokens: list[int], positions: list[int], prompts: list[Prompt]):
        """One forward over decode rows and prompts. `chunks`: busy chunks (of `block` slots each), with `tokens` and
        `positions` giving one row per slot in that order (a row of a slot without a sequence: position < 0).
        Returns (float32 logits of the decode rows, and per prompt the logits of its last position, or of every
        position with `all_logits`)."""
        b, dev = self.block, self.device
        ids, pos, write_slot, groups = [], [], [], []
        for i, c in enumerate(chunks):
            rows = slice(i * b, (i + 1) * b)
            live = [p >= 0 for p in positions[rows]]
            ids += tokens[rows]
            pos += [max(p, 0) for p in positions[rows]]
            write_slot += [c * b + j if ok else self.scratch for j, ok in enumerate(live)]
            query = torch.tensor(pos[rows], device=dev)[:, None]
            span = self.attention_span(int(query.max()) + 1)
            mask = torch.arange(span, device=dev)[None, :] <= query  # (block, span)
            groups.append((i * b, b, 1, c * b, mask[:, None, None]))
        for prompt in prompts:
            n = len(prompt.tokens)
            padded = -(-n // b) * b
            start = len(ids)
            ids += prompt.tokens + [prompt.tokens[-1]] * (padded - n)
            pos += list(range(padded))
            write_slot += [prompt.slot] * padded
            query = torch.arange(padded, device=dev)[:, None]
            mask = torch.arange(self.attention_span(padded), device=dev)[None, :] <= query  # causal
            groups.append((start, 1, padded, prompt.slot, mask[None, None]))
        hidden = self._forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                               torch.tensor(write_slot, device=dev), groups)
        # The head, like every matrix multiply here, on whole blocks: all decode rows, and each prompt's blocks
        # that hold what is asked (its last real position, or all of them).
        wanted = [torch.arange(len(chunks) * b, device=dev)]
        for prompt, (start, _, padded, _, _) in zip(prompts, groups[len(chunks):]):
            first = start if prompt.all_logits else start + (len(prompt.tokens) - 1) // b * b
            wanted.append(torch.arange(first, start + padded, device=dev))
        logits = self.model.lm_head(hidden[torch.cat(wanted)]).float()
        decode, at, per_prompt = logits[:len(chunks) * b], len(chunks) * b, []
        for prompt, rows in zip(prompts, wanted[1:]):
            mine, at, n = logits[at:at + len(rows)], at + len(rows), len(prompt.tokens)
            per_prompt.append(mine[:n] if prompt.all_logits else mine[(n - 1) % b:][:1])  # the last: in its block
        return decode, per_prompt

    def _forward(self, ids, positions, write_slots, groups) -> torch.Tensor:
        """The decoder stack on flat token rows `ids` (N,) at `positions` (N,); the final norm's output (N, hidden).
        Keys and values of row r go to slot `write_slots[r]` at position `positions[r]`. `groups` lists the
        attention calls: (first row, slots, queries per slot, first slot, mask), the slots consecutive so that the
        cache is read as a view."""
        inner = self.model.model
        N = ids.shape[0]
        hidden = inner.embed_tokens(ids)[None]  # (1, N, hidden): the shape the model's modules expect
        cos, sin = inner.rotary_emb(hidden, positions[None])
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = cos[:, :, None], sin[:, :, None]  # (1, N, 1, head_dim): rows by heads, as q and k are laid out
        for layer, k_cache, v_cache, (qkv, gate_up) in zip(inner.layers, self.keys, self.values, self.fused):
            attn = layer.self_attn
            x = _norm(layer.input_layernorm, hidden)
            q, k, v = F.linear(x, *qkv).view(1, N, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], 2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head's queries and keys
                q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            q, k, v = _rotate(q, cos, sin)[0], _rotate(k, cos, sin)[0], v[0]  # (N, heads, head_dim)
            k_cache[write_slots, :, positions] = k
            v_cache[write_slots, :, positions] = v
            outs = []
            for row, slots, per_slot, slot, mask in groups:
                query = q[row:row + slots * per_slot].view(slots, per_slot, heads, dim).transpose(1, 2)
                span = mask.shape[-1]
                out = F.scaled_dot_product_attention(
                    query, k_cache[slot:slot + slots, :, :span], v_cache[slot:slot + slots, :, :span], attn_mask=mask,
                    scale=attn.scaling, enable_gqa=kv_heads != heads)
                outs.append(out.transpose(1, 2).reshape(slots * per_slot, heads * dim))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            hidden = hidden + attn.o_proj(out[None])
            gate, up = F.linear(_norm(layer.post_attention_layernorm, hidden), *gate_up).chunk(2, -1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return _norm(inner.norm, hidden)[0]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, the Llama/Qwen way (`x * cos + rotate_half(x) * sin`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _fused(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the linears' one after another. The linears' parameters become views of it, so
    loading weights into the model (a hot load) updates it too; a model fused before is reused as it is."""
    weights = [lin.weight for lin in linears]
    base = weights[0]._base
    if base is not None and all(w._base is base for w in weights) and base.shape[0] == sum(len(w) for w in weights):
        biases = [lin.bias for lin in linears]
        return base, None if biases[0] is None else biases[0]._base
    weight = torch.cat([w.detach() for w in weights])
    bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[at:at + n]
        if bias is not None:
            lin.bias.data = bias[at:at + n]
        at += n
    return weight, bias


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's output. In float32 torch's fused rms_norm gives the same bits as the Llama/Qwen modules
    (upcast, mean of squares, rsqrt, scale) in about half the time; anything else runs the module itself."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if x.dtype == torch.float32 and weight is not None and weight.dtype == torch.float32 and eps is not None:
        return F.rms_norm(x, weight.shape, weight, eps)
    return module(x)
