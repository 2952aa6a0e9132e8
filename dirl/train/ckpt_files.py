"""Where training checkpoints and models are on disk: names, completeness, and which folder a
``model.path`` means. No torch here, so config checks can use it before any heavy import
(:mod:`dirl.train.checkpoint` writes and reads the checkpoints themselves)."""

from __future__ import annotations

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
