"""Rollouts: the block-diffusion decoder (SPEC section 4), its HTTP server and the client.

* :class:`Engine` (``engine.py``): the reference decoder with a KV cache of committed blocks;
  :func:`naive_generate` (``naive.py``): the no-cache oracle; the shared rules in ``decoding.py``.
* :class:`GenerateRequest`, :class:`RequestParser` (``backend.py``); :func:`get_backend` (``backends.py``).
* ``server.py``: ``dirl serve``; :class:`ServerConfig`, :func:`open_servers`, :func:`start_server`
  (``launch.py``): the servers of a run, started in subprocesses that die with their parent.
* :class:`RolloutClient` (``client.py``): generate over a pool of servers, push weights in place.

Names are imported on first use, so ``import dirl.rollout`` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Engine": "dirl.rollout.engine",
    "naive_generate": "dirl.rollout.naive",
    "GenerateRequest": "dirl.rollout.backend",
    "RequestParser": "dirl.rollout.backend",
    "RequestError": "dirl.rollout.backend",
    "ReferenceBackend": "dirl.rollout.backend",
    "RolloutBackend": "dirl.rollout.backend",
    "get_backend": "dirl.rollout.backends",
    "start_server": "dirl.rollout.launch",
    "ServerHandle": "dirl.rollout.launch",
    "ServerConfig": "dirl.rollout.launch",
    "open_servers": "dirl.rollout.launch",
    "RolloutClient": "dirl.rollout.client",
    "RolloutError": "dirl.rollout.client",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dirl.rollout' has no attribute {name!r}")
