"""The naive block-diffusion decoder: no KV cache, one request at a time. The test oracle.

Every denoising step runs the model over the whole sequence so far (prompt, finished blocks and the
current block) under the block-causal mask and reads the logits of the current block. It follows
the same rules as the engine (it calls the same :mod:`dirl.rollout.decoding` functions) and shares
none of its cache or batching code, so agreement between the two checks the cache, the commit
forwards, the padding and the per-row offsets of :mod:`dirl.rollout.engine`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from dirl.model.attention import block_causal_meta
from dirl.rollout.decoding import SamplingSettings, Sequence, denoise_step


@torch.inference_mode()
def naive_generate(
    model,
    requests: Iterable,
    tokenizer: Any = None,
    denoising_steps: int = 4,
    unmasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.9,
    max_context: Optional[int] = None,
    record_logits: bool = False,
) -> list[dict]:
    """Decode each request alone; trajectories as :meth:`Engine.generate` returns them.

    With ``record_logits`` every trajectory also carries ``"step_logits"``: per denoising step, the
    fp32 logits ``[B, V]`` of the current block (for log-prob checks).
    """
    B = int(model.block_size)
    mask_id = int(model.mask_token_id)
    if max_context is None:
        max_context = getattr(model.config, "max_position_embeddings", None)
    device = model.device
    out = []
    for req in requests:
        settings = SamplingSettings(
            max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
            do_sample=req.do_sample, stop_token_ids=list(req.stop_token_ids), seed=req.seed,
            min_new_tokens=int(getattr(req, "min_new_tokens", 0)),
            banned_token_ids=list(getattr(req, "banned_token_ids", [])),
        )
        seq = Sequence(req.request_id, req.input_ids, settings, B, mask_id, max_context=max_context)
        context = seq.prefill_ids()  # every token before the current block
        block = seq.first_block()
        masked = [j >= seq.prompt_in_block() for j in range(B)]
        steps = [0] * B
        logps = [0.0] * B
        recorded = []
        while True:
            ids = torch.tensor([context + block], dtype=torch.long, device=device)
            meta = block_causal_meta(ids.shape[1], B, device=device)
            hidden = model.hidden_states(ids, meta, backend="sdpa")
            logits = model.lm_head(hidden[:, len(context):]).float()
            if record_logits:
                recorded.append(logits[0].cpu())
            keep, tokens, lps, step = denoise_step(
                logits, torch.tensor([block], device=device), torch.tensor([masked], device=device), [seq],
                unmasking_strategy, confidence_threshold, denoising_steps,
            )
            for j in keep[0].nonzero().flatten().tolist():
                block[j] = int(tokens[0, j])
                steps[j] = int(step[0])
                logps[j] = float(lps[0, j])
                masked[j] = False
            if any(masked):
                continue
            if seq.finish_block(block, steps, logps):
                break
            context = context + block
            block, masked, steps, logps = [mask_id] * B, [True] * B, [0] * B, [0.0] * B
        res = seq.result(tokenizer)
        if record_logits:
            res["step_logits"] = recorded
        out.append(res)
    return out
