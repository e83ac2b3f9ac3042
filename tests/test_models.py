"""Embedded model factory and byte-level tokenizer."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cookbook import models


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_embedded_init_is_deterministic_per_seed():
    a = models.load_model("local-micro", seed=3)
    b = models.load_model("local-micro", seed=3)
    c = models.load_model("local-micro", seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_init_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load_model("local-micro", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_sizes():
    n = lambda name: sum(p.numel() for p in models.load_model(name).parameters())  # noqa: E731
    assert 0.6e6 < n("local-tiny") < 1.0e6
    assert n("local-micro") < n("local-tiny") < n("local-small")
    assert models.vocab_size(models.load_model("local-micro")) == models.VOCAB_SIZE == 260
    assert models.max_len(models.embedded_config("local-tiny")) == 512


def test_tokenizer_is_lossless_with_one_token_per_digit():
    tok = models.build_tokenizer()
    text = "héllo\n\t 0123456789 世界 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digits = tok.encode("0123456789")
    assert digits == [ord(c) for c in "0123456789"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    assert tok.pad_token_id == 259 and len(tok) == 260


def test_chat_template_and_assistant_mask():
    tok = models.build_tokenizer()
    msgs = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "4<|im_end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"


def test_save_dir_round_trips_through_auto_classes(tmp_path):
    model = models.load_model("local-micro", seed=1)
    tok = models.build_tokenizer()
    models.save_model_dir(model, tok, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _same_weights(model, loaded)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n12+7=?<|im_end|>"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.chat_template == tok.chat_template
    # load_model / load_tokenizer take the same path (non-embedded branch)
    assert _same_weights(model, models.load_model(str(tmp_path)))
    assert models.load_tokenizer(str(tmp_path)).encode("abc") == [97, 98, 99]
    ids = torch.tensor([tok.encode("hello")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
