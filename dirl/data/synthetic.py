"""The synthetic arithmetic task of the embedded default.

Problems are additions of two numbers with ``digits`` digits each, asked as ``What is 43+75?``;
the worked response adds column by column from the units up, then boxes the sum:
``3+5=8, 4+7=11. \\boxed{118}`` (a carry shows as ``+1``: ``7+8=15, 4+3+1=8. \\boxed{85}``).
Every step is a one-digit sum a tiny model can learn from any pairs, so the held-out pairs are
reachable; the carries and the final assembly are where it errs.

The SFT data can come from an imperfect teacher (``teacher_error`` > 0): its column steps are
always right, but with that probability, drawn independently per row, the last digit of its boxed
sum is one too high, 9 becoming 0 (``3+5=8, 4+7=11. \\boxed{119}`` for 43+75), a slip of the pen.
The slip is one token with one alternative, so a model that imitates the teacher samples it at the
teacher's rate even under confidence-ordered decoding (a slip spread over several tokens is mostly
out-voted by the confident ones), more SFT converges toward the teacher's accuracy, and RL's reward,
which checks the sum itself, has no such ceiling. This stands for the real setting, where the SFT
data are a stronger model's solutions whose final answers are sometimes wrong, and RL against a
verifier goes past what imitating them gives.
The teacher can also be inconsistent in style (``teacher_swap`` > 0): with that probability, drawn
independently per column, it writes the column's two digits in the other order (``5+3=8`` for 3+5;
the carry stays last: ``3+4+1=8``). Nothing about correctness depends on it, so accuracy has no
reason to settle the order, but under confidence-thresholded decoding a position that is ``+``'s
left digit with probability 1 − ``teacher_swap`` and its right digit otherwise waits for a later
step when that probability is below the threshold: the teacher's open choices cost steps. This
stands for the stylistic freedom of real solutions (word choice, order of terms), which parallel
decoding pays for; docs/QUICKSTART.md measures what RL, with and without the speed reward (SPEC
section 7), does with it.
Two more style choices, drawn per row, each with its own probability and its own draws, give correct
answers in two texts. ``teacher_echo``: the teacher first restates the sum
(``43+75: 3+5=8, 4+7=11. \\boxed{118}``); the restated digits are copies of the prompt's, so parallel
decoding writes them many to a step and the answer decodes more tokens per step (in more steps);
``teacher_echo_at="end"`` puts the restatement after the boxed answer (``... \\boxed{118} (43+75)``),
where it cannot help the sum, so accuracy has no reason to prefer either text.
``teacher_carry``: the teacher writes a carry of 0 too (``3+5=8, 4+7+0=11``), two more tokens in a
column without a carry. These stand for the choices between texts of different parallelism that the
speed reward could act on (docs/QUICKSTART.md measures what RL does with them).
Problems (``question`` / ``answer``) and the held-out split are always exact.

Every pair (a, b) belongs to exactly one split,
decided by a fixed hash of the pair, so the test split is held out from SFT and RL data whatever the
seed. Rows carry the fields the rest of the project reads: ``question`` / ``answer`` (benchmarks and
RL prompts) and ``prompt`` / ``response`` (SFT pairs; ``prompt`` is the user turn, the chat template
is applied later).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal, Optional, Sequence

Split = Literal["train", "test"]
TEST_FRACTION_PER_MILLE = 100  # 10% of all pairs are held out


def pair_split(a: int, b: int) -> Split:
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "little")
    return "test" if h % 1000 < TEST_FRACTION_PER_MILLE else "train"


def column_steps(a: int, b: int, swapped: Optional[Sequence[bool]] = None, explicit_carry: bool = False) -> list[str]:
    """Schoolbook addition, one step a column from the units up: ``3+5=8``, then ``4+7=11``; a carry
    shows as ``+1`` (``7+8=15, 4+3+1=8`` for 47+38), and with ``explicit_carry`` a carry of 0 as
    ``+0`` (``4+7+0=11``; never in the units column). ``swapped[i]`` writes column i's digits in the
    other order (``5+3=8``)."""
    steps, carry = [], 0
    while a or b or not steps:
        x, y = a % 10, b % 10
        s = x + y + carry
        if swapped is not None and len(steps) < len(swapped) and swapped[len(steps)]:
            x, y = y, x
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry or (explicit_carry and steps) else "") + f"={s}")
        carry, a, b = s // 10, a // 10, b // 10
    return steps


def slip_of(total: int) -> int:
    """The imperfect teacher's slip of a sum: its last digit one too high, 9 becoming 0 and nothing
    carried (118 -> 119, 89 -> 80); never the sum itself."""
    return total - total % 10 + (total % 10 + 1) % 10


ECHO_PLACES = ("start", "end")


def check_echo_at(place: str) -> None:
    if place not in ECHO_PLACES:
        raise ValueError(f"teacher_echo_at must be one of {', '.join(ECHO_PLACES)}, got {place!r}")


def make_problem(a: int, b: int, teacher_error: float = 0.0, seed: int = 0, teacher_swap: float = 0.0,
                 teacher_echo: float = 0.0, teacher_carry: float = 0.0, echo_at: str = "start") -> dict:
    """The problem and its worked response. With ``teacher_error`` > 0 the response is the imperfect
    teacher's (the boxed sum slips with that probability; the draw depends on ``seed`` and the pair
    only); with ``teacher_swap`` > 0 each column's digits are written in the other order with that
    probability (its own draws, so the slips stay those of ``teacher_swap`` = 0); with ``teacher_echo``
    or ``teacher_carry`` > 0 the response restates the sum (first, or after the answer with
    ``echo_at="end"``) or shows carries of 0 with that probability (their own draws too). ``answer`` is always
    the true sum, ``teacher_correct`` says whether the boxed sum is it."""
    check_echo_at(echo_at)
    slip = teacher_error > 0 and random.Random(f"teacher:{seed}:{a}+{b}").random() < teacher_error
    given = slip_of(a + b) if slip else a + b
    swapped = None
    if teacher_swap > 0:
        rng = random.Random(f"teacher-order:{seed}:{a}+{b}")
        swapped = [rng.random() < teacher_swap for _ in range(len(str(max(a, b))))]
    echo = teacher_echo > 0 and random.Random(f"teacher-echo:{seed}:{a}+{b}").random() < teacher_echo
    carry = teacher_carry > 0 and random.Random(f"teacher-carry:{seed}:{a}+{b}").random() < teacher_carry
    question = f"What is {a}+{b}?"
    response = ", ".join(column_steps(a, b, swapped, carry)) + f". \\boxed{{{given}}}"
    if echo:
        response = f"{a}+{b}: {response}" if echo_at == "start" else f"{response} ({a}+{b})"
    return {"question": question, "answer": str(a + b), "prompt": question, "response": response,
            "teacher_correct": given == a + b}


def all_pairs(digits: int = 2) -> list[tuple[int, int]]:
    lo, hi = 10 ** (digits - 1), 10 ** digits
    return [(a, b) for a in range(lo, hi) for b in range(lo, hi)]


def synthetic_problems(split: Split = "train", n: Optional[int] = None, seed: int = 0, digits: int = 2,
                       teacher_error: float = 0.0, teacher_swap: float = 0.0, teacher_echo: float = 0.0,
                       teacher_carry: float = 0.0, teacher_echo_at: str = "start") -> list[dict]:
    """``n`` problems of ``split`` (all of them when ``n`` is None), in a seeded order, without repeats;
    responses from the imperfect teacher when ``teacher_error``, ``teacher_swap``, ``teacher_echo`` or
    ``teacher_carry`` > 0 (see the module text)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for name, q in (("teacher_error", teacher_error), ("teacher_swap", teacher_swap),
                    ("teacher_echo", teacher_echo), ("teacher_carry", teacher_carry)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {q!r}")
    check_echo_at(teacher_echo_at)
    pairs = [p for p in all_pairs(digits) if pair_split(*p) == split]
    random.Random(seed).shuffle(pairs)
    if n is not None:
        if n > len(pairs):
            raise ValueError(f"asked for {n} {split} problems but only {len(pairs)} exist with {digits} digits")
        pairs = pairs[:n]
    return [dict(make_problem(a, b, teacher_error, seed, teacher_swap, teacher_echo, teacher_carry, teacher_echo_at),
                 id=f"add{digits}-{a}-{b}")
            for a, b in pairs]
