"""Answer extraction, bounded grading (threads, processes, pathological inputs) and reward functions."""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from dirl.config import ConfigError, load_config
from dirl.rewards import (
    Grader,
    RewardConfig,
    compute_rewards,
    cosine_reward,
    cosine_schedule,
    extract_answer,
    format_reward,
    gold_answer,
    grade_many,
    is_correct,
    normalize_answer,
    score_trajectories,
    speed_reward,
    tokens_per_step,
)

# A response whose comparison never finishes in time: 9^(9^(9^9)) as an exact integer.
PATHOLOGICAL = "so the answer is \\boxed{9^{9^{9^{9}}}}"

CASES = [
    ("The answer is \\boxed{18}.", "18", True),
    ("The answer is \\boxed{19}.", "18", False),
    ("no box here, 18", "18", False),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("\\boxed{70,000}", "Janet ... #### 70000", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{-2, 1}", "1,-2", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{025}", "25", True),
    ("first \\boxed{3} then \\boxed{4}", "4", True),
    ("first \\boxed{4} then \\boxed{3}", "4", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{64, \\frac14}", ["$64,\\frac{1}{4}$"], True),
    ("\\fbox{7}", "7", True),
    ("\\boxed {7}", "7", True),
    ("\\boxed 7.", "7", True),
    ("\\boxed{\\$18.90}", "\\$18.90", True),
    ("\\boxed{1/3}", "0.5", False),
    # percent golds (OlympiadBench): the number with or without its sign, or as a fraction
    ("\\boxed{62.5}", "62.5%", True),
    ("\\boxed{17.5\\%}", "17.5", True),
    ("\\boxed{0.625}", "62.5%", True),
    ("\\boxed{900\\%}", "9", True),
    ("\\boxed{8}", "9\\%", False),
    ("\\boxed{62.4}", "62.5%", False),
    # a comma and a space separate a list, not thousands
    ("\\boxed{1, 234}", "1234", False),
    ("\\boxed{1,234}", "1234", True),
    # the instruction's empty box, quoted after the answer, is not the answer
    ("The answer is \\boxed{5}. I put it within $\\boxed{}$.", "5", True),
]


def test_extract_answer():
    assert extract_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_answer("\\boxed{\\frac{a}{b}} and \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("\\boxed{1} then a cut \\boxed{2") == "1"  # an unclosed box is skipped
    assert extract_answer("\\boxed 5.") == "5"
    assert extract_answer("\\framebox[2cm]{12}") == "12"
    assert extract_answer("\\fbox {3}") == "3"
    assert extract_answer("\\boxedx{3}") is None
    assert extract_answer("nothing") is None
    assert extract_answer("") is None
    assert extract_answer("\\boxed{5} and \\boxed{ }") == "5"  # an empty box is passed over
    assert extract_answer("\\boxed{}") is None
    # many unclosed boxes (a degenerate generation) are scanned once, not once per box: this took
    # hours when each box scanned to the end of the text
    assert extract_answer("\\boxed{7} " + "\\boxed{" * 50_000) == "7"
    assert extract_answer("{" * 100_000 + "\\boxed{8}") == "8"


def test_gold_answer_and_normalize():
    assert gold_answer("He makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gold_answer("#### 1,000") == "1000"
    assert gold_answer(["$\\frac{2}{3}$"]) == "\\frac{2}{3}"
    assert gold_answer(["$69$,$84$"]) == "69,84"
    assert gold_answer(42) == "42"
    for bad in ({"value": 5}, [1, None], None, True, [["a"]]):
        with pytest.raises(TypeError):
            gold_answer(bad)
    with pytest.raises(ValueError):
        gold_answer(float("nan"))
    assert normalize_answer("\\left( 3, 4 \\right).") == "(3,4)"
    assert normalize_answer("(3)") == "3"
    assert normalize_answer("\\text{(073)}") == "73"
    assert normalize_answer("$12,345$") == "12345"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"


@pytest.mark.parametrize("response,gt,expected", CASES)
def test_is_correct(response, gt, expected):
    assert is_correct(response, gt) is expected


def test_grade_many_matches_is_correct():
    pairs = [(r, g) for r, g, _ in CASES]
    assert grade_many(pairs) == [e for _, _, e in CASES]


def test_inline_grader_agrees():
    g = Grader(workers=0)
    assert g.grade_many([(r, gt) for r, gt, _ in CASES]) == [e for _, _, e in CASES]


def test_threads_give_serial_results():
    pairs = [(r, gt) for r, gt, _ in CASES]
    serial = [is_correct(r, gt) for r, gt in pairs]
    with Grader(workers=2) as g:
        with ThreadPoolExecutor(4) as ex:
            threaded = list(ex.map(lambda p: g.is_correct(*p), pairs))
            # and batch calls racing each other
            batches = list(ex.map(lambda _: g.grade_many(pairs), range(4)))
    assert threaded == serial
    assert all(b == serial for b in batches)


def _grade_in_child(pair):
    return is_correct(*pair)


def _one_worker():
    import os

    os.environ["DIRL_GRADER_WORKERS"] = "1"


def test_process_pool_gives_serial_results():
    pairs = [(r, gt) for r, gt, _ in CASES]
    serial = grade_many(pairs)
    import multiprocessing as mp

    for method in ("fork", "spawn"):
        with ProcessPoolExecutor(2, mp_context=mp.get_context(method), initializer=_one_worker) as ex:
            assert list(ex.map(_grade_in_child, pairs)) == serial, method


def test_pathological_input_is_bounded(caplog):
    """A comparison past its deadline counts wrong, its worker is killed and replaced (behaviour,
    not a wall-clock bound: the deadline path must be the one taken)."""
    with Grader(workers=1, timeout=1.5) as g, caplog.at_level(logging.WARNING, logger="dirl.rewards.math"):
        assert g.is_correct("\\boxed{\\sqrt{4}}", "2") is True  # a worker is up
        first = g._workers[0].proc.pid
        assert g.is_correct(PATHOLOGICAL, "5") is False
        assert any("timed out" in r.getMessage() for r in caplog.records)
        assert g._workers[0].proc is None  # the stuck worker was killed
        # the pool recovers: the next comparison uses a fresh worker and is right
        assert g.is_correct("\\boxed{\\frac{2}{4}}", "0.5") is True
        assert g._workers[0].proc.pid != first
        # a batch holding one pathological item: the rest still grade
        out = g.grade_many([("\\boxed{\\sqrt{4}}", "2"), (PATHOLOGICAL, "5"), ("\\boxed{2^{10}}", "1024")])
        assert out == [True, False, True]


def test_runaway_answer_is_cheap(monkeypatch):
    """An answer over MAX_ANSWER_CHARS never reaches math-verify (checked by making it fail)."""
    import dirl.rewards.math as rm

    def no_math_verify(*a, **k):
        raise AssertionError("a runaway answer went to math-verify")

    monkeypatch.setattr(rm, "math_verify_equal", no_math_verify)
    with Grader(workers=0) as g:
        assert g.is_correct("\\boxed{" + "1+" * 3000 + "1}", "3001") is False
        assert g.is_correct("\\boxed{" + "x" * 3000 + "}", "x" * 3000) is True  # string equality still counts


def test_pathological_from_threads():
    with Grader(workers=2, timeout=1.0) as g:
        res = {}

        def work(i):
            res[i] = g.is_correct(PATHOLOGICAL if i % 2 else "\\boxed{\\sqrt{9}}", "3")

        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()  # a hang fails through the suite's per-test timeout
        assert res == {0: True, 1: False, 2: True, 3: False}


# --------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------


def test_cosine_schedule():
    assert cosine_schedule(0, 10, 0.5, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(10, 10, 0.5, 1.0) == pytest.approx(0.5)
    assert cosine_schedule(5, 10, 0.5, 1.0) == pytest.approx(0.75)
    # quarter way: 1 - 0.5 * (1 - cos(pi/4)) / 2
    assert cosine_schedule(2.5, 10, 0.5, 1.0) == pytest.approx(1.0 - 0.25 * (1 - math.cos(math.pi / 4)))
    assert cosine_schedule(20, 10, 0.5, 1.0) == pytest.approx(0.5)  # clipped


def test_cosine_reward_hand_values():
    L = 100
    assert cosine_reward(True, 0, L) == pytest.approx(1.0)
    assert cosine_reward(True, 50, L) == pytest.approx(0.75)
    assert cosine_reward(True, 99, L) == pytest.approx(1.0 - 0.5 * (1 - math.cos(math.pi * 0.99)) / 2)
    assert cosine_reward(False, 0, L) == pytest.approx(-0.5)
    assert cosine_reward(False, 50, L) == pytest.approx(-0.25)
    assert cosine_reward(True, 100, L) == -0.5
    assert cosine_reward(False, 130, L) == -0.5


def test_tokens_per_step():
    # 8 tokens kept in steps 1,1,2,2 | 3,3,3,3 -> 8 tokens / 3 steps
    assert tokens_per_step([1, 1, 2, 2, 3, 3, 3, 3]) == pytest.approx(8 / 3)
    # only the response counts: the first 5 tokens use steps {1, 2, 3}
    assert tokens_per_step([1, 1, 2, 2, 3, 3, 3, 3], 5) == pytest.approx(5 / 3)
    assert tokens_per_step([1, 2, 3, 4], 4) == 1.0
    assert tokens_per_step([], 0) == 0.0
    assert tokens_per_step(None, 3) is None


def test_speed_reward_hand_values():
    B = 4
    assert speed_reward(True, 1.0, B) == pytest.approx(0.5)  # one token a step: slow
    assert speed_reward(True, 4.0, B) == pytest.approx(1.0)  # a block a step: fast
    assert speed_reward(True, 2.5, B) == pytest.approx(0.75)
    assert speed_reward(False, 1.0, B) == pytest.approx(0.0)
    assert speed_reward(False, 4.0, B) == pytest.approx(-0.5)
    assert speed_reward(False, 2.5, B) == pytest.approx(-0.25)
    assert speed_reward(True, 9.0, B) == pytest.approx(1.0)  # clipped


def test_format_reward():
    assert format_reward("x \\boxed{3}", "stop") == 1.0
    assert format_reward("x \\boxed{3", "stop") == 0.0
    assert format_reward("x \\boxed{3}", "length") == 0.0


def _traj(text, finish="stop", steps=None, n=None):
    steps = steps if steps is not None else [1, 1, 2, 2]
    return {"request_id": "r", "prompt_ids": [1, 2], "token_ids": list(range(len(steps))), "step_map": steps,
            "logprobs": [0.0] * len(steps), "response_length": len(steps) if n is None else n,
            "finish_reason": finish, "text": text}


def test_compute_rewards_accuracy_and_truncation():
    trajs = [_traj("\\boxed{5}"), _traj("\\boxed{6}"), _traj("\\boxed{5}", finish="length"), _traj("no answer")]
    rewards, correct = compute_rewards(trajs, ["5"] * 4)
    assert correct == [True, False, False, False]
    assert rewards == [1.0, 0.0, 0.0, 0.0]


def test_compute_rewards_weighted_sum():
    cfg = RewardConfig(weights={"accuracy": 1.0, "speed": 0.5, "format": 0.1, "cosine": 2.0}, block_size=4, max_length=8)
    # 4 tokens in 2 steps (2 tokens a step), correct, length 4 of 8
    t = _traj("\\boxed{5}", steps=[1, 1, 2, 2])
    b = score_trajectories([t], ["5"], cfg)
    speed = speed_reward(True, 2.0, 4)
    cos = cosine_reward(True, 4, 8)
    assert b.correct == [True]
    assert b.components["speed"] == [pytest.approx(speed)]
    assert b.components["cosine"] == [pytest.approx(0.75)]
    assert b.rewards[0] == pytest.approx(1.0 + 0.5 * speed + 0.1 * 1.0 + 2.0 * cos)
    assert b.tokens_per_step == [2.0]
    # a truncated response: accuracy 0, cosine -0.5 at the length limit, wrong-speed branch
    t2 = _traj("\\boxed{5}", finish="length", steps=[1, 2, 3, 4, 5, 6, 7, 8])
    b2 = score_trajectories([t2], ["5"], cfg)
    assert b2.correct == [False]
    assert b2.components["cosine"] == [-0.5]
    assert b2.components["speed"] == [pytest.approx(0.0)]


def test_caller_supplies_lengths():
    cfg = RewardConfig(weights={"cosine": 1.0, "speed": 1.0})
    with pytest.raises(ValueError, match="max_length"):
        compute_rewards([_traj("\\boxed{1}")], ["1"], cfg, block_size=4)
    r, c = compute_rewards([_traj("\\boxed{1}")], ["1"], cfg, max_length=8, block_size=4)
    assert c == [True]
    assert r[0] == pytest.approx(0.75 + speed_reward(True, 2.0, 4))


def test_reward_config_from_yaml(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Top:
        rewards: RewardConfig = field(default_factory=RewardConfig)

        def validate(self):
            self.rewards.validate()

    p = tmp_path / "r.yaml"
    p.write_text("rewards:\n  weights: {accuracy: 1.0, speed: 0.2}\n  block_size: 4\n  cosine_correct: [1.0, 0.6]\n")
    cfg = load_config(Top, p)
    assert cfg.rewards.weights == {"accuracy": 1.0, "speed": 0.2}
    assert cfg.rewards.cosine_correct == (1.0, 0.6)
    with pytest.raises(ConfigError, match="rewards.weights.nope"):
        load_config(Top, p, ["rewards.weights.nope=1"])


def test_a_failing_or_non_finite_custom_reward_is_named_with_its_trajectory():
    from dirl.rewards import REWARDS, RewardError, register_reward

    trajs = [_traj("\\boxed{5}"), _traj("\\boxed{6}")]
    cases = {"boom": lambda c: 1.0 if c.correct else 1 / 0, "nan": lambda c: math.nan if not c.correct else 0.5,
             "text": lambda c: "high"}
    try:
        for name, fn in cases.items():
            register_reward(name, fn)
        with pytest.raises(RewardError, match=r"reward 'boom' failed on trajectory 1 of the batch \(ZeroDivisionError"):
            score_trajectories(trajs, ["5", "5"], RewardConfig(weights={"boom": 1.0}))
        with pytest.raises(RewardError, match=r"reward 'nan' returned nan for trajectory 1 .* must be finite"):
            score_trajectories(trajs, ["5", "5"], RewardConfig(weights={"nan": 1.0}))
        with pytest.raises(RewardError, match=r"reward 'text' failed on trajectory 0 .*ValueError"):
            score_trajectories(trajs, ["5", "5"], RewardConfig(weights={"text": 1.0}))
        with pytest.raises(TypeError, match="not callable"):
            register_reward("seven", 7)
    finally:
        for name in cases:
            REWARDS.pop(name, None)
