"""Checkpoints: where models are, which one a run starts from, and atomic, resumable training
checkpoints (single process, DDP and DeepSpeed ZeRO-1/2).

Finding models (the one place that decides it, for every command):

* :func:`resolve_model_dir`: a model folder, a training checkpoint, or a run folder → a model folder;
* :func:`newest_checkpoint`: the newest *complete training checkpoint* of a kind (``sft``, ``rl``)
  under a runs folder. Only folders written by :func:`save_checkpoint` count, so an untrained model
  (:func:`write_tiny_model`: RL's ``initial_model``, eval's ``tiny-model``) is never picked;
* :func:`resume_point`: the checkpoint a run resumes from (``auto`` / ``never`` / a path);
* :func:`write_tiny_model`: a fresh embedded-default model with its ``UNTRAINED`` marker.

Layout of ``RUN_DIR/checkpoints/step_00000120/``::

    model/                 SDAR layout (config.json with model_type sdar, block_size, mask_token_id;
                           model.safetensors; tokenizer files): loadable by dirl, LMDeploy, SDAR tools
    optimizer.pt           full optimizer state (single process / DDP; written by rank 0), or
    optimizer/rank_00000.pt ... one ZeRO shard per data-parallel rank (DeepSpeed: each rank writes its own)
    scheduler.pt           LR scheduler state
    rng/rank_00000.pt ...  Python / NumPy / torch / CUDA RNG states of every rank
    trainer_state.json     step, world size, strategy, and the trainer's ``extra_state`` (data cursor, ...)
    COMPLETE               written last

Everything is first written to a hidden ``.step_XXXXXXXX.tmp`` folder and renamed when complete, so
a process killed mid-save never leaves a folder that :func:`latest_checkpoint` would pick up.
Every rank must call :func:`save_checkpoint` and :func:`load_checkpoint` (they synchronise).
A ZeRO checkpoint resumes with the same number of ranks; a full one with any number.

Resume order::

    model = ...; load_model_weights(ckpt, model)          # before accelerator.prepare
    wrapped, opt = accelerator.prepare(module, opt)
    state = load_checkpoint(ckpt, optimizer=opt, scheduler=sched, accelerator=accelerator)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dirl.config import ConfigError, TinyModelConfig
from dirl.model.tiny import make_tiny_model
from dirl.train.ckpt_files import (  # noqa: F401  (re-exported: the one place that decides where models are)
    COMPLETE_MARKER,
    STATE_FILE,
    TINY_VOCAB_MAX,
    UNTRAINED_MARKER,
    _STEP_RE,
    _tiny_vocab,
    checkpoint_kind,
    checkpoint_name,
    checkpoints_dir,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    newest_checkpoint,
    resolve_model_dir,
)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"'{p}' is neither a complete checkpoint nor a run folder with one")
    return latest


def resume_point(resume: str, run_dir: str | os.PathLike, kind: str = "") -> Optional[Path]:
    """The checkpoint a run resumes from: ``auto`` the newest of ``run_dir`` (None when there is
    none), ``never`` / ``""`` None, else the given checkpoint or run folder. With ``kind`` (``sft``,
    ``rl``) a checkpoint written by the other command is refused: its trainer state is not this
    command's (an RL run has a prompt cursor, SFT a row cursor)."""
    if resume in ("never", ""):
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir)
    else:
        try:
            found = resolve_checkpoint(resume)
        except FileNotFoundError as e:
            raise ConfigError(f"config key 'train.resume': {e}") from None
    if found is not None and kind:
        other = checkpoint_kind(found)
        if other and other != kind:
            raise ConfigError(f"config key 'train.resume': {found} is a 'dirl {other}' checkpoint; a 'dirl {kind}' "
                              f"run resumes only its own (start from its model with model.path={found / 'model'})")
    return found


def recover_interrupted_save(run_dir: str | os.PathLike) -> list[Path]:
    """Bring back a checkpoint that a kill left only under a hidden name: re-saving a step moves
    the old ``step_N`` to ``.step_N.old`` and then the new ``.step_N.tmp`` to ``step_N``; a kill
    between the two renames leaves no ``step_N`` but one or two complete hidden copies. The newer
    (``.tmp``) is preferred. Called by the main process as a run folder is opened, before any
    resume looks for checkpoints; returns the checkpoints restored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    restored = []
    for name in sorted({m.group(1) for d in root.iterdir() if (m := re.match(r"^\.(step_\d+)\.(?:tmp|old)$", d.name))}):
        final = root / name
        if final.exists():
            continue
        for hidden in (root / f".{name}.tmp", root / f".{name}.old"):
            if hidden.is_dir() and is_complete(hidden):
                os.replace(hidden, final)
                restored.append(final)
                break
    return restored


def resume_settings(cfg: Any, keys: tuple[str, ...]) -> dict:
    """The settings a resumed run must share with the run it continues, flattened to dotted keys:
    the sections or fields ``keys`` of ``cfg`` (its data, optimizer, loss, batch shape ...). Stored
    in each checkpoint's trainer state; :func:`check_resume_settings` compares them."""
    from dirl.config import to_dict

    tree = to_dict(cfg)
    out: dict = {}

    def flat(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                flat(f"{prefix}.{k}", x)
        else:
            out[prefix] = v

    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        flat(key, node)
    return out


def check_resume_settings(saved: Optional[dict], now: dict, ckpt: str | os.PathLike) -> None:
    """A resumed run whose settings differ from its checkpoint's would silently mix two runs (the
    optimizer's restored state keeps the old lr; a changed data seed meets the old data cursor):
    a one-line :class:`ConfigError` naming the first key that differs. Checkpoints written before
    the settings were stored are not checked."""
    if not saved:
        return
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"config key '{key}': the run resumed from {ckpt} was made with {saved.get(key)!r}, this config has "
                f"{now.get(key)!r}; a resumed run keeps its settings (set it back, or start another run: "
                f"another run_name, or train.resume=never)")


def set_aside_checkpoints(run_dir: str | os.PathLike) -> Optional[Path]:
    """A run starting afresh (``train.resume=never``) in a folder that holds checkpoints of an
    earlier run: their folder is renamed ``checkpoints.replaced-<time>`` (kept, not deleted), so
    that the new run's checkpoints never mix with them and pruning or a later ``resume=auto``
    never takes one of theirs. Returns the new name, or None when there was nothing."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir() or not any(_STEP_RE.match(d.name) for d in root.iterdir()):
        return None
    dest = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        n += 1
        dest = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.replace(root, dest)
    return dest


def mark_untrained(model_dir: str | os.PathLike) -> None:
    (Path(model_dir) / UNTRAINED_MARKER).write_text("a randomly initialised embedded-default model\n")


def write_tiny_model(out_dir: str | os.PathLike, cfg: Optional[TinyModelConfig] = None) -> Path:
    """A freshly initialised embedded-default model in ``out_dir``, marked ``UNTRAINED`` so that no
    default model finder takes it for a trained one."""
    out = Path(make_tiny_model(out_dir, cfg))
    mark_untrained(out)
    return out


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):
            pass  # a different number of visible devices: keep the fresh seeds


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _rank_world(accelerator) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process


def _barrier(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def zero_optimizer(optimizer: Any) -> Any:
    """The DeepSpeed ZeRO (stage 1/2) optimizer inside Accelerate's wrapper, or None."""
    o = optimizer
    for _ in range(4):
        if o is None:
            return None
        if hasattr(o, "single_partition_of_fp32_groups"):
            return o
        if isinstance(o, torch.optim.Optimizer) and not hasattr(o, "optimizer"):
            return None
        o = getattr(o, "optimizer", None)
    return None


def _unsupported_deepspeed_optimizer(optimizer: Any) -> bool:
    o = getattr(optimizer, "optimizer", optimizer)
    return zero_optimizer(optimizer) is None and not isinstance(o, torch.optim.Optimizer)


def _torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path, skip: tuple[str, ...] = (), files: bool = True) -> None:
    """fsync every file under ``root`` (not under its top-level folders named in ``skip``; none
    with ``files=False``), then the folders, deepest first: after it, a power loss cannot leave
    the tree's names pointing at lost data."""
    dirs = []
    for dirpath, dirnames, names in os.walk(root):
        d = Path(dirpath)
        if d == root:
            dirnames[:] = [n for n in dirnames if n not in skip]
        if files:
            for name in names:
                _fsync(d / name)
        dirs.append(d)
    for d in reversed(dirs):
        _fsync(d)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    extra_state: Optional[dict] = None,
    accelerator: Any = None,
    keep_last: int = 0,
    kind: str = "",
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write checkpoint ``step`` of a run; call it on every rank. Returns the checkpoint folder.

    ``model``: the (unwrapped) :class:`~dirl.model.sdar.SDARModel`, saved in SDAR layout by rank 0.
    ``optimizer``: the optimizer as returned by ``accelerator.prepare`` (or a plain one).
    ``extra_state``: JSON-serialisable trainer state (data cursor, counters, ...).
    ``keep_last`` > 0: delete older complete checkpoints beyond the newest ``keep_last``.
    ``kind``: the command writing it (``sft``, ``rl``), for :func:`newest_checkpoint`.
    ``extra_files``: name -> text, written by the main process into the checkpoint folder (before
    it is marked complete).
    """
    rank, world, main = _rank_world(accelerator)
    root = checkpoints_dir(run_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)

    zero = zero_optimizer(optimizer) if optimizer is not None else None
    if optimizer is not None and zero is None and _unsupported_deepspeed_optimizer(optimizer):
        raise NotImplementedError(f"cannot checkpoint optimizer of type {type(optimizer).__name__} "
                                  "(use ZeRO stage 1 or 2, DDP or one process)")
    if zero is not None:
        _torch_save(zero.state_dict(), tmp / "optimizer" / f"rank_{rank:05d}.pt")
    elif optimizer is not None and main:
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    _torch_save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")

    if main:
        model.save_pretrained(tmp / "model", tokenizer=tokenizer)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {
            "step": int(step),
            "kind": kind,
            "world_size": world,
            "optimizer": "zero-sharded" if zero is not None else ("full" if optimizer is not None else "none"),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "extra": extra_state or {},
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    # Each rank's files reach the disk before COMPLETE is written (each rank fsyncs what it wrote:
    # on a shared file system only the writer's fsync is sure to flush it, and another rank's
    # file may still be a .part being renamed), so a power loss never leaves a COMPLETE
    # checkpoint with lost contents.
    for own in (tmp / "rng" / f"rank_{rank:05d}.pt", tmp / "optimizer" / f"rank_{rank:05d}.pt"):
        if own.is_file():
            _fsync(own)
    if main:
        _fsync_tree(tmp, skip=("rng", "optimizer"))  # the model, optimizer.pt, scheduler, state, extras
    _barrier(accelerator)
    if main:
        _fsync_tree(tmp, files=False)  # every folder's entries, the other ranks' files included
        (tmp / COMPLETE_MARKER).write_text(f"step {int(step)}\n")
        _fsync(tmp / COMPLETE_MARKER)
        _fsync(tmp)
        if final.exists():  # re-saving the same step: swap atomically
            old = root / f".{final.name}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync(root)
        if keep_last and keep_last > 0:
            # only checkpoints up to this one count: the one just written is never pruned
            upto = [(s, d) for s, d in list_checkpoints(run_dir) if s <= int(step)]
            for _, d in upto[:-keep_last]:
                # hide it first, so a kill mid-delete leaves a hidden leftover, never a half folder
                doomed = root / f".{d.name}.old"
                os.replace(d, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    _barrier(accelerator)
    return final


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def read_trainer_state(ckpt_dir: str | os.PathLike) -> dict:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def load_model_weights(ckpt_dir: str | os.PathLike, model: Any) -> None:
    """Copy the checkpoint's weights into ``model`` (an SDARModel or a HF model), in place.
    Call it before ``accelerator.prepare`` so DeepSpeed's fp32 copies start from them."""
    from safetensors.torch import load_file

    mdir = Path(ckpt_dir) / "model"
    hf = getattr(model, "hf", model)
    files = sorted(mdir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in '{mdir}'")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{mdir}' does not match the model: missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    if tied and hasattr(hf, "tie_weights"):
        hf.tie_weights()


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    accelerator: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Restore what is given from a complete checkpoint; call it on every rank. Returns the trainer
    state (``step``, ``world_size``, ``extra`` ...). ``model`` (optional) gets its weights via
    :func:`load_model_weights`; prefer doing that before ``accelerator.prepare``."""
    ck = Path(ckpt_dir)
    if not is_complete(ck):
        raise FileNotFoundError(f"'{ck}' is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    rank, world, _ = _rank_world(accelerator)
    state = read_trainer_state(ck)
    if model is not None:
        load_model_weights(ck, model)
    if optimizer is not None:
        zero = zero_optimizer(optimizer)
        saved_kind = state.get("optimizer")
        if zero is not None:
            if saved_kind != "zero-sharded":
                raise RuntimeError(f"'{ck}' holds a {saved_kind} optimizer state; DeepSpeed ZeRO needs one saved "
                                   "under DeepSpeed (resume with the strategy the run was saved with)")
            if state.get("world_size") != world:
                raise RuntimeError(f"'{ck}' was saved by {state.get('world_size')} ZeRO ranks; resuming with {world} "
                                   "ranks is not supported (relaunch with the same number of processes)")
            shard = torch.load(ck / "optimizer" / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
            shards: list[Any] = [None] * world
            shards[rank] = shard
            zero.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            if saved_kind != "full":
                raise RuntimeError(f"'{ck}' holds a {saved_kind} optimizer state; this run's optimizer needs a full "
                                   "one (resume with the strategy the run was saved with)")
            sd = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(sd)
    if scheduler is not None and (ck / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ck / "scheduler.pt", map_location="cpu", weights_only=False))
    if restore_rng:
        f = ck / "rng" / f"rank_{rank:05d}.pt"
        if not f.is_file():
            f = ck / "rng" / "rank_00000.pt"
        if f.is_file():
            set_rng_state(torch.load(f, map_location="cpu", weights_only=False))
    _barrier(accelerator)
    return state
