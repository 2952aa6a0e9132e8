"""The rollout backends by name: ``get_backend("reference" | "lmdeploy", ...)``.

Its own module so that :mod:`dirl.rollout.backend` (the contract both backends implement) and
:mod:`dirl.rollout.lmdeploy_backend` (which builds on it) never import each other. LMDeploy itself
is imported only when an LMDeploy engine is built (a GPU-only package).
"""

from __future__ import annotations

from typing import Optional

from dirl.config import ConfigError, DecodingConfig
from dirl.rollout import lmdeploy_backend
from dirl.rollout.backend import ReferenceBackend, RolloutBackend


def _check_option_types(backend: str, options: dict, types: dict) -> None:
    """Options of known type (``{name: (type, ...)}``) must have it (``None`` leaves the default)."""
    for k, v in options.items():
        want = types.get(k)
        if want is None or v is None:
            continue
        if (isinstance(v, bool) and bool not in want) or not isinstance(v, tuple(want)):
            names = " or ".join(t.__name__ for t in want)
            raise ConfigError(f"backend {backend!r}: option {k!r} must be {names}, got {v!r}")


def get_backend(name: str, model_dir: str, decoding: Optional[DecodingConfig] = None, device: str = "cpu",
                **kwargs) -> RolloutBackend:
    """Build a backend by name: ``reference`` or ``lmdeploy``.

    ``kwargs`` are the backend's own options (``dtype``, ``max_batch_size`` for both; LMDeploy also
    ``cache_max_entry_count``, ``max_context``, ``eager_mode``, ``weight_segment_bytes``); an unknown
    option or one of the wrong type is a :class:`ConfigError` naming it."""
    if name == "reference":
        return ReferenceBackend(model_dir, decoding=decoding, device=device, **kwargs)
    if name == "lmdeploy":
        _check_option_types(name, kwargs, lmdeploy_backend.OPTION_TYPES)
        return lmdeploy_backend.LMDeployBackend(model_dir, decoding=decoding, device=device, **kwargs)
    raise ConfigError(f"unknown rollout backend {name!r} (expected reference or lmdeploy)")
