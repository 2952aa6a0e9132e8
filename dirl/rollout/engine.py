"""The reference rollout engine: batched block-diffusion decoding with a KV cache of committed blocks.

How one forward is laid out (every active sequence is one row of the batch):

    row r:  [ clean tokens to commit (c_r) | current block (B, noisy) | padding ]

* The clean part holds what must enter the KV cache before the current block: the whole prompt
  blocks on the sequence's first forward (the prefill), the block finished at the previous step
  (the commit forward), or nothing while a block is still being denoised. A commit is thus done in
  the same forward as the first denoising step of the next block; the attention rule makes this
  exactly the separate commit forward of SPEC section 4 item 5 (clean tokens never see noisy
  ones), one forward fewer per block.
* After the forward the cache keeps the clean part and forgets the noisy block, so a row's cache
  always holds exactly positions ``[0, block_start)`` of its sequence.
* Rows sit at different positions and commit at different steps. :class:`BlockKVCache` gives every
  row its own length: new keys are written at each row's own offset, and slots past a row's
  length are padding that nobody attends.
* Each row attends only its own keys (:class:`~dirl.model.attention.RaggedRows`, the default): in
  this layout the attention rule is one key bound per query, so the current blocks of all rows
  attend in one batched SDPA call (the query heads sharing a KV head folded into one batch of
  queries, a mask only for rows that end before the longest), and a row's clean part (a commit, or
  its prompt blocks) in a call of its own. No mask is built from per-token metadata, and rows of
  unequal lengths are laid end to end for the linear layers, so nothing is computed for padding.
  ``ragged_attention=False`` gives the general path instead: one batched call with the dense mask
  of the padded layout, built from per-token metadata (:class:`TokenMeta`; additive, built once per
  forward and shared by every layer: :class:`~dirl.model.attention.GroupedQueryMask`), rows packed
  for the linear layers only (``pack_rows``). Both give the same numbers (tested).

Rows that finish leave the batch at once and waiting requests take their place (continuous
batching), so one ``generate`` call may hold many more requests than ``max_batch_size``. On the
dense-mask path a forward pads every row to its longest clean part, and a row just admitted carries
its whole prompt: when that would pad the running rows by ``split_prefill_tokens`` (64) query tokens
or more, the new rows (the last rows of the cache) get a forward of their own in that step (ragged
rows pad nothing, so they never split). The numbers are the same either way, since each row attends
only its own keys (scripts/bench_rollout.py section 5).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Optional

import torch

from dirl.model.attention import RaggedRows, TokenMeta
from dirl.rollout.decoding import STRATEGIES, SamplingSettings, Sequence, denoise_step, sampling_params

PAD_DOC = -1


try:  # transformers >= 4.56 has per-layer cache objects
    from transformers.cache_utils import Cache as _HFCache, CacheLayerMixin as _HFLayer
except ImportError:  # pragma: no cover
    _HFCache, _HFLayer = object, object


class _BlockLayer(_HFLayer):
    """One decoder layer's preallocated keys/values ``[rows, kv_heads, capacity, head_dim]``; the
    per-row bookkeeping lives in the owning :class:`BlockKVCache`."""

    is_sliding = False

    def __init__(self, owner: "BlockKVCache"):
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.is_initialized = False
        # a weak reference: no cycle, so the cache's memory goes back the moment generate() drops it
        self.owner = weakref.proxy(owner)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def _ensure(self, key: torch.Tensor, rows: int) -> None:
        owner = self.owner
        need = owner._kv_len
        t = self.keys
        if t is not None and t.shape[0] >= rows and t.shape[2] >= need:
            return
        cap = max(need, owner.capacity, 64)
        if t is not None and t.shape[2] < need:
            cap = max(need, int(t.shape[2] * 1.5))
        cap = int(math.ceil(cap / 64) * 64)
        old_rows = t.shape[0] if t is not None else 0
        nrows = old_rows if rows <= old_rows else max(rows, min(2 * old_rows, owner.max_rows or rows))
        for name in ("keys", "values"):
            old = getattr(self, name)
            # zeros, not empty: stale slots are masked out, but must hold finite numbers
            new = key.new_zeros(nrows, key.shape[1], cap, key.shape[3])
            if old is not None:
                new[: old.shape[0], :, : old.shape[2]] = old
            setattr(self, name, new)
        owner.capacity = max(owner.capacity, cap)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        r0 = owner._r0
        n = owner._n if owner._packed is not None else key_states.shape[0]
        self._ensure(key_states, r0 + n)
        kb, vb = self.keys[r0:r0 + n], self.values[r0:r0 + n]  # views: the writes land in the cache
        if owner._packed is not None:  # [1, Hkv, T, D]: each real token to its row's slot
            rows, slots = owner._packed
            self.keys[rows, :, slots] = key_states[0].transpose(0, 1)
            self.values[rows, :, slots] = value_states[0].transpose(0, 1)
        elif owner._index is None:
            o = owner._offset
            kb[:, :, o:o + owner._lq] = key_states
            vb[:, :, o:o + owner._lq] = value_states
        else:
            idx = owner._index[:, None, :, None].expand(n, key_states.shape[1], owner._lq, key_states.shape[3])
            kb.scatter_(2, idx, key_states)
            vb.scatter_(2, idx, value_states)
        return kb[:, :, : owner._kv_len], vb[:, :, : owner._kv_len]

    def keep_rows(self, idx: torch.Tensor, n: int) -> None:
        for t in (self.keys, self.values):
            if t is not None:
                t[:n] = t[idx]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._kv_len or query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class BlockKVCache(_HFCache):
    """Per-row KV cache of committed blocks, a ``transformers.Cache`` (one layer object per
    decoder layer), handed to the decoder through its ``cache`` argument.

    The attention layers call ``update(key, value, layer_idx)``: it writes the forward's keys/values
    at every row's own offset (``lengths[r]``) and returns the keys of ``[0, max(lengths) + Lq)``.
    :meth:`prepare` must be called before each forward and :meth:`advance` after it. A forward may
    cover a window of consecutive rows (``prepare(lq, r0, n)``); the others are left as they are.
    Keys are preallocated (grown by 1.5x when needed) instead of concatenated every forward. The
    decoder gets the mask ready-made (per-token metadata), so it asks the cache for nothing else.
    """

    def __init__(self, num_layers: int, device: torch.device, max_rows: Optional[int] = None):
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.max_rows = max_rows
        layers = [_BlockLayer(self) for _ in range(num_layers)]
        if _HFCache is object:  # pragma: no cover
            self.layers = layers
        else:
            super().__init__(layers=layers)
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.capacity = 0
        self._lq = 0
        self._kv_len = 0
        self._r0, self._n = 0, 0  # the row window of the current forward
        self._offset: Optional[int] = None
        self._index: Optional[torch.Tensor] = None
        self._packed: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (row, slot) of each packed token

    # -- views (for inspection and tests) -------------------------------------------------------
    @property
    def keys(self) -> list[Optional[torch.Tensor]]:
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list[Optional[torch.Tensor]]:
        return [layer.values for layer in self.layers]

    # -- rows --------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def add_rows(self, n: int) -> None:
        self.lengths = torch.cat([self.lengths, torch.zeros(n, dtype=torch.long, device=self.device)])

    def keep_rows(self, index: list[int]) -> None:
        """Keep only the rows in ``index`` (in that order)."""
        idx = torch.tensor(index, dtype=torch.long, device=self.device)
        self.lengths = self.lengths[idx]
        n = len(index)
        if index == list(range(n)):
            return
        for layer in self.layers:
            layer.keep_rows(idx, n)

    def free(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.capacity = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    # -- one forward -------------------------------------------------------------------------
    def prepare(self, lq: int, r0: int = 0, n: Optional[int] = None, packed: Optional[torch.Tensor] = None) -> int:
        """Set up the writes of a forward of ``lq`` query tokens per row, of the rows
        ``[r0, r0 + n)`` (default: all); returns the key length. ``packed``: the real tokens of each
        row (the first ``packed[r]`` of its ``lq``), when the forward lays its rows end to end
        (:class:`~dirl.model.attention.PackedRows`): only those are written."""
        n = self.rows - r0 if n is None else n
        window = self.lengths[r0:r0 + n]
        lengths = window.tolist()
        self._r0, self._n = r0, n
        self._lq = lq
        self._kv_len = (max(lengths) if lengths else 0) + lq
        self._packed = None
        if packed is not None:
            rows = torch.repeat_interleave(torch.arange(r0, r0 + n, device=self.device), packed)
            starts = torch.cumsum(packed, 0) - packed
            cols = torch.arange(int(packed.sum()), device=self.device) - torch.repeat_interleave(starts, packed)
            self._packed = (rows, self.lengths[rows] + cols)
        if lengths and all(x == lengths[0] for x in lengths):
            self._offset, self._index = lengths[0], None
        else:
            self._offset = None
            self._index = window[:, None] + torch.arange(lq, device=self.device)[None, :]
        return self._kv_len

    def window_lengths(self) -> torch.Tensor:
        """The cached lengths of the rows of the current forward."""
        return self.lengths[self._r0:self._r0 + self._n]

    def advance(self, committed: torch.Tensor) -> None:
        """After a forward: each row of its window keeps ``committed[r]`` of its query tokens (its
        clean part)."""
        lengths = self.lengths.clone()
        lengths[self._r0:self._r0 + self._n] += committed.to(self.device)
        self.lengths = lengths

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max().item()) if self.rows else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)


class _Row:
    """An active sequence in the engine's batch."""

    __slots__ = ("seq", "index", "pending")

    def __init__(self, seq: Sequence, index: int):
        self.seq = seq
        self.index = index  # position of the request in the generate() call
        self.pending: list[int] = seq.prefill_ids()  # clean tokens to write at the next forward


class Engine:
    """Reference block-diffusion decoder with a KV cache (SPEC section 4), CPU or CUDA.

    ``generate(requests)`` takes :class:`~dirl.rollout.backend.GenerateRequest` objects (or
    anything with ``request_id``, ``input_ids`` and the sampling fields) and returns one trajectory
    dict per request, in order.
    """

    def __init__(
        self,
        model,
        tokenizer: Any = None,
        denoising_steps: int = 4,
        unmasking_strategy: str = "low_confidence_dynamic",
        confidence_threshold: float = 0.9,
        max_batch_size: int = 64,
        max_context: Optional[int] = None,
        split_prefill_tokens: int = 64,
        pack_rows: bool = True,
        ragged_attention: bool = True,
    ):
        if unmasking_strategy not in STRATEGIES:
            raise ValueError(f"unknown unmasking strategy {unmasking_strategy!r} (expected one of {', '.join(STRATEGIES)})")
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = int(model.block_size)
        self.mask_token_id = int(model.mask_token_id)
        self.denoising_steps = int(denoising_steps)
        self.unmasking_strategy = unmasking_strategy
        self.confidence_threshold = float(confidence_threshold)
        self.max_batch_size = int(max_batch_size)
        # Rows just admitted carry their whole prompt into their first forward; the others carry a
        # block at most. One forward pads every row to the longest, so when the padding the running
        # rows would get is at least this many tokens, the new rows get a forward of their own.
        self.split_prefill_tokens = int(split_prefill_tokens)
        # A row that commits a block carries 2B query tokens, the others B: the decoder's linear
        # layers then run on the real tokens only (on the dense-mask path attention still sees the
        # padded layout; ragged rows always pack).
        self.pack_rows = bool(pack_rows)
        # Each row attends only its own keys, its current block batched with the other rows' and its
        # clean part in a call of its own (RaggedRows): no mask built from metadata, no padding
        # computed anywhere (rows are then always packed, and never split). False: one batched call
        # with the dense mask of the padded layout (pack_rows decides the linear layers').
        self.ragged_attention = bool(ragged_attention)
        if max_context is None:
            max_context = getattr(model.config, "max_position_embeddings", None)
        self.max_context = max_context
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        # statistics since construction: model forwards, rows over all forwards, query tokens over all
        # forwards (padding included: what attention computes), tokens through the linear layers
        # (padding left out when rows are packed), tokens kept
        self.forwards = 0
        self.row_forwards = 0
        self.query_tokens = 0
        self.linear_tokens = 0
        self.tokens_kept = 0
        self.requests_cancelled = 0  # dropped mid-decode by generate's cancelled()

    # ------------------------------------------------------------------------------------------
    def free_cache(self) -> None:
        """The cache lives only inside ``generate``; this hands cached GPU memory back."""
        if torch.cuda.is_available() and self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def new_sequence(self, req) -> Sequence:
        settings = SamplingSettings(
            max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
            do_sample=req.do_sample, stop_token_ids=list(req.stop_token_ids), seed=req.seed,
            min_new_tokens=int(getattr(req, "min_new_tokens", 0)),
            banned_token_ids=list(getattr(req, "banned_token_ids", [])),
        )
        return Sequence(req.request_id, req.input_ids, settings, self.block_size, self.mask_token_id,
                        max_context=self.max_context)

    @torch.inference_mode()
    def generate(self, requests: Iterable, on_result: Optional[Callable[[int, dict], None]] = None,
                 more: Optional[Callable[[], list]] = None,
                 cancelled: Optional[Callable[[int], bool]] = None) -> list[dict]:
        """Decode every request; results in input order. ``on_result(i, trajectory)`` fires as each
        finishes (for progress bars). ``more()``, when given, is asked for requests that arrived since
        (a server's queue) whenever a row is free; they get the indices after the given ones and
        their results are appended. ``cancelled(i)``, asked before every forward, drops request
        ``i`` (a server's caller that went away): it is decoded no further and its result stays None."""
        seqs = [self.new_sequence(r) for r in requests]  # validates all before any work
        # OpenMP thread counts are per OS thread: called from a worker thread (the server's), torch
        # would use every core whatever torch.set_num_threads said, and tiny forwards crawl on a
        # busy machine. Re-applying the process setting here makes it hold in this thread too.
        torch.set_num_threads(torch.get_num_threads())
        waiting = deque(range(len(seqs)))
        results: list[Optional[dict]] = [None] * len(seqs)
        device = self.model.device
        B = self.block_size
        cache = BlockKVCache(self.model.config.num_hidden_layers, device, max_rows=self.max_batch_size)
        rows: list[_Row] = []
        block_ids = torch.zeros(0, B, dtype=torch.long, device=device)
        masked = torch.zeros(0, B, dtype=torch.bool, device=device)
        steps = torch.zeros(0, B, dtype=torch.long, device=device)
        logps = torch.zeros(0, B, dtype=torch.float32, device=device)
        params = None  # per-row sampling tensors, rebuilt when the rows change
        while True:
            if more is not None and len(rows) + len(waiting) < self.max_batch_size:
                for r in more():
                    seqs.append(self.new_sequence(r))
                    results.append(None)
                    waiting.append(len(seqs) - 1)
            if cancelled is not None:
                dropped = {i for i in waiting if cancelled(i)}
                if dropped:
                    waiting = deque(i for i in waiting if i not in dropped)
                gone = {k for k, r in enumerate(rows) if cancelled(r.index)}
                if gone:
                    live = [k for k in range(len(rows)) if k not in gone]
                    params = None
                    rows = [rows[k] for k in live]
                    cache.keep_rows(live)
                    li = torch.tensor(live, dtype=torch.long, device=device)
                    block_ids, masked, steps, logps = block_ids[li], masked[li], steps[li], logps[li]
                self.requests_cancelled += len(dropped) + len(gone)
            if not (waiting or rows):
                break
            # admit waiting requests into free rows
            new = []
            while waiting and len(rows) + len(new) < self.max_batch_size:
                i = waiting.popleft()
                new.append(_Row(seqs[i], i))
            if new:
                params = None
                rows += new
                cache.add_rows(len(new))
                nb = torch.tensor([r.seq.first_block() for r in new], dtype=torch.long, device=device)
                nm = torch.tensor([[j >= r.seq.prompt_in_block() for j in range(B)] for r in new],
                                  dtype=torch.bool, device=device)
                block_ids = torch.cat([block_ids, nb])
                masked = torch.cat([masked, nm])
                steps = torch.cat([steps, torch.zeros_like(nb)])
                logps = torch.cat([logps, torch.zeros(len(new), B, dtype=torch.float32, device=device)])

            seqs_now = [r.seq for r in rows]
            if params is None:
                params = sampling_params(seqs_now, device)
            logits = self._forward_rows(rows, block_ids, cache, len(new))
            keep, tokens, lps, step = denoise_step(
                logits, block_ids, masked, seqs_now, self.unmasking_strategy,
                self.confidence_threshold, self.denoising_steps, params,
            )
            block_ids = torch.where(keep, tokens, block_ids)
            steps = torch.where(keep, step[:, None], steps)
            logps = torch.where(keep, lps, logps)
            masked = masked & ~keep
            self.tokens_kept += int(keep.sum())

            finished_block = (~masked.any(dim=1)).tolist()
            if not any(finished_block):
                continue
            live = []
            ids_l, steps_l, lps_l = block_ids.tolist(), steps.tolist(), logps.tolist()
            for k, (row, fin) in enumerate(zip(rows, finished_block)):
                if not fin:
                    live.append(k)
                    continue
                if row.seq.finish_block(ids_l[k], steps_l[k], lps_l[k]):
                    results[row.index] = res = row.seq.result(self.tokenizer)
                    if on_result is not None:
                        on_result(row.index, res)
                    continue
                row.pending = ids_l[k]  # commit it with the next block's first step
                block_ids[k] = self.mask_token_id
                masked[k] = True
                steps[k] = 0
                logps[k] = 0.0
                live.append(k)
            if len(live) < len(rows):
                params = None
                rows = [rows[k] for k in live]
                cache.keep_rows(live)
                li = torch.tensor(live, dtype=torch.long, device=device)
                block_ids, masked, steps, logps = block_ids[li], masked[li], steps[li], logps[li]
        cache.free()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------
    def _forward_rows(self, rows: list[_Row], block_ids: torch.Tensor, cache: BlockKVCache, new: int) -> torch.Tensor:
        """Logits of every row's current block: one forward, or two when the ``new`` rows (the last
        ones, just admitted with their prompts) would pad the running rows by at least
        ``split_prefill_tokens`` query tokens. Same numbers either way (each row attends only its own
        keys)."""
        k = len(rows) - new
        if new and k and not self.ragged_attention:
            old_c = max(len(r.pending) for r in rows[:k])
            new_c = max(len(r.pending) for r in rows[k:])
            if k * (new_c - old_c) >= self.split_prefill_tokens:
                return torch.cat([self._forward(rows[:k], block_ids[:k], cache, 0),
                                  self._forward(rows[k:], block_ids[k:], cache, k)])
        return self._forward(rows, block_ids, cache, 0)

    def _forward(self, rows: list[_Row], block_ids: torch.Tensor, cache: BlockKVCache, r0: int) -> torch.Tensor:
        """One forward of the clean part + current block of the rows ``[r0, r0 + len(rows))``; logits
        ``[N, B, V]`` (fp32) of their current blocks. The clean parts stay in the cache."""
        device = block_ids.device
        B = self.block_size
        n = len(rows)
        pend = [len(r.pending) for r in rows]
        c = max(pend)
        lq = c + B
        starts = torch.tensor([r.seq.block_start for r in rows], dtype=torch.long, device=device)
        ar = torch.arange(B, device=device)
        if c == 0:
            input_ids = block_ids
            pos = starts[:, None] + ar[None, :]
            doc = torch.zeros_like(pos)
            noisy = torch.ones_like(pos)
            offsets = torch.zeros(n, dtype=torch.long, device=device)
        else:
            pad = self.pad_token_id
            ids_rows, pos_rows, doc_rows, noisy_rows = [], [], [], []
            for r, p in zip(rows, pend):
                s = r.seq.block_start
                fill = lq - p - B
                ids_rows.append(r.pending + [0] * B + [pad] * fill)
                pos_rows.append(list(range(s - p, s + B)) + [0] * fill)
                doc_rows.append([0] * (p + B) + [PAD_DOC] * fill)
                noisy_rows.append([0] * p + [1] * B + [0] * fill)
            input_ids = torch.tensor(ids_rows, dtype=torch.long, device=device)
            offsets = torch.tensor(pend, dtype=torch.long, device=device)
            cols = offsets[:, None] + ar[None, :]
            input_ids.scatter_(1, cols, block_ids)
            pos = torch.tensor(pos_rows, dtype=torch.long, device=device)
            doc = torch.tensor(doc_rows, dtype=torch.long, device=device)
            noisy = torch.tensor(noisy_rows, dtype=torch.long, device=device)
        blk = torch.div(pos, B, rounding_mode="floor")
        q_meta = TokenMeta(doc=doc, pos=pos, blk=blk, noisy=noisy, grp=blk * noisy)
        # rows of unequal length (some commit a block, others do not): the decoder's linear layers
        # run on the real tokens only, laid end to end (the dense-mask path pads them back for its mask)
        lens = offsets + B
        pack = self.pack_rows or self.ragged_attention
        packed = lens if pack and c > 0 and int(lens.min()) < lq else None
        kv_len = cache.prepare(lq, r0, n, packed=packed)
        if self.ragged_attention:
            ragged = RaggedRows(pend, cache.window_lengths(), B, self.model.query_groups, self.model.dtype)
            hidden = self.model.hidden_states(input_ids, q_meta, cache=cache, backend="sdpa", ragged=ragged)
        else:
            k_meta = self._key_meta(q_meta, cache.window_lengths(), kv_len)
            hidden = self.model.hidden_states(input_ids, q_meta, k_meta=k_meta, cache=cache, backend="sdpa",
                                              fold_query_heads=True, packed=packed)
        cache.advance(offsets)
        for r in rows:
            r.pending = []
        if packed is not None:
            first = torch.cumsum(lens, 0) - lens + offsets  # each row's current block in the packed row
            hidden = hidden[0].index_select(0, (first[:, None] + ar[None, :]).flatten()).view(n, B, -1)
        elif c > 0:
            idx = (offsets[:, None] + ar[None, :])[:, :, None].expand(n, B, hidden.shape[-1])
            hidden = hidden.gather(1, idx)
        self.query_tokens += int(lens.sum()) if self.ragged_attention else n * lq
        self.linear_tokens += int(lens.sum()) if packed is not None else n * lq
        self.forwards += 1
        self.row_forwards += n
        return self.model.lm_head(hidden).float()

    def _key_meta(self, q: TokenMeta, lengths: torch.Tensor, kv_len: int) -> TokenMeta:
        """Metadata of the keys ``[0, kv_len)`` of every row: cached clean tokens at their own
        positions, then this forward's tokens, then padding."""
        device = q.pos.device
        n, lq = q.pos.shape
        slot = torch.arange(kv_len, device=device)[None, :].expand(n, kv_len)
        rel = slot - lengths[:, None]
        cached = rel < 0
        current = (rel >= 0) & (rel < lq)
        gi = rel.clamp(0, lq - 1)

        def field(name: str, cached_value: torch.Tensor, pad_value: int) -> torch.Tensor:
            qv = getattr(q, name).gather(1, gi)
            return torch.where(cached, cached_value, torch.where(current, qv, torch.full_like(qv, pad_value)))

        zero = torch.zeros_like(slot)
        pos = field("pos", slot, 0)
        return TokenMeta(
            doc=field("doc", zero, PAD_DOC),
            pos=pos,
            blk=torch.div(pos, self.block_size, rounding_mode="floor"),
            noisy=field("noisy", zero, 0),
            grp=field("grp", zero, 0),
        )
