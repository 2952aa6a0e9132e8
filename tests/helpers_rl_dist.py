"""Helpers of the RL tests: toy rewards, and one optimizer step of the RL update run in 1 or 2
processes (``python -m torch.distributed.run --nproc_per_node 2 tests/helpers_rl_dist.py ...``; with
``--strategy deepspeed`` the launcher first writes the ZeRO-1 config with ``zero1_config``).

The step uses plain SGD with lr 1 and no clipping, so the parameter change is exactly minus the
gradient of the mini-batch: comparing changes compares gradients.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- toy rewards (dirl.rewards.RewardContext -> float) ----------------------------------------------


def digit_fraction(ctx, digit: str = "7") -> float:
    """Fraction of the response's characters that are ``digit``."""
    text = ctx.text or ""
    return text.count(digit) / max(1, len(text))


def hold_from_step(ctx) -> float:
    """A reward of 0. With ``$DIRL_TEST_HOLD_STEP`` = N and ``$DIRL_TEST_HOLD_FILE`` set, the first
    response of step N (request ids are ``s{step}-...``) writes that file and blocks for good, so a
    test can kill the trainer at a known point of the run, whatever the machine's speed."""
    hold = os.environ.get("DIRL_TEST_HOLD_STEP")
    rid = str(ctx.trajectory.get("request_id", ""))
    if hold and rid.startswith("s") and int(rid[1:].split("-")[0]) >= int(hold):
        Path(os.environ["DIRL_TEST_HOLD_FILE"]).write_text(rid)
        import threading

        threading.Event().wait()
    return 0.0


# -- one update step -----------------------------------------------------------------------------------


def zero1_config(out_file) -> Path:
    """Write the ZeRO-1 config a ``--strategy deepspeed`` run with this ``--out`` reads (written by the
    launcher before the ranks start, so no rank waits for another's file)."""
    path = Path(out_file).with_suffix(".ds.json")
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    return path


def run_update(model_dir: str, samples_file: str, out_file: str, n_micro: int, strategy: str,
               aggregation: str = "grpo", behaviour: str = "old", layout: str = "packed") -> None:
    from dirl.model.sdar import load_model
    from dirl.train.common import Dist, DistConfig, GradientStepper, setup_accelerator, unwrap
    from dirl.train.layouts import TrajectoryScorer
    from dirl.train.rl.config import LossConfig
    from dirl.train.rl.update import BatchSettings, Sample, plan_micro_batches, update

    data = json.loads(Path(samples_file).read_text())
    dist_cfg = DistConfig(strategy=strategy)
    if strategy == "deepspeed":  # the ZeRO-1 config the launching test wrote (see ``zero1_config``)
        dist_cfg = DistConfig(strategy="deepspeed", deepspeed_config=str(Path(out_file).with_suffix(".ds.json")))
    acc = setup_accelerator(dist_cfg, micro_batch_size=4, gradient_accumulation_steps=n_micro, max_grad_norm=0.0)
    torch.manual_seed(0)
    model = load_model(model_dir, dtype="float32", device=acc.device)
    model.train()
    before = {k: v.detach().clone() for k, v in model.hf.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    wrapped, opt = acc.prepare(TrajectoryScorer(model), opt)
    stepper = GradientStepper(acc, wrapped, opt, None, 0.0, n_micro)
    samples = []
    for d in data:
        s = Sample(d["traj"], d["advantage"], 0, d["n_scored"])
        s.old = torch.tensor([float("nan") if v is None else v for v in d["old"]])
        samples.append(s)
    loss = LossConfig(loss_type=aggregation, layout=layout)
    dist = Dist(acc)
    plan = plan_micro_batches(len(samples), 1, dist.rank, dist.world, n_micro)
    s = BatchSettings(model.block_size, model.mask_token_id, 0, layout, False, 1.0, 4096, acc.device)
    stats = update(wrapped, stepper, samples, plan[0], s, loss, dist, behaviour)
    after = unwrap(wrapped).model.hf.state_dict()
    if acc.is_main_process:
        delta = {k: (after[k].detach().float().cpu() - before[k].float().cpu()) for k in before}
        torch.save({"delta": delta, "stats": stats}, out_file)
    acc.wait_for_everyone()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-micro", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--aggregation", default="grpo")
    p.add_argument("--behaviour", default="old")
    a = p.parse_args()
    run_update(a.model, a.samples, a.out, a.n_micro, a.strategy, a.aggregation, a.behaviour)
    from dirl.cli import exit_process

    exit_process(0)  # closes the process group and skips the interpreter's finalisation (see there)
