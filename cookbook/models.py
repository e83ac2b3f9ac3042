"""Embedded models and tokenizer: small Qwen3-architecture models built deterministically from a seed.

`local-tiny` is the default embedded model (~0.8 M params), `local-small` the largest size that still feels
interactive on 2 CPU cores, and `local-micro` a unit-test size. Any other name is treated as a local directory or a
Hugging Face id and goes through `from_pretrained` (real loading code for boxes with hub access). A process may
register aliases (`register_alias`): the platform catalog maps names such as `accounts/fireworks/models/qwen3-8b` to
an embedded model or a directory.

The tokenizer is a fixed byte-level vocabulary (256 byte tokens + 4 specials): no training, lossless for any text and
one token per digit, which is what the toy arithmetic/reversal tasks need. It wraps as a normal transformers fast
tokenizer, so a saved model directory loads with plain `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
BYTE_VOCAB_SIZE = 256
VOCAB_SIZE = BYTE_VOCAB_SIZE + len(SPECIAL_TOKENS)  # 260: ids 0..255 are bytes, 256.. the specials in order

# ChatML. `{% generation %}` marks assistant content (incl. its closing <|im_end|>, which the model must learn to emit)
# so `apply_chat_template(..., return_assistant_tokens_mask=True)` yields a loss mask.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    max_positions: int = 512

    def config_kwargs(self) -> dict[str, Any]:
        return dict(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden, intermediate_size=self.mlp,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_positions, tie_word_embeddings=True,
            rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            bos_token_id=None, eos_token_id=VOCAB_SIZE - 4, pad_token_id=VOCAB_SIZE - 1,
            use_cache=True, architectures=["Qwen3ForCausalLM"],
        )


EMBEDDED_MODELS: dict[str, ModelSpec] = {
    "local-micro": ModelSpec(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=192),
    "local-tiny": ModelSpec(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, mlp=384),
    "local-small": ModelSpec(layers=6, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=768),
}


# Base-model aliases of this process (`register_alias`): a trainer or deployment started for a catalog alias
# (e.g. `accounts/fireworks/models/qwen3-8b` -> `local-micro`) loads the target while keeping the aliased name.
_ALIASES: dict[str, str] = {}


def register_alias(name: str, source: str) -> None:
    """Make `name` load `source` (an embedded model name or a model directory) in this process."""
    if name != source:
        _ALIASES[name] = source


def resolve(name_or_path: str) -> str:
    """What `name_or_path` loads: its alias target (followed), else itself."""
    seen = set()
    while name_or_path in _ALIASES and name_or_path not in seen:
        seen.add(name_or_path)
        name_or_path = _ALIASES[name_or_path]
    return name_or_path


def is_embedded(name_or_path: str) -> bool:
    return resolve(name_or_path) in EMBEDDED_MODELS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable byte alphabet, which the ByteLevel pre-tokenizer/decoder use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer():
    """The embedded byte-level tokenizer as a transformers fast tokenizer (vocab 260, ChatML template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(BYTE_VOCAB_SIZE)}  # id == byte value
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = BYTE_VOCAB_SIZE + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No regex split: every byte is its own token anyway, and the split would only cost time.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END], model_max_length=EMBEDDED_MODELS["local-tiny"].max_positions,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(name_or_path: str):
    name_or_path = resolve(name_or_path)
    if is_embedded(name_or_path):
        return build_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name_or_path)


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers/hf-hub progress bars and info logs (they clutter CLIs and test output)."""
    from transformers.utils import logging as hf_logging
    old_level = hf_logging.get_verbosity()
    old_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old_level)
        with warnings.catch_warnings():  # hf-hub warns when its env switch overrides re-enabling
            warnings.simplefilter("ignore")
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env


def embedded_config(name: str):
    from transformers import Qwen3Config
    return Qwen3Config(**EMBEDDED_MODELS[name].config_kwargs())


def load_model(name_or_path: str, seed: int = 0):
    """An fp32 causal LM. Embedded names: deterministic random init from `seed` (no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    name_or_path = resolve(name_or_path)
    if is_embedded(name_or_path):
        from transformers import Qwen3ForCausalLM
        # A private generator state: the init must not depend on (or disturb) the global RNG history.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(embedded_config(name_or_path))
        model.config.name_or_path = name_or_path
        return model.float().eval()
    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    return model.eval()


def save_model_dir(model, tokenizer, path: str | os.PathLike) -> Path:
    """Write an HF-loadable directory (safetensors + config + tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_hf():
        model.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return path


def vocab_size(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.vocab_size)


def max_len(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.max_position_embeddings)
