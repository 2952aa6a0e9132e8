"""A training forward in two parts: the clean text once, then the noisy copies in groups.

In the training layouts (SFT's ``[x_t ; x_0]``, the RL scorer's packed layout) a noisy token
attends the clean tokens of earlier blocks and the tokens of its own copy, and no clean token
attends a noisy one (:func:`dirl.model.attention.allowed`). So the forward can run

1. the clean tokens of a row on their own, recording every layer's keys and values, then
2. the noisy tokens, a group of whole copies at a time, each group's queries attending the recorded
   clean keys/values followed by the group's own,

with the numbers of the single forward (same keys, same weights; only the order of floating-point
sums may differ). Under autograd each noisy group runs under activation checkpointing: its layers'
activations are dropped after its forward and recomputed in the backward pass, one group at a
time, while the clean part keeps its activations (they carry the gradient of the keys and values
every group read). Peak memory holds the clean tokens' activations plus one group's, instead of
every token's: at 8k generated tokens the packed layout has ~2.6 noisy tokens per clean one.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from dirl.model.attention import TokenMeta, build_mask

try:  # transformers >= 4.56 has per-layer cache objects
    from transformers.cache_utils import Cache as _HFCache, CacheLayerMixin as _HFLayer
except ImportError:  # pragma: no cover
    _HFCache, _HFLayer = object, object

#: noisy tokens per group (whole copies; a copy longer than this is a group of its own)
DEFAULT_GROUP_TOKENS = 1024
#: auto mode: a forward under autograd on the SDPA path is split when the activations it would keep
#: for the backward pass are estimated above this (short forwards stay in one piece: the split costs
#: a second forward of the noisy tokens)
DEFAULT_SPLIT_MIN_BYTES = 1 << 30


def saved_activation_bytes(config, tokens: int, element_size: int = 4) -> int:
    """Rough size of what a Qwen3 decoder keeps for the backward pass of ``tokens`` tokens: about ten
    hidden-sized and four intermediate-sized tensors per token and layer (norms, projections, RoPE,
    the MLP's gate/up/product)."""
    per_layer = 10 * int(config.hidden_size) + 4 * int(config.intermediate_size)
    return int(tokens) * per_layer * int(config.num_hidden_layers) * int(element_size)


class _PrefixLayer(_HFLayer):
    is_sliding = False

    def __init__(self, owner: "_PrefixKV", idx: int):
        self.owner = owner
        self.idx = idx
        self.keys = self.values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.idx)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.owner.prefix_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.prefix_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class _PrefixKV(_HFCache):
    """Records each layer's keys/values in its first forward (``recording``), then hands them,
    followed by the new ones, to every later forward. Nothing is written after recording."""

    def __init__(self, num_layers: int):
        layers = [_PrefixLayer(self, i) for i in range(num_layers)]
        if _HFCache is object:  # pragma: no cover
            self.layers = layers
        else:
            super().__init__(layers=layers)
        self.k: list[Optional[torch.Tensor]] = [None] * num_layers
        self.v: list[Optional[torch.Tensor]] = [None] * num_layers
        self.recording = True
        self.prefix_len = 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.k[layer_idx], self.v[layer_idx] = key_states, value_states
            return key_states, value_states
        return (torch.cat([self.k[layer_idx], key_states], dim=2),
                torch.cat([self.v[layer_idx], value_states], dim=2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        return self.prefix_len + query_length, 0


def noisy_groups(meta: TokenMeta, idx: torch.Tensor, group_tokens: int) -> list[torch.Tensor]:
    """``idx`` (positions of one row's noisy tokens, in order) cut into groups of whole copies (a copy
    is a run of equal ``(doc, grp)``) of at most ``group_tokens`` tokens where possible."""
    if idx.numel() == 0:
        return []
    doc, grp = meta.doc[0, idx], meta.grp[0, idx]
    change = ((doc[1:] != doc[:-1]) | (grp[1:] != grp[:-1])).nonzero().flatten() + 1
    cuts = [0] + change.tolist() + [int(idx.numel())]
    out, a = [], 0
    for prev, p in zip(cuts[:-1], cuts[1:]):
        if p - a > group_tokens and prev > a:  # the copy ending at p would overflow: cut before it
            out.append(idx[a:prev])
            a = prev
    out.append(idx[a:])
    return out


def split_hidden_states(hf_model, input_ids: torch.Tensor, meta: TokenMeta, query_chunk: Optional[int] = None,
                        group_tokens: Optional[int] = None, cache_kwarg: str = "cache") -> torch.Tensor:
    """Final hidden states ``[R, W, H]`` of a training forward (no KV cache), computed as the module
    docstring says. ``hf_model``: the Qwen3 decoder (``Qwen3ForCausalLM.model``) set to the SDPA
    attention function. ``meta``: ``[R, W]`` metadata of the layout. ``group_tokens``: noisy tokens
    per group (None: :data:`DEFAULT_GROUP_TOKENS`)."""
    group_tokens = DEFAULT_GROUP_TOKENS if group_tokens is None else max(1, int(group_tokens))
    rows = []
    grad = torch.is_grad_enabled()
    n_layers = int(hf_model.config.num_hidden_layers)

    def run(ids, q_meta, k_meta, cache):
        mask = build_mask(q_meta, k_meta, backend="sdpa", query_chunk=query_chunk)
        out = hf_model(input_ids=ids, attention_mask={"full_attention": mask, "sliding_attention": mask},
                       position_ids=q_meta.pos, use_cache=False, **{cache_kwarg: cache})
        return out.last_hidden_state

    for r in range(int(input_ids.shape[0])):
        ids_r = input_ids[r:r + 1]
        meta_r = meta.select((slice(r, r + 1), slice(None)))
        noisy = meta_r.noisy[0] != 0
        cidx, nidx = (~noisy).nonzero().flatten(), noisy.nonzero().flatten()
        if nidx.numel() == 0 or cidx.numel() == 0:
            rows.append(run(ids_r, meta_r, meta_r, None))
            continue
        cache = _PrefixKV(n_layers)
        c_meta = meta_r.select((slice(None), cidx))
        parts = [run(ids_r[:, cidx], c_meta, c_meta, cache)]
        cache.recording = False
        cache.prefix_len = int(cidx.numel())
        order = [cidx]
        for g in noisy_groups(meta_r, nidx, group_tokens):
            g_meta = meta_r.select((slice(None), g))
            k_meta = TokenMeta.cat([c_meta, g_meta])
            if grad:
                h = checkpoint(run, ids_r[:, g], g_meta, k_meta, cache, use_reentrant=False)
            else:
                h = run(ids_r[:, g], g_meta, k_meta, cache)
            parts.append(h)
            order.append(g)
        inv = torch.argsort(torch.cat(order))
        rows.append(torch.cat(parts, dim=1)[:, inv])
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
