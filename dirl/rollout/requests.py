"""Generate requests as the trainer and the evaluator send them: one builder, one seed rule."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from dirl.config import DecodingConfig


def request_seed(base: int, key: str, sample: int) -> int:
    """The sampling seed of response ``sample`` of the prompt named ``key`` (``"math500:7"``,
    ``"s3:r0:p5"``): stable across runs, resumes and servers, independent of how many samples are
    drawn (raising the count only adds seeds), and distinct for the samples of one prompt."""
    off = int(hashlib.sha256(f"{base}:{key}".encode()).hexdigest()[:8], 16)
    return (off + sample) % (2**31 - 1)


def sampling_request(request_id: str, decoding: DecodingConfig, seed: int, *,
                     input_ids: Optional[Sequence[int]] = None, messages: Optional[list[dict]] = None,
                     stop_token_ids: Optional[Sequence[int]] = None) -> dict:
    """A ``/generate`` request (docs/CONTRACTS.md) with the per-request sampling settings of
    ``decoding``; the prompt as token ids or as chat messages (templated by the server)."""
    req: dict = {"request_id": request_id}
    if input_ids is not None:
        req["input_ids"] = list(input_ids)
    if messages is not None:
        req["messages"] = messages
    req.update({
        "max_new_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "top_k": decoding.top_k,
        "top_p": decoding.top_p,
        "do_sample": decoding.do_sample,
        "seed": seed,
    })
    if stop_token_ids is not None:
        req["stop_token_ids"] = list(stop_token_ids)
    return req
