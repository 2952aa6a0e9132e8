"""The block-diffusion attention rule (SPEC section 2), built from per-token metadata.

Every token of a forward carries five integers:

* ``doc``   which sample it belongs to (packing); tail padding is a doc of its own;
* ``pos``   its absolute position in prompt + response (RoPE position);
* ``blk``   ``pos // block_size``;
* ``noisy`` 0 for a clean copy of the text, 1 for a token of a (partly masked) noisy copy;
* ``grp``   for noisy tokens, the id of the copy they belong to (unique within a doc).

:func:`allowed` is the only statement of the rule. The dense SDPA mask (CPU) and the FlexAttention
``mask_mod`` (CUDA) both call it, so the two backends cannot drift apart. Masks are built from
O(L) metadata; no L x L tensor is materialised on the flex path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

Backend = Literal["auto", "flex", "sdpa"]


def allowed(q_doc, q_blk, q_noisy, q_grp, k_doc, k_blk, k_noisy, k_grp):
    """True where query q may attend to key k. Works on broadcastable integer tensors.

    q clean : k clean and blk(k) <= blk(q)                (block-causal, bidirectional in a block)
    q noisy : (k clean and blk(k) < blk(q)) or (k noisy and grp(k) == grp(q))
    and always doc(q) == doc(k). Only integer comparisons: FlexAttention's mask compiler accepts them.
    """
    same_doc = q_doc == k_doc
    k_clean = k_noisy == 0
    q_clean = q_noisy == 0
    earlier_clean = k_clean & (k_blk < q_blk)
    same_block_clean = k_clean & q_clean & (k_blk == q_blk)
    same_copy = (k_noisy != 0) & (q_noisy != 0) & (k_grp == q_grp)
    return same_doc & (earlier_clean | same_block_clean | same_copy)


@dataclass
class TokenMeta:
    """Per-token metadata, each field a ``[batch, length]`` int tensor."""

    doc: torch.Tensor
    pos: torch.Tensor
    blk: torch.Tensor
    noisy: torch.Tensor
    grp: torch.Tensor

    @classmethod
    def make(
        cls,
        pos: torch.Tensor,
        block_size: int,
        doc: Optional[torch.Tensor] = None,
        noisy: Optional[torch.Tensor] = None,
        grp: Optional[torch.Tensor] = None,
    ) -> "TokenMeta":
        pos = _as_2d(pos).long()
        zeros = torch.zeros_like(pos)
        doc = zeros if doc is None else _as_2d(doc).long().expand_as(pos)
        noisy = zeros if noisy is None else _as_2d(noisy).long().expand_as(pos)
        grp = zeros if grp is None else _as_2d(grp).long().expand_as(pos)
        return cls(doc=doc, pos=pos, blk=torch.div(pos, block_size, rounding_mode="floor"), noisy=noisy, grp=grp)

    @classmethod
    def cat(cls, metas: list["TokenMeta"], dim: int = 1) -> "TokenMeta":
        return cls(*(torch.cat([getattr(m, f) for m in metas], dim=dim) for f in cls.fields()))

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("doc", "pos", "blk", "noisy", "grp")

    @property
    def shape(self) -> torch.Size:
        return self.pos.shape

    def to(self, device) -> "TokenMeta":
        return TokenMeta(*(getattr(self, f).to(device) for f in self.fields()))

    def select(self, index) -> "TokenMeta":
        """Index every field the same way (e.g. ``meta.select((slice(None), slice(a, b)))``)."""
        return TokenMeta(*(getattr(self, f)[index] for f in self.fields()))


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.unsqueeze(0) if t.dim() == 1 else t


def block_causal_meta(length: int, block_size: int, batch: int = 1, device=None, offset: int = 0) -> TokenMeta:
    """A plain clean sequence (one doc): block-causal attention."""
    pos = torch.arange(offset, offset + length, device=device).unsqueeze(0).expand(batch, -1)
    return TokenMeta.make(pos, block_size)


def sft_meta(pos: torch.Tensor, doc: torch.Tensor, block_size: int) -> TokenMeta:
    """Metadata of the SFT layout ``[x_t ; x_0]``: a noisy copy of every block (grp = blk), then the
    clean text, both halves at the same positions. ``pos`` and ``doc`` are ``[B, L]`` for x_0."""
    pos = _as_2d(pos).long()
    doc = _as_2d(doc).long()
    blk = torch.div(pos, block_size, rounding_mode="floor")
    noisy = TokenMeta(doc=doc, pos=pos, blk=blk, noisy=torch.ones_like(pos), grp=blk)
    clean = TokenMeta(doc=doc, pos=pos, blk=blk, noisy=torch.zeros_like(pos), grp=torch.zeros_like(pos))
    return TokenMeta.cat([noisy, clean])


def dense_mask(q: TokenMeta, k: Optional[TokenMeta] = None) -> torch.Tensor:
    """``[B, 1, Lq, Lk]`` boolean mask (True = attend) for SDPA."""
    k = q if k is None else k
    rule = ("doc", "blk", "noisy", "grp")
    m = allowed(
        *(getattr(q, f)[:, :, None] for f in rule),
        *(getattr(k, f)[:, None, :] for f in rule),
    )
    return m[:, None, :, :]


def flex_block_mask(q: TokenMeta, k: Optional[TokenMeta] = None, block: int = 128):
    """A FlexAttention ``BlockMask`` for the rule, from O(L) metadata."""
    from torch.nn.attention.flex_attention import create_block_mask

    k = q if k is None else k
    qd, qb, qn, qg = q.doc, q.blk, q.noisy, q.grp
    kd, kb, kn, kg = k.doc, k.blk, k.noisy, k.grp

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(qd[b, q_idx], qb[b, q_idx], qn[b, q_idx], qg[b, q_idx],
                       kd[b, kv_idx], kb[b, kv_idx], kn[b, kv_idx], kg[b, kv_idx])

    B, Lq = q.pos.shape
    Lk = k.pos.shape[1]
    return create_block_mask(mask_mod, B=B, H=None, Q_LEN=Lq, KV_LEN=Lk, device=q.pos.device, BLOCK_SIZE=block)


def resolve_backend(backend: Backend, device: torch.device | str) -> Literal["flex", "sdpa"]:
    """``auto`` picks flex on CUDA and SDPA elsewhere (torch has no FlexAttention backward on CPU)."""
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if backend not in ("flex", "sdpa"):
        raise ValueError(f"unknown attention backend {backend!r} (expected auto, flex or sdpa)")
    return backend


def build_mask(q: TokenMeta, k: Optional[TokenMeta] = None, backend: Literal["flex", "sdpa"] = "sdpa",
               query_chunk: Optional[int] = None, query_groups: int = 1, dtype: torch.dtype = torch.float32):
    """The mask object of a forward: a FlexAttention ``BlockMask`` (flex), else for SDPA a dense
    boolean mask, or a :class:`ChunkedMask` when the queries are longer than ``query_chunk``
    (None: :data:`DEFAULT_QUERY_CHUNK`; 0: never chunk). ``query_groups > 1`` (SDPA, short
    forwards such as a decoding step): a :class:`GroupedQueryMask` for that many query heads per KV
    head, additive in ``dtype``."""
    if backend == "flex":
        return flex_block_mask(q, k)
    chunk = DEFAULT_QUERY_CHUNK if query_chunk is None else int(query_chunk)
    if chunk > 0 and q.pos.shape[1] > chunk:
        return ChunkedMask(q, k, chunk=chunk)
    if query_groups > 1:
        return GroupedQueryMask(dense_mask(q, k), query_groups, dtype)
    return dense_mask(q, k)


class GroupedQueryMask:
    """The mask of a short forward (a decoding step) for attention with ``groups`` query heads per
    KV head, laid out for folding: the query heads of a group are stacked along the query axis
    (``[B, Hkv, groups * Lq, D]``), so SDPA runs on the KV heads as they are, with one plain batched
    product per KV head instead of its grouped-query broadcast. The mask is built once per forward,
    additive (0 / -inf) in the model's dtype (SDPA would otherwise convert a boolean mask in every
    layer), and shared by every layer. Same numbers as the boolean mask: the same keys weigh 0."""

    def __init__(self, mask: torch.Tensor, groups: int, dtype: torch.dtype = torch.float32):
        self.groups = int(groups)
        self.shape = tuple(mask.shape)  # what the boolean mask is ([B, 1, Lq, Lk])
        folded = mask.repeat(1, 1, self.groups, 1) if self.groups > 1 else mask
        self.additive = torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill_(~folded, float("-inf"))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        """``[B, Hq, Lq, D]`` output for ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, D]``."""
        b, hq, lq, d = query.shape
        hkv = key.shape[1]
        if hq != hkv * self.groups:
            raise ValueError(f"GroupedQueryMask for {self.groups} query heads per KV head, got {hq} / {hkv}")
        q = query.reshape(b, hkv, self.groups * lq, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=self.additive, scale=scale)
        return out.reshape(b, hq, lq, out.shape[-1])


# --------------------------------------------------------------------------------------------
# SDPA with grouped KV heads, and chunked queries for long training forwards
# --------------------------------------------------------------------------------------------

#: the name under which :func:`sdpa_attention` is registered with transformers' attention interface
SDPA_IMPL = "dirl_sdpa"
#: query rows per chunk of :class:`ChunkedMask` (its transient mask is ``chunk x keys`` booleans)
DEFAULT_QUERY_CHUNK = 512


class ChunkedMask:
    """The attention rule for a long forward, attended ``chunk`` queries at a time.

    The dense path holds an ``Lq x Lk`` mask (and, under autograd, per-layer attention state of that
    size); here each chunk of queries attends only the keys that some query of the chunk may see
    (for the training layouts: its doc's clean prefix and its own noisy copies), gathered once per
    forward, with the ``chunk x keys`` slice of the rule as its mask. Under autograd every chunk is
    recomputed in the backward pass, so nothing of size ``Lq x Lk`` is ever stored: memory grows
    linearly with the length. The numbers are those of the dense mask (masked keys weigh exactly 0
    there), up to the order of floating-point sums.

    The plan (which keys each chunk gathers) is made once per forward and shared by every layer; each
    layer rebuilds a chunk's ``chunk x keys`` mask from the O(L) metadata, so nothing quadratic is kept.
    """

    def __init__(self, q: TokenMeta, k: Optional[TokenMeta] = None, chunk: int = DEFAULT_QUERY_CHUNK,
                 gather_below: float = 0.75):
        k = q if k is None else k
        self.q_len = int(q.pos.shape[1])
        self.k_len = int(k.pos.shape[1])
        self.chunk = max(1, int(chunk))
        self.shape = (int(q.pos.shape[0]), 1, self.q_len, self.k_len)  # what a dense mask would be
        # per chunk: query range, gathered key indices (None: all keys), and the metadata the
        # chunk's mask is rebuilt from in every layer (cheaper to recompute than to keep)
        self.plan: list[tuple[int, int, Optional[torch.Tensor], TokenMeta, TokenMeta]] = []
        for a, b in _chunk_bounds(q.doc, self.chunk):
            qm = q.select((slice(None), slice(a, b)))
            need = dense_mask(qm, k).any(dim=2).any(dim=0)[0]  # keys some query of the chunk may see
            idx = None
            km = k
            if int(need.sum()) < gather_below * self.k_len:
                idx = need.nonzero().flatten()
                km = k.select((slice(None), idx))
            self.plan.append((a, b, idx, qm, km))

    @property
    def keys_attended(self) -> int:
        """Query-key pairs the chunks compute (for cost accounting)."""
        return sum((b - a) * (self.k_len if idx is None else int(idx.numel())) for a, b, idx, _, _ in self.plan)

    def chunk_masks(self):
        """``(a, b, key indices or None, [B, 1, b - a, keys] mask)`` per chunk (for inspection)."""
        return [(a, b, idx, dense_mask(qm, km)) for a, b, idx, qm, km in self.plan]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        """``[B, Hq, Lq, D]`` attention output of the whole query sequence."""
        gqa = query.shape[1] != key.shape[1]
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        outs = []
        for a, b, idx, qm, km in self.plan:
            if grad:
                from torch.utils.checkpoint import checkpoint

                o = checkpoint(_chunk_attention, query[:, :, a:b], key, value, idx, qm, km, scale, gqa,
                               use_reentrant=False)
            else:
                o = _chunk_attention(query[:, :, a:b], key, value, idx, qm, km, scale, gqa)
            outs.append(o)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _chunk_bounds(doc: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Query ranges of at most ``chunk`` tokens, cut where a document starts (in any row) once the
    current range holds ``chunk // 8`` tokens or more, so a chunk rarely spans documents and gathers
    only its own document's keys."""
    n = int(doc.shape[1])
    starts = ((doc[:, 1:] != doc[:, :-1]).any(dim=0).nonzero().flatten() + 1).tolist()
    min_len = max(1, chunk // 8)
    bounds, a = [], 0
    for p in starts + [n]:
        while p - a > chunk:
            bounds.append((a, a + chunk))
            a += chunk
        if p - a >= min_len or p == n:
            if p > a:
                bounds.append((a, p))
            a = p
    return bounds


def _chunk_attention(q, key, value, idx, q_meta, k_meta, scale, gqa):
    if idx is not None:
        key = key.index_select(2, idx)
        value = value.index_select(2, idx)
    mask = dense_mask(q_meta, k_meta)
    return torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale,
                                                            enable_gqa=gqa)


class PackedRows:
    """Rows of unequal lengths laid end to end, for a forward whose linear layers should not compute
    padding: the decoder gets the ``T`` real tokens as one row ``[1, T]``; attention unpacks the
    queries to the padded layout ``[n, lq]`` that ``mask`` (any SDPA mask object of this module, built
    on that layout) describes, attends, and packs the output again. Row ``r`` holds ``lengths[r]``
    real tokens at the start of its padded row; the padding queries' outputs are dropped. The
    numbers of the real tokens are those of the padded forward: every token's linear work is its own,
    and attention sees the same queries, keys and mask."""

    def __init__(self, lengths: torch.Tensor, lq: int, mask):
        self.n, self.lq = int(lengths.shape[0]), int(lq)
        cols = torch.arange(self.lq, device=lengths.device)
        #: positions of the real tokens in the flattened padded layout ``[n * lq]``, row by row
        self.index = (cols[None, :] < lengths[:, None]).view(-1).nonzero().flatten()
        self.mask = mask

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, lq, ...]`` -> ``[1, T, ...]``: the real tokens, row by row."""
        return x.reshape(self.n * self.lq, *x.shape[2:]).index_select(0, self.index)[None]

    def unpack_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, H, T, D]`` -> ``[n, H, lq, D]``, zeros at the padding."""
        h, d = x.shape[1], x.shape[3]
        out = x.new_zeros(self.n * self.lq, h, d)
        out.index_copy_(0, self.index, x[0].transpose(0, 1))
        return out.view(self.n, self.lq, h, d).transpose(1, 2)


class RaggedRows:
    """A decoding forward of the rollout engine with no padding anywhere: each row attends only its
    own keys, and nothing is computed for tokens a row does not have.

    Row ``r`` brings ``pending[r]`` clean tokens (whole blocks: the prompt blocks of its prefill, or
    the block it commits; often none) and its current (noisy) block of ``B`` tokens, and has
    ``cached[r]`` committed tokens in the KV cache, which the forward's tokens follow. In that layout
    the rule of :func:`allowed` comes down to one key bound per query: clean block ``i`` of the
    pending part sees the keys ``[0, cached[r] + (i + 1) B)``, the current block sees
    ``[0, cached[r] + pending[r] + B)`` (every clean key and itself). So:

    * the current blocks of all rows attend in one batched SDPA call, the query heads of a KV head
      folded along the query axis (as in :class:`GroupedQueryMask`), with an additive ``[n, 1, 1, K]``
      mask only where rows end at different keys (none when they all end at ``K``);
    * a row with a pending part attends it in a call of its own over its own keys (no mask for a
      single block; the block-causal bounds for a prefill).

    With ``packed`` the rows are laid end to end (``[1, T]``, as with :class:`PackedRows`), otherwise
    every row has the same number of tokens and the layout is ``[n, lq]``. The tests compare
    :meth:`attend` with SDPA under :func:`dense_mask` on the padded layout."""

    def __init__(self, pending: list[int], cached: torch.Tensor, block: int, groups: int,
                 dtype: torch.dtype = torch.float32):
        self.device = device = cached.device
        self.n, self.B, self.groups = len(pending), int(block), int(groups)
        self.pending = [int(p) for p in pending]
        self.cached = cached.tolist()
        B = self.B
        lens = [p + B for p in self.pending]
        self.lq = max(lens)
        self.packed = min(lens) < self.lq
        self.dtype = dtype
        lens_t = torch.tensor(lens, dtype=torch.long, device=device)
        ar = torch.arange(B, device=device)
        if self.packed:
            cols = torch.arange(self.lq, device=device)
            #: positions of the real tokens in the flattened padded layout ``[n * lq]``, row by row
            self.index = (cols[None, :] < lens_t[:, None]).view(-1).nonzero().flatten()
            self.starts = (torch.cumsum(lens_t, 0) - lens_t).tolist()
            # each row's current block in the packed row
            self.current = (torch.tensor(self.starts, device=device) + torch.tensor(self.pending, device=device)
                            )[:, None].add(ar[None, :]).flatten()
        ends = cached + lens_t  # every row's last key + 1
        #: keys the current blocks attend: up to the longest row's end (the cache returns at least these)
        self.k_end = int(ends.max())
        keys = torch.arange(self.k_end, device=device)
        self.current_mask = None
        if bool((ends != self.k_end).any()):
            self.current_mask = torch.zeros(self.n, 1, 1, self.k_end, dtype=dtype, device=device).masked_fill_(
                (keys[None, :] >= ends[:, None])[:, None, None, :], float("-inf"))
        # the pending parts: one call per row when packed, else one batched call (same pending count)
        self.pending_calls: list[tuple[Optional[int], int, int, Optional[torch.Tensor]]] = []
        if self.packed:
            for r, p in enumerate(self.pending):
                if p:
                    klen = self.cached[r] + p
                    self.pending_calls.append((r, self.starts[r], klen, self._pending_mask(p, [self.cached[r]], klen)))
        elif self.pending[0]:
            p = self.pending[0]
            klen = max(self.cached) + p
            self.pending_calls.append((None, 0, klen, self._pending_mask(p, self.cached, klen)))

    def _pending_mask(self, p: int, cached: list[int], klen: int) -> Optional[torch.Tensor]:
        """Additive mask of ``p`` pending tokens of rows with ``cached`` committed tokens over ``klen``
        keys (folded query axis); None when every query sees every key."""
        if p == self.B and all(c + p == klen for c in cached):
            return None
        device = self.device
        c = torch.tensor(cached, dtype=torch.long, device=device)
        t = torch.arange(p, device=device)
        bound = c[:, None] + (torch.div(t, self.B, rounding_mode="floor") + 1)[None, :] * self.B  # [rows, p]
        if p == self.B:  # one block: one bound per row
            bound = bound[:, :1]
        else:
            bound = bound.repeat(1, self.groups)
        keys = torch.arange(klen, device=device)
        return torch.zeros(len(cached), 1, bound.shape[1], klen, dtype=self.dtype, device=device).masked_fill_(
            (keys[None, None, :] >= bound[:, :, None])[:, None], float("-inf"))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, lq, ...]`` -> ``[1, T, ...]`` (the real tokens, row by row) when packed; else as is."""
        if not self.packed:
            return x
        return x.reshape(self.n * self.lq, *x.shape[2:]).index_select(0, self.index)[None]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        """``query``: ``[1, Hq, T, D]`` (packed) or ``[n, Hq, lq, D]``; ``key``/``value``
        ``[n, Hkv, K, D]`` with ``K >= k_end`` (the current blocks attend the first ``k_end``).
        Returns the output in the query's token layout, ``[.., L, Hq, D]``."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        _, hq, _, d = query.shape
        hkv, g, n, B = key.shape[1], self.groups, self.n, self.B
        if hq != hkv * g:
            raise ValueError(f"RaggedRows for {g} query heads per KV head, got {hq} / {hkv}")
        if self.packed:
            q = query[0].index_select(1, self.current).view(hq, n, B, d).transpose(0, 1)
        else:
            q = query[:, :, self.pending[0]:]
        o = sdpa(q.reshape(n, hkv, g * B, d), key[:, :, :self.k_end], value[:, :, :self.k_end],
                 attn_mask=self.current_mask, scale=scale)
        o = o.reshape(n, hq, B, -1).transpose(1, 2)  # [n, B, Hq, Dv] (reshape: CUDA kernels may return strided)
        dv = o.shape[-1]
        if self.packed:
            out = query.new_empty(1, query.shape[2], hq, dv)
            out[0].index_copy_(0, self.current, o.reshape(n * B, hq, dv))
        else:
            out = query.new_empty(n, self.lq, hq, dv)
            out[:, self.pending[0]:] = o
        for r, start, klen, mask in self.pending_calls:
            if r is None:  # every row, the same number of pending tokens
                p = self.pending[0]
                q = query[:, :, :p].reshape(n, hkv, g * p, d)
                o = sdpa(q, key[:, :, :klen], value[:, :, :klen], attn_mask=mask, scale=scale)
                out[:, :p] = o.reshape(n, hq, p, dv).transpose(1, 2)
            else:
                p = self.pending[r]
                q = query[:, :, start:start + p].reshape(1, hkv, g * p, d)
                o = sdpa(q, key[r:r + 1, :, :klen], value[r:r + 1, :, :klen], attn_mask=mask, scale=scale)
                out[0, start:start + p] = o.reshape(hq, p, dv).transpose(0, 1)
        return out


def sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (registered as ``dirl_sdpa``): torch SDPA on the grouped KV
    heads as they are (``enable_gqa``; transformers' own SDPA path copies K/V once per query head
    whenever a mask is given), with the boolean block-diffusion mask or a :class:`ChunkedMask`.
    ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, D]``; returns ``[B, Lq, Hq, D]``. With
    :class:`PackedRows` the query is ``[1, Hq, T, D]`` (rows laid end to end) and so is the output."""
    if isinstance(attention_mask, RaggedRows):
        return attention_mask.attend(query, key, value, scaling), None
    if isinstance(attention_mask, PackedRows):
        out, _ = sdpa_attention(module, attention_mask.unpack_heads(query), key, value, attention_mask.mask, dropout,
                                scaling, **kwargs)
        return attention_mask.pack(out), None
    if isinstance(attention_mask, (ChunkedMask, GroupedQueryMask)):
        if dropout and module.training:
            raise ValueError("attention dropout is not supported with chunked queries or folded query groups")
        out = attention_mask.attend(query, key, value, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> str:
    """Register :func:`sdpa_attention` with transformers (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(SDPA_IMPL, sdpa_attention)
        _registered = True
    return SDPA_IMPL
