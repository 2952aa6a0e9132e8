"""Grading on the real benchmark sets (local copies in ../shared/data/benchmarks).

Each check asserts exactly the figures of docs/GRADING.md ("Measured on the five test sets"): for
every problem of the five sets a response ending in ``\\boxed{gold}`` grades correct; every worked
MATH500 / AIME2024 solution grades correct; no clearly wrong answer (integer gold + 1, else another
problem's different gold) grades correct. The checks run through the default grader and (marked
slow) through math-verify alone (``string_fallback=False``: no string path at all), which accepts
every worked solution but the two AIME2024 exceptions named in the doc.
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
    g = Grader(timeout=10.0, string_fallback=False)
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
def test_wrong_answer_is_wrong(benchmarks_dir, grader, name):
    ps = _problems(benchmarks_dir, name)
    golds = [p["answer"] for p in ps]
    verdicts = grader.grade_many((f"\\boxed{{{_wrong(i, golds)}}}", g) for i, g in enumerate(golds))
    wrongly_right = [(golds[i], _wrong(i, golds)) for i, v in enumerate(verdicts) if v]
    assert not wrongly_right, f"{len(wrongly_right)} false positives: {wrongly_right[:10]}"


# math-verify alone misses two AIME2024 worked solutions (docs/GRADING.md): `\boxed{104.}` and
# `\textbf{(073)}`; the string fallback of the default grader recovers both
MV_ALONE_MISSES = {"math500": [], "aime2024": ["104", "073"]}


@pytest.mark.parametrize("name", ["math500", "aime2024"])
def test_worked_solution_is_correct(benchmarks_dir, grader, name):
    import json

    file = {"math500": "math500.jsonl", "aime2024": "aime24.jsonl"}[name]
    rows = [json.loads(line) for line in (benchmarks_dir / file).read_text().splitlines() if line.strip()]
    verdicts = grader.grade_many((r["solution"], r["answer"]) for r in rows)
    failed = [r["answer"] for r, v in zip(rows, verdicts) if not v]
    assert failed == ([] if grader.string_fallback else MV_ALONE_MISSES[name])


def test_math_verify_alone_has_no_string_path(mv_grader, default_grader):
    """Answers only the normalised-string comparison accepts: math-verify alone says no."""
    for pred, gold in (("104.", "104"), ("\\textbf{(073)}", "073")):
        assert default_grader.compare_answers([(pred, gold)]) == [True]
        assert mv_grader.compare_answers([(pred, gold)]) == [False]
