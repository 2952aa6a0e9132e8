"""Step maps and kept-token log-probs inside LMDeploy's dLLM engine (targets lmdeploy 0.18.0 only).

LMDeploy 0.18.0 decodes SDAR checkpoints block by block but does not say at which forward each
token was kept, and its own ``logprobs`` output is not the quantity the trainer recomputes. This
module adds both with a small patch applied once, at server start, in the process that runs the
engine (the PyTorch engine with the single-GPU ``uni`` executor runs in that same process).

How LMDeploy 0.18.0 tracks a block (``lmdeploy/pytorch/strategies/dllm``): every position of the
block being decoded carries a state, ``MASKED`` (0), ``UNMASKED`` (1, kept, not yet in the KV cache)
or ``CACHED`` (2). One forward feeds the block, samples every position, and the unmasking rule turns
some ``MASKED`` positions into ``UNMASKED``; a block that enters a forward fully ``UNMASKED`` is the
commit forward: it is turned into ``CACHED`` and nothing is sampled into it. The engine process then
hands each forward's new states to ``DLLMSequenceStrategy.update_running``, which writes them into
the sequence.

The patch wraps three functions and changes none of their results:

* ``DLLMModelAgentStrategy.post_sampling`` (model side): also computes
  ``log softmax(logits)[token]`` for every position of the block. The logits it sees are already
  divided by the temperature and not yet top-k/top-p filtered, so this is exactly SPEC section 4
  item 8; the confidence LMDeploy ranks positions by is its ``exp``.
* ``DLLMModelAgentStrategy.make_extra_outputs``: carries those log-probs to the engine process in
  one more dataclass field of the per-forward outputs.
* ``DLLMSequenceStrategy.update_running`` (engine side): before the sequence is updated, remembers
  the states of the block each sequence fed; after, a position that went ``MASKED`` → ``UNMASKED``
  was kept by this forward. A forward that keeps at least one token adds one to the sequence's
  counter (commit forwards keep none, so they never count), and each kept token records the counter,
  its id and its log-prob. Only sequences registered in :data:`REGISTRY` are recorded.

It also makes the engine use the checkpoint's ``mask_token_id`` (0.18.0 hard-codes 151669 for every
SDAR checkpoint) by wrapping ``SDARModelConfigBuilder.build``.

Everything that decides a step map is a plain function of numpy arrays (:func:`kept_positions`,
:func:`record_forward`, :func:`response_arrays`) or a wrapper factory that takes the original
function (:func:`wrap_update_running`, :func:`wrap_post_sampling`, :func:`wrap_make_extra_outputs`),
so all of it is tested on CPU without LMDeploy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

TARGET_VERSION = "0.18.0"

# LMDeploy's block states (lmdeploy/pytorch/consts.py in 0.18.0)
MASKED, UNMASKED, CACHED = 0, 1, 2

LOGPROB_FIELD = "dirl_logprobs"  # the extra field of the per-forward outputs
_LOGPROB_ATTR = "_dirl_logprobs"  # where post_sampling leaves them on the extra inputs


class PatchError(RuntimeError):
    """The installed LMDeploy is not the version this patch was written for, or the engine's
    state broke an assumption of the patch."""


# ----------------------------------------------------------------------------------------------
# Pure step-map logic
# ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What one sequence's forwards kept, by absolute position (prompt ⊕ response)."""

    counter: int = 0  # forwards that kept at least one token: the step-map counter
    forwards: int = 0  # every forward seen for the sequence, commit forwards included
    tokens: dict[int, int] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, float] = field(default_factory=dict)


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def kept_positions(old_mask: Any, new_mask: Any) -> np.ndarray:
    """Indices of the block kept by one forward: ``MASKED`` before it, ``UNMASKED`` after it."""
    old, new = _as_array(old_mask), _as_array(new_mask)
    if old.shape != new.shape:
        raise PatchError(f"block state shapes differ before and after a forward: {old.shape} vs {new.shape}")
    return np.nonzero((old == MASKED) & (new == UNMASKED))[0]


def record_forward(record: StepRecord, block_start: int, old_mask: Any, new_mask: Any, token_ids: Any,
                   logprobs: Any = None) -> list[int]:
    """Apply one forward's block states to ``record``; returns the absolute positions it kept.

    The counter grows by one iff the forward kept a token (SPEC section 4 item 7); every kept
    position records that value, the kept token and, when given, its log-prob. A position is kept
    at most once: LMDeploy never remasks, so a second keep means the patch misread the engine.
    """
    record.forwards += 1
    idx = kept_positions(old_mask, new_mask)
    if idx.size == 0:
        return []
    toks = _as_array(token_ids).reshape(-1)
    lps = None if logprobs is None else _as_array(logprobs).reshape(-1)
    record.counter += 1
    step = record.counter
    kept = []
    for i in idx.tolist():
        pos = int(block_start) + int(i)
        if pos in record.steps:
            raise PatchError(f"position {pos} was kept twice (steps {record.steps[pos]} and {step})")
        record.steps[pos] = step
        record.tokens[pos] = int(toks[i])
        if lps is not None:
            record.logprobs[pos] = float(lps[i])
        kept.append(pos)
    return kept


def response_arrays(record: StepRecord, prompt_len: int, block_size: int) -> tuple[list[int], list[int], list[float]]:
    """``token_ids``, ``step_map`` and ``logprobs`` of the response, from the first position after the
    prompt through the end of the last block that has a kept token.

    Every response position up to there must have been kept (a finished sequence's blocks are
    complete); a gap means the record is incomplete and raises :class:`PatchError`.
    """
    resp = [p for p in record.steps if p >= prompt_len]
    if not resp:
        return [], [], []
    end = (max(resp) // block_size + 1) * block_size
    missing = [p for p in range(prompt_len, end) if p not in record.steps]
    if missing:
        raise PatchError(
            f"step record incomplete: {len(missing)} of positions {prompt_len}..{end - 1} were never kept "
            f"(first: {missing[0]})"
        )
    positions = range(prompt_len, end)
    tokens = [record.tokens[p] for p in positions]
    steps = [record.steps[p] for p in positions]
    if all(p in record.logprobs for p in positions):
        lps = [record.logprobs[p] for p in positions]
    else:
        raise PatchError("step record has no log-prob for some kept tokens (is the model-side patch applied?)")
    return tokens, steps, lps


class StepRegistry:
    """Step records of the sequences being decoded, by LMDeploy session id (thread safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[int, StepRecord] = {}

    def register(self, session_id: int) -> StepRecord:
        with self._lock:
            if session_id in self._records:
                raise PatchError(f"session {session_id} is already being recorded")
            rec = self._records[session_id] = StepRecord()
            return rec

    def get(self, session_id: int) -> Optional[StepRecord]:
        with self._lock:
            return self._records.get(session_id)

    def pop(self, session_id: int) -> Optional[StepRecord]:
        with self._lock:
            return self._records.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


REGISTRY = StepRegistry()


# ----------------------------------------------------------------------------------------------
# Wrappers (factories over the original functions; no LMDeploy import here)
# ----------------------------------------------------------------------------------------------


def _rows(x: Any, n: int) -> Optional[np.ndarray]:
    if x is None:
        return None
    return _as_array(x).reshape(n, -1)


def wrap_update_running(orig: Callable, running_status: Any, registry: StepRegistry = REGISTRY) -> Callable:
    """Wrap ``DLLMSequenceStrategy.update_running(self, running, batched_outputs, model_inputs, delta)``.

    Before the original runs, the block each registered, running sequence fed is its last
    ``block_size`` states (``history_dllm_mask[num_all_ids - B : num_all_ids]``; in a prefill that
    is the prompt's last block padded with ``[M]``). After it, ``batched_outputs`` holds one row of
    new states, tokens and (patched) log-probs per sequence of ``running``.
    """

    def update_running(self, running, batched_outputs, model_inputs=None, delta=None, **kwargs):
        B = int(self.block_size)
        snaps = []
        for msg in running:
            sid = msg.session_id
            if msg.status != running_status or registry.get(sid) is None:
                snaps.append(None)
                continue
            end = int(msg.num_all_ids)
            old = np.array(msg.history_dllm_mask[end - B:end], copy=True)
            snaps.append((sid, end - B, old))
        out = orig(self, running, batched_outputs, model_inputs, delta, **kwargs)
        if any(s is not None for s in snaps):
            n = len(running)
            masks = _rows(batched_outputs.extra_outputs.dllm_mask, n)
            toks = _rows(batched_outputs.next_token_ids, n)
            lps = _rows(getattr(batched_outputs.extra_outputs, LOGPROB_FIELD, None), n)
            for i, snap in enumerate(snaps):
                if snap is None:
                    continue
                sid, start, old = snap
                rec = registry.get(sid)
                if rec is not None:
                    record_forward(rec, start, old, masks[i], toks[i], None if lps is None else lps[i])
        return out

    update_running.__wrapped__ = orig  # type: ignore[attr-defined]
    return update_running


def token_logprobs(logits, token_ids):
    """``log softmax(logits)[token]`` per row in fp32 (``logits`` ``[N, V]``, ``token_ids`` ``[N]``)."""
    import torch

    lg = logits.float()
    picked = lg.gather(-1, token_ids.long().reshape(-1, 1)).squeeze(-1)
    return picked - torch.logsumexp(lg, dim=-1)


def wrap_post_sampling(orig: Callable) -> Callable:
    """Wrap ``DLLMModelAgentStrategy.post_sampling(self, inputs, logits, next_token_ids, extra_inputs)``.

    The original returns the block's tokens (kept ones sampled, earlier ones from the input) and the
    new states; the log-prob of every returned token under the logits it was sampled from is left
    on the extra inputs for :func:`wrap_make_extra_outputs`.
    """

    def post_sampling(self, inputs, logits, next_token_ids, extra_inputs):
        next_token_ids, extra_inputs = orig(self, inputs, logits, next_token_ids, extra_inputs)
        setattr(extra_inputs, _LOGPROB_ATTR, token_logprobs(logits, next_token_ids))
        return next_token_ids, extra_inputs

    post_sampling.__wrapped__ = orig  # type: ignore[attr-defined]
    return post_sampling


def wrap_make_extra_outputs(orig: Callable, outputs_cls: type) -> Callable:
    """Wrap ``DLLMModelAgentStrategy.make_extra_outputs(self, extra_inputs)`` so the per-forward
    outputs are an ``outputs_cls`` (the original dataclass plus :data:`LOGPROB_FIELD`)."""

    def make_extra_outputs(self, extra_inputs):
        out = orig(self, extra_inputs)
        return outputs_cls(dllm_mask=out.dllm_mask, **{LOGPROB_FIELD: getattr(extra_inputs, _LOGPROB_ATTR, None)})

    make_extra_outputs.__wrapped__ = orig  # type: ignore[attr-defined]
    return make_extra_outputs


def wrap_config_build(orig_func: Callable, get_mask_id: Callable[[], Optional[int]]) -> classmethod:
    """Wrap ``SDARModelConfigBuilder.build`` (a classmethod) so the engine's mask token is the
    checkpoint's: the id set by :func:`set_mask_token_id`, else the config's ``mask_token_id``."""

    def build(cls, hf_config, model_path: str = None, **kwargs):
        cfg = orig_func(cls, hf_config, model_path, **kwargs)
        mid = get_mask_id()
        if mid is None:
            mid = getattr(hf_config, "mask_token_id", None)
        if isinstance(mid, int) and not isinstance(mid, bool):
            cfg.dllm_mask_token = int(mid)
        return cfg

    build.__wrapped__ = orig_func  # type: ignore[attr-defined]
    return classmethod(build)


# ----------------------------------------------------------------------------------------------
# Applying the patch
# ----------------------------------------------------------------------------------------------

_state = {"applied": False, "mask_token_id": None}
_apply_lock = threading.Lock()


def set_mask_token_id(mask_token_id: Optional[int]) -> None:
    """The mask token the patched SDAR config builder gives the engine (None: the checkpoint's)."""
    _state["mask_token_id"] = None if mask_token_id is None else int(mask_token_id)


def installed_version() -> Optional[str]:
    """The installed lmdeploy version, read without importing lmdeploy (None when absent)."""
    from importlib import metadata

    try:
        return metadata.version("lmdeploy")
    except metadata.PackageNotFoundError:
        import importlib.util

        if importlib.util.find_spec("lmdeploy") is None:
            return None
        from lmdeploy.version import __version__  # an unpacked tree on the path, no dist-info

        return str(__version__)


def check_version(version: Optional[str]) -> None:
    """Refuse anything but the targeted LMDeploy release (one-line :class:`PatchError`)."""
    if version is None:
        raise PatchError(f"lmdeploy is not installed (dirl's LMDeploy backend needs lmdeploy=={TARGET_VERSION})")
    if version != TARGET_VERSION:
        raise PatchError(
            f"dirl's LMDeploy step-map patch targets lmdeploy {TARGET_VERSION}, but {version} is installed; "
            f"install lmdeploy=={TARGET_VERSION} (pip install 'dirl[gpu]')"
        )


def is_applied() -> bool:
    return bool(_state["applied"])


def apply_patch() -> None:
    """Check the LMDeploy version and install the wrappers (idempotent)."""
    with _apply_lock:
        if _state["applied"]:
            return
        check_version(installed_version())
        try:
            from lmdeploy.pytorch import consts
            from lmdeploy.pytorch.configurations.sdar import SDARModelConfigBuilder
            from lmdeploy.pytorch.messages import MessageStatus
            from lmdeploy.pytorch.strategies.dllm import model_agent as dllm_agent
            from lmdeploy.pytorch.strategies.dllm import sequence as dllm_sequence
        except ImportError as e:
            raise PatchError(
                f"cannot import LMDeploy's dLLM modules ({e}); is lmdeploy {TARGET_VERSION} complete?"
            ) from None
        if (consts.DLLM_MASKED, consts.DLLM_UNMASKED, consts.DLLM_CACHED) != (MASKED, UNMASKED, CACHED):
            raise PatchError("LMDeploy's dLLM block states are not the ones this patch was written for")
        agent_cls = dllm_agent.DLLMModelAgentStrategy
        seq_cls = dllm_sequence.DLLMSequenceStrategy
        for cls, name in ((agent_cls, "post_sampling"), (agent_cls, "make_extra_outputs"),
                          (seq_cls, "update_running"), (SDARModelConfigBuilder, "build")):
            if name not in cls.__dict__:
                raise PatchError(
                    f"LMDeploy's {cls.__name__}.{name} is missing; the patch needs lmdeploy {TARGET_VERSION}"
                )

        outputs_cls = _extra_outputs_class(dllm_agent.DLLMExtraOutputs)
        agent_cls.post_sampling = wrap_post_sampling(agent_cls.__dict__["post_sampling"])
        agent_cls.make_extra_outputs = wrap_make_extra_outputs(agent_cls.__dict__["make_extra_outputs"], outputs_cls)
        seq_cls.update_running = wrap_update_running(seq_cls.__dict__["update_running"], MessageStatus.RUNNING)
        SDARModelConfigBuilder.build = wrap_config_build(
            SDARModelConfigBuilder.__dict__["build"].__func__, lambda: _state["mask_token_id"]
        )
        _state["applied"] = True


def _extra_outputs_class(base: type) -> type:
    """``base`` (LMDeploy's dLLM per-forward outputs) plus a log-prob field, as a module-level class
    so that it pickles when an executor sends outputs between processes."""
    import dataclasses

    cls = dataclasses.make_dataclass(
        "DirlDLLMExtraOutputs", [(LOGPROB_FIELD, Any, dataclasses.field(default=None))], bases=(base,)
    )
    cls.__module__ = __name__
    cls.__qualname__ = "DirlDLLMExtraOutputs"
    globals()["DirlDLLMExtraOutputs"] = cls
    return cls


__all__ = [
    "TARGET_VERSION", "MASKED", "UNMASKED", "CACHED", "LOGPROB_FIELD", "PatchError", "StepRecord",
    "StepRegistry", "REGISTRY", "kept_positions", "record_forward", "response_arrays", "token_logprobs",
    "wrap_update_running", "wrap_post_sampling", "wrap_make_extra_outputs", "wrap_config_build",
    "set_mask_token_id", "installed_version", "check_version", "is_applied", "apply_patch",
]
