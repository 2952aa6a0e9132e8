"""The synthetic task and its imperfect teacher: what the SFT data say, checked by re-doing the sums."""

from __future__ import annotations

import math
import re

import pytest

from dirl.data.synthetic import make_problem, pair_split, synthetic_problems

STEP = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")


def reread(response: str) -> tuple[list[tuple[int, int, bool, int]], int]:
    """The columns of a worked response and its boxed number, parsed from the text alone."""
    body, boxed = re.fullmatch(r"(.*)\. \\boxed\{(\d+)\}", response).groups()
    cols = []
    for step in body.split(", "):
        x, y, plus, s = STEP.fullmatch(step).groups()
        cols.append((int(x), int(y), plus is not None, int(s)))
    return cols, int(boxed)


def check_arithmetic(a: int, b: int, response: str) -> int:
    """Every written step is a true sum of what it names, carries included, and the columns are a's and
    b's digits from the units up. Returns the boxed number."""
    cols, boxed = reread(response)
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry = False
    assert len(cols) == max(len(digits_a), len(digits_b)), response
    for i, (x, y, plus, s) in enumerate(cols):
        assert (str(x), str(y)) == (digits_a[i], digits_b[i]), response
        assert plus == carry and s == x + y + int(plus), response
        carry = s >= 10
    return boxed


def last_digit_up(n: int) -> int:
    """The teacher's slip, written out from its description: the last digit one higher, 9 -> 0."""
    digits = str(n)
    return int(digits[:-1] + "1234567890"[int(digits[-1])])


def numbers(question: str) -> tuple[int, int]:
    a, b = re.fullmatch(r"What is (\d+)\+(\d+)\?", question).groups()
    return int(a), int(b)


def test_the_exact_teacher_is_right_on_every_pair():
    for p in synthetic_problems("train", n=500, seed=3) + synthetic_problems("test"):
        a, b = numbers(p["question"])
        assert check_arithmetic(a, b, p["response"]) == a + b
        assert p["teacher_correct"] and p["answer"] == str(a + b)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_the_imperfect_teacher_slips_at_its_rate_and_only_in_the_boxed_sum(rate):
    rows = synthetic_problems("train", seed=7, teacher_error=rate)
    slips = 0
    for p in rows:
        a, b = numbers(p["question"])
        boxed = check_arithmetic(a, b, p["response"])  # the steps are always right
        true = a + b
        assert p["answer"] == str(true) and p["teacher_correct"] == (boxed == true)
        assert boxed in (true, last_digit_up(true)), p  # the one slip: the last digit one too high
        slips += boxed != true
    # binomial: 5 standard errors either side
    n = len(rows)
    assert abs(slips / n - rate) < 5 * math.sqrt(rate * (1 - rate) / n), (slips, n)


def test_teacher_slips_are_seeded_and_leave_the_problems_and_the_split_alone():
    a = synthetic_problems("train", n=300, seed=1, teacher_error=0.5)
    b = synthetic_problems("train", n=300, seed=1, teacher_error=0.5)
    c = synthetic_problems("train", n=300, seed=2, teacher_error=0.5)
    exact = synthetic_problems("train", n=300, seed=1)
    assert a == b
    assert [(p["question"], p["answer"]) for p in a] == [(p["question"], p["answer"]) for p in exact]
    assert [p["response"] for p in a] != [p["response"] for p in exact]
    same_pairs = {p["id"]: p["response"] for p in c}
    assert any(same_pairs[p["id"]] != p["response"] for p in a if p["id"] in same_pairs)
    assert all(pair_split(*map(int, p["id"].split("-")[1:])) == "train" for p in a)
    assert make_problem(43, 75, 1.0)["response"] == "3+5=8, 4+7=11. \\boxed{119}"
    assert make_problem(47, 38, 1.0)["response"] == "7+8=15, 4+3+1=8. \\boxed{86}"
    assert make_problem(40, 49, 1.0)["response"] == "0+9=9, 4+4=8. \\boxed{80}"  # 9 -> 0, nothing carried
    with pytest.raises(ValueError, match="teacher_error"):
        synthetic_problems("train", n=3, teacher_error=1.5)


def test_sft_config_key_and_default():
    from dirl.config import ConfigError
    from dirl.train.sft import SFTConfig, load_sft_config, load_sft_examples

    assert 0 < SFTConfig().data.teacher_error < 1
    with pytest.raises(ConfigError, match="data.teacher_error"):
        load_sft_config(None, ["data.teacher_error=-0.1"])
    for rate in (0, 1):
        rows = load_sft_examples(load_sft_config(None, ["data.num_samples=50", f"data.teacher_error={rate}"]).data)
        assert len(rows) == 50
        for r in rows:
            a, b = numbers(r.prompt[-1]["content"])
            assert check_arithmetic(a, b, r.response) == (a + b if rate == 0 else last_digit_up(a + b))


def check_columns_either_order(a: int, b: int, response: str) -> tuple[int, int, int]:
    """Like ``check_arithmetic``, each column's two digits in either order. Returns the boxed number,
    the columns whose digits differ and how many of those are written b's digit first."""
    cols, boxed = reread(response)
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, differ, swapped = False, 0, 0
    assert len(cols) == max(len(digits_a), len(digits_b)), response
    for i, (x, y, plus, s) in enumerate(cols):
        assert sorted((str(x), str(y))) == sorted((digits_a[i], digits_b[i])), response
        assert plus == carry and s == x + y + int(plus), response
        if digits_a[i] != digits_b[i]:
            differ += 1
            swapped += str(x) == digits_b[i]
        carry = s >= 10
    return boxed, differ, swapped


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_the_inconsistent_teacher_swaps_column_digits_at_its_rate_and_nothing_else(rate):
    rows = synthetic_problems("train", seed=4, teacher_error=0.3, teacher_swap=rate)
    plain = synthetic_problems("train", seed=4, teacher_error=0.3)
    differ = swapped = 0
    for p, q in zip(rows, plain):
        a, b = numbers(p["question"])
        boxed, d, s = check_columns_either_order(a, b, p["response"])
        assert (p["question"], p["answer"], p["teacher_correct"]) == (q["question"], q["answer"], q["teacher_correct"])
        assert boxed == check_arithmetic(a, b, q["response"])  # the same slips as without swaps
        differ, swapped = differ + d, swapped + s
    assert abs(swapped / differ - rate) < 5 * math.sqrt(rate * (1 - rate) / differ), (swapped, differ)


def test_teacher_swap_examples_seeding_and_config_key():
    from dirl.config import ConfigError
    from dirl.train.sft import SFTConfig, load_sft_config, load_sft_examples

    assert make_problem(43, 75, 0.0, 0, 1.0)["response"] == "5+3=8, 7+4=11. \\boxed{118}"
    assert make_problem(47, 38, 0.0, 0, 1.0)["response"] == "8+7=15, 3+4+1=8. \\boxed{85}"  # the carry stays last
    assert synthetic_problems("train", n=200, seed=1, teacher_swap=0.3) == synthetic_problems("train", n=200, seed=1, teacher_swap=0.3)
    assert synthetic_problems("train", n=200, seed=1, teacher_swap=0.3) != synthetic_problems("train", n=200, seed=1)
    with pytest.raises(ValueError, match="teacher_swap"):
        synthetic_problems("train", n=3, teacher_swap=-0.5)
    assert SFTConfig().data.teacher_swap == 0.0  # the default task is the consistent teacher
    with pytest.raises(ConfigError, match="data.teacher_swap"):
        load_sft_config(None, ["data.teacher_swap=1.5"])
    rows = load_sft_examples(load_sft_config(None, ["data.num_samples=300", "data.teacher_swap=1", "data.teacher_error=0"]).data)
    for r in rows:
        a, b = numbers(r.prompt[-1]["content"])
        boxed, differ, swapped = check_columns_either_order(a, b, r.response)
        assert boxed == a + b and swapped == differ
