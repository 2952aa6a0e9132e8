"""Block-diffusion decoding rules (SPEC section 4), shared by the reference engine and the naive oracle.

Everything that decides *which* token is produced lives here, so the cached engine
(:mod:`dirl.rollout.engine`) and the no-cache decoder (:mod:`dirl.rollout.naive`) cannot disagree:

* :func:`sample_tokens`: one draw per still-masked position: logits / T, top-k, top-p, then an
  inverse-CDF draw from a caller-supplied uniform (greedy = argmax). Returns the token and its
  log-probability ``log softmax(logits / T)[token]``, unfiltered; the confidence is its ``exp``,
  i.e. taken before top-k/top-p filtering.
* :func:`tokens_to_keep`: the three unmasking strategies.
* :class:`Sequence`: one request's bookkeeping: the prompt/block partition, the per-request random
  stream, the step counter, the stop rules and the output trajectory.

Decisions where the spec is silent:

* ``temperature == 0`` means greedy; log-probs and confidences then use T = 1.
* Sampling draws B uniforms from the request's own generator at every denoising step (greedy
  requests draw none), and inverts the CDF of the filtered distribution over tokens sorted by
  decreasing probability (ties: lower token id first). A seeded request therefore never depends on
  the other requests of its batch.
* Ties in confidence go to the leftmost position.
* ``banned_token_ids`` and ``min_new_tokens`` (evaluation settings, e.g. DiRL's eval script) set
  logits to -inf before anything else (:func:`suppress_tokens`): banned ids everywhere, stop ids at
  every position of a block that starts while fewer than ``min_new_tokens`` response tokens are
  finished. So no stop token can end a response inside its first ``min_new_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


def is_greedy(do_sample: bool, temperature: float, top_k: int) -> bool:
    """Argmax decoding: sampling off, top_k == 1, or temperature == 0."""
    return (not do_sample) or top_k == 1 or temperature == 0


def effective_temperature(temperature: float) -> float:
    """The T that divides the logits for log-probs and confidences (1 for temperature 0)."""
    return float(temperature) if temperature > 0 else 1.0


def tokens_per_step(block_size: int, denoising_steps: int) -> int:
    """How many tokens the static and sequential strategies keep per step."""
    return max(1, block_size // max(1, denoising_steps))


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits [R, V]``.

    ``temperature``/``top_p`` float ``[R]`` (temperature already made positive, see
    :func:`effective_temperature`), ``top_k`` long ``[R]`` (<= 0: off), ``greedy`` bool ``[R]``,
    ``uniforms`` float ``[R]`` in [0, 1) (ignored for greedy rows).
    Returns ``(tokens [R] long, logprobs [R] float32)`` with
    ``logprobs = log softmax(logits / T)[token]`` (unfiltered, fp32).
    """
    logits = logits.float()
    R, V = logits.shape
    if R == 0:
        return logits.new_zeros(0, dtype=torch.long), logits.new_zeros(0)
    scaled = logits / temperature.float().unsqueeze(1)
    tokens = logits.argmax(dim=-1)  # first maximal index on ties
    sampled = ~greedy
    if bool(sampled.any()):
        rows = sampled.nonzero().squeeze(1)
        tokens = tokens.clone()
        tokens[rows] = _draw(scaled[rows], top_k[rows], top_p[rows], uniforms[rows].float())
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def _draw(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from the top-k / top-p filtered softmax of ``scaled [R, V]``."""
    V = scaled.shape[1]
    vals, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=scaled.device).unsqueeze(0)
    k = top_k.long().unsqueeze(1)
    vals = vals.masked_fill((k > 0) & (rank >= k), float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    p = top_p.float().unsqueeze(1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (p < 1.0) & (mass_before >= p)
    drop[:, 0] = False  # the most likely token always stays
    probs = probs.masked_fill(drop, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)
    return order.gather(1, j).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Unmasking
# ----------------------------------------------------------------------------------------------


def tokens_to_keep(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    strategy: str,
    threshold: float,
    denoising_steps: int,
) -> torch.Tensor:
    """Which sampled positions of ``[N, B]`` blocks are kept this step (bool ``[N, B]``).

    * ``low_confidence_dynamic``: every masked position with confidence >= ``threshold``, and always
      the single most confident masked position;
    * ``low_confidence_static``: the ``max(1, B // denoising_steps)`` most confident masked positions;
    * ``sequential``: the same count, leftmost masked positions first.
    Only masked positions are ever kept; a row with a masked position keeps at least one.
    """
    N, B = masked.shape
    if strategy == "sequential":
        count = tokens_per_step(B, denoising_steps)
        order_in_mask = torch.cumsum(masked.long(), dim=1) - 1
        return masked & (order_in_mask < count)
    conf = torch.where(masked, confidence.float(), torch.full_like(confidence, -1.0, dtype=torch.float32))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(B, device=order.device).expand(N, B).contiguous())
    if strategy == "low_confidence_dynamic":
        return masked & ((conf >= threshold) | (rank == 0))
    if strategy == "low_confidence_static":
        return masked & (rank < tokens_per_step(B, denoising_steps))
    raise ValueError(f"unknown unmasking strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")


# ----------------------------------------------------------------------------------------------
# One request's state
# ----------------------------------------------------------------------------------------------


@dataclass
class SamplingSettings:
    """The per-request settings a decoder needs (filled from the request and the engine defaults)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None
    min_new_tokens: int = 0
    banned_token_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.do_sample, self.temperature, self.top_k)


class Sequence:
    """Bookkeeping of one decoded sequence, independent of how its forwards are batched.

    Blocks are aligned to absolute position 0: the first block to denoise starts at
    ``(P // B) * B``; its prompt part is kept as given and the rest starts as ``[M]``.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], settings: SamplingSettings, block_size: int,
                 mask_token_id: int, max_context: Optional[int] = None):
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        self.request_id = request_id
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.settings = settings
        self.B = int(block_size)
        self.mask_token_id = int(mask_token_id)
        self.max_context = max_context
        P = len(self.prompt_ids)
        self.block_start = (P // self.B) * self.B
        if max_context is not None and self.block_start + self.B > max_context:
            raise ValueError(
                f"request {request_id!r}: a prompt of {P} tokens leaves no room for a block of "
                f"{self.B} in the context limit of {max_context}"
            )
        self.steps = 0  # the step-map counter
        self.token_ids: list[int] = []
        self.step_map: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: Optional[str] = None
        self.response_length: Optional[int] = None
        self.stop_ids = set(int(t) for t in settings.stop_token_ids)
        self.banned_ids = sorted(set(int(t) for t in settings.banned_token_ids))
        self.min_new_tokens = int(settings.min_new_tokens)
        self.greedy = settings.greedy
        self.temperature = effective_temperature(settings.temperature)
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            seed = settings.seed
            if seed is None:  # follows torch's global RNG, so torch.manual_seed makes runs repeatable
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self.generator = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def prefill_ids(self) -> list[int]:
        """The whole prompt blocks that go into the KV cache before the first denoising step."""
        return self.prompt_ids[: (self.prompt_len // self.B) * self.B]

    def first_block(self) -> list[int]:
        """The first block to denoise: the prompt's last partial block completed with ``[M]``."""
        tail = self.prompt_ids[self.block_start:]
        return tail + [self.mask_token_id] * (self.B - len(tail))

    def prompt_in_block(self) -> int:
        """How many leading positions of the current block belong to the prompt."""
        return max(0, min(self.B, self.prompt_len - self.block_start))

    def uniforms(self) -> torch.Tensor:
        """B uniforms for one denoising step (zeros for greedy requests, which draw nothing)."""
        if self.generator is None:
            return torch.zeros(self.B)
        return torch.rand(self.B, generator=self.generator)

    def suppressed_ids(self) -> list[int]:
        """Token ids whose logits are -inf at every position of the current block: the banned ids,
        and the stop ids while fewer than ``min_new_tokens`` response tokens lie in finished blocks
        (LMDeploy's rule: the minimum is checked per block, against the tokens generated before it)."""
        if len(self.token_ids) < self.min_new_tokens:
            return sorted(set(self.banned_ids) | self.stop_ids)
        return self.banned_ids

    def next_step(self) -> int:
        """Count a forward that keeps at least one token; returns the step it records."""
        self.steps += 1
        return self.steps

    def finish_block(self, block_ids: list[int], block_steps: list[int], block_logprobs: list[float]) -> bool:
        """Record a block with no ``[M]`` left; apply the stop rules. True when the sequence ends.

        On False the caller moves on: ``block_start`` already points at the next (all-masked) block.
        """
        first = self.prompt_in_block()
        new = [int(t) for t in block_ids[first:]]
        start = len(self.token_ids)
        self.token_ids += new
        self.step_map += [int(s) for s in block_steps[first:]]
        self.logprobs += [float(x) for x in block_logprobs[first:]]
        self.block_start += self.B
        for i, t in enumerate(new):
            if t in self.stop_ids:
                self.response_length = start + i + 1
                self.finish_reason = "stop"
                return True
        if len(self.token_ids) >= self.settings.max_new_tokens or (
            self.max_context is not None and self.block_start + self.B > self.max_context
        ):
            self.response_length = len(self.token_ids)
            self.finish_reason = "length"
            return True
        return False

    def result(self, tokenizer: Any = None) -> dict:
        """The trajectory dict of docs/CONTRACTS.md."""
        if not self.done:
            raise RuntimeError(f"request {self.request_id!r} has not finished")
        n = self.response_length
        text = ""
        if tokenizer is not None:
            text = tokenizer.decode(self.token_ids[:n], skip_special_tokens=True)
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "token_ids": list(self.token_ids),
            "step_map": list(self.step_map),
            "logprobs": list(self.logprobs),
            "response_length": int(n),
            "finish_reason": self.finish_reason,
            "text": text,
        }


def sampling_params(seqs: list[Sequence], device) -> tuple[torch.Tensor, ...]:
    """Per-row ``(temperature, top_k, top_p, greedy)`` tensors of a batch of sequences."""
    return (
        torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=device),
        torch.tensor([s.settings.top_k for s in seqs], dtype=torch.long, device=device),
        torch.tensor([s.settings.top_p for s in seqs], dtype=torch.float32, device=device),
        torch.tensor([s.greedy for s in seqs], dtype=torch.bool, device=device),
    )


def suppress_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logits [N, B, V]`` with each row's :meth:`Sequence.suppressed_ids` set to -inf (a copy when
    anything changes). Sampling, the confidence and the recorded log-probability then all come from
    the constrained distribution, as in LMDeploy (its bad-word / min-new-token processing runs
    before sampling and unmasking)."""
    rows = [(i, ids) for i, s in enumerate(seqs) if (ids := s.suppressed_ids())]
    if not rows:
        return logits
    logits = logits.clone()
    for i, ids in rows:
        logits[i, :, torch.tensor(ids, dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def denoise_step(
    logits: torch.Tensor,
    block_ids: torch.Tensor,
    masked: torch.Tensor,
    seqs: list[Sequence],
    strategy: str,
    threshold: float,
    denoising_steps: int,
    params: Optional[tuple[torch.Tensor, ...]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising step for ``N`` blocks at once.

    ``logits [N, B, V]`` of the current blocks, ``block_ids [N, B]``, ``masked [N, B]`` bool,
    ``params`` the :func:`sampling_params` of ``seqs`` (computed when not given).
    Samples every masked position, picks the kept ones, advances each sequence's step counter when it
    keeps a token. Returns ``(keep [N, B], tokens [N, B], logprobs [N, B], step [N])`` where ``step``
    is the step number recorded by the kept tokens of each row (0 where nothing was kept).
    """
    N, B, V = logits.shape
    device = logits.device
    temps, top_k, top_p, greedy = params if params is not None else sampling_params(seqs, device)
    logits = suppress_tokens(logits, seqs)
    r, c = masked.nonzero(as_tuple=True)
    if all(s.generator is None for s in seqs):
        uniforms = torch.zeros(r.shape[0], device=device)
    else:
        uniforms = torch.stack([s.uniforms() for s in seqs]).to(device)[r, c]
    tok, lp = sample_tokens(logits[r, c], temps[r], top_k[r], top_p[r], greedy[r], uniforms)
    tokens = block_ids.index_put((r, c), tok)
    logprobs = torch.zeros(N, B, dtype=torch.float32, device=device).index_put_((r, c), lp)
    keep = tokens_to_keep(logprobs.exp(), masked, strategy, threshold, denoising_steps)
    kept_any = keep.any(dim=1).tolist()
    step = torch.tensor([s.next_step() if k else 0 for s, k in zip(seqs, kept_any)], dtype=torch.long, device=device)
    return keep, tokens, logprobs, step
