"""The RL trainer: prompt order and cursor, DAPO refill, micro-batch planning, gradient invariance
(micro-batches, 1 vs 2 processes), learning through a real server with in-place weight pushes,
kill and resume, and a rollout server dying mid-rollout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dirl.config import ConfigError, DecodingConfig
from dirl.train.common import Dist
from dirl.train.rl.config import load_rl_config
from dirl.train.rl.groups import FillError, Group, Sampling, collect_groups, rollout_and_score
from dirl.train.rl.prompts import PromptSampler, load_problems
from dirl.train.rl.recipe import train_rl
from dirl.train.rl.update import make_samples, micro_batches_per_rank, plan_micro_batches
from ports import rendezvous_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- prompts and groups -------------------------------------------------------------------------------


def test_prompt_sampler_is_seeded_and_resumable():
    a = PromptSampler(10, seed=3)
    first = a.draw(4) + a.draw(4) + a.draw(4)  # crosses into the second epoch
    assert sorted(first[:10]) == list(range(10))  # one epoch is a permutation
    b = PromptSampler(10, seed=3)
    b.draw(5)
    c = PromptSampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.draw(7) == first[5:12]
    assert PromptSampler(10, seed=4).draw(10) != first[:10]
    with pytest.raises(ConfigError, match="data"):
        PromptSampler(11, seed=3).load_state_dict(b.state_dict())


def _fake_generate(verdicts):
    """A stand-in for rollouts: prompt i's group has correctness ``verdicts[i]`` (for the filter logic)."""

    def gen(problems, prompts, rnd):
        return [Group(p, ids, [{}] * 4, [float(c) for c in verdicts[p["i"]]], list(verdicts[p["i"]]), rnd)
                for p, ids in zip(problems, prompts)]

    return gen


def test_dapo_filter_refills_and_advances_the_cursor():
    verdicts = {0: [1, 1, 1, 1], 1: [0, 1, 0, 0], 2: [0, 0, 0, 0], 3: [1, 0, 1, 1], 4: [0, 0, 0, 0],
                5: [1, 0, 0, 0], 6: [1, 1, 0, 0], 7: [0, 1, 1, 1]}
    sampler = PromptSampler(8, seed=0)
    order = sampler.peek(8)

    def draw(n):
        return [({"i": i, "id": str(i)}, [i]) for i in sampler.draw(n)]

    kept, st = collect_groups(draw, _fake_generate(verdicts), target=3, filter_groups=True, max_rounds=5)
    mixed = [i for i in order if 0 < sum(verdicts[i]) < 4]
    assert [g.problem["i"] for g in kept] == mixed[:3]
    assert all(0 < sum(g.correct) < 4 for g in kept)
    assert st.drawn == sampler.cursor and st.rounds >= 2  # refill rounds drew more prompts
    assert len(st.all_groups) == st.drawn  # every drawn prompt was rolled out and counted
    assert st.dropped == st.drawn - len(kept) - st.surplus
    # the bound: never more than max_rounds rounds, and a step still short fails loudly, naming the keys
    s2 = PromptSampler(8, seed=0)
    with pytest.raises(FillError, match=r"after 2 sampling rounds \(6 prompts drawn\) only 0 of 3 groups.*"
                                        r"train.max_sampling_rounds or train.oversample"):
        collect_groups(lambda n: [({"i": i, "id": str(i)}, [i]) for i in s2.draw(n)],
                       _fake_generate({i: [0, 0, 0, 0] for i in range(8)}), target=3,
                       filter_groups=True, max_rounds=2)
    assert s2.cursor == 6  # the drawn prompts were consumed all the same
    # switched off: one round, everything kept
    s3 = PromptSampler(8, seed=0)
    kept3, st3 = collect_groups(lambda n: [({"i": i, "id": str(i)}, [i]) for i in s3.draw(n)],
                                _fake_generate(verdicts), target=3, filter_groups=False, max_rounds=5)
    assert len(kept3) == 3 and st3.rounds == 1 and s3.cursor == 3


def test_a_step_short_of_groups_says_how_many_prompts_were_too_long():
    """The source drops prompts over data.max_prompt_tokens: a step short because of them names that
    key; with the filter on, the filter's own message counts them too."""
    mixed = {i: [1, 0, 0, 0] for i in range(8)}
    flat = {i: [0, 0, 0, 0] for i in range(8)}

    def odd_only(sampler):  # the even prompts are "too long"
        return lambda n: [({"i": i, "id": str(i)}, [i]) for i in sampler.draw(n) if i % 2]

    with pytest.raises(FillError, match=r"^config key 'data.max_prompt_tokens': 2 of the 4 prompts drawn were skipped"):
        collect_groups(odd_only(PromptSampler(8, seed=0)), _fake_generate(mixed), target=4, filter_groups=False,
                       max_rounds=5)
    with pytest.raises(FillError, match=r"^config key 'train.max_sampling_rounds': after 2 sampling rounds \(6 prompts "
                                        r"drawn; 3 of them were skipped as longer than data.max_prompt_tokens\)"):
        collect_groups(odd_only(PromptSampler(8, seed=0)), _fake_generate(flat), target=3, filter_groups=True,
                       max_rounds=2)


def test_oversampling_draws_more_and_keeps_exactly_the_target():
    verdicts = {i: ([1, 0, 0, 0] if i % 2 else [1, 1, 1, 1]) for i in range(20)}
    s = PromptSampler(20, seed=1)
    kept, st = collect_groups(lambda n: [({"i": i, "id": str(i)}, [i]) for i in s.draw(n)],
                              _fake_generate(verdicts), target=4, filter_groups=True, max_rounds=3, oversample=2.0)
    assert st.drawn >= 8  # the first round drew twice the missing groups
    assert len(kept) == 4 and s.cursor == st.drawn


def test_advantages_of_groups():
    g1 = Group({}, [], [{"token_ids": [1, 2], "response_length": 2}] * 4, [1.0, 0.0, 0.0, 1.0], [True, False, False, True])
    g2 = Group({}, [], [{"token_ids": [1, 2, 3], "response_length": 1}] * 4, [0.5] * 4, [False] * 4)
    s = make_samples([g1, g2])
    assert [x.advantage for x in s] == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [x.n_scored for x in s] == [2] * 4 + [1] * 4
    assert [x.n_scored for x in make_samples([g2], score_after_eos=True)] == [3] * 4


def test_micro_batch_plan_covers_everything_once_with_equal_counts():
    n_micro = micro_batches_per_rank(capacity=64, num_mini_batches=2, world=3, micro_batch_size=4)
    assert n_micro == 3
    seen = []
    for rank in range(3):
        plan = plan_micro_batches(50, 2, rank, 3, n_micro)  # fewer than capacity: some micro-batches empty
        assert len(plan) == 2 and all(len(m) == n_micro for m in plan)
        seen += [i for mini in plan for micro in mini for i in micro]
    assert sorted(seen) == list(range(50))


# -- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("rollout.decoding.temperature=0", "rollout.decoding.temperature"),
    ("train.num_generations=1", "train.num_generations"),
    ("rollout.decoding.block_size=8", "rollout.decoding.block_size"),
    ("loss.loss_type=sum", "loss.loss_type"),
    ("train.oversample=0.5", "train.oversample"),
    ("custom_rewards.x=nomodule:f", "custom_rewards.x"),
])
def test_bad_rl_configs_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_rl_config(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_rl_defaults_are_the_spec_values():
    """SPEC section 6: eps_low 0.2, eps_high 0.28 (not DiRL's 0.2 + 0.08 written as 0.2), beta 0 (no
    reference model), grpo aggregation, gradient clipping 1.0, weight decay 0, one update per
    rollout batch; post-EOS tokens take no loss; SPEC section 4/6 decoding: 4 steps, dynamic tau 0.9,
    T 1.0, top-p 1.0. The paper configs say the same."""
    cfg = load_rl_config(None, [])
    lo = cfg.loss
    assert (lo.epsilon, lo.epsilon_high, lo.beta, lo.loss_type) == (0.2, 0.28, 0.0, "grpo")
    assert lo.score_after_eos is False and lo.layout == "packed" and lo.behaviour_logprobs == "auto"
    assert (cfg.optim.max_grad_norm, cfg.optim.weight_decay) == (1.0, 0.0)
    assert (cfg.train.num_mini_batches, cfg.train.num_iterations) == (1, 1)
    d = cfg.rollout.decoding
    assert (d.denoising_steps, d.unmasking_strategy, d.confidence_threshold, d.temperature, d.top_p) == (
        4, "low_confidence_dynamic", 0.9, 1.0, 1.0)
    for name in ("rl_sdar8b.yaml", "rl_sdar8b_dapo.yaml"):
        c = load_rl_config(str(ROOT / "configs" / name), ["model.path=''", "server.urls=[http://10.0.0.1:8000]"])
        assert (c.loss.epsilon, c.loss.epsilon_high) == (0.2, 0.28), name
        assert c.rollout.decoding.block_size == 4 and c.rollout.decoding.denoising_steps == 4, name


def test_paper_configs_load():
    for name in ("rl_sdar8b.yaml", "rl_sdar8b_dapo.yaml"):
        cfg = load_rl_config(str(ROOT / "configs" / name), ["model.path=''", "server.urls=[http://10.0.0.1:8000]"])
        assert cfg.train.prompts_per_step == 128 and cfg.optim.lr == 1e-6
        assert cfg.rollout.decoding.top_k == 50 and cfg.rollout.decoding.confidence_threshold == 0.9
    dapo = load_rl_config(str(ROOT / "configs" / "rl_sdar8b_dapo.yaml"), ["model.path=''", "server.urls=[http://x:1]"])
    assert dapo.train.filter_groups and dapo.loss.loss_type == "dapo"


@pytest.mark.parametrize("old, new", [
    ("train.samples_per_prompt=4", "train.num_generations"),
    ("train.mini_batches=2", "train.num_mini_batches"),
    ("loss.aggregation=dapo", "loss.loss_type"),
    ("loss.clip_eps_low=0.2", "loss.epsilon"),
    ("loss.clip_eps_high=0.28", "loss.epsilon_high"),
    ("loss.kl_beta=0.1", "loss.beta"),
    ("rollout.urls=[http://x:1]", "server.urls"),
    ("rollout.timeout_s=5", "server.timeout_s"),
    ("eval.samples=2", "eval.num_samples"),
    ("eval.problems=20", "eval.num_problems"),
    ("data.num_samples=20", "data.limit"),
])
def test_old_rl_key_names_name_the_new_ones(old, new):
    with pytest.raises(ConfigError) as e:
        load_rl_config(None, [old])
    msg = str(e.value)
    assert f"'{old.split('=')[0]}' was renamed to '{new}'" in msg and "\n" not in msg


# -- gradient invariance -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def update_samples(tiny, tmp_path_factory):
    """Real trajectories of the tiny model with advantages and perturbed old log-probs, as JSON."""
    from dirl.rollout.backend import GenerateRequest
    from dirl.rollout.engine import Engine

    model, _ = tiny
    eng = Engine(model, denoising_steps=4, unmasking_strategy="low_confidence_dynamic", confidence_threshold=0.02)
    reqs = [GenerateRequest(request_id=f"u{i}", input_ids=list(range(5, 5 + n)), max_new_tokens=8, temperature=1.0,
                            top_k=0, top_p=1.0, do_sample=True, stop_token_ids=[2], seed=i)
            for i, n in enumerate([5, 8, 6, 9, 7, 4, 10])]
    trajs = eng.generate(reqs)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i, t in enumerate(trajs):
        n = int(t["response_length"])
        old = [lp + float(torch.randn((), generator=g)) * 0.2 if k < n else None for k, lp in enumerate(t["logprobs"])]
        rows.append({"traj": t, "advantage": [1.2, -0.7, 0.3, -1.5, 0.9, 0.0, -0.2][i], "n_scored": n, "old": old})
    p = tmp_path_factory.mktemp("upd") / "samples.json"
    p.write_text(json.dumps(rows))
    return p


def _single(tiny_dir, samples, tmp_path, n_micro, aggregation="grpo", layout="packed"):
    from helpers_rl_dist import run_update

    out = tmp_path / f"single-{n_micro}-{aggregation}-{layout}.pt"
    run_update(str(tiny_dir), str(samples), str(out), n_micro, "single", aggregation, "old", layout)
    return torch.load(out, weights_only=False)


def _max_rel(a, b):
    return max((a[k] - b[k]).abs().max().item() / (b[k].abs().max().item() + 1e-12) for k in b)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_gradient_is_independent_of_the_micro_batch_split(tiny_dir, update_samples, tmp_path, aggregation):
    one = _single(tiny_dir, update_samples, tmp_path, 1, aggregation)
    three = _single(tiny_dir, update_samples, tmp_path, 3, aggregation)
    seven = _single(tiny_dir, update_samples, tmp_path, 7, aggregation)
    assert one["stats"]["clip_fraction"] > 0  # the old log-probs were perturbed: clipping is exercised
    assert max(v.abs().max().item() for v in one["delta"].values()) > 0
    assert _max_rel(three["delta"], one["delta"]) < 1e-4
    assert _max_rel(seven["delta"], one["delta"]) < 1e-4
    rounds = _single(tiny_dir, update_samples, tmp_path, 2, aggregation, layout="rounds")
    assert _max_rel(rounds["delta"], one["delta"]) < 1e-4


def test_recorded_logprobs_as_behaviour_policy(tiny_dir, update_samples, tmp_path):
    """behaviour_logprobs=rollout uses the engine's log-probs in the ratio: the same update as a
    pre-pass that produced exactly those numbers."""
    from helpers_rl_dist import run_update

    rows = json.loads(update_samples.read_text())
    for r in rows:
        n = r["traj"]["response_length"]
        r["old"] = [lp if k < n else None for k, lp in enumerate(r["traj"]["logprobs"])]
    f = tmp_path / "rec.json"
    f.write_text(json.dumps(rows))
    run_update(str(tiny_dir), str(f), str(tmp_path / "a.pt"), 2, "single", "grpo", "old")
    run_update(str(tiny_dir), str(f), str(tmp_path / "b.pt"), 2, "single", "grpo", "rollout")
    a, b = torch.load(tmp_path / "a.pt", weights_only=False), torch.load(tmp_path / "b.pt", weights_only=False)
    assert _max_rel(b["delta"], a["delta"]) < 1e-6
    assert abs(a["stats"]["ratio_mean"] - 1.0) < 1e-3  # the engine's numbers are the policy's


def _torchrun(tiny_dir, samples, out, n_micro, strategy, timeout=240):
    from helpers_rl_dist import zero1_config

    if strategy == "deepspeed":
        zero1_config(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(rendezvous_port()), str(TESTS / "helpers_rl_dist.py"), "--model", str(tiny_dir), "--samples", str(samples),
           "--out", str(out), "--n-micro", str(n_micro), "--strategy", strategy]
    env = _env()
    env["ACCELERATE_USE_CPU"] = "true"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_gradient_is_the_same_with_two_processes_ddp(tiny_dir, update_samples, tmp_path):
    one = _single(tiny_dir, update_samples, tmp_path, 1)
    two = _torchrun(tiny_dir, update_samples, tmp_path / "ddp.pt", 2, "ddp")
    assert two["stats"]["responses"] == one["stats"]["responses"]
    assert _max_rel(two["delta"], one["delta"]) < 1e-4


@pytest.mark.slow
def test_gradient_is_the_same_with_two_processes_deepspeed_zero1(tiny_dir, update_samples, tmp_path):
    one = _single(tiny_dir, update_samples, tmp_path, 1)
    two = _torchrun(tiny_dir, update_samples, tmp_path / "zero1.pt", 3, "deepspeed")
    assert _max_rel(two["delta"], one["delta"]) < 1e-4


# -- end to end through the real server ------------------------------------------------------------------------------


def _small_run(tmp_path, tiny_dir, steps, extra=()):
    return [
        f"model.path={tiny_dir}", f"output_dir={tmp_path}", "run_name=run", "runs_dir=/nonexistent",
        f"train.steps={steps}", "train.prompts_per_step=4", "train.num_generations=8",
        "train.micro_batch_size=32", "rollout.decoding.max_new_tokens=8", "server.max_batch_size=64",
        "eval.enabled=false", "logging.progress_bar=false", "logging.tensorboard=false",
        "rollout.decoding.unmasking_strategy=low_confidence_static", "rollout.decoding.denoising_steps=2",
        "train.filter_groups=false",  # the tiny random model answers nothing right: every group is flat
        *extra,
    ]


@pytest.mark.slow
def test_rl_raises_a_toy_reward_through_the_server(tiny_dir, tmp_path):
    """Reward = fraction of '7' in the response; the tiny random model starts near 1/100."""
    cfg = load_rl_config(None, _small_run(tmp_path, tiny_dir, 8, [
        "custom_rewards.sevens=helpers_rl_dist:digit_fraction", "rewards.weights={sevens: 1.0}",
        "optim.lr=3e-3", "train.save_every=0"]))
    summary = train_rl(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rew = [r["reward/mean"] for r in rows if "reward/mean" in r]
    first, last = sum(rew[:3]) / 3, sum(rew[-3:]) / 3
    assert last > 3 * first and last - first > 0.05, rew
    assert all(r["time/weight_push"] > 0 for r in rows if "time/weight_push" in r)
    assert max(r["mismatch/max"] for r in rows if "mismatch/max" in r) < 1e-3  # servers got every update
    assert (tmp_path / "run" / "curves.png").is_file() and summary["final_model"]


@pytest.mark.slow
def test_kl_several_updates_dapo_and_rounds_run_end_to_end(tiny_dir, tmp_path):
    """The other branches of the step: a frozen reference model (beta > 0), old log-probs from a
    pre-pass (two mini-batches), DAPO aggregation, the filter's bound, the rounds layout."""
    cfg = load_rl_config(None, _small_run(tmp_path, tiny_dir, 2, [
        "custom_rewards.sevens=helpers_rl_dist:digit_fraction", "rewards.weights={sevens: 1.0}",
        "loss.beta=0.1", "train.num_mini_batches=2", "loss.loss_type=dapo", "loss.layout=rounds",
        "train.filter_groups=true", "train.max_sampling_rounds=2", "optim.lr=1e-3", "train.save_every=0",
        "train.micro_batch_size=8"]))
    # no response is ever 'correct' for the accuracy verdict: every group is flat, the refill reaches its
    # bound, and the step fails loudly instead of training on nothing
    with pytest.raises(FillError, match="after 2 sampling rounds .* only 0 of 4 groups"):
        train_rl(cfg)
    # with the filter off, both mini-batches update, KL is measured against the reference
    cfg = load_rl_config(None, _small_run(tmp_path, tiny_dir, 2, [
        "custom_rewards.sevens=helpers_rl_dist:digit_fraction", "rewards.weights={sevens: 1.0}",
        "loss.beta=0.1", "train.num_mini_batches=2", "loss.loss_type=dapo", "loss.layout=rounds",
        "optim.lr=1e-3", "train.save_every=0", "train.micro_batch_size=8", "run_name=run2"]))
    train_rl(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in rows] == [2, 2]
    assert rows[0]["kl"] >= 0 and rows[1]["kl"] > 0  # the policy moved away from the reference
    assert rows[0]["mismatch/max"] < 1e-3 and rows[0]["time/logprobs"] > 0


def test_kill_and_resume_continues_from_the_saved_cursor(tiny_dir, tmp_path):
    """The first run holds at step 3's rewards (helpers_rl_dist.hold_from_step), after step 2's
    checkpoint, and is killed there: an event, so a fast machine cannot finish the run first."""
    args = [sys.executable, "-m", "dirl.cli", "rl", *_small_run(tmp_path, tiny_dir, 4, [
        "train.save_every=2", "train.prompts_per_step=2", "train.num_generations=2", "optim.lr=1e-3",
        "custom_rewards.hold=helpers_rl_dist:hold_from_step", "rewards.weights={accuracy: 1.0, hold: 1.0}"])]
    run = tmp_path / "run"
    held = tmp_path / "held"
    env = {**_env(), "DIRL_TEST_HOLD_STEP": "3", "DIRL_TEST_HOLD_FILE": str(held)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not held.is_file():  # waits for the event; a hang fails by the suite's per-test timeout
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        assert held.read_text().startswith("s3-")
        assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
        assert not (run / "checkpoints" / "step_00000004").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its rollout server
        proc.wait()
    r = subprocess.run(args, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    rows = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    # the same prompts, in the same order, as an uninterrupted run: the seeded order from cursor 0
    cfg = load_rl_config(None, _small_run(tmp_path, tiny_dir, 4))
    problems = load_problems(cfg.data)
    expected = [problems[i]["id"] for i in PromptSampler(len(problems), seed=cfg.data.seed).draw(8)]
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [r["problem_id"] for r in rows] == expected
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["extra"]["sampler"]["cursor"] == 8
    # the model the run started from travels with its checkpoints (the resumed run's β reference)
    summary = json.loads((run / "summary.json").read_text())
    assert state["extra"]["init_model"] == summary["initial_model"] == str(Path(tiny_dir).resolve())


# -- a server dying mid-rollout ------------------------------------------------------------------------------------------


def _rollout_setup(tiny_dir):
    from dirl.data.chat import prompt_ids
    from dirl.model.sdar import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    cfg = load_rl_config(None, [f"model.path={tiny_dir}", "rollout.decoding.max_new_tokens=32"])
    sampling = Sampling(cfg.rollout.decoding, [2], cfg.train.seed, cfg.rewards, 4)
    probs = [{"id": str(i), "answer": str(100 + i)} for i in range(12)]
    prompts = [prompt_ids(tok, f"What is {i}+100?") for i in range(12)]
    return sampling, probs, prompts, Dist(None)


def _rollout_in_thread(fn):
    """Runs ``fn()`` on a thread; ``box`` gets its result or exception, ``ended`` is set after."""
    box, ended = {}, threading.Event()

    def go():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - checked by the test
            box["err"] = e
        finally:
            ended.set()

    th = threading.Thread(target=go)
    th.start()
    return th, box, ended


@pytest.mark.slow
def test_a_dying_server_is_retried_on_the_pool_and_rewards_stay_with_their_prompts(tiny_dir):
    """The first server holds its requests (tests/helpers_gated_server.py) and is killed once it
    reports them in its engine; the second takes them over."""
    from helpers_gated_server import GatedServer

    from dirl.rollout.client import RolloutClient
    from dirl.rollout.launch import start_server

    sampling, probs, prompts, dist = _rollout_setup(tiny_dir)
    dec = DecodingConfig(max_new_tokens=32)
    b = start_server(tiny_dir, decoding=dec, device="cpu", max_batch_size=8, wait=False)
    a = GatedServer(tiny_dir)
    try:
        b.wait_ready()
        # a is first: its workers take the first chunks
        client = RolloutClient([a.url, b.url], retries=4, batch_size=4, max_concurrency=2, backoff=0.2)
        th, box, ended = _rollout_in_thread(lambda: rollout_and_score(
            client, probs, prompts, 4, step=0, rnd=0, s=sampling, dist=dist))
        held = a.wait_in_flight()
        assert held > 0 and not ended.is_set()  # the rollout cannot finish while a holds requests
        a.kill()
        th.join()
        assert not a.alive()
    finally:
        a.kill()
        b.stop()
    assert "err" not in box, box.get("err")
    groups = box["out"]
    assert [g.problem["id"] for g in groups] == [p["id"] for p in probs]
    for g, ids in zip(groups, prompts):
        assert len(g.trajectories) == 4 and len(g.rewards) == 4
        assert all(t["prompt_ids"] == ids for t in g.trajectories)


def test_a_dying_only_server_fails_the_step_with_a_clear_error(tiny_dir):
    """The only server is killed while its engine holds the step's requests (an event, not a
    delay): the step fails with an error naming them."""
    from helpers_gated_server import GatedServer

    from dirl.rollout.client import RolloutClient, RolloutError
    sampling, probs, prompts, dist = _rollout_setup(tiny_dir)
    a = GatedServer(tiny_dir)
    try:
        client = RolloutClient([a.url], retries=2, batch_size=48, max_concurrency=1, backoff=0.1)
        th, box, ended = _rollout_in_thread(lambda: rollout_and_score(
            client, probs, prompts, 4, step=0, rnd=0, s=sampling, dist=dist))
        assert a.wait_in_flight() == 48 and not ended.is_set()
        a.kill()
        th.join()
    finally:
        a.kill()
    e = box.get("err")
    assert isinstance(e, RolloutError), box
    # either the chunk's own retries run out first or the client sees the only server gone
    assert re.search(
        r"failed( after 3 attempts|: no rollout server answers \(1 tried, 3 times each\))", str(e)), str(e)
    assert e.request_ids and all(r.startswith("s0-r0-p") for r in e.request_ids)
