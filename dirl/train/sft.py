"""Supervised fine-tuning with the random-masking blockwise NELBO (SPEC section 3).

``dirl sft [CONFIG] [key=value ...]`` runs :func:`train_sft`. With no config it is the embedded
default: the tiny SDAR model made on the spot, the synthetic arithmetic train split, one CPU process,
a few minutes. With a config (e.g. ``configs/sft_sdar8b.yaml``) under ``accelerate launch`` it is the
paper recipe on GPUs with DeepSpeed ZeRO-1.

One optimizer step, in order:

1. the step's ``global_batch_size`` packed rows are global row indices ``[step*G, (step+1)*G)`` of a
   seeded row order; rank r takes a contiguous slice and splits it into micro-batches;
2. the number of labelled tokens of the whole step is summed over ranks (the normaliser);
3. per micro-batch: noise (one t per sample, p = eps + (1-eps) t, response tokens masked with
   probability p, nothing forced, a row with no mask redrawn, seeded by the row's global index;
   :mod:`dirl.train.noise`), forward of ``[x_t ; x_0]`` under the
   block-diffusion mask, ``lm_head`` on the masked positions only, loss = sum(CE / p) / normaliser;
4. one clipped AdamW step and one scheduler step (:class:`~dirl.train.common.GradientStepper`).

The gradient is therefore the same whatever the split into ranks and micro-batches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from dirl.config import (
    ConfigError,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TinyModelConfig,
    check_model,
    model_folder,
    check_optim,
    check_logging,
    check_path_exists,
    check_positive,
    check_seed,
    check_synthetic_split,
    check_tiny,
    check_training_model,
    embedded_tiny_shape,
    load_config,
    run_config_command,
)
from dirl.data.formats import FieldNames, read_sft_examples, synthetic_sft_examples
from dirl.data.sft import RowStream, build_sft_rows, rank_row_slice
from dirl.model.attention import sft_meta
from dirl.model.sdar import load_model, load_tokenizer, resolve_dtype
from dirl.model.tiny import build_tiny_model, count_parameters
from dirl.train.checkpoint import (
    check_resume_settings, load_checkpoint, load_model_weights, resume_point, resume_settings, save_checkpoint,
    set_aside_checkpoints,
)
from dirl.train.common import (
    DistConfig,
    close_distributed,
    GradientStepper,
    MetricsLogger,
    all_reduce_sum,
    param_digests,
    build_optimizer,
    build_scheduler,
    format_rate,
    make_run_dir,
    plot_curves,
    progress_bar,
    rank_zero_print,
    resolve_mixed_precision,
    resolve_strategy,
    seed_everything,
    setup_accelerator,
    unwrap,
)
from dirl.train.logprobs import token_logprobs
from dirl.train.noise import DEFAULT_EPS, sample_noise

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


# what a resumed run must share with the run it continues (train.max_steps may grow)
RESUME_KEYS = ("data", "optim", "train.global_batch_size", "train.noise_eps", "train.seed")


def default_tiny_shape() -> TinyModelConfig:
    """The embedded default model (:func:`dirl.config.embedded_tiny_shape`)."""
    return embedded_tiny_shape()


SYNTHETIC_NUM_SAMPLES = 7000  # data.num_samples unset, synthetic source


def num_samples(data: "SFTDataConfig") -> int:
    """``data.num_samples`` with its default resolved (also for a config built in code and never
    validated): 7,000 for the synthetic task, 0 (every row) for anything else."""
    if data.num_samples is not None:
        return data.num_samples
    return SYNTHETIC_NUM_SAMPLES if data.source == "synthetic" else 0


@dataclass
class SFTDataConfig:
    # "synthetic" (built-in arithmetic), a .json / .jsonl file, a `datasets` folder or a Hub name
    source: str = "synthetic"
    split: str = "train"  # the split of a `datasets` source (synthetic: train)
    subset: str = ""  # `datasets` configuration name
    # rows to use, the first N; 0: every row. Unset: every row of a file or dataset, and 7,000
    # distinct train problems of the synthetic task (of 7,283; fewer are memorised instead of learnt)
    num_samples: Optional[int] = None
    digits: int = 2  # synthetic only
    # synthetic only: the worked solutions come from a teacher whose boxed sum slips (its last digit
    # one too high) with this probability (dirl/data/synthetic.py): the SFT ceiling that RL can pass
    teacher_error: float = 0.3
    # synthetic only: with this probability, per column, the teacher writes the column's digits in
    # the other order (5+3=8 for 3+5): open choices that cost decoding steps (docs/QUICKSTART.md)
    teacher_swap: float = 0.0
    # synthetic only: with this probability, per row, the teacher restates the sum (43+75: ...), text
    # that decodes many tokens a step: a second text the speed reward can choose (docs/QUICKSTART.md)
    teacher_echo: float = 0.0
    teacher_echo_at: str = "start"  # synthetic only: where the restatement goes: start, or end (after the answer)
    # synthetic only: with this probability, per row, the teacher writes carries of 0 too (4+7+0=11)
    teacher_carry: float = 0.0
    max_length: int = 96  # tokens per packed row (the forward holds twice as many: [x_t ; x_0])
    # the fields of a row (docs/DATA.md): a chat in messages_field, else prompt_field + response_field
    messages_field: str = "messages"
    prompt_field: str = "prompt"  # the prompt text of a prompt/response row
    response_field: str = "response"  # the response text (the only tokens trained on)
    shuffle: bool = True  # a fresh seeded order of the packed rows every epoch (false: the packing order)
    seed: int = 0  # data order (and which synthetic problems)


@dataclass
class SFTTrainConfig:
    max_steps: int = 800  # 0: derive from num_epochs
    num_epochs: float = 0.0  # passes over the packed rows, when max_steps is 0
    global_batch_size: int = 16  # packed rows per optimizer step, over all ranks
    micro_batch_size: int = 16  # rows per forward on one rank
    noise_eps: float = DEFAULT_EPS  # a sample's mask probability is p = eps + (1 - eps) t, t ~ U[0, 1) (the loss divides by p)
    seed: int = 0  # the noise draws (masks and their probabilities) and torch's global seed
    save_every: int = 0  # steps between checkpoints (0: only the final one)
    keep_last: int = 2  # complete checkpoints kept (0: all)
    resume: str = "auto"  # "auto": newest checkpoint of the run folder if any; "never"; or a checkpoint path
    logits_chunk_size: int = 4096  # masked positions per lm_head chunk


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(tiny=default_tiny_shape()))
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.0, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, max_grad_norm=1.0))
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs"  # the run folder is OUTPUT_DIR/RUN_NAME
    run_name: str = ""  # empty: sft-YYYYmmdd-HHMMSS

    def validate(self) -> None:
        check_model(self.model)
        if not self.model.path and self.model.block_size is not None and self.model.block_size != self.model.tiny.block_size:
            raise ConfigError(f"config key 'model.block_size': {self.model.block_size} disagrees with "
                              f"model.tiny.block_size {self.model.tiny.block_size}")
        d, t = self.data, self.train
        check_positive("data.max_length", d.max_length)
        d.num_samples = num_samples(d)  # resolved here, so the saved config (and a resume check) holds the number
        check_positive("data.num_samples", d.num_samples, allow_zero=True)
        check_positive("data.digits", d.digits)
        for key in ("teacher_error", "teacher_swap", "teacher_echo", "teacher_carry"):
            q = getattr(d, key)
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"config key 'data.{key}': must be in [0, 1], got {q!r}")
            if key != "teacher_error" and q and d.source != "synthetic":  # (teacher_error's default is not 0)
                raise ConfigError(f"config key 'data.{key}': the synthetic task's teacher only; data.source is "
                                  f"{d.source!r}")
        from dirl.data.synthetic import ECHO_PLACES

        if d.teacher_echo_at not in ECHO_PLACES:
            raise ConfigError(f"config key 'data.teacher_echo_at': expected {' or '.join(ECHO_PLACES)}, "
                              f"got {d.teacher_echo_at!r}")
        if d.source != "synthetic" and d.source.endswith((".json", ".jsonl")):
            check_path_exists("data.source", d.source)
        check_synthetic_split(d.source, d.split)
        check_positive("train.global_batch_size", t.global_batch_size)
        check_positive("train.micro_batch_size", t.micro_batch_size)
        check_positive("train.max_steps", t.max_steps, allow_zero=True)
        check_positive("train.num_epochs", t.num_epochs, allow_zero=True)
        check_positive("train.save_every", t.save_every, allow_zero=True)
        check_positive("train.keep_last", t.keep_last, allow_zero=True)
        check_positive("train.logits_chunk_size", t.logits_chunk_size)
        if t.max_steps == 0 and t.num_epochs == 0:
            raise ConfigError("config key 'train.max_steps': set max_steps > 0 or num_epochs > 0")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size {t.micro_batch_size}")
        if not 0.0 < t.noise_eps < 1.0:
            raise ConfigError(f"config key 'train.noise_eps': must be in (0, 1), got {t.noise_eps!r}")
        if t.resume not in ("auto", "never", ""):
            check_path_exists("train.resume", t.resume)
        check_optim(self.optim)
        if not self.model.path:
            check_tiny(self.model.tiny)
        check_seed("train.seed", t.seed)
        check_seed("data.seed", self.data.seed)
        check_logging(self.logging)
        check_training_model(self.model)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


class NELBOLoss(nn.Module):
    """Wraps an :class:`~dirl.model.sdar.SDARModel`; ``forward`` returns the *sum* over masked
    positions of ``CE / p`` for a micro-batch. Running the whole computation inside one module call
    lets DDP and DeepSpeed see it as the model's forward."""

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = int(chunk_size)

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor, masked: torch.Tensor,
                p: torch.Tensor) -> torch.Tensor:
        m = self.model
        L = input_ids.shape[1]
        masked = masked.bool()
        x_t = torch.where(masked, torch.full_like(input_ids, m.mask_token_id), input_ids)
        meta = sft_meta(pos, doc, m.block_size)
        hidden = m.hidden_states(torch.cat([x_t, input_ids], dim=1), meta)[:, :L]
        h = hidden[masked]
        if h.shape[0] == 0:  # keep every parameter in the graph (DDP needs it)
            return (hidden.sum() + m.lm_head.weight.sum()) * 0.0
        lp = token_logprobs(h, m.lm_head, input_ids[masked], chunk_size=self.chunk_size)
        return (-lp / p[masked].float()).sum()


def nelbo_reference(model, input_ids, pos, doc, masked, p) -> torch.Tensor:
    """The same sum computed the plain way (full logits, ``cross_entropy``); for tests and checks."""
    L = input_ids.shape[1]
    x_t = torch.where(masked, torch.full_like(input_ids, model.mask_token_id), input_ids)
    logits = model(torch.cat([x_t, input_ids], 1), sft_meta(pos, doc, model.block_size))[:, :L].float()
    ce = torch.nn.functional.cross_entropy(logits[masked], input_ids[masked], reduction="none")
    return (ce / p[masked]).sum()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_sft_examples(data: SFTDataConfig):
    limit = num_samples(data) or None
    if data.source == "synthetic":
        return synthetic_sft_examples(split=data.split, n=limit, seed=data.seed, digits=data.digits,
                                      teacher_error=data.teacher_error, teacher_swap=data.teacher_swap,
                                      teacher_echo=data.teacher_echo, teacher_carry=data.teacher_carry,
                                      teacher_echo_at=data.teacher_echo_at)
    names = FieldNames(messages=data.messages_field, prompt=data.prompt_field, response=data.response_field)
    return read_sft_examples(data.source, split=data.split, names=names, limit=limit, subset=data.subset or None)


def build_sft_data(cfg: SFTConfig, tokenizer: Any, block_size: int):
    """The packed rows of a run (identical on every rank)."""
    examples = load_sft_examples(cfg.data)
    if not examples:
        raise ConfigError(f"config key 'data.source': '{cfg.data.source}' has no rows")
    rows = build_sft_rows(tokenizer, examples, block_size, cfg.data.max_length)
    if len(rows) == 0:
        raise ConfigError(f"config key 'data.max_length': every one of the {len(examples)} samples of "
                          f"'{cfg.data.source}' is longer than {cfg.data.max_length} tokens (all dropped)")
    return rows


def make_micro_batches(data, stream, cursor: int, cfg: SFTConfig, rank: int, world: int,
                       device: torch.device) -> list[dict]:
    """This rank's micro-batches, noise included, on ``device``, of the optimizer step whose rows start
    at global row index ``cursor`` (step ``s`` of a run that never changed its batch size: ``s * G``)."""
    t = cfg.train
    start, count = rank_row_slice(cursor, t.global_batch_size, rank, world)
    out = []
    for s in range(0, count, t.micro_batch_size):
        g0 = start + s
        n = min(t.micro_batch_size, count - s)
        rows = data.rows(stream.rows_at(g0, n))
        masked, p = sample_noise(rows["labels"], rows["doc"], seed=t.seed, first_global_row=g0, eps=t.noise_eps)
        out.append({
            "input_ids": rows["input_ids"].to(device), "pos": rows["pos"].to(device), "doc": rows["doc"].to(device),
            "masked": masked.to(device), "p": p.to(device),
            "_labelled": int(rows["labels"].sum()), "_masked": int(masked.sum()),
        })
    return out


def model_inputs(mb: dict) -> dict:
    return {k: v for k, v in mb.items() if not k.startswith("_")}


def accumulate_step(wrapped, stepper, micro_batches: list[dict], accelerator) -> dict:
    """Forward and backward of one optimizer step's micro-batches (no optimizer step).
    Returns the step's global loss, labelled and masked token counts."""
    n_lab_local = sum(mb["_labelled"] for mb in micro_batches)
    n_mask_local = sum(mb["_masked"] for mb in micro_batches)
    totals = all_reduce_sum(accelerator, torch.tensor([float(n_lab_local), float(n_mask_local)]))
    n_global = float(totals[0])
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        with stepper.accumulate(i):
            s = wrapped(**model_inputs(mb))
            stepper.backward(s / n_global)
        loss_sum += float(s.detach())
    total_loss = float(all_reduce_sum(accelerator, loss_sum))
    return {"loss": total_loss / n_global, "labelled_tokens": n_global, "masked_tokens": float(totals[1])}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(cfg: SFTConfig, device: torch.device, deepspeed_bf16: bool = False):
    """(SDARModel, tokenizer) for training: the tiny model from ``model.tiny`` or a checkpoint folder.
    Weights are fp32 (mixed precision keeps fp32 masters) unless ``model.dtype`` says otherwise, or
    bf16 under DeepSpeed bf16 (the engine keeps fp32 masters itself)."""
    mc = cfg.model
    if mc.dtype != "auto":
        dtype = mc.dtype
    else:
        dtype = "bfloat16" if deepspeed_bf16 else "float32"
    if mc.path:
        path = model_folder(mc.path)  # a model folder, a training checkpoint or a run folder
        model = load_model(path, device=device, dtype=dtype, attn_backend=mc.attn_backend,
                           block_size=mc.block_size, mask_token_id=mc.mask_token_id)
        tok = load_tokenizer(path)
    else:
        model, tok = build_tiny_model(mc.tiny)
        model.attn_backend = mc.attn_backend
        if mc.mask_token_id is not None and mc.mask_token_id != model.mask_token_id:
            raise ConfigError(f"config key 'model.mask_token_id': {mc.mask_token_id} disagrees with the tiny "
                              f"tokenizer's <|MASK|> id {model.mask_token_id}")
        model.to(device=device, dtype=resolve_dtype(dtype, device))
    if tok.pad_token_id is None:
        raise ConfigError("config key 'model.path': the tokenizer has no pad token")
    if mc.gradient_checkpointing:
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.hf.config.use_cache = False
    model.train()
    return model, tok


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def total_steps_of(cfg: SFTConfig, n_rows: int) -> int:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * n_rows / t.global_batch_size))


def train_sft(cfg: SFTConfig, on_finish: Optional[Callable[[Any, Any], None]] = None) -> dict:
    """Run SFT as configured; returns the run summary (also written to ``RUN_DIR/summary.json``):
    ``run_dir``, ``final_checkpoint``, ``final_model`` (SDAR folder), ``steps``, ``start_step``,
    ``loss_first`` / ``loss_last`` (first and last step), ``loss_start`` / ``loss_end`` (means of the
    first and last ten steps), ``data`` (packing statistics, dropped samples), ``train_time_s``,
    ``world_size``, ``strategy``, ``param_digest_per_rank`` (a SHA-256 of each rank's final
    parameters) and ``ranks_in_sync`` (all equal), ``plot``.

    ``on_finish(model, accelerator)``, when given, is called on every rank with the trained
    :class:`~dirl.model.sdar.SDARModel` before returning (e.g. to evaluate it in the same process)."""
    t = cfg.train

    def micro_per_rank(world: int) -> int:
        if t.global_batch_size % (t.micro_batch_size * world):
            raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} rows must split into "
                              f"{world} ranks x micro-batches of {t.micro_batch_size} (train.micro_batch_size)")
        return t.global_batch_size // (t.micro_batch_size * world)

    acc = setup_accelerator(cfg.dist, micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=micro_per_rank,
                            max_grad_norm=cfg.optim.max_grad_norm)
    rank, world = acc.process_index, acc.num_processes
    n_micro = micro_per_rank(world)
    strategy = resolve_strategy(cfg.dist, world)
    seed_everything(t.seed)
    run_dir = make_run_dir(acc, cfg.output_dir, cfg.run_name, "sft", cfg)
    resume_from = resume_point(cfg.train.resume, run_dir, kind="sft")
    if resume_from is None and acc.is_main_process:
        moved = set_aside_checkpoints(run_dir)
        if moved is not None:
            rank_zero_print(acc, f"[dirl sft] starting afresh: the earlier checkpoints of {run_dir} are kept in {moved}")

    ds_bf16 = strategy == "deepspeed" and resolve_mixed_precision(cfg.dist) == "bf16"
    model, tok = build_model(cfg, acc.device, deepspeed_bf16=ds_bf16)
    t0 = time.time()
    data = build_sft_data(cfg, tok, model.block_size)
    stats = data.stats.as_dict()
    rank_zero_print(acc, f"[dirl sft] data: {stats['samples']} samples in {stats['rows']} rows of "
                         f"{stats['row_len']} tokens (packing {stats['packing_efficiency']:.1%}), "
                         f"{stats['dropped_too_long']} dropped as longer than data.max_length "
                         f"({time.time() - t0:.1f}s)")
    stream = RowStream(len(data), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    total = total_steps_of(cfg, len(data))

    if resume_from is not None:
        load_model_weights(resume_from, model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    module = NELBOLoss(model, chunk_size=t.logits_chunk_size)
    wrapped, optimizer = acc.prepare(module, optimizer)
    stepper = GradientStepper(acc, wrapped, optimizer, scheduler, cfg.optim.max_grad_norm, n_micro)

    start_step, start_cursor = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, optimizer=optimizer, scheduler=scheduler, accelerator=acc)
        start_step = int(state["step"])
        check_resume_settings(state["extra"].get("settings"), resume_settings(cfg, RESUME_KEYS), resume_from)
        if start_step > total:
            raise ConfigError(f"config key 'train.max_steps': the run resumes from step {start_step} ({resume_from}), "
                              f"past its {total} steps; give more steps, or train.resume=never to start afresh")
        start_cursor = int(state["extra"].get("cursor", start_step * t.global_batch_size))
        rank_zero_print(acc, f"[dirl sft] resumed from {resume_from} at step {start_step} (data cursor: row "
                             f"{start_cursor}, epoch {stream.epoch_of(start_cursor):.2f})")

    def cursor_at(step: int) -> int:
        """Global row index of the first row of optimizer step ``step``."""
        return start_cursor + (step - start_step) * t.global_batch_size

    rank_zero_print(acc, f"[dirl sft] run {run_dir} | {count_parameters(model):,} params | {strategy}, "
                         f"{world} process(es), {n_micro} micro-batch(es) of {t.micro_batch_size} rows per rank | "
                         f"{total} steps x {t.global_batch_size} rows | device {acc.device}")

    logger = MetricsLogger(run_dir, cfg.logging, is_main=acc.is_main_process,
                           resume_step=start_step if resume_from is not None else None,
                           run_name=run_dir.name, config=cfg)
    bar = progress_bar(total, initial=start_step, desc="sft", enabled=cfg.logging.progress_bar,
                       is_main=acc.is_main_process)
    losses: list[float] = []
    last_saved = start_step if resume_from is not None else -1
    final_ckpt: Optional[Path] = resume_from
    train_start = time.time()
    tokens_per_step = t.global_batch_size * data.row_len

    def save(step: int) -> Path:
        extra = {"cursor": cursor_at(step), "epoch": stream.epoch_of(cursor_at(step)), "total_steps": total,
                 "settings": resume_settings(cfg, RESUME_KEYS),
                 "global_batch_size": t.global_batch_size}
        return save_checkpoint(run_dir, step, unwrap(wrapped).model, tok, optimizer, scheduler, extra,
                               accelerator=acc, keep_last=t.keep_last, kind="sft")

    try:
        for step in range(start_step, total):
            ts = time.time()
            mbs = make_micro_batches(data, stream, cursor_at(step), cfg, rank, world, acc.device)
            res = accumulate_step(wrapped, stepper, mbs, acc)
            st = stepper.step()
            dt = time.time() - ts
            losses.append(res["loss"])
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == total:
                logger.log(done, {
                    "loss": res["loss"], "lr": st["lr"], "grad_norm": st["grad_norm"],
                    "tokens_per_s": tokens_per_step / max(dt, 1e-9), "step_time_s": dt,
                    "mask_fraction": res["masked_tokens"] / max(1.0, res["labelled_tokens"]),
                    "labelled_tokens": res["labelled_tokens"],
                    "epoch": stream.epoch_of(cursor_at(done)),
                })
            bar.set_postfix(loss=f"{res['loss']:.3f}", lr=f"{st['lr']:.2e}",
                            tok_s=format_rate(tokens_per_step / max(dt, 1e-9)), refresh=False)
            bar.update(1)
            if t.save_every and done % t.save_every == 0 and done != total:
                final_ckpt = save(done)
                last_saved = done
        if last_saved != total:
            final_ckpt = save(total)
    finally:
        bar.close()
        logger.close()
    train_time = time.time() - train_start

    plot = None
    if acc.is_main_process:
        plot = plot_curves(run_dir / "metrics.jsonl", ["loss", "lr", "grad_norm"], run_dir / "loss.png",
                           title=f"SFT {run_dir.name}", smooth=10, smooth_keys=["loss", "grad_norm"])
    assert final_ckpt is not None
    k = max(1, min(10, len(losses) // 2))  # averaging window for the start/end loss
    digests = param_digests(acc, wrapped)
    summary = {
        "run_dir": str(run_dir),
        "final_checkpoint": str(final_ckpt),
        "final_model": str(final_ckpt / "model"),
        "steps": total,
        "start_step": start_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_start": sum(losses[:k]) / k if losses else None,
        "loss_end": sum(losses[-k:]) / k if losses else None,
        "data": stats,
        "train_time_s": round(train_time, 2),
        "world_size": world,
        "strategy": strategy,
        "param_digest_per_rank": digests,
        "ranks_in_sync": len(set(digests)) == 1,
        "plot": str(plot) if plot else None,
    }
    if acc.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if losses:
            print(f"[dirl sft] loss {summary['loss_start']:.4f} (mean of the first {k} steps) -> "
                  f"{summary['loss_end']:.4f} (last {k}) in {train_time:.0f}s; curve: {plot}", flush=True)
        print(f"[dirl sft] final checkpoint: {summary['final_model']}", flush=True)
    if on_finish is not None:
        on_finish(unwrap(wrapped).model, acc)
    acc.wait_for_everyone()
    return summary


def load_sft_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> SFTConfig:
    """The SFT config of a YAML file plus ``key=value`` overrides, on top of the embedded defaults."""
    return load_config(SFTConfig, path, overrides, run_defaults=True)


def cli_main(argv: list[str]) -> int:
    path, overrides = run_config_command(
        argv, "dirl sft",
        "Supervised fine-tuning with the random-masking blockwise NELBO. Without a config: the embedded "
        "default (tiny model, synthetic arithmetic, CPU, a few minutes).")
    cfg = load_sft_config(path, overrides)
    train_sft(cfg)
    close_distributed()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
