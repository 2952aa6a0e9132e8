"""Where training checkpoints and models are on disk: names, completeness, and which folder a
``model.path`` means. No torch here, so config checks can use it before any heavy import
(:mod:`dirl.train.checkpoint` writes and reads the checkpoints themselves)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from dirl.config import ConfigError

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
UNTRAINED_MARKER = "UNTRAINED"  # next to a freshly made tiny model
TINY_VOCAB_MAX = 4096  # the embedded default's vocabulary is far below this; any Hub model far above
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    p = Path(ckpt_dir)
    return (p / COMPLETE_MARKER).is_file() and (p / STATE_FILE).is_file() and (p / "model" / "config.json").is_file()


def list_checkpoints(run_dir: str | os.PathLike, model_only: bool = False) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as ``(step, path)``. ``model_only``: every
    checkpoint whose model is complete (``COMPLETE`` and ``model/config.json``), whether or not its
    trainer state is there (enough to evaluate, not to resume)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if not (m and d.is_dir()):
            continue
        ok = ((d / COMPLETE_MARKER).is_file() and (d / "model" / "config.json").is_file()) if model_only \
            else is_complete(d)
        if ok:
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` (or None)."""
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def resolve_model_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    """A model folder (with ``config.json``), the model of a training checkpoint (``step_N``), or
    the model of a run folder's newest complete checkpoint. ``key``: the config key (or, starting
    with ``--``, the command-line flag) the one-line error names."""
    where = key if key.startswith("-") else f"config key '{key}'"
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{where}: '{p}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{where}: '{p}' is not a folder (expected a model folder with config.json)")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    done = list_checkpoints(p, model_only=True)
    if done:
        return done[-1][1] / "model"
    raise ConfigError(f"{where}: '{p}' has no config.json: it is neither a model folder nor a training checkpoint "
                      f"or a run folder with a complete one")


def checkpoint_kind(ckpt_dir: str | os.PathLike) -> str:
    """``sft`` or ``rl``: the command that wrote a checkpoint (its trainer state, else the name of
    its run folder: ``sft-*``, ``rl-*``); ``""`` when neither tells."""
    p = Path(ckpt_dir)
    try:
        kind = json.loads((p / STATE_FILE).read_text()).get("kind", "")
    except (OSError, ValueError):
        kind = ""
    if kind:
        return str(kind)
    run = p.parent.parent.name
    return next((k for k in ("sft", "rl") if run.startswith(k)), "")


def _tiny_vocab(model_dir: Path) -> bool:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return int(raw.get("vocab_size", 1 << 30)) <= TINY_VOCAB_MAX


def newest_checkpoint(runs_dir: str | os.PathLike, kinds: Optional[tuple[str, ...]] = None, tiny_only: bool = True,
                      max_depth: int = 6) -> Optional[Path]:
    """The model folder of the most recently completed training checkpoint under ``runs_dir``
    (``.../checkpoints/step_N/model`` with its ``COMPLETE`` marker), or None. ``kinds``: only
    checkpoints of these commands (see :func:`checkpoint_kind`); ``tiny_only``: only the embedded
    default's (tiny-vocabulary) models. Folders that merely hold a model (an untrained tiny model,
    a download) are never candidates."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    best: tuple[float, Optional[Path]] = (-1.0, None)
    base = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not n.startswith(".") and len(d.parts) - base < max_depth]
        if d.name != "checkpoints":
            continue
        dirnames[:] = []
        for _, ck in list_checkpoints(d.parent, model_only=True):
            model = ck / "model"
            if kinds is not None and checkpoint_kind(ck) not in kinds:
                continue
            if (tiny_only and not _tiny_vocab(model)) or (model / UNTRAINED_MARKER).exists():
                continue
            t = (ck / COMPLETE_MARKER).stat().st_mtime
            if t > best[0]:
                best = (t, model)
    return best[1]
