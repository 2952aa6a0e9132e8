"""Training infrastructure shared by the SFT and RL trainers.

What lives here (each piece usable alone):

* :class:`DistConfig` and :func:`setup_accelerator`: an ``accelerate.Accelerator`` for one process,
  plain DDP, or DeepSpeed ZeRO (stage 1 by default); gloo on CPU, NCCL and bf16 on GPU.
* :class:`GradientStepper`: one optimizer step over ``n`` micro-batches per rank with the same
  meaning under every strategy. The caller divides each micro-batch's summed loss by a **global**
  normaliser (counted over every micro-batch of the step on every rank, see :func:`all_reduce_sum`);
  the stepper then undoes the averaging over ranks that DDP and DeepSpeed apply, disables DeepSpeed's
  own ``1/gradient_accumulation_steps`` scaling, skips gradient all-reduce on all but the last
  micro-batch, clips, steps the optimizer once and the scheduler once. The resulting update equals
  the single-process, single-micro-batch one (SPEC section 6 and 11).
* :func:`seed_everything`, :func:`build_optimizer` (AdamW), :func:`build_scheduler` (cosine,
  constant_with_warmup, constant; a ``LambdaLR`` stepped by the stepper, never by Accelerate, which
  would step it once per process).
* :class:`MetricsLogger` (JSONL + TensorBoard + W&B when configured, rank 0 only),
  :func:`plot_curves` (PNG), :func:`make_run_dir` (same folder on every rank, resolved config saved),
  :func:`progress_bar` (tqdm on rank 0, a no-op elsewhere).

Typical loop::

    acc = setup_accelerator(cfg.dist, micro_batch_size=mbs, gradient_accumulation_steps=n_micro,
                            max_grad_norm=cfg.optim.max_grad_norm)
    opt = build_optimizer(model, cfg.optim); sched = build_scheduler(opt, cfg.optim, total_steps)
    wrapped, opt = acc.prepare(module_whose_forward_returns_the_loss_sum, opt)
    stepper = GradientStepper(acc, wrapped, opt, sched, cfg.optim.max_grad_norm, n_micro)
    n_global = all_reduce_sum(acc, local_count)
    for i, mb in enumerate(micro_batches):
        with stepper.accumulate(i):
            stepper.backward(wrapped(**mb) / n_global)
    stats = stepper.step()   # {"grad_norm", "lr"}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from dirl.config import ConfigError, FieldError, LoggingConfig, OptimConfig, save_config, to_dict
from dirl.data.formats import read_jsonl_log, truncate_jsonl_log

Strategy = Literal["auto", "single", "ddp", "deepspeed"]

DEFAULT_ZERO_CONFIG: dict = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 1,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
        "elastic_checkpoint": False,
    },
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


@dataclass
class DistConfig:
    """How the processes of a run cooperate.

    ``strategy``: ``auto`` follows the launcher (DeepSpeed when launched with a DeepSpeed accelerate
    config, i.e. ``ACCELERATE_USE_DEEPSPEED=true``; DDP when several processes; one process
    otherwise). ``deepspeed_config``: a DeepSpeed JSON file (its ``"auto"`` values are filled from
    the run's config); empty means the launcher's file or the built-in ZeRO settings with
    ``zero_stage``. ``mixed_precision``: ``auto`` is bf16 on CUDA and fp32 on CPU.
    """

    strategy: Strategy = "auto"  # auto: follow the launcher (see above); single, ddp or deepspeed
    deepspeed_config: str = ""  # a DeepSpeed JSON file ("auto" values filled); empty: the launcher's or built-in
    zero_stage: int = 1  # ZeRO stage of the built-in DeepSpeed settings: 0, 1 or 2
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a CUDA GPU that has it, else fp32
    timeout_s: int = 1800  # seconds a collective (all-reduce, barrier) waits for the other ranks

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise FieldError("zero_stage", f"must be 0, 1 or 2 (ZeRO-3 shards parameters, which this trainer does "
                             f"not support), got {self.zero_stage}")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise FieldError("deepspeed_config", f"'{self.deepspeed_config}' is not a file")
        if not self.timeout_s > 0:
            raise FieldError("timeout_s", f"must be > 0 seconds, got {self.timeout_s!r}")


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------
# Accelerator
# --------------------------------------------------------------------------------------------


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# Whether the launcher asked for DeepSpeed, read once: Accelerate sets the variable itself later.
_LAUNCHED_WITH_DEEPSPEED = _env_true("ACCELERATE_USE_DEEPSPEED")


def use_cpu() -> bool:
    return _env_true("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def resolve_strategy(dist: DistConfig, world_size: Optional[int] = None) -> Literal["single", "ddp", "deepspeed"]:
    world = env_world_size() if world_size is None else world_size
    if dist.strategy == "auto":
        if _LAUNCHED_WITH_DEEPSPEED or dist.deepspeed_config:
            return "deepspeed"
        return "ddp" if world > 1 else "single"
    if dist.strategy == "single" and world > 1:
        raise ConfigError(f"config key 'dist.strategy': 'single' but {world} processes were launched")
    if dist.strategy == "ddp" and world == 1:
        return "single"
    return dist.strategy


def resolve_mixed_precision(dist: DistConfig) -> str:
    if dist.mixed_precision != "auto":
        return dist.mixed_precision
    if not use_cpu() and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def deepspeed_config_dict(dist: DistConfig, micro_batch_size: int, gradient_accumulation_steps: int,
                          max_grad_norm: float, mixed_precision: str) -> dict:
    """The DeepSpeed config of a run: the file (``dist.deepspeed_config``, else the launcher's
    ``ACCELERATE_DEEPSPEED_CONFIG_FILE``, else the built-in ZeRO settings) with every ``"auto"``
    filled from the run's settings. Batch size, accumulation and clipping always come from the run."""
    path = dist.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path != "none":
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"config key 'dist.deepspeed_config': cannot read '{path}': {e}") from None
    else:
        cfg = json.loads(json.dumps(DEFAULT_ZERO_CONFIG))
        cfg["zero_optimization"]["stage"] = dist.zero_stage
    stage = cfg.setdefault("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ConfigError("config key 'dist.deepspeed_config': ZeRO stage 3 is not supported (use 1 or 2)")
    cfg["zero_optimization"]["elastic_checkpoint"] = False  # checkpoint.py saves one shard per rank
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    cfg["gradient_accumulation_steps"] = int(gradient_accumulation_steps)
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else 0.0
    bf16 = mixed_precision == "bf16"
    fp16 = mixed_precision == "fp16"
    cfg.setdefault("bf16", {})["enabled"] = bf16
    if fp16 or "fp16" in cfg:
        cfg.setdefault("fp16", {})["enabled"] = fp16
    for section in ("optimizer", "scheduler"):  # the trainer builds both itself
        cfg.pop(section, None)
    cfg.setdefault("steps_per_print", 1_000_000_000)
    return cfg


def setup_accelerator(
    dist: DistConfig,
    micro_batch_size: int = 1,
    gradient_accumulation_steps: Union[int, Callable[[int], int]] = 1,
    max_grad_norm: float = 1.0,
):
    """Build the ``Accelerator`` of a run.

    ``gradient_accumulation_steps`` is the number of micro-batches per optimizer step on each rank
    (the same on every rank), or a function of the world size returning it. Under DeepSpeed it
    becomes the engine's accumulation count, so the engine steps exactly once per optimizer step.
    Process groups use gloo on CPU (``ACCELERATE_USE_CPU=true`` or no CUDA) and NCCL on GPU.
    Safe to call several times in one process (state from an earlier run is reset).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    world = env_world_size()
    strategy = resolve_strategy(dist, world)
    gas = gradient_accumulation_steps(world) if callable(gradient_accumulation_steps) else int(gradient_accumulation_steps)
    if gas < 1:
        raise ConfigError(f"gradient accumulation steps must be >= 1, got {gas}")
    mp = resolve_mixed_precision(dist)
    cpu = use_cpu()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs: dict[str, Any] = {}
    handlers = []
    if world > 1 or strategy == "deepspeed":
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                               timeout=timedelta(seconds=dist.timeout_s)))
    if strategy == "deepspeed":
        if world == 1:  # DeepSpeed wants a process group even for one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            # port 0: the one-process store binds a port the OS picks (no window in which a port
            # found free can be taken by another job before the store binds it)
            os.environ.setdefault("MASTER_PORT", "0")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        if cpu:  # Accelerate turns DeepSpeed off when told "cpu"; without CUDA the device is the CPU anyway
            os.environ.pop("ACCELERATE_USE_CPU", None)
            skip_deepspeed_shm_op()
        ds_cfg = deepspeed_config_dict(dist, micro_batch_size, gas, max_grad_norm, mp)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_cfg, gradient_accumulation_steps=gas,
                                                     gradient_clipping=ds_cfg["gradient_clipping"])
    elif _env_true("ACCELERATE_USE_DEEPSPEED"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"  # the run asked for no DeepSpeed
    acc = Accelerator(
        cpu=cpu and strategy != "deepspeed",
        mixed_precision=mp,
        gradient_accumulation_steps=gas,
        kwargs_handlers=handlers,
        **kwargs,
    )
    acc.dirl_strategy = strategy  # type: ignore[attr-defined]
    acc.dirl_micro_batches = gas  # type: ignore[attr-defined]
    return acc


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed on CPU from building its shared-memory collective op. DeepSpeed's torch comm
    backend JIT-compiles that C++ op (ninja and a compiler; about 50 s on 2 cores, once per
    environment) when its process group starts, and fails the run where it cannot compile; yet its
    only user is ``inference_all_reduce`` (DeepSpeed-Inference tensor parallelism). Training's
    collectives, ZeRO's included, go through ``torch.distributed`` (gloo here) either way. DeepSpeed
    builds the op only where ``deepspeed.ops.__compatible_ops__`` marks it compatible; mark it not."""
    import deepspeed.ops

    # probed on first access, then one dict for the process; a DeepSpeed without it has nothing to skip
    # here (tests/test_sft_train.py fails if the op is built again)
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False


_GROUP_USED = False


def process_group_was_used() -> bool:
    """Whether this process has had a torch process group (open now, or closed by
    :func:`close_distributed`)."""
    import torch.distributed as dist

    return _GROUP_USED or (dist.is_available() and dist.is_initialized())


def close_distributed() -> None:
    """End a command's process group: a last barrier (no rank leaves while another still waits on
    it), then ``destroy_process_group``. No-op without a process group. gloo's worker threads
    outlive it; the process then ends through ``dirl.cli.exit_process`` (see there)."""
    import torch.distributed as dist

    global _GROUP_USED
    if dist.is_available() and dist.is_initialized():
        _GROUP_USED = True
        dist.barrier()
        dist.destroy_process_group()


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def all_reduce_sum(accelerator, value: Union[float, int, torch.Tensor]) -> torch.Tensor:
    """Sum of ``value`` over all ranks, as a float64 tensor on the accelerator's device (detached).
    Use it for global normalisers (e.g. the number of labelled tokens of a whole optimizer step)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if accelerator is None or accelerator.num_processes == 1:
        return t
    dev = accelerator.device
    t = t.to(dev if dev.type != "cpu" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.cpu()


def all_reduce_max(accelerator, value: float) -> float:
    t = torch.tensor(float(value), dtype=torch.float64)
    if accelerator is None or accelerator.num_processes == 1:
        return float(t)
    t = t.to(accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.cpu())


def broadcast_object(accelerator, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


class Dist:
    """The few collective operations a training step needs (no-ops in one process)."""

    def __init__(self, accelerator=None, group: Any = None):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        # the process group of all_gather (None: the default one); a thread that gathers while
        # another runs the training's collectives needs a group of its own
        self.group = group

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in all_reduce_sum(self.acc, torch.tensor(list(values), dtype=torch.float64))]

    def max(self, value: float) -> float:
        return all_reduce_max(self.acc, value) if self.world > 1 else float(value)

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()


class PhaseTimer:
    """Seconds per named phase of one step: ``with timer("rollout"): ...`` or ``timer.add(name, s)``;
    :meth:`metrics` gives ``time/<phase>``, the slowest rank's."""

    def __init__(self, phases: Sequence[str] = (), on_enter: Optional[Callable[[str], None]] = None):
        self.seconds: dict[str, float] = {p: 0.0 for p in phases}
        self.start = time.perf_counter()
        self.on_enter = on_enter  # called with a phase's name as it starts (a probe for tests and tools)

    def enter(self, name: str) -> None:
        if self.on_enter is not None:
            self.on_enter(name)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.enter(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    def metrics(self, dist: Optional["Dist"] = None) -> dict:
        out = {f"time/{k}": (dist.max(v) if dist is not None else v) for k, v in self.seconds.items()}
        out["time/step"] = time.perf_counter() - self.start
        return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user module inside DDP / DeepSpeed / compile wrappers."""
    m = model
    for _ in range(8):
        inner = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            break
        m = inner
    return m


class GradientStepper:
    """One optimizer step over ``micro_batches`` micro-batches per rank; see the module docstring.

    Contract: ``stepper.backward(loss)`` receives a loss whose gradient summed over all micro-batches
    of the step **and over all ranks** is the wanted gradient (sum of per-token losses divided by a
    global count). Every rank must run exactly ``micro_batches`` backward calls per step.
    """

    def __init__(self, accelerator, model, optimizer, scheduler=None, max_grad_norm: float = 1.0,
                 micro_batches: int = 1):
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.n = int(micro_batches)
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.deepspeed = is_deepspeed(accelerator)
        self._i = 0
        if self.deepspeed:
            eng_gas = int(model.gradient_accumulation_steps())
            if eng_gas != self.n:
                raise RuntimeError(f"DeepSpeed engine accumulates {eng_gas} micro-batches but the step has {self.n}")

    @property
    def ddp(self) -> bool:
        return isinstance(self.model, torch.nn.parallel.DistributedDataParallel)

    @contextlib.contextmanager
    def accumulate(self, index: int):
        """Wrap the forward *and* backward of micro-batch ``index`` (0-based) of the step."""
        if index != self._i:
            raise RuntimeError(f"micro-batch {index} out of order (expected {self._i})")
        last = index == self.n - 1
        if self.deepspeed:
            boundary = self.model.is_gradient_accumulation_boundary()
            if boundary != last:
                raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the trainer's micro-batches")
            yield
        elif self.ddp and not last:
            with self.model.no_sync():
                yield
        else:
            yield
        self._i += 1

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss * self.world  # DDP and DeepSpeed average gradients over ranks
        if self.deepspeed:
            self.model.backward(scaled, scale_wrt_gas=False)
            self.model.step()  # a no-op except at the accumulation boundary
        elif self.acc is not None and self.acc.scaler is not None:  # fp16 autocast
            self.acc.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    def step(self) -> dict:
        """Clip, step the optimizer and the scheduler, zero the gradients. Returns grad norm and lr."""
        if self._i != self.n:
            raise RuntimeError(f"step() after {self._i} of {self.n} micro-batches")
        self._i = 0
        lr = self.current_lr()
        if self.deepspeed:
            gn = self.model.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        else:
            params = [p for p in unwrap(self.model).parameters() if p.grad is not None]
            max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            if self.acc is not None and self.acc.scaler is not None:
                self.acc.unscale_gradients()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {"grad_norm": grad_norm, "lr": lr}

    def current_lr(self) -> float:
        if self.scheduler is not None:
            return float(self.scheduler.get_last_lr()[0])
        return float(self.optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm weights and biases are not decayed)."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kw: dict[str, Any] = {}
    if any(p.is_cuda for p in decay + no_decay):
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kw)


def lr_multiplier(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` before optimizer step ``step`` (0-based)."""
    warm = max(0, int(optim.warmup_steps))
    if optim.schedule == "constant":
        return 1.0
    if warm and step < warm:
        return (step + 1) / warm
    if optim.schedule == "constant_with_warmup":
        return 1.0
    # cosine from 1 to min_lr_ratio over the steps after warm-up
    span = max(1, total_steps - warm)
    progress = min(1.0, max(0.0, (step - warm) / span))
    floor = optim.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """A ``LambdaLR`` for ``optim.schedule`` over ``total_steps`` optimizer steps (state-dict saveable)."""
    if optim.schedule not in ("cosine", "constant_with_warmup", "constant"):
        raise ConfigError(f"config key 'optim.schedule': unknown schedule {optim.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, optim, total_steps))


# --------------------------------------------------------------------------------------------
# Run directory, metrics, plots, progress
# --------------------------------------------------------------------------------------------


def make_run_dir(accelerator, output_dir: str, run_name: str, prefix: str, config: Any = None) -> Path:
    """``output_dir/run_name`` (``run_name`` empty: ``{prefix}-YYYYmmdd-HHMMSS``), the same on every
    rank; rank 0 creates it, restores a checkpoint an interrupted save left hidden
    (:func:`dirl.train.checkpoint.recover_interrupted_save`) and writes the resolved config to
    ``config.yaml``."""
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = broadcast_object(accelerator, name)
    run = Path(output_dir) / name
    if accelerator is None or accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        from dirl.train.checkpoint import recover_interrupted_save

        for ckpt in recover_interrupted_save(run):
            print(f"[dirl] {ckpt}: restored from the copy a save interrupted between two renames left", flush=True)
        if config is not None:
            save_config(config, run / "config.yaml")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return run


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Drop the lines of a per-step JSONL file whose ``step`` is after ``last_step`` (a run killed
    after its last checkpoint wrote steps that a resumed run does again); a torn last line (killed,
    disk full) is dropped too. See :func:`dirl.data.formats.truncate_jsonl_log`."""
    truncate_jsonl_log(path, last_step)


class MetricsLogger:
    """Scalars to ``run_dir/metrics.jsonl``, TensorBoard (``run_dir/tensorboard``) and W&B (when
    ``logging.wandb_project`` is set). Only the main process writes; other ranks' calls are no-ops.

    ``resume_step``: lines of an earlier attempt with a step after it are dropped (a run killed after
    its last checkpoint logged steps that will be redone).
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, is_main: bool = True,
                 resume_step: Optional[int] = None, run_name: str = "", config: Any = None):
        self.enabled = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            truncate_jsonl_log(self.path, resume_step)  # a torn last line (killed, disk full) is dropped
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=(resume_step + 1) if resume_step is not None else None)
            except Exception as e:  # noqa: BLE001 - tensorboard is optional at run time
                print(f"[dirl] tensorboard disabled: {e}", file=sys.stderr)
        if cfg.wandb_project:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name or Path(run_dir).name,
                                    dir=str(run_dir), config=to_dict(config) if config is not None else None,
                                    resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer, torch.Tensor)) else v)
                 for k, v in metrics.items()}
        rec = {"step": int(step), "time": round(time.time(), 3), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(metrics_jsonl: str | os.PathLike) -> list[dict]:
    return read_jsonl_log(metrics_jsonl)


def plot_curves(metrics_jsonl: str | os.PathLike, keys: Sequence[str], out_png: str | os.PathLike,
                title: str = "", smooth: int = 0, smooth_keys: Optional[Sequence[str]] = None) -> Optional[Path]:
    """One panel per key (x = step) from a metrics JSONL file; ``smooth`` > 1 adds a centred moving
    average to ``smooth_keys`` (default: every key). Returns the PNG path, or None when none of the
    keys was logged."""
    rows = read_metrics(metrics_jsonl)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        smoothed = smooth > 1 and len(ys) >= smooth and (smooth_keys is None or k in smooth_keys)
        ax.plot(xs, ys, lw=0.8, alpha=0.5 if smoothed else 1.0, label=k)
        if smoothed:
            kern = np.ones(smooth) / smooth
            lo = (smooth - 1) // 2
            ax.plot(xs[lo:lo + len(ys) - smooth + 1], np.convolve(ys, kern, mode="valid"), lw=1.6,
                    label=f"{k} (mean of {smooth})")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...
    def close(self) -> None: ...
    def write(self, s: str) -> None: ...


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True, is_main: bool = True,
                 unit: str = "it"):
    """A tqdm bar on the main process (``enabled``), a no-op object elsewhere."""
    if not (enabled and is_main):
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr, mininterval=0.5)


def format_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def rank_zero_print(accelerator, *args, **kwargs) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(*args, **kwargs, flush=True)


def param_digests(accelerator, model: torch.nn.Module) -> list[str]:
    """A SHA-256 of every rank's parameters (names, dtypes, shapes and bytes, in name order), gathered
    on every rank: data-parallel ranks that trained as one job end with identical digests."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    mine = h.hexdigest()
    if accelerator is None or accelerator.num_processes == 1:
        return [mine]
    out: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, mine)
    return [str(d) for d in out]
