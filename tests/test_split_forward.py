"""The training forward split into a clean pass and checkpointed noisy groups (dirl.model.split), and
the engine's folded query-head attention (GroupedQueryMask): both equal the single dense forward."""

from __future__ import annotations

import pytest
import torch

from dirl.model.attention import GroupedQueryMask, TokenMeta, dense_mask, sft_meta
from dirl.model.split import noisy_groups
from dirl.train.layouts import build_batch
from test_chunked_attention import random_trajectories


def _run(model, ids, meta, pick, **kw):
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(ids, meta, backend="sdpa", **kw)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(h.shape[-1], generator=g)
    loss = model.lm_head(h[pick]).float().log_softmax(-1)[..., 7].sum() + (h[pick] @ w).sum()
    loss.backward()
    return h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    (h1, g1), (h0, g0) = got, want
    torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:  # fp32: the sums run in another order
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5 * float(g0[n].abs().max()), msg=n)


@pytest.mark.parametrize("group_tokens,chunk", [(6, 0), (1000, 0), (9, 8)])
def test_split_forward_equals_the_packed_forward_and_gradients(tiny, monkeypatch, group_tokens, chunk):
    import dirl.model.split as split

    model, _ = tiny
    trajs = random_trajectories(5, model.config.vocab_size, model.block_size, seed=group_tokens)
    # two rows, several responses in each (separate docs), tail padding
    batch = build_batch(trajs, model.block_size, model.mask_token_id, row_tokens=90)
    assert batch.input_ids.shape[0] >= 2
    pick = (batch.rows, batch.cols)
    monkeypatch.setattr(split, "DEFAULT_GROUP_TOKENS", group_tokens)
    model.train()
    try:
        want = _run(model, batch.input_ids, batch.meta, pick, query_chunk=0, split_noisy=False)
        got = _run(model, batch.input_ids, batch.meta, pick, query_chunk=chunk, split_noisy=True)
        with torch.no_grad():
            plain = model.hidden_states(batch.input_ids, batch.meta, backend="sdpa", split_noisy=True)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    _assert_same(got, want)
    torch.testing.assert_close(plain, want[0], rtol=0, atol=1e-5)


def test_split_forward_equals_the_sft_forward_and_gradients(tiny, monkeypatch):
    import dirl.model.split as split

    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    row = 30
    pos = torch.cat([torch.arange(12), torch.arange(row - 12)])[None].repeat(2, 1)
    doc = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(row - 12, dtype=torch.long)])[None].repeat(2, 1)
    x0 = torch.randint(5, model.config.vocab_size, (2, row), generator=g)
    masked = torch.rand(2, row, generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, model.mask_token_id), x0)
    ids, meta = torch.cat([xt, x0], 1), sft_meta(pos, doc, model.block_size)
    pick = torch.cat([masked, torch.zeros_like(masked)], 1)
    monkeypatch.setattr(split, "DEFAULT_GROUP_TOKENS", 7)
    model.train()
    try:
        want = _run(model, ids, meta, pick, query_chunk=0, split_noisy=False)
        got = _run(model, ids, meta, pick, query_chunk=0, split_noisy=True)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    _assert_same(got, want)


def test_noisy_groups_keep_copies_whole():
    grp = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 4]])
    doc = torch.tensor([[0] * 6 + [1] * 6])
    meta = TokenMeta.make(torch.arange(12)[None], 4, doc=doc, noisy=torch.ones_like(grp), grp=grp)
    idx = torch.arange(12)
    groups = noisy_groups(meta, idx, 4)
    assert torch.equal(torch.cat(groups), idx)
    for g in groups:  # a copy never spans two groups
        others = torch.cat([h for h in groups if h is not g]) if len(groups) > 1 else torch.zeros(0, dtype=torch.long)
        assert not set(zip(doc[0, g].tolist(), grp[0, g].tolist())) & set(zip(doc[0, others].tolist(),
                                                                            grp[0, others].tolist()))
    assert [len(g) for g in groups] == [2, 4, 5, 1]  # the 5-token copy is a group of its own


def test_split_runs_by_default_only_for_long_rows_under_autograd(tiny, monkeypatch):
    import dirl.model.split as split

    model, _ = tiny
    meta = sft_meta(torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long), model.block_size)
    size = split.saved_activation_bytes(model.config, 16)
    assert not model._should_split(meta, None)  # 16 tokens: far below the default
    monkeypatch.setattr(split, "DEFAULT_SPLIT_MIN_BYTES", size - 1)
    assert model._should_split(meta, None)
    with torch.no_grad():
        assert not model._should_split(meta, None)
    monkeypatch.setattr(split, "DEFAULT_SPLIT_MIN_BYTES", size)
    assert not model._should_split(meta, None)
    assert model._should_split(meta, True)


def test_folded_query_heads_equal_the_grouped_attention(tiny):
    model, _ = tiny
    cfg = model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads
    # a decoding-step-like forward: a clean prefix of 2 rows at different lengths, then noisy blocks
    trajs = random_trajectories(2, cfg.vocab_size, model.block_size, seed=4)
    batch = build_batch(trajs, model.block_size, model.mask_token_id, row_tokens=60)
    with torch.no_grad():
        want = model.hidden_states(batch.input_ids, batch.meta, backend="sdpa", query_chunk=0)
        got = model.hidden_states(batch.input_ids, batch.meta, backend="sdpa", query_chunk=0, fold_query_heads=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    m = GroupedQueryMask(dense_mask(batch.meta), cfg.num_attention_heads // cfg.num_key_value_heads)
    q = torch.randn(batch.input_ids.shape[0], cfg.num_attention_heads, batch.input_ids.shape[1], 8)
    kv = torch.randn(batch.input_ids.shape[0], cfg.num_key_value_heads, batch.input_ids.shape[1], 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=dense_mask(batch.meta), enable_gqa=True)
    torch.testing.assert_close(m.attend(q, kv, kv, None), ref, rtol=0, atol=1e-6)
