"""Random-masking noise of the SFT objective (SPEC section 3).

For every sample (doc) of a packed row: one ``t ~ U[0, 1)``, mask probability
``p = eps + (1 - eps) * t``, and every labelled (response) token replaced by ``[M]`` independently
with probability ``p``. Prompt tokens and the row's tail padding are never masked.

No token is ever forced to ``[M]``: a sample that drew no mask simply contributes no loss this time
(its labelled tokens still count in the normaliser). Forcing one token into such a sample, weighted
``1/p``, biases the estimator for short responses (a mean weight of 3.79 instead of 1 at 2 response
tokens). A *row* with labelled tokens but no masked one would make a forward with nothing to
score, so such a row is redrawn as a whole row (``t`` and the masks of every sample again, from the
same generator), as DiRL does. Redrawing conditions the noise on the event A = "the row has a
masked token"; to keep the estimator exactly unbiased the weight of every masked position is
``P(A) / p`` instead of ``1 / p``, with

    P(A) = 1 - prod_d (1 - eps)^{n_d} / (n_d + 1)

(``n_d`` = labelled tokens of sample d; ``∫_0^1 (1 - p(t))^n dt = (1 - eps)^n / (n + 1)``). Then
``E[sum over masked positions of P(A)/p] = E[sum masked/p | A] P(A) = E[sum masked/p] = n`` exactly,
the labelled count, for every response length. ``P(A)`` is 1 to float precision for any row with
more than a few dozen labelled tokens; it matters for rows holding one very short sample.
The returned ``p`` is the divisor of each masked position's cross-entropy: ``p / P(A)``.

Randomness comes from a generator seeded by ``(seed, global row index)`` (:func:`row_seed`), so the
noise of a row does not depend on how a batch is split over micro-batches and ranks, nor on what ran
before a resume.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

DEFAULT_EPS = 1e-3
MAX_REDRAWS = 10_000  # a row with labels draws a mask with probability >= 1/2: never reached


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``p = eps + (1 - eps) t``."""
    return eps + (1.0 - eps) * t


def row_seed(seed: int, global_row: int, salt: int = 0x5F7) -> int:
    """A 63-bit seed for the noise of one row, from the run seed and the row's global index."""
    return int(np.random.SeedSequence([int(seed), int(global_row), salt]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def prob_row_has_mask(labels: torch.Tensor, doc: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``P(A)`` of every row of ``labels``/``doc`` ``[R, L]``: the probability that one draw masks at
    least one labelled token (float64 ``[R]``; 0 for a row without labels)."""
    labels = labels.bool()
    doc = doc.long()
    R = labels.shape[0]
    if labels.numel() == 0:
        return torch.zeros(R, dtype=torch.float64)
    D = int(doc.max().item()) + 1
    n = torch.zeros(R, D, dtype=torch.float64).scatter_add_(1, doc, labels.double())
    # log P(no mask in sample d) = n_d log(1 - eps) - log(n_d + 1); samples without labels give 0
    log_keep = math.log1p(-eps) if eps < 1.0 else -math.inf  # eps = 1: every labelled token is masked
    per_sample = torch.where(n > 0, n * log_keep, torch.zeros_like(n)) - torch.log1p(n)
    log_none = per_sample.sum(dim=1)
    return -torch.expm1(log_none)


def draw_rows(labels: torch.Tensor, doc: torch.Tensor, generator: torch.Generator,
              eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of ``R`` rows from one generator (vectorised over rows). ``labels`` ``[R, L]`` bool,
    ``doc`` ``[R, L]`` int (0..D-1 in each row).

    Returns ``masked`` ``[R, L]`` bool and ``p`` ``[R, L]`` float32: the CE divisor ``p_d / P(A)`` of
    each labelled position's sample (1 where a position has no label). Every row with a labelled
    token has at least one masked token; samples inside it may have none.
    """
    labels = labels.bool().cpu()
    doc = doc.long().cpu()
    R, L = labels.shape
    D = int(doc.max().item()) + 1 if labels.numel() else 0
    t = torch.rand(R, D, generator=generator)
    u = torch.rand(R, L, generator=generator)
    p_tok = mask_probability(t, eps).gather(1, doc)
    masked = labels & (u < p_tok)
    has_labels = labels.any(dim=1)
    redo = (has_labels & ~masked.any(dim=1)).nonzero().flatten()
    for _ in range(MAX_REDRAWS):
        if redo.numel() == 0:
            break
        t2 = torch.rand(redo.numel(), D, generator=generator)
        u2 = torch.rand(redo.numel(), L, generator=generator)
        p2 = mask_probability(t2, eps).gather(1, doc[redo])
        m2 = labels[redo] & (u2 < p2)
        p_tok[redo] = p2
        masked[redo] = m2
        redo = redo[~m2.any(dim=1)]
    else:  # pragma: no cover - probability < 2**-10000
        raise RuntimeError("SFT noise: a row drew no masked token in every redraw")
    p_a = prob_row_has_mask(labels, doc, eps)
    p = torch.where(labels, (p_tok.double() / p_a.clamp_min(1e-300)[:, None]), torch.ones(R, L, dtype=torch.float64))
    return masked, p.float()


def sample_row_noise(labels: torch.Tensor, doc: torch.Tensor, generator: torch.Generator,
                     eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of one row. ``labels`` [L] bool, ``doc`` [L] int (0..D-1).

    Returns ``masked`` [L] bool (positions replaced by [M]) and ``p`` [L] float32 (the CE divisor of
    each position's sample, ``p_d / P(A)``; 1 where a row position has no sample labels).
    """
    m, p = draw_rows(labels.reshape(1, -1), doc.reshape(1, -1), generator, eps)
    return m[0], p[0]


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
