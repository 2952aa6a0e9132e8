"""The RL recipe: ``dirl rl [CONFIG] [key=value ...]`` runs :func:`train_rl`.

With no config it is the embedded default: the newest quick-start SFT checkpoint under ``runs/``
(a fresh tiny model when there is none), the synthetic arithmetic train split, reward = accuracy,
one CPU process, a few minutes. With a config (``configs/rl_sdar8b.yaml``,
``configs/rl_sdar8b_dapo.yaml``) under ``accelerate launch`` it is the paper recipe on GPUs with
DeepSpeed ZeRO-1 and LMDeploy rollout servers.

:func:`train_rl` is set-up → loop {:func:`rl_step`, log, evaluate, save} → summary. One RL step is
this list of calls, each timed by one :class:`~dirl.train.common.PhaseTimer`:

1. :func:`collect_step_groups`: prompts (seeded order, saved cursor) → G rollouts each through the
   rollout client → rewards → DAPO's filter with refill rounds (``groups.collect_groups``);
2. :func:`~dirl.train.rl.groups.rollout_metrics`: reward, accuracy, lengths, filter counts;
3. :func:`step_samples`: group advantages (``update.make_samples``), shuffled across mini-batches;
4. :func:`~dirl.train.rl.update.plan_micro_batches`: mini-batches, this rank's share, micro-batches;
5. :func:`sleep_servers`: the memory hand-off (SPEC section 8): colocated servers sleep (KV cache
   freed; ``rollout.sleep_level`` 2: weights too) from here until their weights are pushed;
6. :func:`score_before_update`: old log-probs (off-policy) and reference log-probs (β > 0), no grad;
7. :func:`run_updates`: per mini-batch and iteration, the DiPO loss and one optimizer step;
8. :func:`push_weights`: the new weights to the rollout servers in place (update → wakeup; a server
   that did not sleep for the training sleeps first);
9. :func:`update_metrics` and the phase times; :func:`write_samples` (``samples.jsonl``).

With ``train.offload_during_rollout`` (CUDA) the trainer's weights, gradients and optimizer state
sit on the CPU during step 1, so the servers' KV cache has the device to itself.

With ``train.staleness: 1`` (one-step off-policy, :class:`Rollouts`) item 1 runs on a worker thread
one step ahead: step t's rollout was made with the weights before step t-1's update and ran while
the trainer computed that update; at the start of step t the trainer waits for it, pushes its
current weights, starts step t+1's rollout with them, and trains on step t's groups with the
engine's recorded log-probs as the behaviour policy. Servers do not sleep in that mode.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dirl.config import ConfigError, run_config_command
from dirl.data.chat import stop_token_ids
from dirl.model.sdar import load_model, load_tokenizer
from dirl.model.tiny import count_parameters
from dirl.rewards import tokens_per_step
from dirl.rollout.launch import ModelFacts, Servers, open_servers, stop_on_signals
from dirl.train.checkpoint import (
    check_resume_settings,
    load_checkpoint,
    newest_checkpoint,
    read_trainer_state,
    resolve_model_dir,
    resume_point,
    resume_settings,
    save_checkpoint,
    set_aside_checkpoints,
    write_tiny_model,
)
from dirl.train.common import (
    Dist,
    close_distributed,
    GradientStepper,
    MetricsLogger,
    PhaseTimer,
    build_optimizer,
    build_scheduler,
    make_run_dir,
    param_digests,
    plot_curves,
    progress_bar,
    rank_zero_print,
    resolve_mixed_precision,
    resolve_strategy,
    seed_everything,
    setup_accelerator,
    truncate_jsonl,
    unwrap,
)
from dirl.train.layouts import TrajectoryScorer
from dirl.train.rl.config import RLConfig, load_rl_config, register_custom_rewards
from dirl.train.rl.groups import (
    CollectStats,
    Group,
    Sampling,
    collect_groups,
    evaluate_held_out,
    mean,
    rollout_and_score,
    rollout_metrics,
)
from dirl.train.rl.prompts import PromptSource, load_problems
from dirl.train.rl.update import (
    Behaviour,
    BatchSettings,
    Sample,
    behaviour_policy,
    make_samples,
    micro_batches_per_rank,
    new_measure,
    plan_micro_batches,
    prepass,
    update,
)

PHASES = ("rollout", "reward", "sleep", "logprobs", "update", "weight_push", "offload")
PENDING_FILE = "pending_rollout.json"  # a checkpoint's rollout of the next step (train.staleness 1)


@dataclass
class RLRun:
    """Everything a step needs, built once by :func:`setup_run`."""

    cfg: RLConfig
    acc: Any
    dist: Dist
    run_dir: Path
    init_dir: Path
    model: Any
    tok: Any
    ref_model: Any
    wrapped: Any
    optimizer: Any
    scheduler: Any
    stepper: GradientStepper
    source: PromptSource
    servers: Servers
    sampling: Sampling
    settings: BatchSettings
    n_micro: int
    behaviour: Behaviour
    strategy: str
    start_step: int
    resumed_from: Optional[Path]
    samples_path: Optional[Path]
    sleeps: bool = False  # servers sleep while the trainer trains (rollout.sleep_while_training)
    phase_hook: Optional[Callable[[str], None]] = None  # called as each phase of a step starts
    rollout_hook: Optional[Callable[[int, "Rollout"], None]] = None  # called with each step's rollout
    rollout_dist: Optional[Dist] = None  # the collectives of the rollout (its own group with staleness 1)
    rollouts: Optional["Rollouts"] = None


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def rl_step(run: RLRun, step: int) -> dict:
    """One RL step (0-based ``step``); returns its metrics."""
    t = run.cfg.train
    lag = run.rollouts.lag
    timer = PhaseTimer(PHASES + (("rollout_wait",) if lag else ()), on_enter=run.phase_hook)
    ro, slept = run.rollouts.take(step, timer)
    if run.rollout_hook is not None:
        run.rollout_hook(step, ro)
    kept, stats = ro.kept, ro.stats
    metrics = rollout_metrics(stats, kept, t.prompts_per_step)
    metrics["staleness"] = step - ro.version
    samples = step_samples(run, kept, step)
    plan = plan_micro_batches(len(samples), t.num_mini_batches, run.dist.rank, run.dist.world, run.n_micro)
    with timer("logprobs"):
        measure = score_before_update(run, samples, plan)
    ups = run_updates(run, samples, plan, measure, timer)
    with timer("weight_push"):
        run.rollouts.after_update(step, bool(ups), slept)
    metrics.update(update_metrics(ups, measure, run.dist, t.num_iterations))
    metrics.update(timer.metrics(run.dist))
    write_samples(run, step + 1, stats, kept)
    return metrics


# --------------------------------------------------------------------------------------------
# Where a step's rollout comes from: now (staleness 0) or one step ahead (staleness 1)
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One step's rewarded groups and how they were made: ``version`` is the number of RL steps
    whose updates the servers' weights held (the behaviour policy is θ_version); ``sampler_before``
    the prompt cursor before its draws (what a checkpoint records when this rollout is pending)."""

    step: int
    kept: list[Group]
    stats: CollectStats
    version: int
    sampler_before: dict
    seconds: dict = field(default_factory=dict)  # rollout / reward seconds of the worker

    def to_json(self, sampler_after: dict) -> str:
        ids = {id(g): i for i, g in enumerate(self.stats.all_groups)}
        st = {k: v for k, v in asdict(self.stats).items() if k != "all_groups"}
        return json.dumps({"step": self.step, "version": self.version, "sampler_before": self.sampler_before,
                           "sampler_after": sampler_after, "stats": st, "kept": [ids[id(g)] for g in self.kept],
                           "groups": [asdict(g) for g in self.stats.all_groups]})

    @staticmethod
    def from_json(text: str) -> tuple["Rollout", dict]:
        d = json.loads(text)
        groups = [Group(**g) for g in d["groups"]]
        stats = CollectStats(**d["stats"], all_groups=groups)
        ro = Rollout(int(d["step"]), [groups[i] for i in d["kept"]], stats, int(d["version"]), d["sampler_before"])
        return ro, d["sampler_after"]


class _Job:
    """A rollout on a daemon thread (a hung request cannot keep the process alive at exit)."""

    def __init__(self, fn: Callable[[], Rollout], name: str):
        self.future: concurrent.futures.Future = concurrent.futures.Future()

        def main():
            try:
                self.future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised by result() in the trainer's thread
                self.future.set_exception(e)

        threading.Thread(target=main, name=name, daemon=True).start()

    @staticmethod
    def done(ro: Rollout) -> "_Job":
        job = _Job.__new__(_Job)
        job.future = concurrent.futures.Future()
        job.future.set_result(ro)
        return job

    def result(self) -> Rollout:
        return self.future.result()


class Rollouts:
    """The rollouts of the run's steps, in one of two schedules (``train.staleness``).

    Weights θ_k: after the updates of k steps (θ_0 the initial weights); step t updates θ_t to
    θ_{t+1}. ``server_version``: the k of the weights the servers hold.

    * staleness 0 (the synchronous loop): step t rolls out now, with θ_t (trainer state offloaded
      and servers put to sleep as configured), and θ_{t+1} is pushed right after its update.
    * staleness 1: step t's rollout was started, on a worker thread, at the beginning of step t-1's
      update, with θ_{t-1} (the first step of a process starts its own, with the weights it has).
      ``take(t)`` waits for it, pushes θ_t, starts step t+1's rollout (with θ_t) and returns step t's;
      the update of step t then overlaps step t+1's rollout. Refill rounds of the group filter are
      part of the worker's job (same weights, exact filling). Held-out evaluation and checkpoints
      first wait for the rollout in flight (a push cannot interrupt a generation); a checkpoint
      stores that finished rollout (:data:`PENDING_FILE`), so a resumed run trains on exactly it.
    """

    def __init__(self, run: RLRun, pending: Optional[Rollout] = None):
        self.run = run
        self.lag = int(run.cfg.train.staleness)
        self.server_version = run.start_step
        self.pending: Optional[_Job] = _Job.done(pending) if pending is not None else None

    # -- the two schedules ---------------------------------------------------------------------------
    def take(self, step: int, timer: PhaseTimer) -> tuple[Rollout, bool]:
        """Step ``step``'s rollout, and whether the servers now sleep for the training."""
        run = self.run
        if not self.lag:
            before = run.source.sampler.state_dict()
            with offloaded_trainer(run, timer):
                kept, stats = collect_step_groups(run, step, timer, run.dist)
            with timer("sleep"):
                slept = sleep_servers(run)
            return Rollout(step, kept, stats, self.server_version, before), slept
        if self.pending is None:  # the first step of this process: nothing ran ahead
            self.pending = self._start(step)
        with timer("rollout_wait"):
            ro = self.pending.result()
        self.pending = None
        if ro.step != step:
            raise RuntimeError(f"the rollout in hand is step {ro.step + 1}'s, not step {step + 1}'s")
        with timer("weight_push"):
            self.push(step)
        if step + 1 < run.cfg.train.steps:
            self.pending = self._start(step + 1)
        for k, v in ro.seconds.items():
            timer.add(k, v)
        return ro, False

    def after_update(self, step: int, updated: bool, slept: bool) -> None:
        """After step ``step``'s updates: staleness 0 pushes θ_{step+1} now (or wakes the servers);
        staleness 1 pushes it at the next step's start, once the rollout in flight has finished."""
        if self.lag:
            return
        if updated:
            push_weights(self.run, slept=slept)
        elif slept:
            wake_servers(self.run)
        self.server_version = step + 1

    def _start(self, step: int) -> _Job:
        version = self.server_version
        return _Job(lambda: self._produce(step, version), name=f"dirl-rollout-s{step}")

    def _produce(self, step: int, version: int) -> Rollout:
        run = self.run
        timer = PhaseTimer(("rollout", "reward"))
        before = run.source.sampler.state_dict()
        kept, stats = collect_step_groups(run, step, timer, run.rollout_dist or run.dist)
        return Rollout(step, kept, stats, version, before, dict(timer.seconds))

    # -- the servers' weights ------------------------------------------------------------------------
    def push(self, version: int) -> None:
        """The trainer's weights (θ_version) to the servers unless they hold them; waits for a
        rollout in flight first."""
        if self.server_version == version:
            return
        if self.pending is not None:
            self.pending.result()
        push_weights(self.run)
        self.server_version = version

    def before_eval(self, done: int) -> None:
        """The servers hold θ_done for a held-out evaluation after ``done`` steps."""
        self.push(done)

    def checkpoint_state(self) -> tuple[dict, dict[str, str]]:
        """The prompt cursor a checkpoint records and its extra files: with a rollout in flight,
        waits for it and stores it; the cursor is then the one before its draws."""
        sampler = self.run.source.sampler.state_dict()
        if self.pending is None:
            return sampler, {}
        ro = self.pending.result()
        return ro.sampler_before, {PENDING_FILE: ro.to_json(sampler)}


def collect_step_groups(run: RLRun, step: int, timer: PhaseTimer,
                        dist: Optional[Dist] = None) -> tuple[list[Group], CollectStats]:
    """The step's rewarded groups: ``prompts_per_step`` of them, filtered and refilled with dynamic sampling."""
    t = run.cfg.train
    run.source.skipped = 0
    generate = partial(rollout_and_score, run.servers.client, G=t.num_generations, step=step, s=run.sampling,
                       dist=dist or run.dist, timer=timer)
    kept, stats = collect_groups(run.source.draw, generate, t.prompts_per_step, t.filter_groups,
                                 t.max_sampling_rounds, t.oversample)
    stats.skipped_long = run.source.skipped
    return kept, stats


def step_samples(run: RLRun, kept: list[Group], step: int) -> list[Sample]:
    t, lo = run.cfg.train, run.cfg.loss
    samples = make_samples(kept, lo.scale_adv_by_std, lo.score_after_eos)
    if t.shuffle_samples and t.num_mini_batches > 1:
        random.Random(t.seed * 7919 + step).shuffle(samples)
    return samples


def score_before_update(run: RLRun, samples: list[Sample], plan: list[list[list[int]]]) -> dict:
    """Old log-probs (``behaviour == "old"``) and reference log-probs (β > 0) before any update;
    returns the mismatch/entropy sums of the pass (empty when the policy was not scored)."""
    want_old = run.behaviour == "old"
    want_ref = run.ref_model is not None
    if samples and (want_old or want_ref):
        pre = prepass(unwrap(run.wrapped), run.ref_model, samples, plan, run.settings, want_old, want_ref,
                      run.cfg.train.entropy and want_old)
        if want_old:
            return pre
    return new_measure()


def run_updates(run: RLRun, samples: list[Sample], plan: list[list[list[int]]], measure: dict,
                timer: PhaseTimer) -> list[dict]:
    """``num_iterations`` passes of one optimizer step per mini-batch. Without a pre-pass the first
    update's forwards measure mismatch and entropy. Their forwards count as log-prob time."""
    t = run.cfg.train
    ups: list[dict] = []
    if not samples:
        return ups
    timer.enter("update")
    t0 = time.perf_counter()
    for it in range(t.num_iterations):
        for mi, mini in enumerate(plan):
            first = it == 0 and mi == 0 and run.behaviour != "old"
            ups.append(update(run.wrapped, run.stepper, samples, mini, run.settings, run.cfg.loss, run.dist,
                              run.behaviour, measure if first else None, entropy=t.entropy))
    fwd = sum(u["forward_s"] for u in ups)
    timer.add("logprobs", fwd)
    timer.add("update", time.perf_counter() - t0 - fwd)
    return ups


def _talks_to_servers(run: RLRun) -> bool:
    """Colocated servers: every rank drives its own; a pool: rank 0 drives every server."""
    return run.servers.mode == "started" or run.dist.rank == 0


def sleep_servers(run: RLRun) -> bool:
    """Put the servers to sleep for the log-prob pass and the updates (when ``run.sleeps``); True
    when they sleep. Every rank has its rollouts by now (they were gathered)."""
    if not run.sleeps:
        return False
    if _talks_to_servers(run):
        run.servers.client.sleep(run.cfg.rollout.sleep_level)
    run.dist.barrier()
    return True


def wake_servers(run: RLRun) -> None:
    if _talks_to_servers(run):
        run.servers.client.wakeup()
    run.dist.barrier()


def push_weights(run: RLRun, slept: bool = False) -> None:
    """The current weights to the servers, in place: update_weights → wakeup, with a sleep first
    unless they already sleep for the training (``slept``)."""
    if _talks_to_servers(run):
        run.servers.client.push_weights(unwrap(run.wrapped).model, transport=run.cfg.rollout.weight_transport,
                                        sleep_level=run.cfg.rollout.sleep_level, sleep_first=not slept)
    run.dist.barrier()


@contextlib.contextmanager
def offloaded_trainer(run: RLRun, timer: PhaseTimer):
    """With ``train.offload_during_rollout`` on CUDA: the trainer's weights, gradients and optimizer
    state on the CPU for the duration (the rollout), back on the device after."""
    device = torch.device(run.acc.device)
    if not (run.cfg.train.offload_during_rollout and device.type == "cuda"):
        yield
        return
    with timer("offload"):
        move_trainer_state(unwrap(run.wrapped), run.optimizer, torch.device("cpu"))
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        with timer("offload"):
            move_trainer_state(unwrap(run.wrapped), run.optimizer, device)


def update_metrics(ups: list[dict], measure: dict, dist: Dist, num_iterations: int) -> dict:
    ms = dist.sum([measure["mis_sum"], measure["mis_n"], measure["ent_sum"], measure["ent_n"]])
    m = {
        "mismatch/mean": ms[0] / ms[1] if ms[1] else float("nan"),
        "mismatch/max": dist.max(measure["mis_max"]),
        "entropy": ms[2] / ms[3] if ms[3] else float("nan"),
        "updates": len(ups),
    }
    if ups:
        m.update({
            "loss": mean([u["loss"] for u in ups]),
            "clip_fraction": mean([u["clip_fraction"] for u in ups]),
            "kl": mean([u["kl"] for u in ups]),
            "ratio/mean": mean([u["ratio_mean"] for u in ups]),
            "ratio/max": max(u["ratio_max"] for u in ups),
            "ratio/min": _finite_or_nan(min(u["ratio_min"] for u in ups)),
            "ratio/clamped_tokens": sum(u["ratio_clamped"] for u in ups),
            "kl/clamped_tokens": sum(u["kl_clamped"] for u in ups),
            "grad_norm": mean([u["grad_norm"] for u in ups]),
            "lr": ups[-1]["lr"],
            "tokens/scored": sum(u["scored_tokens"] for u in ups) / num_iterations,
            "tokens/forward": sum(u["forward_tokens"] for u in ups) / num_iterations,
        })
    return m


def _finite_or_nan(x: float) -> float:
    return x if x != float("inf") else float("nan")


def write_samples(run: RLRun, done: int, stats: CollectStats, kept: list[Group]) -> None:
    """One ``samples.jsonl`` line per rewarded group of the step (main process, ``log_samples``): its
    rewards, correctness and tokens per step (SPEC section 7; None without a step map) per sample."""
    if run.samples_path is None:
        return
    kept_ids = {id(g) for g in kept}
    with run.samples_path.open("a") as f:
        for g in stats.all_groups:
            f.write(json.dumps({"step": done, "round": g.round, "problem_id": g.problem["id"],
                                "answer": g.problem["answer"], "kept": id(g) in kept_ids, "rewards": g.rewards,
                                "correct": g.correct,
                                "tokens_per_step": [tokens_per_step(t.get("step_map"), t.get("response_length"))
                                                    for t in g.trajectories],
                                "first_response": g.trajectories[0].get("text", "")}) + "\n")


def held_out_eval(run: RLRun) -> dict:
    e = run.cfg.eval
    s = Sampling(run.sampling.decoding, run.sampling.stop_ids, e.seed, run.sampling.rewards, run.sampling.block_size)
    t0 = time.perf_counter()
    m = evaluate_held_out(run.servers.client, run.tok, e.benchmark, e.num_problems, e.num_samples, s, run.dist)
    m["time/eval"] = time.perf_counter() - t0
    return m


# what a resumed run must share with the run it continues (train.steps may grow)
RESUME_KEYS = ("data", "optim", "loss", "rewards", "custom_rewards", "rollout.decoding", "train.prompts_per_step",
               "train.num_generations", "train.num_mini_batches", "train.num_iterations", "train.filter_groups",
               "train.seed")


def save(run: RLRun, step: int) -> Path:
    sampler, files = run.rollouts.checkpoint_state()
    extra = {"sampler": sampler, "config_steps": run.cfg.train.steps, "staleness": run.cfg.train.staleness,
             "settings": resume_settings(run.cfg, RESUME_KEYS), "init_model": str(run.init_dir)}
    return save_checkpoint(run.run_dir, step, unwrap(run.wrapped).model, run.tok, run.optimizer, run.scheduler, extra,
                           accelerator=run.acc, keep_last=run.cfg.train.keep_last, kind="rl", extra_files=files)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def initial_model(cfg: RLConfig, run_dir: Path, is_main: bool, dist: Dist) -> Path:
    """The model the run starts from: ``model.path``, else the newest SFT checkpoint under
    ``runs_dir``, else a fresh (marked untrained) tiny model in ``RUN_DIR/initial_model``."""
    if cfg.model.path:
        return resolve_model_dir(cfg.model.path)
    found = newest_checkpoint(cfg.runs_dir, kinds=("sft",))
    if found is not None:
        return found
    out = run_dir / "initial_model"
    if is_main and not (out / "config.json").is_file():
        write_tiny_model(out, cfg.model.tiny)
    dist.barrier()
    return out


def load_policy(path: Path, cfg: RLConfig, device, dtype: str):
    mc = cfg.model
    model = load_model(path, device=device, dtype=dtype, attn_backend=mc.attn_backend, block_size=mc.block_size,
                       mask_token_id=mc.mask_token_id)
    return model, load_tokenizer(path)


def setup_run(cfg: RLConfig, cleanup: contextlib.ExitStack) -> RLRun:
    """Accelerator, run folder, policy (and reference), optimizer, prompts, resume state, servers.
    Servers are registered on ``cleanup`` the moment they start."""
    t, lo = cfg.train, cfg.loss
    register_custom_rewards(cfg.custom_rewards)
    capacity = t.prompts_per_step * t.num_generations

    def n_micro_of(world: int) -> int:
        return micro_batches_per_rank(capacity, t.num_mini_batches, world, t.micro_batch_size)

    acc = setup_accelerator(cfg.dist, micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=n_micro_of,
                            max_grad_norm=cfg.optim.max_grad_norm)
    dist = Dist(acc)
    n_micro = n_micro_of(dist.world)
    strategy = resolve_strategy(cfg.dist, dist.world)
    seed_everything(t.seed + dist.rank)
    run_dir = make_run_dir(acc, cfg.output_dir, cfg.run_name, "rl", cfg)
    resumed_from = resume_point(t.resume, run_dir, kind="rl")
    if resumed_from is None and acc.is_main_process:
        moved = set_aside_checkpoints(run_dir)
        if moved is not None:
            rank_zero_print(acc, f"[dirl rl] starting afresh: the earlier checkpoints of {run_dir} are kept in {moved}")
    # a resumed run starts from the model it started from (the β > 0 reference, the summary), not
    # from whatever SFT checkpoint is newest under runs_dir by now
    saved_init = read_trainer_state(resumed_from)["extra"].get("init_model") if resumed_from is not None else None
    if saved_init and (Path(saved_init) / "config.json").is_file():
        init_dir = Path(saved_init)
    else:
        init_dir = initial_model(cfg, run_dir, acc.is_main_process, dist)
    model_dir = (resumed_from / "model") if resumed_from is not None else init_dir

    ds_bf16 = strategy == "deepspeed" and resolve_mixed_precision(cfg.dist) == "bf16"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if ds_bf16 else "float32")
    model, tok = load_policy(model_dir, cfg, acc.device, dtype)
    if cfg.model.gradient_checkpointing:
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.hf.config.use_cache = False
    model.train()
    ref_model = None
    if lo.beta > 0:  # the frozen reference is the starting policy, not the resumed one
        ref_model, _ = load_policy(init_dir, cfg, acc.device, dtype)
        ref_model.eval().requires_grad_(False)

    source = PromptSource(load_problems(cfg.data), tok, seed=cfg.data.seed, max_prompt_tokens=cfg.data.max_prompt_tokens)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps * t.num_mini_batches * t.num_iterations)
    wrapped, optimizer = acc.prepare(TrajectoryScorer(model), optimizer)
    stepper = GradientStepper(acc, wrapped, optimizer, scheduler, cfg.optim.max_grad_norm, n_micro)
    start_step = 0
    if resumed_from is not None:
        state = load_checkpoint(resumed_from, optimizer=optimizer, scheduler=scheduler, accelerator=acc)
        start_step = int(state["step"])
        check_resume_settings(state["extra"].get("settings"), resume_settings(cfg, RESUME_KEYS), resumed_from)
        if start_step > t.steps:
            raise ConfigError(f"config key 'train.steps': the run resumes from step {start_step} ({resumed_from}), "
                              f"past its {t.steps} steps; give more steps, or train.resume=never to start afresh")
        source.sampler.load_state_dict(state["extra"]["sampler"])
        rank_zero_print(acc, f"[dirl rl] resumed from {resumed_from} at step {start_step} "
                             f"(prompt cursor {source.sampler.cursor})")

    B, mask_id = model.block_size, model.mask_token_id
    dec = cfg.rollout.decoding
    servers = cleanup.enter_context(open_servers(
        cfg.server, model_dir, ModelFacts(B, mask_id, dec), rank_device=acc.device,
        log_path=run_dir / "logs" / f"server-rank{dist.rank}.log", decoding_key="rollout.decoding"))
    samples_path = None
    if cfg.log_samples and acc.is_main_process:
        samples_path = run_dir / "samples.jsonl"
        if resumed_from is not None:
            truncate_jsonl(samples_path, start_step)
        elif samples_path.exists():
            samples_path.unlink()
    run = RLRun(
        cfg=cfg, acc=acc, dist=dist, run_dir=run_dir, init_dir=init_dir, model=model, tok=tok, ref_model=ref_model,
        wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, stepper=stepper, source=source, servers=servers,
        sampling=Sampling(dec, stop_token_ids(tok), t.seed, cfg.rewards, B),
        settings=BatchSettings(B, mask_id, int(tok.pad_token_id or 0), lo.layout, lo.score_after_eos,
                               float(dec.temperature), lo.logits_chunk_size, acc.device, t.row_tokens),
        n_micro=n_micro, behaviour=behaviour_policy(lo, t.num_iterations, t.num_mini_batches, t.staleness),
        strategy=strategy,
        start_step=start_step, resumed_from=resumed_from, samples_path=samples_path)
    sleeps = cfg.rollout.sleep_while_training
    run.sleeps = (servers.mode == "started" and not t.staleness) if sleeps is None else bool(sleeps)
    if t.staleness and dist.world > 1:  # the worker thread gathers while the trainer all-reduces
        run.rollout_dist = Dist(acc, group=torch.distributed.new_group(backend="gloo"))
    run.rollouts = Rollouts(run, pending_rollout(run, resumed_from))
    if t.offload_during_rollout and strategy == "deepspeed":
        raise ConfigError("config key 'train.offload_during_rollout': not with DeepSpeed (its parameters are views "
                          "of flat buffers); use DeepSpeed's offload_optimizer, or dist.strategy ddp")
    if servers.mode == "pool" and resumed_from is not None:  # a pool keeps the weights it had: send ours
        push_weights(run)
    info = servers.infos[0]
    rank_zero_print(acc, f"[dirl rl] run {run_dir} | {count_parameters(model):,} params from {model_dir} | "
                         f"{strategy}, {dist.world} process(es), {n_micro} micro-batch(es) of <= {t.micro_batch_size} "
                         f"responses per rank per optimizer step | {t.steps} steps x {t.prompts_per_step} prompts x "
                         f"{t.num_generations} samples | servers ({_servers_label(servers)}): {', '.join(servers.urls)} "
                         f"[{info.get('engine')}, {info.get('unmasking_strategy')}]")
    return run


def pending_rollout(run: RLRun, ckpt: Optional[Path]) -> Optional[Rollout]:
    """The next step's rollout a checkpoint stored (written with train.staleness 1): used when
    resuming with staleness 1 (the prompt cursor moves past its draws); the synchronous loop rolls
    the step out again with the checkpoint's weights and the cursor before those draws."""
    if ckpt is None or not (ckpt / PENDING_FILE).is_file():
        return None
    if not run.cfg.train.staleness:
        rank_zero_print(run.acc, f"[dirl rl] {ckpt / PENDING_FILE} not used: train.staleness is 0, step "
                                 f"{run.start_step + 1} is rolled out again with the checkpoint's weights")
        return None
    ro, sampler_after = Rollout.from_json((ckpt / PENDING_FILE).read_text())
    if ro.step != run.start_step:
        raise ConfigError(f"config key 'train.resume': {ckpt / PENDING_FILE} holds step {ro.step + 1}'s rollout, "
                          f"but the checkpoint resumes at step {run.start_step + 1}")
    run.source.sampler.load_state_dict(sampler_after)
    return ro


def move_trainer_state(model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
    """Parameters, their gradients and every tensor of the optimizer state to ``device``, in place
    (the optimizer keeps its references: ``param.data`` moves, the Parameter objects stay)."""
    for p in model.parameters():
        p.data = p.data.to(device, non_blocking=True)
        if p.grad is not None:
            p.grad = p.grad.to(device, non_blocking=True)
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for state in opt.state.values():
        for k, v in list(state.items()):
            if torch.is_tensor(v):
                state[k] = v.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _servers_label(servers: Servers) -> str:
    return "colocated" if servers.mode == "started" else "pool"


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class RunLog:
    """Metrics (JSONL, TensorBoard, W&B), the progress bar, and what the summary reports."""

    def __init__(self, run: RLRun):
        cfg, acc = run.cfg, run.acc
        self.run, self.history, self.evals = run, [], []
        self.metrics = MetricsLogger(run.run_dir, cfg.logging, is_main=acc.is_main_process,
                                     resume_step=run.start_step if run.resumed_from is not None else None,
                                     run_name=run.run_dir.name, config=cfg)
        self.bar = progress_bar(cfg.train.steps, initial=run.start_step, desc="rl", enabled=cfg.logging.progress_bar,
                                is_main=acc.is_main_process)

    def step(self, done: int, m: dict) -> None:
        self.history.append({"step": done, **m})
        if done % self.run.cfg.logging.log_every == 0 or done == self.run.cfg.train.steps:
            self.metrics.log(done, m)
        self.bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m['accuracy']:.3f}",
                             kept=f"{m['groups/kept']}/{m['groups/target']}", len=f"{m['response_length/mean']:.0f}",
                             refresh=False)
        self.bar.update(1)

    def eval(self, step: int, m: dict) -> None:
        self.evals.append({"step": step, **m})
        self.metrics.log(step, m)
        rank_zero_print(self.run.acc, f"[dirl rl] step {step}: held-out accuracy {m['eval/accuracy']:.3f} "
                                      f"({m['eval/problems']} problems x {self.run.cfg.eval.num_samples})")

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def train_rl(cfg: RLConfig) -> dict:
    """Run RL as configured; returns the run summary (also ``RUN_DIR/summary.json``)."""
    t, ev = cfg.train, cfg.eval
    with contextlib.ExitStack() as cleanup:
        run = setup_run(cfg, cleanup)
        log = RunLog(run)
        cleanup.callback(log.close)
        final_ckpt, last_saved = run.resumed_from, (run.start_step if run.resumed_from is not None else -1)
        t0 = time.perf_counter()
        if ev.enabled and run.start_step == 0:
            log.eval(0, held_out_eval(run))
        for step in range(run.start_step, t.steps):
            done = step + 1
            log.step(done, rl_step(run, step))
            if ev.enabled and ev.every and done % ev.every == 0 and done != t.steps:
                run.rollouts.before_eval(done)
                log.eval(done, held_out_eval(run))
            if t.save_every and done % t.save_every == 0 and done != t.steps:
                final_ckpt, last_saved = save(run, done), done
        if ev.enabled and t.steps > run.start_step:
            run.rollouts.before_eval(t.steps)
            log.eval(t.steps, held_out_eval(run))
        if last_saved != t.steps:
            final_ckpt = save(run, t.steps)
        train_time = time.perf_counter() - t0
    return write_summary(run, log, final_ckpt, train_time)


def write_summary(run: RLRun, log: RunLog, final_ckpt: Optional[Path], train_time: float) -> dict:
    acc, history, evals = run.acc, log.history, log.evals
    plot = None
    if acc.is_main_process:
        plot = plot_curves(run.run_dir / "metrics.jsonl", ["reward/mean", "accuracy", "response_length/mean",
                                                           "eval/accuracy"],
                           run.run_dir / "curves.png", title=f"RL {run.run_dir.name}", smooth=5)
    k = min(5, len(history))
    digests = param_digests(acc, run.wrapped)
    summary = {
        "run_dir": str(run.run_dir),
        "initial_model": str(run.init_dir),
        "final_checkpoint": str(final_ckpt) if final_ckpt else None,
        "final_model": str(final_ckpt / "model") if final_ckpt else None,
        "steps": run.cfg.train.steps,
        "start_step": run.start_step,
        "reward_first": mean([h["reward/mean"] for h in history[:k]]) if history else None,
        "reward_last": mean([h["reward/mean"] for h in history[-k:]]) if history else None,
        "accuracy_first": mean([h["accuracy"] for h in history[:k]]) if history else None,
        "accuracy_last": mean([h["accuracy"] for h in history[-k:]]) if history else None,
        "eval": evals,
        "train_time_s": round(train_time, 2),
        "world_size": run.dist.world,
        "strategy": run.strategy,
        "param_digest_per_rank": digests,
        "ranks_in_sync": len(set(digests)) == 1,
        "servers": _servers_label(run.servers),
        "staleness": run.cfg.train.staleness,
        "plot": str(plot) if plot else None,
    }
    if acc.is_main_process:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if history:
            line = (f"[dirl rl] reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, "
                    f"accuracy {summary['accuracy_first']:.3f} -> {summary['accuracy_last']:.3f} "
                    f"(mean of the first / last {k} steps)")
            if len(evals) >= 2:
                line += f"; held-out accuracy {evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}"
            print(line + f" in {train_time:.0f}s; curves: {plot}", flush=True)
        print(f"[dirl rl] final checkpoint: {summary['final_model']}", flush=True)
    acc.wait_for_everyone()
    return summary


def cli_main(argv: list[str]) -> int:
    path, overrides = run_config_command(
        argv, "dirl rl",
        "RL for block diffusion LMs (DiPO/GRPO, DAPO). Without a config: the embedded default (newest "
        "quick-start SFT checkpoint or a tiny model, synthetic arithmetic, CPU, a few minutes).")
    cfg = load_rl_config(path, overrides)
    stop_on_signals()
    train_rl(cfg)
    close_distributed()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
