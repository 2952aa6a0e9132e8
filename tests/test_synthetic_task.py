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


ECHO = re.compile(r"^(\d+)\+(\d+): (.*)$")
STEP_C = re.compile(r"^(\d)\+(\d)(?:\+([01]))?=(\d+)$")


def reread_styles(a: int, b: int, response: str) -> tuple[int, bool, bool]:
    """A response of any of the teacher's styles, checked from the text: an optional restatement that
    names exactly a and b, then the columns, each a true sum of a's and b's digits from the units up,
    with its carry written as +1 always and +0 either never or in every column past the units. Returns
    the boxed number, whether it restated and whether it wrote carries of 0."""
    m = ECHO.fullmatch(response)
    echo = m is not None
    if echo:
        assert (int(m.group(1)), int(m.group(2))) == (a, b), response
        response = m.group(3)
    body, boxed = re.fullmatch(r"(.*)\. \\boxed\{(\d+)\}", response).groups()
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps = body.split(", ")
    assert len(steps) == max(len(digits_a), len(digits_b)), response
    carry, zeros, bare = 0, 0, 0
    for i, step in enumerate(steps):
        x, y, c, s = STEP_C.fullmatch(step).groups()
        assert (x, y) == (digits_a[i], digits_b[i]), response
        if c is None:
            assert carry == 0, response  # a carry of 1 is always written
            bare += i > 0
        else:
            assert i > 0 and int(c) == carry, response
            zeros += c == "0"
        assert int(s) == int(x) + int(y) + carry, response
        carry = int(s) // 10
    explicit = zeros > 0
    assert not (explicit and bare), response  # one style per response
    return int(boxed), echo, explicit


@pytest.mark.parametrize("echo,carry", [(0.5, 0.0), (0.0, 0.5), (0.3, 0.7)])
def test_the_teacher_restates_and_writes_zero_carries_at_their_rates_and_nothing_else(echo, carry):
    rows = synthetic_problems("train", seed=5, teacher_error=0.3, teacher_echo=echo, teacher_carry=carry)
    plain = synthetic_problems("train", seed=5, teacher_error=0.3)
    n_echo = n_zero = n_both = could = 0
    for p, q in zip(rows, plain):
        a, b = numbers(p["question"])
        boxed, e, z = reread_styles(a, b, p["response"])
        assert (p["question"], p["answer"], p["teacher_correct"]) == (q["question"], q["answer"], q["teacher_correct"])
        assert boxed == check_arithmetic(a, b, q["response"])  # the same slips as the plain teacher's
        n_echo += e
        if a % 10 + b % 10 < 10:  # two digits and no carry out of the units: a zero carry would show
            could += 1
            n_zero += z
            n_both += e and z
    n = len(rows)
    assert abs(n_echo / n - echo) <= 5 * math.sqrt(echo * (1 - echo) / n) + 1e-9, (n_echo, n)
    assert could > 1000 and abs(n_zero / could - carry) <= 5 * math.sqrt(carry * (1 - carry) / could) + 1e-9, (n_zero, could)
    both = echo * carry  # independent draws
    assert abs(n_both / could - both) <= 5 * math.sqrt(both * (1 - both) / could) + 1e-9, (n_both, could)


def test_teacher_echo_and_carry_examples_seeding_and_config_keys():
    from dirl.config import ConfigError
    from dirl.train.sft import SFTConfig, load_sft_config, load_sft_examples

    assert make_problem(43, 75, teacher_echo=1.0)["response"] == "43+75: 3+5=8, 4+7=11. \\boxed{118}"
    assert make_problem(43, 75, teacher_carry=1.0)["response"] == "3+5=8, 4+7+0=11. \\boxed{118}"
    assert make_problem(47, 38, teacher_carry=1.0)["response"] == "7+8=15, 4+3+1=8. \\boxed{85}"
    assert make_problem(43, 75, 1.0, teacher_echo=1.0, teacher_carry=1.0)["response"] == "43+75: 3+5=8, 4+7+0=11. \\boxed{119}"
    assert make_problem(5, 8, teacher_carry=1.0)["response"] == "5+8=13. \\boxed{13}"  # no column past the units
    assert make_problem(43, 75, teacher_echo=1.0, echo_at="end")["response"] == "3+5=8, 4+7=11. \\boxed{118} (43+75)"
    at_end = synthetic_problems("train", n=300, seed=1, teacher_echo=0.5, teacher_echo_at="end")
    at_start = synthetic_problems("train", n=300, seed=1, teacher_echo=0.5)
    for p, q in zip(at_end, at_start):  # the same rows restate, only the place differs
        assert p["response"].endswith(")") == (":" in q["response"])
    with pytest.raises(ValueError, match="teacher_echo_at"):
        synthetic_problems("train", n=3, teacher_echo_at="middle")
    with pytest.raises(ValueError, match="teacher_echo_at"):
        make_problem(43, 75, teacher_echo=1.0, echo_at="middle")
    with pytest.raises(ConfigError, match="data.teacher_echo_at"):
        load_sft_config(None, ["data.teacher_echo_at=middle"])
    kw = dict(n=200, seed=1, teacher_echo=0.4, teacher_carry=0.4)
    assert synthetic_problems("train", **kw) == synthetic_problems("train", **kw)
    assert synthetic_problems("train", **kw) != synthetic_problems("train", **dict(kw, seed=2))[:200]
    for key in ("teacher_echo", "teacher_carry"):
        with pytest.raises(ValueError, match=key):
            synthetic_problems("train", n=3, **{key: 1.5})
        assert getattr(SFTConfig().data, key) == 0.0  # the default task has one style
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_sft_config(None, [f"data.{key}=-0.1"])
        with pytest.raises(ConfigError, match=f"config key 'data.{key}': the synthetic task's teacher only"):
            load_sft_config(None, [f"data.{key}=0.5", "data.source=some/dataset"])
    rows = load_sft_examples(load_sft_config(None, ["data.num_samples=100", "data.teacher_echo=1", "data.teacher_error=0"]).data)
    for r in rows:
        a, b = numbers(r.prompt[-1]["content"])
        assert reread_styles(a, b, r.response)[:2] == (a + b, True)
