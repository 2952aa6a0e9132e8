"""From recorded trajectories to step-level training targets (SPEC section 5).

A trajectory's step map says at which denoising step each response token was kept. For block j
with distinct steps S_j, the block's state at step s has ``[M]`` at every response position kept at
step s or later, and its tokens elsewhere (prompt positions always hold their tokens). The tokens
*scored* at that state are those kept at step s; their log-probability is
``log softmax(f(state, clean earlier blocks) / T)[token]``, exactly what the decoder sampled from.

Two layouts build forwards that yield all of those log-probabilities at once:

* ``packed`` (the default, the fast path): one document per response,
  ``[x_0 ; copy(b_1, s_1) ; copy(b_1, s_2) ; ... ]``: the clean text, then one noisy copy of a block
  per (block, step), each copy with its own ``grp``. A noisy copy sees the clean earlier blocks and
  itself, which is what the decoder saw with its KV cache.
* ``rounds`` (DiRL's): up to max_j |S_j| documents per response, document r = ``[x_t^(r) ; x_0]``
  where block j of ``x_t^(r)`` is its state at its r-th step (clean when it has fewer steps).

Both give the same numbers; ``packed`` processes roughly (1 + mean steps per block) * L tokens per
response against rounds' 2L per round. Documents are packed into rows (several responses side by
side as separate docs) and only the scored positions go through ``lm_head``.

Tokens after ``response_length`` stay in the context (their positions were present while the last
block was denoised) but are not scored unless ``score_after_eos`` is set; a copy with nothing to
score is left out entirely, since nothing else attends to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from dirl.model.attention import TokenMeta
from dirl.train.logprobs import token_logprobs

Layout = Literal["packed", "rounds"]
LAYOUTS = ("packed", "rounds")


class TrajectoryError(ValueError):
    """A trajectory that cannot be turned into training targets."""


# --------------------------------------------------------------------------------------------
# Documents: the tokens of one response's forward, before rows are formed
# --------------------------------------------------------------------------------------------


@dataclass
class Doc:
    """One attention document: parallel per-token lists, plus which of its tokens are scored."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    noisy: list[int] = field(default_factory=list)
    grp: list[int] = field(default_factory=list)
    scored_at: list[int] = field(default_factory=list)  # offsets into this doc
    scored_tok: list[int] = field(default_factory=list)  # index into the trajectory's token_ids
    scored_tgt: list[int] = field(default_factory=list)  # the token to score there
    traj: int = 0  # index of the trajectory in the caller's list

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids, pos, noisy: int, grp: int) -> int:
        start = len(self.ids)
        self.ids.extend(ids)
        self.pos.extend(pos)
        self.noisy.extend([noisy] * len(ids))
        self.grp.extend([grp] * len(ids))
        return start


@dataclass
class _Parsed:
    prompt: list[int]
    tokens: list[int]
    steps: list[int]
    scored: list[bool]  # per response token

    @property
    def P(self) -> int:
        return len(self.prompt)

    @property
    def x0(self) -> list[int]:
        return self.prompt + self.tokens


def parse_trajectory(traj: dict, score_after_eos: bool = False, index: int = 0) -> _Parsed:
    """Check a trajectory dict (docs/CONTRACTS.md) and return its parts; :class:`TrajectoryError`
    names the trajectory and the field on any problem."""
    rid = traj.get("request_id", index)
    where = f"trajectory {rid!r}"
    for key in ("prompt_ids", "token_ids", "step_map"):
        if key not in traj or traj[key] is None:
            hint = " (the rollout backend must return step maps for step-level log-probs)" if key == "step_map" else ""
            raise TrajectoryError(f"{where}: missing field '{key}'{hint}")
    for key in ("prompt_ids", "token_ids", "step_map"):
        v = traj[key]
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise TrajectoryError(f"{where}: '{key}' must be a list of integers")
    prompt = [int(t) for t in traj["prompt_ids"]]
    tokens = [int(t) for t in traj["token_ids"]]
    steps = [int(s) for s in traj["step_map"]]
    if len(steps) != len(tokens):
        raise TrajectoryError(f"{where}: step_map has {len(steps)} entries for {len(tokens)} token_ids")
    if any(s < 1 for s in steps):
        raise TrajectoryError(f"{where}: step_map values must be >= 1 (1-based steps)")
    n_resp = traj.get("response_length")
    n_resp = len(tokens) if n_resp is None else int(n_resp)
    if not 0 <= n_resp <= len(tokens):
        raise TrajectoryError(f"{where}: response_length {n_resp} outside [0, {len(tokens)}]")
    scored = [score_after_eos or k < n_resp for k in range(len(tokens))]
    return _Parsed(prompt, tokens, steps, scored)


def _blocks(p: _Parsed, block_size: int):
    """Yield (block index, lo, hi, [response token indices in the block], sorted distinct steps)."""
    S = p.P + len(p.tokens)
    if not p.tokens:
        return
    for j in range(p.P // block_size, (S - 1) // block_size + 1):
        lo, hi = j * block_size, min((j + 1) * block_size, S)
        ks = [i - p.P for i in range(max(lo, p.P), hi)]
        yield j, lo, hi, ks, sorted({p.steps[k] for k in ks})


def _state(p: _Parsed, x0: list[int], lo: int, hi: int, step: int, mask_id: int) -> list[int]:
    """Block [lo, hi) as the decoder saw it at ``step``: response tokens kept at ``step`` or later masked."""
    return [x0[i] if i < p.P or p.steps[i - p.P] < step else mask_id for i in range(lo, hi)]


def packed_doc(traj: dict, block_size: int, mask_id: int, score_after_eos: bool = False, index: int = 0) -> Optional[Doc]:
    """The packed document of one trajectory, or None when it has nothing to score."""
    p = parse_trajectory(traj, score_after_eos, index)
    x0 = p.x0
    copies = []  # (lo, hi, step, scored token indices)
    for j, lo, hi, ks, steps in _blocks(p, block_size):
        for s in steps:
            hit = [k for k in ks if p.steps[k] == s and p.scored[k]]
            if hit:
                copies.append((j, lo, hi, s, hit))
    if not copies:
        return None
    doc = Doc(traj=index)
    # Noisy copies of block j see clean blocks < j only: the clean text can stop there.
    clean_len = max(j for j, *_ in copies) * block_size
    doc.extend(x0[:clean_len], range(clean_len), noisy=0, grp=0)
    for g, (j, lo, hi, s, hit) in enumerate(copies, start=1):
        start = doc.extend(_state(p, x0, lo, hi, s, mask_id), range(lo, hi), noisy=1, grp=g)
        for k in hit:
            doc.scored_at.append(start + (p.P + k - lo))
            doc.scored_tok.append(k)
            doc.scored_tgt.append(p.tokens[k])
    return doc


def rounds_docs(traj: dict, block_size: int, mask_id: int, score_after_eos: bool = False, index: int = 0) -> list[Doc]:
    """DiRL's layout: document r = [x_t^(r) ; x_0], block j of x_t^(r) at its r-th step."""
    p = parse_trajectory(traj, score_after_eos, index)
    x0 = p.x0
    S = len(x0)
    blocks = list(_blocks(p, block_size))
    n_rounds = max((len(steps) for *_, steps in blocks), default=0)
    docs = []
    for r in range(n_rounds):
        noisy_half = list(x0)
        scored: list[tuple[int, int]] = []  # (position, token index)
        for j, lo, hi, ks, steps in blocks:
            if r >= len(steps):
                continue
            s = steps[r]
            noisy_half[lo:hi] = _state(p, x0, lo, hi, s, mask_id)
            scored += [(p.P + k, k) for k in ks if p.steps[k] == s and p.scored[k]]
        if not scored:
            continue
        doc = Doc(traj=index)
        # noisy half: grp = block index, so each block's copy sees itself and clean earlier blocks
        doc.ids += noisy_half
        doc.pos += list(range(S))
        doc.noisy += [1] * S
        doc.grp += [i // block_size for i in range(S)]
        doc.extend(x0, range(S), noisy=0, grp=0)
        doc.scored_at = [i for i, _ in scored]
        doc.scored_tok = [k for _, k in scored]
        doc.scored_tgt = [p.tokens[k] for _, k in scored]
        docs.append(doc)
    return docs


def build_docs(trajectories: Sequence[dict], block_size: int, mask_id: int, layout: Layout = "packed",
               score_after_eos: bool = False, indices: Optional[Sequence[int]] = None) -> list[Doc]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected packed or rounds)")
    indices = list(range(len(trajectories))) if indices is None else list(indices)
    docs: list[Doc] = []
    for i, t in zip(indices, trajectories):
        if layout == "packed":
            d = packed_doc(t, block_size, mask_id, score_after_eos, index=i)
            if d is not None:
                docs.append(d)
        else:
            docs += rounds_docs(t, block_size, mask_id, score_after_eos, index=i)
    return docs


# --------------------------------------------------------------------------------------------
# Rows: documents side by side, padded to one length
# --------------------------------------------------------------------------------------------


@dataclass
class ScoredBatch:
    """Model inputs for one forward and where its scored tokens are.

    ``rows``/``cols`` index the scored positions in ``input_ids``; ``targets`` are their tokens;
    ``traj``/``tok`` say which trajectory (caller's index) and which entry of its ``token_ids``.
    """

    input_ids: torch.Tensor
    meta: TokenMeta
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    traj: torch.Tensor
    tok: torch.Tensor
    num_tokens: int  # real tokens (padding excluded)

    @property
    def num_scored(self) -> int:
        return int(self.targets.numel())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> "ScoredBatch":
        mv = lambda t: t.to(device)  # noqa: E731
        return ScoredBatch(mv(self.input_ids), self.meta.to(device), mv(self.rows), mv(self.cols), mv(self.targets),
                           mv(self.traj), mv(self.tok), self.num_tokens)


def pack_rows(docs: Sequence[Doc], block_size: int, row_tokens: Optional[int] = 0, pad_id: int = 0,
              pad_to_multiple: int = 1) -> ScoredBatch:
    """Place documents into rows and pad them to one length.

    ``row_tokens``: 0 puts every document in one row; None gives each document its own row; a
    positive number fills rows greedily in order up to that many tokens (a longer document gets a
    row of its own; nothing is ever cut). Padding is a document of its own and is never scored.
    """
    rows: list[list[Doc]] = []
    if row_tokens is None:
        rows = [[d] for d in docs]
    elif row_tokens == 0:
        rows = [list(docs)] if docs else []
    else:
        cur: list[Doc] = []
        n = 0
        for d in docs:
            if cur and n + len(d) > row_tokens:
                rows.append(cur)
                cur, n = [], 0
            cur.append(d)
            n += len(d)
        if cur:
            rows.append(cur)
    if not rows:
        rows = [[]]
    width = max(max(sum(len(d) for d in r) for r in rows), 1)
    if pad_to_multiple > 1:
        width = -(-width // pad_to_multiple) * pad_to_multiple
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    pos = torch.zeros((R, width), dtype=torch.long)
    doc = torch.zeros((R, width), dtype=torch.long)
    noisy = torch.zeros((R, width), dtype=torch.long)
    grp = torch.zeros((R, width), dtype=torch.long)
    s_row, s_col, s_tgt, s_traj, s_tok = [], [], [], [], []
    real = 0
    for r, row in enumerate(rows):
        off = 0
        for d_i, d in enumerate(row):
            n = len(d)
            sl = slice(off, off + n)
            ids[r, sl] = torch.tensor(d.ids, dtype=torch.long)
            pos[r, sl] = torch.tensor(d.pos, dtype=torch.long)
            doc[r, sl] = d_i
            noisy[r, sl] = torch.tensor(d.noisy, dtype=torch.long)
            grp[r, sl] = torch.tensor(d.grp, dtype=torch.long)
            for a, k, t in zip(d.scored_at, d.scored_tok, d.scored_tgt):
                s_row.append(r)
                s_col.append(off + a)
                s_tgt.append(t)
                s_traj.append(d.traj)
                s_tok.append(k)
            off += n
        real += off
        if off < width:  # padding: its own doc, positions from 0 so RoPE stays in range
            doc[r, off:] = len(row)
            pos[r, off:] = torch.arange(width - off)
    meta = TokenMeta.make(pos, block_size, doc=doc, noisy=noisy, grp=grp)
    return ScoredBatch(ids, meta, torch.tensor(s_row, dtype=torch.long), torch.tensor(s_col, dtype=torch.long),
                       torch.tensor(s_tgt, dtype=torch.long), torch.tensor(s_traj, dtype=torch.long),
                       torch.tensor(s_tok, dtype=torch.long), real)


def build_batch(trajectories: Sequence[dict], block_size: int, mask_id: int, layout: Layout = "packed",
                score_after_eos: bool = False, row_tokens: Optional[int] | str = "auto", pad_id: int = 0,
                pad_to_multiple: int = 1, indices: Optional[Sequence[int]] = None) -> ScoredBatch:
    """Trajectories -> one :class:`ScoredBatch` in ``layout``.

    ``row_tokens="auto"``: packed puts all responses in one row (separate docs); rounds gives each
    [x_t ; x_0] document its own row, as DiRL does.
    """
    docs = build_docs(trajectories, block_size, mask_id, layout, score_after_eos, indices)
    if row_tokens == "auto":
        row_tokens = 0 if layout == "packed" else None
    return pack_rows(docs, block_size, row_tokens=row_tokens, pad_id=pad_id, pad_to_multiple=pad_to_multiple)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


class TrajectoryScorer(nn.Module):
    """The policy as the trainer calls it: a :class:`ScoredBatch` in, fp32 log-probs of the scored
    tokens out (and their entropies, detached, when asked).

    It is an ``nn.Module`` whose ``forward`` does the whole computation so that DDP/DeepSpeed wrappers
    see the forward they need for gradient synchronisation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: ScoredBatch, temperature: float = 1.0, chunk_size: int = 4096,
                with_entropy: bool = False):
        hidden = self.model.hidden_states(batch.input_ids, batch.meta)
        h = hidden[batch.rows, batch.cols]
        lp = token_logprobs(h, self.model.lm_head, batch.targets, temperature=temperature, chunk_size=chunk_size)
        if not with_entropy:
            return lp, None
        with torch.no_grad():
            _, ent = token_logprobs(h.detach(), self.model.lm_head, batch.targets, temperature=temperature,
                                    chunk_size=chunk_size, return_entropy=True)
        return lp, ent


def score_batch(model: nn.Module, batch: ScoredBatch, temperature: float = 1.0, chunk_size: int = 4096,
                with_entropy: bool = False):
    """Log-probs (fp32, ``[num_scored]``) of a batch under ``model`` (an SDARModel or a wrapper of a
    :class:`TrajectoryScorer`)."""
    scorer = model if isinstance(model, TrajectoryScorer) or not hasattr(model, "hidden_states") else TrajectoryScorer(model)
    return scorer(batch, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)


@torch.no_grad()
def trajectory_logprobs(model, trajectories: Sequence[dict], layout: Layout = "packed", temperature: float = 1.0,
                        score_after_eos: bool = False, batch_size: int = 8, chunk_size: int = 4096,
                        row_tokens: Optional[int] | str = "auto") -> list[list[Optional[float]]]:
    """Per trajectory, a list aligned with ``token_ids``: the trainer's log-prob of each scored token
    (None for unscored ones). Runs ``batch_size`` trajectories per forward."""
    bs, mid = model.block_size, model.mask_token_id
    device = model.device
    out: list[list[Optional[float]]] = [[None] * len(t["token_ids"]) for t in trajectories]
    for s in range(0, len(trajectories), batch_size):
        chunk = trajectories[s:s + batch_size]
        batch = build_batch(chunk, bs, mid, layout, score_after_eos, row_tokens=row_tokens,
                            indices=range(s, s + len(chunk)))
        if batch.num_scored == 0:
            continue
        lp, _ = score_batch(model, batch.to(device), temperature=temperature, chunk_size=chunk_size)
        for i, k, v in zip(batch.traj.tolist(), batch.tok.tolist(), lp.float().cpu().tolist()):
            out[i][k] = v
    return out


def layout_cost(trajectories: Sequence[dict], block_size: int, layout: Layout, score_after_eos: bool = False,
                row_tokens: Optional[int] | str = "auto") -> dict:
    """Token counts of a layout for these trajectories: real tokens, padded tokens, rows, scored."""
    b = build_batch(trajectories, block_size, 0, layout, score_after_eos, row_tokens=row_tokens)
    return {"tokens": b.num_tokens, "padded_tokens": b.padded_tokens, "rows": int(b.input_ids.shape[0]),
            "scored": b.num_scored}
