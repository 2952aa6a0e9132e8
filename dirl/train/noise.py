"""Random-masking noise of the SFT objective (SPEC section 3).

For every sample (doc) of a packed row: one ``t ~ U[0, 1)``, mask probability
``p = eps + (1 - eps) * t``, and every labelled (response) token replaced by ``[M]`` independently
with probability ``p``. Prompt tokens and the row's tail padding are never masked. A sample with
labelled tokens but no masked one gets one of them forced to ``[M]`` (uniformly at random).

Randomness comes from a generator seeded by ``(seed, global row index)`` (:func:`row_seed`), so the
noise of a row does not depend on how a batch is split over micro-batches and ranks, nor on what ran
before a resume.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

DEFAULT_EPS = 1e-3


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``p = eps + (1 - eps) t``."""
    return eps + (1.0 - eps) * t


def row_seed(seed: int, global_row: int, salt: int = 0x5F7) -> int:
    """A 63-bit seed for the noise of one row, from the run seed and the row's global index."""
    return int(np.random.SeedSequence([int(seed), int(global_row), salt]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def sample_row_noise(labels: torch.Tensor, doc: torch.Tensor, generator: torch.Generator,
                     eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of one row. ``labels`` [L] bool, ``doc`` [L] int (0..D-1).

    Returns ``masked`` [L] bool (positions replaced by [M]) and ``p`` [L] float32 (the mask
    probability of each position's sample; 1 where a row position has no sample labels).
    """
    labels = labels.bool().cpu()
    doc = doc.long().cpu()
    L = labels.shape[0]
    n_docs = int(doc.max().item()) + 1 if L else 0
    t = torch.rand(n_docs, generator=generator)
    p_doc = mask_probability(t, eps)
    u = torch.rand(L, generator=generator)
    p_tok = p_doc[doc]
    masked = labels & (u < p_tok)
    # force one masked token in every sample with labels but no mask
    n_lab = torch.zeros(n_docs, dtype=torch.long).scatter_add_(0, doc, labels.long())
    n_mask = torch.zeros(n_docs, dtype=torch.long).scatter_add_(0, doc, masked.long())
    need = torch.nonzero((n_lab > 0) & (n_mask == 0)).flatten().tolist()
    if need:
        scores = torch.rand(L, generator=generator)
        for d in need:
            cand = torch.nonzero(labels & (doc == d)).flatten()
            masked[cand[int(torch.argmax(scores[cand]))]] = True
    p = torch.where(labels, p_tok, torch.ones_like(p_tok)).float()
    return masked, p


def sample_noise(labels: torch.Tensor, doc: torch.Tensor, seed: int, first_global_row: int,
                 eps: float = DEFAULT_EPS, global_rows: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of a ``[R, L]`` batch whose row r has global index ``first_global_row + r`` (or
    ``global_rows[r]``). Returns ``masked`` [R, L] bool and ``p`` [R, L] float32."""
    R = labels.shape[0]
    gl = global_rows if global_rows is not None else [first_global_row + r for r in range(R)]
    ms, ps = [], []
    for r in range(R):
        g = torch.Generator().manual_seed(row_seed(seed, gl[r]))
        m, p = sample_row_noise(labels[r], doc[r], g, eps)
        ms.append(m)
        ps.append(p)
    return torch.stack(ms), torch.stack(ps)


def apply_noise(input_ids: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``x_t``: ``input_ids`` with masked positions replaced by ``mask_token_id``."""
    return torch.where(masked.to(input_ids.device), torch.full_like(input_ids, mask_token_id), input_ids)
