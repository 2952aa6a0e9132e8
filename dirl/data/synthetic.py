"""The synthetic arithmetic task of the embedded default.

Problems are additions of two numbers with ``digits`` digits each, asked as ``What is 43+75?``;
the worked response adds column by column from the units up, then boxes the sum:
``3+5=8, 4+7=11. \\boxed{118}`` (a carry shows as ``+1``: ``7+8=15, 4+3+1=8. \\boxed{85}``).
Every step is a one-digit sum a tiny model can learn from any pairs, so the held-out pairs are
reachable; the carries and the final assembly are where it errs, which leaves RL room to improve.
Every pair (a, b) belongs to exactly one split,
decided by a fixed hash of the pair, so the test split is held out from SFT and RL data whatever the
seed. Rows carry the fields the rest of the project reads: ``question`` / ``answer`` (benchmarks and
RL prompts) and ``prompt`` / ``response`` (SFT pairs; ``prompt`` is the user turn, the chat template
is applied later).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal, Optional

Split = Literal["train", "test"]
TEST_FRACTION_PER_MILLE = 100  # 10% of all pairs are held out


def pair_split(a: int, b: int) -> Split:
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "little")
    return "test" if h % 1000 < TEST_FRACTION_PER_MILLE else "train"


def column_steps(a: int, b: int) -> list[str]:
    """Schoolbook addition, one step a column from the units up: ``3+5=8``, then ``4+7=11``; a carry
    shows as ``+1`` (``7+8=15, 4+3+1=8`` for 47+38)."""
    steps, carry = [], 0
    while a or b or not steps:
        x, y = a % 10, b % 10
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry, a, b = s // 10, a // 10, b // 10
    return steps


def make_problem(a: int, b: int) -> dict:
    s = a + b
    question = f"What is {a}+{b}?"
    response = ", ".join(column_steps(a, b)) + f". \\boxed{{{s}}}"
    return {"question": question, "answer": str(s), "prompt": question, "response": response}


def all_pairs(digits: int = 2) -> list[tuple[int, int]]:
    lo, hi = 10 ** (digits - 1), 10 ** digits
    return [(a, b) for a in range(lo, hi) for b in range(lo, hi)]


def synthetic_problems(split: Split = "train", n: Optional[int] = None, seed: int = 0, digits: int = 2) -> list[dict]:
    """``n`` problems of ``split`` (all of them when ``n`` is None), in a seeded order, without repeats."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pairs = [p for p in all_pairs(digits) if pair_split(*p) == split]
    random.Random(seed).shuffle(pairs)
    if n is not None:
        if n > len(pairs):
            raise ValueError(f"asked for {n} {split} problems but only {len(pairs)} exist with {digits} digits")
        pairs = pairs[:n]
    return [dict(make_problem(a, b), id=f"add{digits}-{a}-{b}") for a, b in pairs]
