"""SFT data: tokenise with the chat template, pad each sample to whole blocks, pack into rows.

One sample = ``prompt ⊕ response``: the prompt is the chat-templated conversation up to and including
the assistant header (no loss), the response is the assistant's text followed by ``<|im_end|>\\n``.
A templated row (DiRL's format, :mod:`dirl.data.formats`) is tokenised exactly as written: its
prompt text as the prompt, its response text (already ending with ``<|im_end|>`` / ``<|endoftext|>``)
as the response.
Blocks are aligned to position 0 of the sample (SPEC section 2), so the sample is padded at the end
with the pad token until its length is a multiple of the block size; those pad tokens belong to the
response and **are** targets (the model learns to fill its last block).

Samples are packed into rows of exactly ``row_len`` tokens (best-fit decreasing, deterministic).
Inside a row every sample is its own ``doc`` with positions restarting at 0; the unused tail of a
row is one more doc of pad tokens that takes no loss. A sample longer than ``row_len`` is dropped and
counted, never truncated.

Rows are materialised lazily from one flat token array, so a large corpus costs 4 bytes a token.
:class:`RowStream` turns the packed rows into a seeded, resumable, epoch-by-epoch order that depends
only on ``(seed, global row index)``: the same rows reach the same optimizer step whatever the
number of ranks or micro-batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from dirl.data.chat import end_of_turn_text, render_prompt
from dirl.data.formats import SFTExample


@dataclass
class TokenizedSample:
    input_ids: list[int]
    n_prompt: int  # positions [0, n_prompt) are prompt (no loss); the rest are labelled targets

    @property
    def n_labelled(self) -> int:
        return len(self.input_ids) - self.n_prompt


def pad_to_block(ids: list[int], block_size: int, pad_id: int) -> list[int]:
    """``ids`` followed by pad tokens up to the next multiple of ``block_size``."""
    rem = (-len(ids)) % block_size
    return ids + [pad_id] * rem


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[SFTExample],
    block_size: int,
    pad_id: Optional[int] = None,
    batch: int = 1024,
) -> list[TokenizedSample]:
    """Chat-template and tokenise every example (batched through the fast tokenizer)."""
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set one (Qwen: <|endoftext|>)")
    eot = end_of_turn_text(tokenizer)
    out: list[TokenizedSample] = []
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        # a templated row (DiRL's format) is used verbatim: its prompt is already chat-templated
        # text and its response already ends with <|im_end|> / <|endoftext|>
        prompts = [ex.prompt_text if ex.templated else render_prompt(tokenizer, ex.prompt) for ex in chunk]
        responses = [ex.response if ex.templated else ex.response + eot for ex in chunk]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        for p, r in zip(p_ids, r_ids):
            ids = pad_to_block(list(p) + list(r), block_size, pad)
            out.append(TokenizedSample(input_ids=ids, n_prompt=len(p)))
    return out


def tokenize_example(tokenizer: Any, example: SFTExample, block_size: int, pad_id: Optional[int] = None) -> TokenizedSample:
    return tokenize_examples(tokenizer, [example], block_size, pad_id)[0]


@dataclass
class PackStats:
    n_samples: int  # samples kept
    n_dropped: int  # samples longer than a row
    n_rows: int
    row_len: int
    n_tokens: int  # non-pad-tail tokens (sample tokens, block pads included)
    n_labelled: int

    @property
    def efficiency(self) -> float:
        """Fraction of row tokens that belong to a sample (not the row's tail padding)."""
        return self.n_tokens / max(1, self.n_rows * self.row_len)

    def as_dict(self) -> dict:
        return {"samples": self.n_samples, "dropped_too_long": self.n_dropped, "rows": self.n_rows,
                "row_len": self.row_len, "tokens": self.n_tokens, "labelled_tokens": self.n_labelled,
                "packing_efficiency": round(self.efficiency, 4)}


def pack_lengths(lengths: Sequence[int], row_len: int) -> tuple[list[list[int]], list[int]]:
    """Best-fit-decreasing bin packing of sample lengths into rows of ``row_len``.

    Returns (rows as lists of sample indices, indices dropped because longer than a row).
    Deterministic: ties are broken by sample index, rows are numbered in creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    dropped = [i for i in order if lengths[i] > row_len]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        if n > row_len or n <= 0:
            continue
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            cap, r = free.pop(j)
            rows[r].append(i)
            cap -= n
        else:
            r = len(rows)
            rows.append([i])
            cap = row_len - n
        if cap > 0:
            bisect.insort(free, (cap, r))
    for r in rows:
        r.sort()  # keep data order inside a row
    return rows, sorted(dropped)


class PackedSFTData:
    """Packed rows over a flat token store. ``rows(indices)`` gives ``[R, row_len]`` tensors:

    ``input_ids`` (long), ``pos`` (long, restarting at 0 per doc), ``doc`` (long, 0.. per row; the
    tail padding is the last doc), ``labels`` (bool, the labelled response tokens).
    """

    def __init__(self, samples: Sequence[TokenizedSample], row_len: int, pad_id: int):
        if row_len <= 0:
            raise ValueError(f"row length must be > 0, got {row_len}")
        self.row_len = int(row_len)
        self.pad_id = int(pad_id)
        lengths = [len(s.input_ids) for s in samples]
        rows, dropped = pack_lengths(lengths, row_len)
        keep = sorted(i for r in rows for i in r)
        new_index = {old: new for new, old in enumerate(keep)}
        self.offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([lengths[i] for i in keep])
        self.tokens = np.empty(int(self.offsets[-1]), dtype=np.int32)
        for new, old in enumerate(keep):
            self.tokens[self.offsets[new]:self.offsets[new + 1]] = samples[old].input_ids
        self.n_prompt = np.array([samples[i].n_prompt for i in keep], dtype=np.int32)
        self._rows = [np.array([new_index[i] for i in r], dtype=np.int64) for r in rows]
        n_tok = int(self.offsets[-1])
        self.stats = PackStats(
            n_samples=len(keep), n_dropped=len(dropped), n_rows=len(rows), row_len=self.row_len,
            n_tokens=n_tok, n_labelled=n_tok - int(self.n_prompt.sum()),
        )
        self.dropped = dropped  # indices into the input samples

    def __len__(self) -> int:
        return len(self._rows)

    def row_samples(self, r: int) -> np.ndarray:
        return self._rows[r]

    def row(self, r: int) -> dict[str, torch.Tensor]:
        L = self.row_len
        ids = np.full(L, self.pad_id, dtype=np.int64)
        pos = np.zeros(L, dtype=np.int64)
        doc = np.zeros(L, dtype=np.int64)
        lab = np.zeros(L, dtype=bool)
        at = 0
        d = 0
        for d, s in enumerate(self._rows[r]):
            a, b = self.offsets[s], self.offsets[s + 1]
            n = int(b - a)
            ids[at:at + n] = self.tokens[a:b]
            pos[at:at + n] = np.arange(n)
            doc[at:at + n] = d
            lab[at + int(self.n_prompt[s]):at + n] = True
            at += n
        if at < L:  # tail padding: a doc of its own, no loss
            pos[at:] = np.arange(L - at)
            doc[at:] = d + 1
        return {"input_ids": torch.from_numpy(ids), "pos": torch.from_numpy(pos),
                "doc": torch.from_numpy(doc), "labels": torch.from_numpy(lab)}

    def rows(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        items = [self.row(int(i)) for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class RowStream:
    """An endless, seeded order over ``n_rows`` rows: epoch e is a permutation drawn from (seed, e).

    Global row index g (0, 1, 2, ...) maps to row ``perm(g // n_rows)[g % n_rows]``; the data cursor of
    a run is just the next g, so resuming needs one integer.
    """

    def __init__(self, n_rows: int, seed: int = 0, shuffle: bool = True):
        if n_rows <= 0:
            raise ValueError("no rows to train on (every sample was dropped or the data is empty)")
        self.n_rows = int(n_rows)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: Optional[np.ndarray] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            else:
                self._perm = np.arange(self.n_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def row_at(self, g: int) -> int:
        return int(self._permutation(g // self.n_rows)[g % self.n_rows])

    def rows_at(self, start: int, count: int) -> list[int]:
        return [self.row_at(g) for g in range(start, start + count)]

    def epoch_of(self, g: int) -> float:
        return g / self.n_rows


def rank_row_slice(first_row: int, global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """Global row indices ``[start, start + count)`` that ``rank`` trains on in an optimizer step whose
    ``global_batch`` rows start at global row index ``first_row`` (the data cursor)."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by the {world} ranks")
    per_rank = global_batch // world
    return first_row + rank * per_rank, per_rank


def build_sft_rows(tokenizer: Any, examples: Sequence[SFTExample], block_size: int, row_len: int,
                   pad_id: Optional[int] = None) -> PackedSFTData:
    """Tokenise, block-pad and pack in one call."""
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    samples = tokenize_examples(tokenizer, examples, block_size, pad)
    return PackedSFTData(samples, row_len, pad)
