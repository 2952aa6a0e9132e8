"""The SDAR model under the attention rule: backends, invariances, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from dirl.config import ConfigError
from dirl.model.attention import TokenMeta, block_causal_meta, sft_meta
from dirl.model.sdar import load_model


def packed_sft_batch(model, lengths=(9, 14), row_len=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    pos, doc = [], []
    for d, n in enumerate(lengths):
        pos += list(range(n))
        doc += [d] * n
    pad = row_len - len(pos)
    pos += list(range(pad))
    doc += [len(lengths)] * pad
    pos, doc = torch.tensor([pos]), torch.tensor([doc])
    x0 = torch.randint(5, V, (1, row_len), generator=g)
    xt = x0.clone()
    xt[torch.rand(1, row_len, generator=g) < 0.5] = model.mask_token_id
    return torch.cat([xt, x0], 1), sft_meta(pos, doc, model.block_size), row_len


def test_flex_and_sdpa_give_the_same_logits(tiny):
    model, _ = tiny
    ids, meta, _ = packed_sft_batch(model)
    with torch.no_grad():
        a = model(ids, meta, backend="sdpa")
        b = model(ids, meta, backend="flex")
    assert (a - b).abs().max().item() <= 1e-5


def test_noisy_tokens_never_change_clean_logits(tiny):
    model, _ = tiny
    ids, meta, L = packed_sft_batch(model)
    other = ids.clone()
    other[0, :L] = torch.randint(5, model.config.vocab_size, (L,))
    with torch.no_grad():
        a, b = model(ids, meta), model(other, meta)
    assert torch.allclose(a[0, L:], b[0, L:], atol=0, rtol=0)
    assert not torch.allclose(a[0, :L], b[0, :L])  # the noisy half did change


def test_later_blocks_never_change_earlier_outputs(tiny):
    model, _ = tiny
    bs = model.block_size
    ids, meta, L = packed_sft_batch(model, lengths=(20,), row_len=20)
    cut = 2 * bs  # change everything from block 2 on, in both halves
    other = ids.clone()
    other[0, cut:L] = torch.randint(5, model.config.vocab_size, (L - cut,))
    other[0, L + cut:] = torch.randint(5, model.config.vocab_size, (L - cut,))
    with torch.no_grad():
        a, b = model(ids, meta), model(other, meta)
    assert torch.equal(a[0, :cut], b[0, :cut])          # noisy copies of blocks 0-1
    assert torch.equal(a[0, L:L + cut], b[0, L:L + cut])  # clean blocks 0-1


def test_clean_copy_equals_plain_block_causal_forward(tiny):
    model, _ = tiny
    ids, meta, L = packed_sft_batch(model, lengths=(11, 13), row_len=24)
    with torch.no_grad():
        full = model(ids, meta)
        first = model(ids[:, L:L + 11], block_causal_meta(11, model.block_size))
        second = model(ids[:, L + 11:L + 24], block_causal_meta(13, model.block_size))
    assert (full[0, L:L + 11] - first[0]).abs().max() < 1e-5
    assert (full[0, L + 11:L + 24] - second[0]).abs().max() < 1e-5


def test_noisy_block_sees_clean_prefix_like_a_kv_cache(tiny):
    """A noisy copy's logits equal a forward of [clean earlier blocks ; that noisy block]."""
    model, _ = tiny
    bs = model.block_size
    ids, meta, L = packed_sft_batch(model, lengths=(16,), row_len=16)
    with torch.no_grad():
        full = model(ids, meta)
        j = 2
        clean_prefix = ids[:, L:L + j * bs]
        noisy_block = ids[:, j * bs:(j + 1) * bs]
        seq = torch.cat([clean_prefix, noisy_block], 1)
        pos = torch.arange(0, (j + 1) * bs)[None]
        noisy = (pos >= j * bs).long()
        m = TokenMeta.make(pos, bs, noisy=noisy, grp=noisy * 7)
        sub = model(seq, m)
    assert (full[0, j * bs:(j + 1) * bs] - sub[0, j * bs:]).abs().max() < 1e-5


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    ids, meta, _ = packed_sft_batch(model)
    out = model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "sdar"
    assert cfg["architectures"] == ["SDARForCausalLM"]
    assert cfg["block_size"] == model.block_size and cfg["mask_token_id"] == model.mask_token_id
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
    again = load_model(out, dtype="float32")
    with torch.no_grad():
        assert torch.equal(model(ids, meta), again(ids, meta))


def test_plain_qwen3_folder_loads_with_block_size_given(tiny, tmp_path):
    model, tok = tiny
    model.hf.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    cfg_file = tmp_path / "qwen3" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("block_size", "mask_token_id")}
    assert cfg["model_type"] == "qwen3"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model.block_size"):
        load_model(tmp_path / "qwen3")
    m = load_model(tmp_path / "qwen3", block_size=4)
    assert m.block_size == 4 and m.mask_token_id == model.mask_token_id  # found in tokenizer.json


def test_tiny_model_is_deterministic_and_small(tmp_path):
    from dirl.config import TinyModelConfig
    from dirl.model.tiny import build_tiny_model, count_parameters

    a, tok = build_tiny_model(TinyModelConfig(seed=5))
    b, _ = build_tiny_model(TinyModelConfig(seed=5))
    c, _ = build_tiny_model(TinyModelConfig(seed=6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert 100_000 < count_parameters(a) < 1_000_000


def test_tiny_tokenizer_chat_format():
    from dirl.data.chat import encode, prompt_ids, stop_token_ids
    from dirl.model.tiny import build_tokenizer

    tok = build_tokenizer()
    ids = prompt_ids(tok, "What is 43+75?")
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nWhat is 43+75?<|im_end|>\n<|im_start|>assistant\n"
    resp = "43+75=118. \\boxed{118}<|im_end|>\n"
    assert tok.decode(encode(tok, resp)) == resp
    assert set(stop_token_ids(tok)) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
    assert tok.convert_tokens_to_ids("<|MASK|>") not in encode(tok, "What is <MASK>?")


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "has no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "not valid JSON"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), "model_type 'llama'"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "sdar", "block_size": 4}')), "has no weights"),
    ],
)
def test_bad_model_folders_give_one_line_errors(tmp_path, setup, match):
    p = tmp_path / "m"
    setup(p)
    with pytest.raises(ConfigError, match=match) as e:
        load_model(p)
    assert "\n" not in str(e.value) and "model.path" in str(e.value)


def test_block_size_disagreement_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="block_size"):
        load_model(tiny_dir, block_size=8)
