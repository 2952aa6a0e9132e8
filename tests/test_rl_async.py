"""One-step off-policy RL (``train.staleness: 1``) against a real rollout server on the tiny model:
the schedule (step t's rollout made with the weights before step t-1's update), the ratio against
the engine's recorded log-probs (checked against a recomputation with those stale weights), resume
from a checkpoint holding the rollout in flight, the configuration rules, and ``staleness: 0``
equal to the synchronous loop written out step by step."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from dirl.config import ConfigError
from dirl.train.common import PhaseTimer, unwrap
from dirl.train.rl.config import load_rl_config
from dirl.train.rl.groups import rollout_metrics
from dirl.train.rl.recipe import (
    PENDING_FILE,
    collect_step_groups,
    push_weights,
    rl_step,
    run_updates,
    score_before_update,
    setup_run,
    step_samples,
    train_rl,
    update_metrics,
)
from dirl.train.rl.update import plan_micro_batches

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 response tokens, 2 prompts x 4 samples, reward = fraction of '7' (dense, so every group has an advantage)
BASE = ["runs_dir=/nonexistent", "train.prompts_per_step=2", "train.num_generations=4", "train.micro_batch_size=8",
        "train.filter_groups=false", "rollout.decoding.max_new_tokens=8", "eval.enabled=false",
        "logging.progress_bar=false", "logging.tensorboard=false", "optim.lr=3e-3",
        "rollout.decoding.unmasking_strategy=low_confidence_static", "rollout.decoding.denoising_steps=2",
        "custom_rewards.sevens=helpers_rl_dist:digit_fraction", "rewards.weights={sevens: 1.0}"]


def _cfg(tmp_path, tiny_dir, name, extra=()):
    return load_rl_config(None, [f"model.path={tiny_dir}", f"output_dir={tmp_path}", f"run_name={name}", *BASE,
                                 *extra])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "time"}


@pytest.mark.parametrize("extra, keys", [
    (["train.staleness=2"], ["train.staleness"]),
    (["train.staleness=1", "rollout.sleep_while_training=true"], ["train.staleness", "rollout.sleep_while_training"]),
    (["train.staleness=1", "train.offload_during_rollout=true"], ["train.staleness", "train.offload_during_rollout"]),
    (["train.staleness=1", "loss.behaviour_logprobs=recompute"], ["train.staleness", "loss.behaviour_logprobs"]),
])
def test_bad_staleness_combinations_are_one_line_errors(extra, keys):
    with pytest.raises(ConfigError) as e:
        load_rl_config(None, extra)
    assert all(k in str(e.value) for k in keys) and "\n" not in str(e.value)


def test_staleness_0_is_the_synchronous_loop_step_for_step(tiny_dir, tmp_path):
    """train_rl with staleness 0 against the synchronous step written out here from its phases:
    roll out with the current weights, train, push; the same metrics and final parameters."""
    extra = ["train.steps=2", "train.save_every=0", "rollout.sleep_while_training=false", "log_samples=false"]
    summary = train_rl(_cfg(tmp_path, tiny_dir, "loop", extra + ["train.staleness=0"]))
    got = [_untimed(r) for r in _rows(Path(summary["run_dir"]))]
    want = []
    with contextlib.ExitStack() as cleanup:
        run = setup_run(_cfg(tmp_path, tiny_dir, "by-hand", extra), cleanup)
        for step in range(2):
            kept, stats = collect_step_groups(run, step, PhaseTimer())
            m = rollout_metrics(stats, kept, run.cfg.train.prompts_per_step)
            samples = step_samples(run, kept, step)
            plan = plan_micro_batches(len(samples), 1, 0, 1, run.n_micro)
            measure = score_before_update(run, samples, plan)
            ups = run_updates(run, samples, plan, measure, PhaseTimer())
            push_weights(run)
            m.update(update_metrics(ups, measure, run.dist, 1))
            want.append({"step": step + 1, "staleness": 0, **m})
        from dirl.train.common import param_digests

        digest = param_digests(run.acc, run.wrapped)
    assert got == want
    assert summary["param_digest_per_rank"] == digest


def _weights(run) -> dict:
    return {k: v.detach().clone() for k, v in unwrap(run.wrapped).model.state_dict().items()}


def test_one_step_off_policy_schedule_and_ratio_against_the_stale_weights(tiny_dir, tmp_path):
    """Step t >= 1 trains on a rollout made with θ_{t-1} (the weights before step t-1's update):
    the engine's recorded log-probs equal the log-probs of θ_{t-1} recomputed here, and the ratio
    statistics of the step equal exp(log p_θt - recorded) over the scored tokens, which are not 1."""
    from dirl.model.sdar import load_model
    from dirl.train.layouts import build_batch, score_batch

    cfg = _cfg(tmp_path, tiny_dir, "async", ["train.steps=3", "train.staleness=1", "train.save_every=0"])
    thetas, rollouts, metrics = [], {}, []
    with contextlib.ExitStack() as cleanup:
        run = setup_run(cfg, cleanup)
        assert run.behaviour == "rollout" and run.sleeps is False
        run.rollout_hook = lambda step, ro: rollouts.__setitem__(step, ro)
        for step in range(3):
            thetas.append(_weights(run))  # θ_step: the trainer's weights as step `step` starts
            metrics.append(rl_step(run, step))
    assert [rollouts[s].version for s in range(3)] == [0, 0, 1]
    assert [m["staleness"] for m in metrics] == [0, 1, 1]
    assert all(m["time/rollout_wait"] >= 0 for m in metrics)
    scorer = load_model(tiny_dir, device="cpu", dtype="float32")
    B, M = scorer.block_size, scorer.mask_token_id

    def logprobs(theta, trajs):
        scorer.load_state_dict(theta)
        batch = build_batch(trajs, B, M, "packed")
        with torch.no_grad():
            lp, _ = score_batch(scorer, batch)
        rec = torch.tensor([trajs[i]["logprobs"][k] for i, k in zip(batch.traj.tolist(), batch.tok.tolist())])
        return lp.double(), rec.double()

    for step in (1, 2):
        trajs = [t for g in rollouts[step].kept for t in g.trajectories]
        behaviour = rollouts[step].version
        lp_old, rec = logprobs(thetas[behaviour], trajs)
        assert (lp_old - rec).abs().max() < 1e-4, step  # the rollout's weights were θ_{step-1}
        lp_now, _ = logprobs(thetas[step], trajs)
        ratio = torch.exp((lp_now - rec).clamp(-10, 10))
        assert (ratio - 1).abs().max() > 1e-3, step  # the data really is one update old
        m = metrics[step]
        assert math.isclose(m["ratio/mean"], float(ratio.mean()), rel_tol=1e-4), (step, m["ratio/mean"])
        assert math.isclose(m["ratio/max"], float(ratio.max()), rel_tol=1e-4)
        assert math.isclose(m["ratio/min"], float(ratio.min()), rel_tol=1e-4)
        # the clipped fraction from the same ratios and the groups' advantages
        from dirl.train.dipo import group_advantages

        adv = torch.cat([torch.full((int(min(len(t["token_ids"]), t["response_length"])),), float(a))
                         for g in rollouts[step].kept
                         for t, a in zip(g.trajectories, group_advantages(g.rewards, len(g.rewards)).tolist())])
        order = build_batch(trajs, B, M, "packed")
        start = torch.cumsum(torch.tensor([0] + [int(min(len(t["token_ids"]), t["response_length"])) for t in trajs]),
                             0)
        a = adv[start[order.traj] + order.tok].double()
        clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8))
        assert abs(m["clip_fraction"] - float(clipped.double().mean())) < 1e-9


def test_async_resume_continues_identically(tiny_dir, tmp_path):
    """A 4-step run with a checkpoint after step 2 (which holds step 3's rollout, made with θ_1),
    and a second run resumed from that checkpoint: steps 3 and 4 and the final weights are equal."""
    extra = ["train.steps=4", "train.staleness=1", "train.save_every=2", "train.keep_last=0"]
    a = train_rl(_cfg(tmp_path, tiny_dir, "whole", extra))
    ck = Path(a["run_dir"]) / "checkpoints" / "step_00000002"
    pending = json.loads((ck / PENDING_FILE).read_text())
    assert pending["step"] == 2 and pending["version"] == 1
    assert not (Path(a["run_dir"]) / "checkpoints" / "step_00000004" / PENDING_FILE).exists()
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["extra"]["sampler"]["cursor"] == 4 and pending["sampler_after"]["cursor"] == 6
    b = train_rl(_cfg(tmp_path, tiny_dir, "resumed", extra + [f"train.resume={ck}"]))
    assert b["start_step"] == 2
    ra, rb = _rows(Path(a["run_dir"])), _rows(Path(b["run_dir"]))
    assert [r["step"] for r in rb] == [3, 4]
    assert [_untimed(r) for r in rb] == [_untimed(r) for r in ra[2:]]
    assert b["param_digest_per_rank"] == a["param_digest_per_rank"]
    # the synchronous loop resumes the same checkpoint from the cursor before the stored rollout
    c = train_rl(_cfg(tmp_path, tiny_dir, "sync-resumed", ["train.steps=3", "train.save_every=0",
                                                           f"train.resume={ck}"]))
    rows = _rows(Path(c["run_dir"]))
    assert [r["step"] for r in rows] == [3] and rows[0]["staleness"] == 0
    samples = [json.loads(ln) for ln in (Path(c["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    assert [s["problem_id"] for s in samples] == [g["problem"]["id"] for g in pending["groups"]]


@pytest.mark.slow
def test_async_rl_raises_a_toy_reward(tiny_dir, tmp_path):
    """The reward of the toy (fraction of '7') rises with one-step off-policy updates as in the
    synchronous test (tests/test_rl_train.py), on the same settings."""
    cfg = load_rl_config(None, [
        f"model.path={tiny_dir}", f"output_dir={tmp_path}", "run_name=run", "runs_dir=/nonexistent",
        "train.steps=8", "train.prompts_per_step=4", "train.num_generations=8", "train.micro_batch_size=32",
        "rollout.decoding.max_new_tokens=8", "server.max_batch_size=64", "eval.enabled=false",
        "logging.progress_bar=false", "logging.tensorboard=false",
        "rollout.decoding.unmasking_strategy=low_confidence_static", "rollout.decoding.denoising_steps=2",
        "train.filter_groups=false", "custom_rewards.sevens=helpers_rl_dist:digit_fraction",
        "rewards.weights={sevens: 1.0}", "optim.lr=3e-3", "train.save_every=0", "train.staleness=1"])
    train_rl(cfg)
    rows = _rows(tmp_path / "run")
    rew = [r["reward/mean"] for r in rows]
    first, last = sum(rew[:3]) / 3, sum(rew[-3:]) / 3
    assert last > 3 * first and last - first > 0.05, rew
    assert [r["staleness"] for r in rows] == [0] + [1] * 7


def test_async_servers_never_sleep_while_they_generate(tiny_dir, tmp_path, monkeypatch):
    """Read from the colocated server's own access log: with staleness 1 the servers generate step
    t+1 while the trainer trains and take the new weights (sleep -> update -> wakeup) only between
    two rollouts: never a /sleep before the rollout in flight has been answered."""
    import itertools

    monkeypatch.setenv("DIRL_SERVER_ACCESS_LOG", "1")
    cfg = _cfg(tmp_path, tiny_dir, "order", ["train.steps=3", "train.staleness=1", "train.save_every=0",
                                             "log_samples=false"])
    with contextlib.ExitStack() as cleanup:
        run = setup_run(cfg, cleanup)
        for step in range(3):
            rl_step(run, step)
    log = (tmp_path / "order" / "logs" / "server-rank0.log").read_text()
    paths = [ln.split()[3] for ln in log.splitlines() if ln.startswith("dirl serve: POST ")]
    folded = [p for p, _ in itertools.groupby(paths)]
    # rollouts 0 and 1 (θ_0), push θ_1, rollout 2 (θ_1), push θ_2
    assert folded == ["/generate", "/sleep", "/update_weights", "/wakeup"] * 2, folded
