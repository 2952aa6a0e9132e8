"""Reinforcement learning for block diffusion LMs: DiPO (GRPO with step-level log-probs) and DAPO.

One module per job:

* :mod:`dirl.train.rl.config`: the ``dirl rl`` configuration (:class:`RLConfig`, :func:`load_rl_config`);
* :mod:`dirl.train.rl.prompts`: problems and their seeded, resumable order;
* :mod:`dirl.train.rl.groups`: rollouts, rewards, DAPO's filter, held-out accuracy;
* :mod:`dirl.train.rl.update`: samples, mini-/micro-batches, log-prob passes, the DiPO update;
* :mod:`dirl.train.rl.recipe`: :func:`rl_step`, :func:`train_rl` and ``dirl rl``.

Names are imported on first use, so reading a config does not load the trainer.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "RLConfig": "dirl.train.rl.config",
    "load_rl_config": "dirl.train.rl.config",
    "rl_step": "dirl.train.rl.recipe",
    "train_rl": "dirl.train.rl.recipe",
    "cli_main": "dirl.train.rl.recipe",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dirl.train.rl' has no attribute {name!r}")
