"""Entry point for the multi-process and kill/resume tests (run under torchrun or as a plain script).

    python tests/helpers_dist.py grad  OUT_DIR [key=value ...]   one step's gradient (DDP) / grad norm
    python tests/helpers_dist.py train OUT_DIR [key=value ...]   train_sft, then dump every rank's params
    python tests/helpers_dist.py save-loop RUN_DIR [POINT]       save checkpoints forever (to be killed); with
                                                                  POINT (write, publish, prune) hold the 4th there
    python tests/helpers_dist.py sft-hold  - [dirl sft args ...]  dirl sft that prints HELD and blocks for
                                                                  good after its first checkpoint (to be killed)

Multi-process: ``ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2
tests/helpers_dist.py ...`` (gloo). Overrides are those of ``dirl sft``.
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for _, p in sorted(model.named_parameters())])


def step_gradient(cfg, out: Path) -> None:
    """Run one optimizer step's forward/backward the way train_sft does; rank 0 writes the gradient
    (DDP / single) and the step's grad norm (every strategy)."""
    from dirl.data.sft import RowStream
    from dirl.train.common import (GradientStepper, build_optimizer, build_scheduler, seed_everything,
                                   setup_accelerator, unwrap)
    from dirl.train.sft import NELBOLoss, accumulate_step, build_model, build_sft_data, make_micro_batches

    t = cfg.train
    acc = setup_accelerator(cfg.dist, micro_batch_size=t.micro_batch_size,
                            gradient_accumulation_steps=lambda w: t.global_batch_size // (t.micro_batch_size * w),
                            max_grad_norm=cfg.optim.max_grad_norm)
    n_micro = acc.dirl_micro_batches
    seed_everything(t.seed)
    model, tok = build_model(cfg, acc.device)
    data = build_sft_data(cfg, tok, model.block_size)
    stream = RowStream(len(data), seed=cfg.data.seed)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 10)
    wrapped, opt = acc.prepare(NELBOLoss(model), opt)
    stepper = GradientStepper(acc, wrapped, opt, sched, cfg.optim.max_grad_norm, n_micro)
    mbs = make_micro_batches(data, stream, 0, cfg, acc.process_index, acc.num_processes, acc.device)
    res = accumulate_step(wrapped, stepper, mbs, acc)
    grads = None
    if not stepper.deepspeed:
        m = unwrap(wrapped).model
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    st = stepper.step()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"grads": grads, "grad_norm": st["grad_norm"], "loss": res["loss"],
                    "labelled": res["labelled_tokens"], "world": acc.num_processes, "micro": n_micro,
                    "deepspeed": stepper.deepspeed}, out / "grad.pt")
    acc.wait_for_everyone()


def train(cfg, out: Path) -> None:
    from dirl.train.sft import train_sft

    def dump(model, acc):
        out.mkdir(parents=True, exist_ok=True)
        torch.save(flat_params(model), out / f"params_rank{acc.process_index}.pt")

    summary = train_sft(cfg, on_finish=dump)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _hold_inside_saves(point: str, at_step: int, current: list) -> None:
    """Make save ``at_step`` print ``HELD <point>`` and block for good at one point of its work:
    ``write`` (between two state files), ``publish`` (before the rename that makes it visible),
    ``prune`` (an old checkpoint hidden, not yet deleted)."""
    import threading

    import dirl.train.checkpoint as ck

    def hold():
        print(f"HELD {point}", flush=True)
        threading.Event().wait()

    if point == "write":
        orig_save, calls = ck._torch_save, [0]

        def torch_save(*a, **k):
            if current[0] == at_step:
                calls[0] += 1
                if calls[0] == 2:
                    hold()
            return orig_save(*a, **k)

        ck._torch_save = torch_save
    elif point == "publish":
        real_os = ck.os

        class _Os:
            def __getattr__(self, name):
                return getattr(real_os, name)

            @staticmethod
            def replace(src, dst):
                if current[0] == at_step and Path(src).name.endswith(".tmp"):
                    hold()
                return real_os.replace(src, dst)

        ck.os = _Os()
    elif point == "prune":
        real_shutil = ck.shutil

        class _Shutil:
            def __getattr__(self, name):
                return getattr(real_shutil, name)

            @staticmethod
            def rmtree(path, *a, **k):
                if current[0] == at_step and Path(path).name.endswith(".old"):
                    hold()
                return real_shutil.rmtree(path, *a, **k)

        ck.shutil = _Shutil()
    else:
        raise SystemExit(f"unknown hold point {point!r}")


def save_loop(run_dir: Path, hold: str = "") -> None:
    """Save checkpoints of a tiny model forever, printing each completed step (killed by the test).
    With ``hold``, the fourth save blocks at that point (:func:`_hold_inside_saves`)."""
    from dirl.config import OptimConfig, TinyModelConfig
    from dirl.model.tiny import build_tiny_model
    from dirl.train.checkpoint import save_checkpoint
    from dirl.train.common import build_optimizer, build_scheduler

    current = [0]
    if hold:
        _hold_inside_saves(hold, 4, current)

    model, tok = build_tiny_model(TinyModelConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=128))
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, OptimConfig(lr=1e-3), 1000)
    step = 0
    while True:
        step += 1
        current[0] = step
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.001)
        save_checkpoint(run_dir, step, model, tok, opt, sched, {"cursor": step}, keep_last=3)
        print(f"saved {step}", flush=True)


def sft_hold(args: list[str]) -> int:
    """``dirl sft args``, held for good once its first checkpoint is complete: a kill test then
    kills it at a known point, whatever the machine's speed."""
    import threading

    import dirl.train.checkpoint as ck
    from dirl.cli import main as cli_main

    save = ck.save_checkpoint

    def save_then_hold(*a, **k):
        out = save(*a, **k)
        print(f"HELD after the checkpoint of step {a[1] if len(a) > 1 else k.get('step')}", flush=True)
        threading.Event().wait()
        return out

    ck.save_checkpoint = save_then_hold
    return cli_main(["sft", *args])


def main(argv: list[str]) -> int:
    mode, target, *overrides = argv
    if mode == "save-loop":
        save_loop(Path(target), *overrides[:1])
        return 0
    if mode == "sft-hold":
        return sft_hold(overrides)
    from dirl.train.sft import load_sft_config

    cfg = load_sft_config(None, overrides)
    if mode == "grad":
        step_gradient(cfg, Path(target))
    elif mode == "train":
        train(cfg, Path(target))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    from dirl.cli import exit_process

    exit_process(main(sys.argv[1:]))  # closes the process group and skips the interpreter's finalisation
