"""The LMDeploy rollout backend: LMDeploy 0.18.0's PyTorch engine behind dirl's backend protocol.

``dirl serve --backend lmdeploy`` (and ``backend: lmdeploy`` in RL/eval configs) builds an
:class:`LMDeployBackend`; the HTTP contract, the trainer and the evaluator are the same as with the
reference backend. This module imports nothing from LMDeploy at import time: on a machine without
CUDA or without ``lmdeploy==0.18.0`` the constructor raises one :class:`~dirl.config.ConfigError`
line saying so.

What it does:

* Decoding settings (block size, denoising steps, unmasking strategy, confidence threshold) are
  engine-wide, passed to LMDeploy's ``PytorchEngineConfig.dllm_*`` fields (:func:`engine_kwargs`);
  each request becomes a ``GenerationConfig`` (:func:`generation_kwargs`) over the prompt token ids
  (the server tokenises, as for the reference backend).
* Step maps and log-probs come from :mod:`dirl.rollout.lmdeploy_patch`, applied before the engine
  is built; :func:`build_trajectory` turns a finished sequence's record into the trajectory dict of
  docs/CONTRACTS.md (the whole last block, post-stop tokens included, although LMDeploy itself
  returns the tokens only up to the stop token or ``max_new_tokens``).
* Weights: ``sleep`` → ``update_weights`` (or ``update_weights_ipc``) → ``wakeup`` drive LMDeploy's own
  ``sleep`` / ``update_params(load_format='flattened_bucket')`` / ``wakeup``. Tensors are flattened
  into same-dtype buckets of at most ``weight_segment_bytes`` (:func:`iter_buckets`); a bucket whose
  memory already lives in the trainer (the ``ipc`` transport of :mod:`dirl.rollout.weights`) is
  opened from its checked JSON handle (:func:`dirl.rollout.weights.decode_ipc_handle`: no pickle
  from the request), checked against the checkpoint like any segment, and handed to LMDeploy
  without a copy.

The engine runs in this process (LMDeploy's single-GPU ``uni`` executor) on an asyncio loop of its
own thread; the backend's methods are synchronous and safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Optional, Sequence

import torch

from dirl.config import ConfigError, DecodingConfig, check_decoding
from dirl.rollout.backend import (
    GenerateRequest,
    RequestError,
    RequestParser,
    StateError,
    describe_backend,
    normalize_weight_name,
)
from dirl.rollout.decoding import effective_temperature, is_greedy
from dirl.rollout.weights import (
    DEFAULT_SEGMENT_BYTES,
    BucketEntry,
    PayloadError,
    check_ipc_buckets,
    check_update,
    checkpoint_tensor_specs,
    flatten_bucket,
    iter_buckets,
    plan_buckets,
    rebuild_bucket,
)
from dirl.rollout.lmdeploy_patch import (
    REGISTRY,
    TARGET_VERSION,
    PatchError,
    StepRecord,
    apply_patch,
    installed_version,
    response_arrays,
    set_mask_token_id,
)

ENGINE_NAME = "lmdeploy"
CONFIDENCE_RULE = "softmax(logits / T)[sampled token], before top-k/top-p filtering (LMDeploy's rule)"
LMDEPLOY_MAX_TEMPERATURE = 2.0  # GenerationConfig refuses more
TAGS = ("weights", "kv_cache")


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def check_environment(device: Optional[str] = "cuda", cuda_available: Optional[bool] = None,
                      version: Optional[str] = "<probe>") -> None:
    """Raise one :class:`ConfigError` line unless CUDA and ``lmdeploy==0.18.0`` are both here.

    ``cuda_available`` and ``version`` are probed when not given (tests pass them)."""
    problems = []
    dev = str(device or "cuda")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        problems.append("no CUDA device is visible (LMDeploy's dLLM decoding runs on CUDA only)")
    elif dev != "auto" and not dev.startswith("cuda"):
        problems.append(f"it runs on CUDA only and device {dev!r} was asked for")
    if version == "<probe>":
        try:
            version = installed_version()
        except Exception as e:  # noqa: BLE001 - an unpacked lmdeploy that fails to import
            version = f"unknown (importing it failed: {type(e).__name__}: {e})"
    if version is None:
        problems.append(f"lmdeploy is not installed (pip install 'dirl[gpu]' gives lmdeploy=={TARGET_VERSION})")
    elif version != TARGET_VERSION:
        problems.append(f"lmdeploy {version} is installed but dirl's step-map patch targets {TARGET_VERSION} only")
    if problems:
        raise ConfigError("backend 'lmdeploy' cannot start: " + "; ".join(problems) + "; use the reference backend")


# ----------------------------------------------------------------------------------------------
# Translation: our settings and requests -> LMDeploy; LMDeploy outputs -> trajectories
# ----------------------------------------------------------------------------------------------


def lmdeploy_dtype(dtype: str) -> str:
    """LMDeploy's ``dtype`` for ours: it computes in float16 or bfloat16 only; ``auto`` is bfloat16,
    as the reference backend resolves ``auto`` on CUDA."""
    table = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "float16"}
    if dtype not in table:
        raise ConfigError(f"config key 'model.dtype': LMDeploy runs in bfloat16 or float16, not {dtype!r}")
    return table[dtype]


def engine_kwargs(decoding: DecodingConfig, block_size: int, dtype: str = "auto", max_batch_size: Optional[int] = None,
                  cache_max_entry_count: float = 0.5, max_context: Optional[int] = None,
                  eager_mode: bool = False) -> dict:
    """``PytorchEngineConfig`` fields: one GPU, in-process executor, our engine-wide decoding rules."""
    if not 0.0 < cache_max_entry_count < 1.0:
        raise ConfigError(f"lmdeploy option 'cache_max_entry_count' must be in (0, 1), got {cache_max_entry_count!r}")
    return dict(
        dtype=lmdeploy_dtype(dtype),
        tp=1,
        distributed_executor_backend="uni",  # the engine and the patched code stay in this process
        device_type="cuda",
        session_len=max_context,
        max_batch_size=max_batch_size,
        cache_max_entry_count=float(cache_max_entry_count),
        enable_prefix_caching=False,
        eager_mode=bool(eager_mode),
        dllm_block_length=int(block_size),
        dllm_unmasking_strategy=decoding.unmasking_strategy,
        dllm_denoising_steps=int(decoding.denoising_steps),
        dllm_confidence_threshold=float(decoding.confidence_threshold),
    )


def generation_kwargs(req: GenerateRequest) -> dict:
    """``GenerationConfig`` fields for one request (LMDeploy's engine reads ``top_k == 1`` as greedy).

    Greedy requests (sampling off, ``top_k == 1`` or ``temperature == 0``) keep their temperature
    for the confidences and log-probs (1 for ``temperature == 0``), as the reference engine does.
    Only the request's own stop ids stop it (the engine adds no EOS of its own at this level)."""
    greedy = is_greedy(req.do_sample, req.temperature, req.top_k)
    temperature = effective_temperature(req.temperature)
    if temperature > LMDEPLOY_MAX_TEMPERATURE:
        raise RequestError(f"request {req.request_id!r}: LMDeploy accepts temperature <= "
                           f"{LMDEPLOY_MAX_TEMPERATURE:g}, got {req.temperature!r}")
    kw = dict(
        max_new_tokens=int(req.max_new_tokens),
        do_sample=not greedy,
        temperature=float(temperature),
        top_k=1 if greedy else max(0, int(req.top_k)),
        top_p=1.0 if greedy else float(req.top_p),
        min_p=0.0,
        repetition_penalty=1.0,
        ignore_eos=False,
        stop_token_ids=[int(t) for t in req.stop_token_ids] or None,
        skip_special_tokens=False,
    )
    # LMDeploy's own fields for the same rules as the reference engine: while fewer than
    # min_new_tokens tokens are finished, the stop ids join the bad words of the whole block
    # (its num_ignore_eos, counted per finished block); bad_token_ids get logits -inf everywhere
    if getattr(req, "min_new_tokens", 0):
        kw["min_new_tokens"] = int(req.min_new_tokens)
    if getattr(req, "banned_token_ids", None):
        kw["bad_token_ids"] = [int(t) for t in req.banned_token_ids]
    if req.seed is not None:
        kw["random_seed"] = int(req.seed) & ((1 << 64) - 1)
    return kw


def _status_name(status: Any) -> str:
    return str(getattr(status, "name", status))


def collect_outputs(outputs: Iterable[Any]) -> tuple[str, list[int]]:
    """Fold LMDeploy's streamed ``EngineOutput``s (``status``, ``token_ids`` new in each) into the
    final status name and all generated ids. ``SUCCESS`` parts are increments; the stream ends at
    the first other status (``FINISH`` with the last increment, or an error)."""
    tokens: list[int] = []
    status = "NONE"
    for out in outputs:
        status = _status_name(out.status)
        tokens += [int(t) for t in (out.token_ids or [])]
        if status != "SUCCESS":
            break
    return status, tokens


def build_trajectory(req: GenerateRequest, record: StepRecord, block_size: int,
                     engine_token_ids: Optional[Sequence[int]] = None, tokenizer: Any = None) -> dict:
    """The trajectory dict (docs/CONTRACTS.md) of a finished sequence from its step record.

    ``engine_token_ids`` (what LMDeploy itself returned: up to the stop token or ``max_new_tokens``)
    must be a prefix of the recorded tokens, a cheap check that the patch read the engine right."""
    prompt_len = len(req.input_ids)
    tokens, steps, logprobs = response_arrays(record, prompt_len, block_size)
    if not tokens:
        raise PatchError(f"request {req.request_id!r}: LMDeploy finished without a recorded token")
    if engine_token_ids is not None:
        eng = [int(t) for t in engine_token_ids]
        if tokens[: len(eng)] != eng:
            raise PatchError(f"request {req.request_id!r}: recorded tokens disagree with LMDeploy's output "
                             f"(first {min(len(eng), 8)} recorded {tokens[:8]} vs returned {eng[:8]})")
    stop = set(int(t) for t in req.stop_token_ids)
    response_length = next((i + 1 for i, t in enumerate(tokens) if t in stop), None)
    finish_reason = "stop"
    if response_length is None:
        response_length, finish_reason = len(tokens), "length"
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(tokens[:response_length], skip_special_tokens=True)
    return {
        "request_id": req.request_id,
        "prompt_ids": [int(t) for t in req.input_ids],
        "token_ids": tokens,
        "step_map": steps,
        "logprobs": logprobs,
        "response_length": int(response_length),
        "finish_reason": finish_reason,
        "text": text,
    }


# ----------------------------------------------------------------------------------------------
# Weights: same-dtype flat buckets in LMDeploy's ``flattened_bucket`` format
# ----------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    """LMDeploy's wire form of ``serialized_named_tensors``: base64 of a ForkingPickler pickle."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# In-process hand-off: LMDeploy calls ``func(*args)`` with ``args[6]`` set to its CUDA device to open a
# tensor (torch's ``rebuild_cuda_tensor`` for IPC handles). For a bucket already in this process we
# pass this function instead: it takes the bucket out of a table, so no IPC handle is opened by the
# process that made it.
_LOCAL_TENSORS: dict[int, torch.Tensor] = {}
_LOCAL_KEYS = itertools.count()
_LOCAL_LOCK = threading.Lock()


def _take_local_tensor(key, _a1=None, _a2=None, _a3=None, _a4=None, _a5=None, device=None):
    with _LOCAL_LOCK:
        t = _LOCAL_TENSORS.pop(int(key))
    if device is not None and t.device.type == "cuda" and t.device.index != int(device):
        t = t.to(torch.device("cuda", int(device)))
    return t


def local_bucket_request(flat: torch.Tensor, entries: list[BucketEntry]) -> str:
    """``serialized_named_tensors`` for a bucket of this process (see :func:`_take_local_tensor`)."""
    with _LOCAL_LOCK:
        key = next(_LOCAL_KEYS)
        _LOCAL_TENSORS[key] = flat
    return _dumps({"metadata": list(entries), "flattened_tensor": (_take_local_tensor, (key, 0, 0, 0, 0, 0, 0)),
                   "require_clone": False})


def decode_flattened_request(serialized: str, device: Optional[int] = None) -> list[tuple[str, torch.Tensor]]:
    """What LMDeploy 0.18.0's ``update_params`` does with a ``flattened_bucket`` request, up to the
    named tensors it loads (used by tests and the GPU check; never on the serving path)."""
    from multiprocessing.reduction import ForkingPickler

    data = ForkingPickler.loads(base64.b64decode(serialized))
    if not data["metadata"]:
        return []
    func, args = data["flattened_tensor"]
    args = list(args)
    args[6] = device if device is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    flat = func(*args)
    if data.get("require_clone", True):
        flat = flat.clone()
    return rebuild_bucket(flat, data["metadata"])


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


OPTIONS_ENV = "DIRL_LMDEPLOY_OPTIONS"
OPTION_TYPES = {"cache_max_entry_count": (int, float), "max_context": (int,), "eager_mode": (bool,),
                "weight_segment_bytes": (int,)}


def options_from_env(environ: Optional[dict] = None) -> dict:
    """Backend options from ``$DIRL_LMDEPLOY_OPTIONS`` (a JSON object), for servers started by other
    commands, e.g. ``DIRL_LMDEPLOY_OPTIONS='{"cache_max_entry_count": 0.3}'``. Explicit arguments win."""
    import json
    import os

    raw = (environ if environ is not None else os.environ).get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"${OPTIONS_ENV} is not valid JSON ({e.msg})") from None
    if not isinstance(opts, dict):
        raise ConfigError(f"${OPTIONS_ENV} must be a JSON object")
    for k, v in opts.items():
        if k not in OPTION_TYPES:
            raise ConfigError(f"${OPTIONS_ENV}: unknown option {k!r} (known: {', '.join(OPTION_TYPES)})")
        if v is not None and (isinstance(v, bool) and bool not in OPTION_TYPES[k]
                              or not isinstance(v, OPTION_TYPES[k])):
            raise ConfigError(f"${OPTIONS_ENV}: option {k!r} has the wrong type ({v!r})")
    return opts


def _first(*values):
    return next((v for v in values if v is not None), None)


class _Gate:
    """Many generate calls at once, or one state change (sleep, wakeup, weights) alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _LoopThread:
    """An asyncio loop in a daemon thread; LMDeploy's engine lives and runs on it."""

    def __init__(self, name: str = "dirl-lmdeploy"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args, **kwargs):
        async def _call():
            return fn(*args, **kwargs)

        return self.run(_call())

    def stop(self):
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class LMDeployBackend:
    """LMDeploy 0.18.0's PyTorch engine (one GPU) behind the rollout backend protocol.

    Options besides the reference backend's: ``cache_max_entry_count`` (LMDeploy's share of the
    *free* GPU memory given to the KV cache when the engine starts; the same size is allocated again
    at every wakeup, so leave room for a trainer sharing the GPU), ``max_context`` (LMDeploy's
    ``session_len``), ``eager_mode`` (no CUDA graphs) and ``weight_segment_bytes`` (bucket size of
    in-process weight updates); each also from ``$DIRL_LMDEPLOY_OPTIONS`` when not given.
    """

    name = "lmdeploy"

    def __init__(self, model_dir: str, decoding: Optional[DecodingConfig] = None, device: str = "cuda",
                 dtype: str = "auto", max_batch_size: Optional[int] = None, tokenizer: Any = None,
                 cache_max_entry_count: Optional[float] = None, max_context: Optional[int] = None,
                 eager_mode: Optional[bool] = None, weight_segment_bytes: Optional[int] = None, **unknown):
        if unknown:
            raise ConfigError(f"backend 'lmdeploy': unknown option {sorted(unknown)[0]!r}")
        check_environment(device)
        opts = options_from_env()
        cache_max_entry_count = _first(cache_max_entry_count, opts.get("cache_max_entry_count"), 0.5)
        max_context = _first(max_context, opts.get("max_context"), None)
        eager_mode = bool(_first(eager_mode, opts.get("eager_mode"), False))
        weight_segment_bytes = int(_first(weight_segment_bytes, opts.get("weight_segment_bytes"),
                                          DEFAULT_SEGMENT_BYTES))
        from dirl.model.sdar import _mask_id_from_tokenizer, load_tokenizer, read_checkpoint_config

        self.decoding = decoding or DecodingConfig()
        check_decoding(self.decoding)
        info = read_checkpoint_config(model_dir)
        bs = info.block_size
        if self.decoding.block_size is not None and bs is not None and self.decoding.block_size != bs:
            raise ConfigError(f"config key 'decoding.block_size': {self.decoding.block_size} disagrees with the "
                              f"checkpoint's block_size {bs} ({info.path})")
        bs = bs if bs is not None else self.decoding.block_size
        if bs is None:
            raise ConfigError(f"config key 'decoding.block_size': the checkpoint '{info.path}' has no block_size")
        mid = info.mask_token_id if info.mask_token_id is not None else _mask_id_from_tokenizer(info.path)
        if mid is None:
            raise ConfigError(f"config key 'model.mask_token_id': the checkpoint '{info.path}' has no mask_token_id")
        self.model_dir = str(model_dir)
        self.block_size = int(bs)
        self.mask_token_id = int(mid)
        self.vocab_size = int(info.raw.get("vocab_size") or 0)
        self.dtype = lmdeploy_dtype(dtype)
        self.segment_bytes = int(weight_segment_bytes)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(model_dir)
            except ConfigError:
                tokenizer = None
        self.tokenizer = tokenizer
        try:
            apply_patch()
        except PatchError as e:
            raise ConfigError(f"backend 'lmdeploy': {e}") from None
        set_mask_token_id(self.mask_token_id)
        from lmdeploy import PytorchEngineConfig
        from lmdeploy.version import __version__ as lmdeploy_version

        self.version = str(lmdeploy_version)
        self.engine_config = PytorchEngineConfig(**engine_kwargs(
            self.decoding, self.block_size, dtype=dtype, max_batch_size=max_batch_size,
            cache_max_entry_count=cache_max_entry_count, max_context=max_context, eager_mode=eager_mode))
        self._gate = _Gate()
        self._sessions = itertools.count(1)
        self.asleep = {"weights": False, "kv_cache": False}
        self._specs = checkpoint_tensor_specs(model_dir)
        self._update_started = False  # a segment of an unfinished update has loaded
        self._weights_partial = False  # ... and a later one was refused
        self._refused_in_update = False  # a segment of the update now open was refused
        dev = torch.device(device) if str(device).startswith("cuda") else torch.device("cuda")
        # the current CUDA device is per thread: the engine's thread gets this one
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self._loop = _LoopThread()
        try:
            self.engine = self._loop.run(self._build_engine())
        except BaseException:
            self._loop.stop()
            raise
        self.max_context = int(self.engine.max_session_len)
        self.max_batch_size = self.engine.engine_config.max_batch_size

    async def _build_engine(self):
        from lmdeploy.pytorch.engine import Engine

        torch.cuda.set_device(self.device)
        engine = Engine.from_pretrained(self.model_dir, engine_config=self.engine_config, trust_remote_code=False)
        engine.start_loop()
        return engine

    # -- protocol ------------------------------------------------------------------------------

    def parser(self) -> RequestParser:
        return RequestParser(self.decoding, self.block_size, self.vocab_size, self.max_context,
                             tokenizer=self.tokenizer)

    def info(self) -> dict:
        return describe_backend(self, block_size=self.block_size, mask_token_id=self.mask_token_id,
                                vocab_size=self.vocab_size, dtype=self.dtype, max_context=self.max_context,
                                max_batch_size=self.max_batch_size, engine=ENGINE_NAME, confidence=CONFIDENCE_RULE)

    def generate(self, requests: list[GenerateRequest]) -> list[dict]:
        results = self.generate_each(requests)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return results

    def generate_each(self, requests: list[GenerateRequest]) -> list:
        """Like :meth:`generate`, but a request that fails has its exception in its place (the server
        answers it alone and serves the rest of the batch)."""
        with self._gate.shared():
            if any(self.asleep.values()):
                raise StateError(f"the backend is asleep ({', '.join(k for k, v in self.asleep.items() if v)}); "
                                 "call wakeup first")
            if self._weights_partial:
                raise StateError("a weight update was refused after part of it had loaded; push a complete "
                                 "update before generating")
            ok, results = [], [None] * len(requests)
            for i, r in enumerate(requests):
                try:
                    generation_kwargs(r)  # refuse what LMDeploy cannot do before anything is sent
                    ok.append(i)
                except RequestError as e:
                    results[i] = e
            got = self._loop.run(self._generate_all([requests[i] for i in ok])) if ok else []
            for i, res in zip(ok, got):
                results[i] = res
        return results

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache. LMDeploy 0.18.0 has no KV-only sleep: its level 1 also moves the weights to
        CPU (level 2 would discard them), so both of our levels use its level 1 and report both asleep."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        with self._gate.exclusive():
            self._update_started = self._refused_in_update = False  # a new update starts after a sleep
            if self.asleep["kv_cache"]:
                return
            self._loop.run(self.engine.sleep(1))
            self.asleep = {"weights": True, "kv_cache": True}

    def wakeup(self, tags: Optional[list[str]] = None) -> None:
        tags = list(TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in TAGS]
        if bad:
            raise ValueError(f"unknown wakeup tag {bad[0]!r} (expected 'weights' or 'kv_cache')")
        with self._gate.exclusive():
            self._wakeup(tags)

    def _wakeup(self, tags: list[str]) -> None:
        todo = [t for t in TAGS if t in tags and self.asleep[t]]
        if "kv_cache" in todo and self.asleep["weights"] and "weights" not in todo:
            todo.insert(0, "weights")  # LMDeploy rebuilds the cache with a forward: weights first
        if not todo:
            return
        self._loop.call(self.engine.wakeup, todo)
        for t in todo:
            self.asleep[t] = False

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], finished: bool) -> None:
        """Load named tensors (any device) through LMDeploy's ``flattened_bucket`` path, cast to the
        engine's dtype, ``weight_segment_bytes`` at a time, once the segment passed
        :meth:`_check_segment`."""
        torch_dtype = getattr(torch, self.dtype)
        with self._gate.exclusive():
            self._before_update()
            pairs = [(str(n), t.detach()) for n, t in named_tensors]
            self._check_segment(pairs)
            serialized = (local_bucket_request(flat, entries) for flat, entries in
                          iter_buckets(pairs, self.segment_bytes, device=self.device, dtype=torch_dtype))
            self._load(serialized, finished)

    def update_weights_ipc(self, payload: dict, finished: bool) -> None:
        """Load an ``ipc`` payload of :mod:`dirl.rollout.weights`: its checked handles are opened here
        (the trainer must be another process on this GPU and keep its buckets alive until this
        returns), the tensors checked like any segment, then handed to LMDeploy without a copy."""
        buckets = payload.get("ipc_buckets")
        if buckets is None:
            buckets = check_ipc_buckets(payload.get("buckets"))
        with self._gate.exclusive():
            self._before_update()
            opened = []
            for k, b in enumerate(buckets):
                func, args = b.rebuild_call(self.device.index or 0)
                try:
                    opened.append((func(*args), b.entries))
                except Exception as e:  # noqa: BLE001 - a handle that does not open is the sender's
                    raise PayloadError(f"ipc bucket {k}: the CUDA IPC handle does not open "
                                       f"({type(e).__name__}: {e})") from None
            self._check_segment([p for flat, entries in opened for p in rebuild_bucket(flat, entries)])
            self._load((local_bucket_request(flat, entries) for flat, entries in opened), finished)

    def _check_segment(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Names and shapes against the checkpoint's safetensors headers, dtypes of the right kind,
        finite values. LMDeploy loads each segment as it arrives (there is no room for a second copy
        of the weights on the GPU): when a later segment is refused after earlier ones loaded,
        ``/generate`` answers 409 until a complete update has loaded."""
        specs = self._specs
        if specs is None:  # a checkpoint without safetensors headers: names are LMDeploy's to check
            specs = {normalize_weight_name(n): (tuple(t.shape), t.dtype) for n, t in pairs}
        try:
            check_update(pairs, specs)
        except PayloadError:
            self.refuse_update(False)
            raise
        self._update_started = True

    def refuse_update(self, finished: bool) -> None:
        """A segment was refused (here, or by the server before it got here: a payload that cannot
        be read). Earlier segments of the update have loaded already: ``/generate`` answers 409
        until a later update loads with no segment refused; the finishing segment of this one does
        not count as complete."""
        if self._update_started:
            self._weights_partial = True
        self._refused_in_update = not finished

    def _before_update(self) -> None:
        if not self.asleep["kv_cache"]:
            raise StateError("update_weights needs the KV cache asleep: call sleep first")
        if self.asleep["weights"]:
            self._wakeup(["weights"])  # LMDeploy loads into weights on the GPU; the KV cache stays asleep

    def _load(self, serialized: Iterable[str], finished: bool) -> None:
        # each bucket is sent once the next one is known, so that the last can carry ``finished``
        pending = None
        for s in serialized:
            if pending is not None:
                self._update_params(pending, False)
            pending = s
        if pending is not None:
            self._update_params(pending, finished)
        elif finished:
            self._update_params(_dumps({"metadata": []}), True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the trainer may reuse its buffers once this returns
        if finished:
            if not self._refused_in_update:  # a segment of this update refused: it is still partial
                self._weights_partial = False
            self._update_started = False
            self._refused_in_update = False

    def _update_params(self, serialized: str, finished: bool) -> None:
        from types import SimpleNamespace

        request = SimpleNamespace(serialized_named_tensors=serialized, load_format="flattened_bucket",
                                  finished=bool(finished))
        self._loop.call(self.engine.update_params, request)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                self._loop.call(engine.close)
            finally:
                self.engine = None
                self._loop.stop()

    # -- decoding ------------------------------------------------------------------------------

    async def _generate_all(self, requests: list[GenerateRequest]) -> list:
        return await asyncio.gather(*(self._generate_one(r) for r in requests), return_exceptions=True)

    async def _generate_one(self, req: GenerateRequest) -> dict:
        from lmdeploy.messages import GenerationConfig

        sid = next(self._sessions)
        REGISTRY.register(sid)
        try:
            instance = self.engine.create_instance()
            gen = GenerationConfig(**generation_kwargs(req))
            outputs = []
            async for out in instance.async_stream_infer(sid, [int(t) for t in req.input_ids], gen_config=gen):
                outputs.append(out)
                if _status_name(out.status) != "SUCCESS":
                    break
            status, engine_tokens = collect_outputs(outputs)
            record = REGISTRY.pop(sid)
            if status != "FINISH" or record is None:
                raise RuntimeError(f"request {req.request_id!r}: LMDeploy ended it with status {status}")
            return build_trajectory(req, record, self.block_size, engine_tokens, self.tokenizer)
        finally:
            REGISTRY.pop(sid)


__all__ = [
    "LMDeployBackend", "check_environment", "options_from_env", "engine_kwargs", "generation_kwargs", "lmdeploy_dtype",
    "collect_outputs", "build_trajectory", "BucketEntry", "plan_buckets", "flatten_bucket", "iter_buckets",
    "rebuild_bucket", "local_bucket_request", "decode_flattened_request",
]
