"""Grading on the real benchmark sets (local copies in ../shared/data/benchmarks).

For every problem of the five sets a response ending in ``\\boxed{gold}`` must grade correct; the
worked MATH500 / AIME2024 solutions must grade correct (>= 99%, exceptions in docs/GRADING.md);
a clearly wrong answer (integer gold + 1, else another problem's different gold) must grade wrong
(>= 99%). The correct-answer checks run twice: through the default grader and (marked slow) through
math-verify alone (no string fast path), so that the gold strings themselves are known to parse.
"""

from __future__ import annotations

import pytest

from dirl.data.benchmarks import MATH_BENCHMARKS, load_benchmark
from dirl.rewards import Grader, normalize_answer


@pytest.fixture(scope="module")
def default_grader():
    g = Grader(timeout=10.0)
    yield g
    g.close()


@pytest.fixture(scope="module")
def mv_grader():
    g = Grader(timeout=10.0, fast_path=False)
    yield g
    g.close()


@pytest.fixture(params=["default", pytest.param("math_verify_only", marks=pytest.mark.slow)])
def grader(request, default_grader, mv_grader):
    return default_grader if request.param == "default" else mv_grader


def _problems(benchmarks_dir, name):
    return load_benchmark(name, data_dir=str(benchmarks_dir))


def _wrong(i, golds):
    g = normalize_answer(golds[i])
    if g.lstrip("-").isdigit():
        return str(int(g) + 1)
    j = (i + 1) % len(golds)
    while normalize_answer(golds[j]) == g:
        j = (j + 1) % len(golds)
    return golds[j]


@pytest.mark.parametrize("name", MATH_BENCHMARKS)
def test_boxed_gold_is_correct(benchmarks_dir, grader, name):
    ps = _problems(benchmarks_dir, name)
    assert len(ps) == {"math500": 500, "gsm8k": 1319, "aime2024": 30, "aime2025": 30, "olympiadbench": 675}[name]
    responses = [f"Some reasoning.\nThe final answer is $\\boxed{{{p['answer']}}}$." for p in ps]
    verdicts = grader.grade_many(zip(responses, [p["answer"] for p in ps]))
    failed = [p["answer"] for p, v in zip(ps, verdicts) if not v]
    assert not failed, f"{len(failed)} gold answers not recognised: {failed[:10]}"


@pytest.mark.parametrize("name", MATH_BENCHMARKS)
def test_wrong_answer_is_wrong(benchmarks_dir, default_grader, name):
    grader = default_grader
    ps = _problems(benchmarks_dir, name)
    golds = [p["answer"] for p in ps]
    verdicts = grader.grade_many((f"\\boxed{{{_wrong(i, golds)}}}", g) for i, g in enumerate(golds))
    wrongly_right = [(golds[i], _wrong(i, golds)) for i, v in enumerate(verdicts) if v]
    assert len(wrongly_right) <= 0.01 * len(ps), wrongly_right[:10]


@pytest.mark.parametrize("name", ["math500", "aime2024"])
def test_worked_solution_is_correct(benchmarks_dir, grader, name):
    import json

    file = {"math500": "math500.jsonl", "aime2024": "aime24.jsonl"}[name]
    rows = [json.loads(line) for line in (benchmarks_dir / file).read_text().splitlines() if line.strip()]
    verdicts = grader.grade_many((r["solution"], r["answer"]) for r in rows)
    failed = [r["answer"] for r, v in zip(rows, verdicts) if not v]
    assert len(failed) <= 0.01 * len(rows), failed
