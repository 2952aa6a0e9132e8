"""The attention rule against a brute-force reference written out independently here."""

from __future__ import annotations

import random

import pytest
import torch

from dirl.model.attention import TokenMeta, dense_mask, flex_block_mask, sft_meta


def reference_mask(tokens: list[dict], block_size: int) -> torch.Tensor:
    """SPEC section 2, one pair at a time, in plain Python."""
    n = len(tokens)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i, q in enumerate(tokens):
        for j, k in enumerate(tokens):
            if q["doc"] != k["doc"]:
                continue
            qb, kb = q["pos"] // block_size, k["pos"] // block_size
            if not q["noisy"]:
                ok = (not k["noisy"]) and kb <= qb
            else:
                ok = ((not k["noisy"]) and kb < qb) or (k["noisy"] and k["grp"] == q["grp"])
            out[i, j] = ok
    return out


def meta_from(tokens: list[dict], block_size: int) -> TokenMeta:
    col = lambda f: torch.tensor([[int(t[f]) for t in tokens]])  # noqa: E731
    return TokenMeta.make(col("pos"), block_size, doc=col("doc"), noisy=col("noisy"), grp=col("grp"))


def sft_tokens(doc_lengths: list[int], row_len: int, block_size: int) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Tokens of a packed SFT row [x_t ; x_0] (several docs, then tail padding as its own doc)."""
    pos, doc = [], []
    for d, n in enumerate(doc_lengths):
        pos += list(range(n))
        doc += [d] * n
    pad = row_len - len(pos)
    pos += list(range(pad))
    doc += [len(doc_lengths)] * pad
    noisy = [dict(doc=d, pos=p, noisy=1, grp=p // block_size) for d, p in zip(doc, pos)]
    clean = [dict(doc=d, pos=p, noisy=0, grp=0) for d, p in zip(doc, pos)]
    return noisy + clean, torch.tensor([pos]), torch.tensor([doc])


def multi_copy_tokens(length: int, steps_per_block: list[int], block_size: int, doc: int = 0) -> list[dict]:
    """The packed RL layout: the clean text, then one noisy copy per (block, step)."""
    toks = [dict(doc=doc, pos=p, noisy=0, grp=0) for p in range(length)]
    g = 1
    for b, steps in enumerate(steps_per_block):
        lo, hi = b * block_size, min((b + 1) * block_size, length)
        for _ in range(steps):
            toks += [dict(doc=doc, pos=p, noisy=1, grp=g) for p in range(lo, hi)]
            g += 1
    return toks


@pytest.mark.parametrize("block_size", [1, 2, 4, 5])
def test_sft_layout_with_packing_and_padding(block_size):
    tokens, pos, doc = sft_tokens([7, 10, 3], row_len=24, block_size=block_size)
    built = sft_meta(pos, doc, block_size)
    assert torch.equal(dense_mask(built)[0, 0], reference_mask(tokens, block_size))
    assert torch.equal(dense_mask(meta_from(tokens, block_size))[0, 0], reference_mask(tokens, block_size))


@pytest.mark.parametrize("block_size", [2, 4])
def test_several_noisy_copies_per_block_and_docs(block_size):
    rng = random.Random(block_size)
    tokens = []
    for d in range(3):
        length = rng.randint(3, 13)
        nblocks = (length + block_size - 1) // block_size
        tokens += multi_copy_tokens(length, [rng.randint(1, block_size) for _ in range(nblocks)], block_size, doc=d)
    tokens += [dict(doc=99, pos=p, noisy=0, grp=0) for p in range(5)]  # tail padding
    ref = reference_mask(tokens, block_size)
    assert torch.equal(dense_mask(meta_from(tokens, block_size))[0, 0], ref)


def test_query_and_key_metadata_differ():
    """A KV-cached forward: queries are one noisy block, keys are the cache plus that block."""
    bs = 4
    cache = [dict(doc=0, pos=p, noisy=0, grp=0) for p in range(8)]
    block = [dict(doc=0, pos=p, noisy=1, grp=2) for p in range(8, 12)]
    ref = reference_mask(cache + block, bs)[len(cache):]
    got = dense_mask(meta_from(block, bs), meta_from(cache + block, bs))[0, 0]
    assert torch.equal(got, ref)
    assert got.all()  # the current block sees all earlier clean blocks and itself


def test_every_query_sees_itself():
    tokens = multi_copy_tokens(11, [2, 3, 1], 4) + multi_copy_tokens(6, [1, 2], 4, doc=1)
    m = dense_mask(meta_from(tokens, 4))[0, 0]
    assert m.diagonal().all()


def test_flex_block_mask_matches_dense():
    tokens, pos, doc = sft_tokens([9, 6], row_len=20, block_size=4)
    meta = sft_meta(pos, doc, 4)
    bm = flex_block_mask(meta)
    # materialise the BlockMask through its mask_mod on every pair
    L = meta.pos.shape[1]
    q = torch.arange(L)[:, None].expand(L, L)
    k = torch.arange(L)[None, :].expand(L, L)
    z = torch.zeros((), dtype=torch.long)
    got = bm.mask_mod(z, z, q, k)
    assert torch.equal(got, dense_mask(meta)[0, 0])
