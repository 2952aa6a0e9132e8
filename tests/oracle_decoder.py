"""An independent block-diffusion decoder, written from SPEC section 4 and the seeding contract of
docs/SEMANTICS.md ("Random draws") alone: the test oracle of the rollout engine.

It shares nothing with dirl's decoding or engine code: it takes the stock transformers
``Qwen3ForCausalLM`` (``model.hf``), builds its own 4-D additive attention mask, and at every
denoising step recomputes the whole sequence (prompt, finished blocks, current block) with no KV
cache. Sampling, confidences, the three keep rules, the step map, log-probs and the stop rules are
re-stated here in float64 on plain Python lists, one request at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def block_causal_additive_mask(length: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 1, L, L]``: 0 where query i may see key j (block(j) <= block(i)), a large negative
    number elsewhere. Every earlier block is clean, so this is SPEC section 2's rule for a sequence
    whose last block is the noisy one."""
    blk = torch.arange(length) // block_size
    allowed = blk[None, :] <= blk[:, None]
    mask = torch.zeros(length, length, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.no_grad()
def block_logits(hf_model, ids: list[int], block_size: int) -> torch.Tensor:
    """Float64 logits ``[B, V]`` of the last block of ``ids`` under the block-causal mask."""
    dev = next(hf_model.parameters()).device
    dtype = next(hf_model.parameters()).dtype
    L = len(ids)
    out = hf_model(
        input_ids=torch.tensor([ids], device=dev),
        attention_mask=block_causal_additive_mask(L, block_size, dtype).to(dev),
        position_ids=torch.arange(L, device=dev)[None],
        use_cache=False,
    )
    return out.logits[0, L - block_size:].double().cpu()


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def draw(scaled: list[float], top_k: int, top_p: float, u: float) -> int:
    """Inverse-CDF draw (docs/SEMANTICS.md, "Random draws"): tokens ordered by decreasing probability
    (ties: lower id first); keep the top_k first (k <= 0: all); then drop every token whose mass
    before it (renormalised after top-k) is >= top_p, the first always stays; pick the first token
    whose cumulative mass exceeds u times the kept mass."""
    order = sorted(range(len(scaled)), key=lambda t: (-scaled[t], t))
    if top_k > 0:
        order = order[:top_k]
    m = scaled[order[0]]
    w = [math.exp(scaled[t] - m) for t in order]
    total = sum(w)
    probs = [x / total for x in w]
    if top_p < 1.0:
        kept, before = [], 0.0
        for i, p in enumerate(probs):
            if i > 0 and before >= top_p:
                break
            kept.append(p)
            before += p
        probs = kept
    target = u * sum(probs)
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if acc > target:
            return order[i]
    return order[len(probs) - 1]


def keep_positions(conf: dict[int, float], strategy: str, threshold: float, block_size: int, steps: int) -> list[int]:
    """SPEC section 4 item 4 over ``{position: confidence}`` of the still-masked positions."""
    count = max(1, block_size // steps)
    if strategy == "sequential":
        return sorted(conf)[:count]
    ranked = sorted(conf, key=lambda j: (-conf[j], j))  # ties: leftmost
    if strategy == "low_confidence_static":
        return sorted(ranked[:count])
    if strategy == "low_confidence_dynamic":
        return sorted({ranked[0]} | {j for j, c in conf.items() if c >= threshold})
    raise ValueError(strategy)


def oracle_generate(model, req, denoising_steps: int = 4, strategy: str = "low_confidence_dynamic",
                    threshold: float = 0.9, max_context: Optional[int] = None) -> dict:
    """Decode one request (a GenerateRequest-like object) and return its trajectory fields."""
    hf = model.hf
    B = int(model.block_size)
    mask_id = int(model.mask_token_id)
    if max_context is None:
        max_context = hf.config.max_position_embeddings
    prompt = [int(t) for t in req.input_ids]
    P = len(prompt)
    greedy = (not req.do_sample) or req.top_k == 1 or req.temperature == 0
    T = float(req.temperature) if req.temperature > 0 else 1.0
    gen = None
    if not greedy:
        assert req.seed is not None, "the oracle reproduces seeded requests only"
        gen = torch.Generator().manual_seed(int(req.seed) & ((1 << 63) - 1))
    stops = set(int(t) for t in req.stop_token_ids)

    start = (P // B) * B  # first position of the current block
    context = prompt[:start]  # every clean token before the current block
    block = prompt[start:] + [mask_id] * (B - (P - start))
    first_resp = P - start  # response positions of the current block start here
    counter = 0
    tokens: list[int] = []
    step_map: list[int] = []
    logprobs: list[float] = []
    while True:
        steps_b: dict[int, int] = {}
        lps_b: dict[int, float] = {}
        while len(steps_b) < B - first_resp:  # a block position is masked until it is kept
            logits = block_logits(hf, context + block, B)
            u = torch.rand(B, generator=gen).tolist() if gen is not None else [0.0] * B
            masked = [j for j in range(first_resp, B) if j not in steps_b]
            sampled, conf, lp = {}, {}, {}
            for j in masked:
                scaled = (logits[j] / T).tolist()
                if greedy:
                    t = max(range(len(scaled)), key=lambda v: (scaled[v], -v))
                else:
                    t = draw(scaled, int(req.top_k), float(req.top_p), u[j])
                lp[j] = _log_softmax(scaled)[t]
                sampled[j], conf[j] = t, math.exp(lp[j])
            kept = keep_positions(conf, strategy, threshold, B, denoising_steps)
            counter += 1
            for j in kept:
                block[j] = sampled[j]
                steps_b[j] = counter
                lps_b[j] = lp[j]
        new = block[first_resp:]
        base = len(tokens)
        tokens += new
        step_map += [steps_b[j] for j in range(first_resp, B)]
        logprobs += [lps_b[j] for j in range(first_resp, B)]
        context = context + block
        stop_at = next((i for i, t in enumerate(new) if t in stops), None)
        if stop_at is not None:
            length, reason = base + stop_at + 1, "stop"
            break
        if len(tokens) >= req.max_new_tokens or len(context) + B > max_context:
            length, reason = len(tokens), "length"
            break
        block, first_resp = [mask_id] * B, 0
    return {"request_id": req.request_id, "prompt_ids": prompt, "token_ids": tokens, "step_map": step_map,
            "logprobs": logprobs, "response_length": length, "finish_reason": reason}
