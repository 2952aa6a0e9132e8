"""dirl's SDPA attention: grouped KV heads kept grouped, chunked queries for long forwards, and the
engine's cache through transformers' current cache API. Each is checked against transformers' own
SDPA path with one dense 4-D mask (the computation these replace)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from dirl.model.attention import ChunkedMask, SDPA_IMPL, TokenMeta, dense_mask, sft_meta
from dirl.train.layouts import build_batch


def random_trajectories(n, vocab, block_size, seed=0, prompt=(3, 9), response=(6, 15)):
    """Trajectories with random step maps (1..block_size steps per block), prompts ending mid-block."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        P, R = rng.randint(*prompt), rng.randint(*response)
        steps, counter = [], 0
        for lo in range(0, R, block_size):
            k = min(block_size, R - lo)
            s = [counter + rng.randint(1, k) for _ in range(k)]
            counter = max(s)
            steps += s
        out.append({"request_id": f"t{i}", "prompt_ids": [rng.randrange(5, vocab) for _ in range(P)],
                    "token_ids": [rng.randrange(5, vocab) for _ in range(R)], "step_map": steps,
                    "response_length": R - rng.randint(0, 2)})
    return out


def hf_sdpa_hidden(model, ids, meta):
    """transformers' own SDPA attention with one dense boolean 4-D mask (repeats K/V per head)."""
    hf = model.hf
    impl = hf.config._attn_implementation
    hf.set_attn_implementation("sdpa")
    try:
        return hf.model(input_ids=ids, attention_mask=dense_mask(meta), position_ids=meta.pos,
                        use_cache=False).last_hidden_state
    finally:
        hf.set_attn_implementation(impl)
        model._active_backend = None


def test_gqa_attention_equals_transformers_sdpa_without_repeating_kv(tiny, monkeypatch):
    model, _ = tiny
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model is GQA
    batch = build_batch(random_trajectories(3, model.config.vocab_size, model.block_size), model.block_size,
                        model.mask_token_id)
    with torch.no_grad():
        ref = hf_sdpa_hidden(model, batch.input_ids, batch.meta)
        import transformers.integrations.sdpa_attention as hf_sdpa

        def no_repeat(*a, **k):
            raise AssertionError("K/V repeated per query head")

        monkeypatch.setattr(hf_sdpa, "repeat_kv", no_repeat)
        got = model.hidden_states(batch.input_ids, batch.meta, backend="sdpa", query_chunk=0)
    assert model.hf.config._attn_implementation == SDPA_IMPL
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def _loss_and_grads(model, ids, meta, chunk, pick):
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(ids, meta, backend="sdpa", query_chunk=chunk)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(h.shape[-1], generator=g)
    loss = (model.lm_head(h[pick]).float().log_softmax(-1)[..., 7].sum() + (h[pick] @ w).sum())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_queries_equal_the_dense_packed_forward_and_gradients(tiny, chunk):
    model, _ = tiny
    trajs = random_trajectories(4, model.config.vocab_size, model.block_size, seed=chunk)
    batch = build_batch(trajs, model.block_size, model.mask_token_id)
    pick = (batch.rows, batch.cols)
    model.train()
    try:
        h0, g0 = _loss_and_grads(model, batch.input_ids, batch.meta, 0, pick)
        h1, g1 = _loss_and_grads(model, batch.input_ids, batch.meta, chunk, pick)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        # fp32: equal to ~1e-7 of the gradient's scale (the sums run in another order)
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5 * float(g0[n].abs().max()), msg=n)
    # each chunk attends only the keys its queries may see: far fewer pairs than the dense mask
    plan = ChunkedMask(batch.meta, chunk=chunk)
    assert plan.keys_attended < 0.6 * plan.q_len * plan.k_len


def test_chunked_queries_equal_the_dense_sft_forward_and_gradients(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    lengths, row = [(9, 14, 5), (20, 6)], 30
    pos = torch.zeros(2, row, dtype=torch.long)
    doc = torch.zeros(2, row, dtype=torch.long)
    for r, ls in enumerate(lengths):
        p, d = [], []
        for i, n in enumerate(ls):
            p += list(range(n))
            d += [i] * n
        p += list(range(row - len(p)))
        d += [len(ls)] * (row - len(d))
        pos[r], doc[r] = torch.tensor(p), torch.tensor(d)
    x0 = torch.randint(5, model.config.vocab_size, (2, row), generator=g)
    masked = torch.rand(2, row, generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, model.mask_token_id), x0)
    ids, meta = torch.cat([xt, x0], 1), sft_meta(pos, doc, model.block_size)
    pick = torch.cat([masked, torch.zeros_like(masked)], 1)
    model.train()
    try:
        h0, g0 = _loss_and_grads(model, ids, meta, 0, pick)
        h1, g1 = _loss_and_grads(model, ids, meta, 7, pick)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
    for n in g0:
        # fp32: equal to ~1e-7 of the gradient's scale (the sums run in another order)
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5 * float(g0[n].abs().max()), msg=n)


def test_chunked_mask_with_separate_key_metadata():
    q = TokenMeta.make(torch.arange(8, 14)[None], 4, noisy=torch.ones(1, 6, dtype=torch.long),
                       grp=torch.full((1, 6), 3))
    k = TokenMeta.cat([TokenMeta.make(torch.arange(0, 8)[None], 4), q])
    plan = ChunkedMask(q, k, chunk=4)
    full = dense_mask(q, k)
    for a, b, idx, m in plan.chunk_masks():
        cols = torch.arange(k.pos.shape[1]) if idx is None else idx
        assert torch.equal(m, full[:, :, a:b][..., cols])
        assert not full[:, :, a:b].index_fill(3, cols, False).any()  # nothing allowed was left out


def test_engine_cache_is_a_transformers_cache_and_no_deprecation_warning(tiny):
    from transformers.cache_utils import Cache

    from dirl.rollout.backend import GenerateRequest
    from dirl.rollout.engine import BlockKVCache, Engine
    from dirl.rollout.naive import naive_generate

    model, _ = tiny
    assert isinstance(BlockKVCache(2, "cpu"), Cache)
    reqs = [GenerateRequest(request_id=f"r{i}", input_ids=list(range(5, 10 + i)), max_new_tokens=9, temperature=1.0,
                            top_k=0, top_p=1.0, do_sample=False, stop_token_ids=[]) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        got = Engine(model, max_batch_size=2).generate(reqs)
        want = naive_generate(model, reqs)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
