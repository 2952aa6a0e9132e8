"""Rollout backends: the protocol ``dirl serve`` wraps, the request schema, and the reference backend.

A backend decodes :class:`GenerateRequest` objects (prompt already tokenised, every sampling field
filled in) into trajectory dicts (docs/CONTRACTS.md) and takes weight updates in place. Requests
arrive as JSON-like dicts; :class:`RequestParser` checks them (unknown fields, wrong types, empty or
over-long prompts) and raises :class:`RequestError` with a one-line reason.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from dirl.config import ConfigError, DecodingConfig, check_decoding

if TYPE_CHECKING:  # torch is imported where a backend runs, not by config checks that read the schema
    import torch

ENGINE_NAME = "dirl-reference"
CONFIDENCE_RULE = "softmax(logits / T)[sampled token], before top-k/top-p filtering"
REQUEST_FIELDS = ("request_id", "input_ids", "prompt", "messages", "max_new_tokens", "temperature", "top_k",
                  "top_p", "do_sample", "stop_token_ids", "seed", "min_new_tokens", "banned_token_ids")


class RequestError(ValueError):
    """A malformed generate request (HTTP 400)."""


class StateError(RuntimeError):
    """An operation not allowed in the backend's current sleep state (HTTP 409)."""


@dataclass
class GenerateRequest:
    """One request as a backend sees it: tokenised prompt, every sampling field resolved."""

    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None
    # stop tokens cannot be generated in a block that starts before this many response tokens
    # (LMDeploy's rule, docs/CONTRACTS.md); 0: off
    min_new_tokens: int = 0
    banned_token_ids: list[int] = field(default_factory=list)  # never generated (logits -inf)


def describe_backend(backend: Any, *, block_size: int, mask_token_id: int, vocab_size: int, dtype: str,
                     max_context: Optional[int], max_batch_size: int, engine: str = ENGINE_NAME,
                     confidence: str = CONFIDENCE_RULE) -> dict:
    """The ``/info`` answer of a backend (docs/CONTRACTS.md): what it decodes with, its request
    defaults and whether it is asleep. ``backend`` gives name, version, model_dir, decoding, device,
    parser() and asleep; the rest differs in where each backend keeps it."""
    d = backend.decoding
    return {
        "engine": engine,
        "version": backend.version,
        "backend": backend.name,
        "model": backend.model_dir,
        "block_size": block_size,
        "denoising_steps": d.denoising_steps,
        "unmasking_strategy": d.unmasking_strategy,
        "confidence_threshold": d.confidence_threshold,
        "confidence": confidence,
        "mask_token_id": mask_token_id,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "device": str(backend.device),
        "max_context": max_context,
        "max_batch_size": max_batch_size,
        "defaults": {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
                     "do_sample": d.do_sample, "max_new_tokens": d.max_new_tokens},
        "stop_token_ids": backend.parser().stop_token_ids,
        "asleep": dict(backend.asleep),
    }


@runtime_checkable
class RolloutBackend(Protocol):
    name: str

    def info(self) -> dict: ...

    def generate(self, requests: list[GenerateRequest]) -> list[dict]: ...

    def sleep(self, level: int = 1) -> None: ...

    def wakeup(self, tags: Optional[list[str]] = None) -> None: ...

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], finished: bool) -> None: ...


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


MIN_TEMPERATURE = 1e-3  # besides 0 (greedy): below it logits / T overflow to inf in float32
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 63) - 1
MAX_STOP_IDS = 256
MAX_REQUEST_ID_CHARS = 256
MAX_MESSAGES = 1024
DEFAULT_MAX_PROMPT_CHARS = 1 << 20  # without a context limit; with one: 8 characters per token of it
CHARS_PER_CONTEXT_TOKEN = 8


def _is_finite_num(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


class RequestParser:
    """Turns request dicts into :class:`GenerateRequest` (defaults from a :class:`DecodingConfig`).

    Every field is checked for type and range before any work (docs/CONTRACTS.md): temperature 0
    (greedy) or in [1e-3, 100]; top_k in [-1, vocab_size] (<= 0: off); top_p in (0, 1];
    max_new_tokens in [1, max_context] (or 2**20 without a context limit); token ids and stop ids
    inside the vocabulary; seed in [0, 2**63 - 1]; a text prompt (or the messages' text together)
    at most ``max_prompt_chars`` characters, checked before it is tokenised."""

    def __init__(self, defaults: DecodingConfig, block_size: int, vocab_size: int, max_context: Optional[int],
                 tokenizer: Any = None, stop_token_ids: Optional[list[int]] = None,
                 max_prompt_chars: Optional[int] = None):
        self.defaults = defaults
        self.block_size = int(block_size)
        self.vocab_size = int(vocab_size)
        self.max_context = max_context
        self.tokenizer = tokenizer
        if max_prompt_chars is None:
            max_prompt_chars = (CHARS_PER_CONTEXT_TOKEN * int(max_context) if max_context
                                else DEFAULT_MAX_PROMPT_CHARS)
        self.max_prompt_chars = int(max_prompt_chars)
        self.max_new_tokens = int(max_context) if max_context else 1 << 20
        if stop_token_ids is None:
            stop_token_ids = []
            if tokenizer is not None:
                from dirl.data.chat import stop_token_ids as chat_stop_ids

                stop_token_ids = chat_stop_ids(tokenizer)
        self.stop_token_ids = list(stop_token_ids)

    def limits(self) -> dict:
        """The bounds this parser holds requests to (reported by ``/info``)."""
        return {"max_prompt_chars": self.max_prompt_chars, "max_new_tokens": self.max_new_tokens,
                "temperature": [0, MIN_TEMPERATURE, MAX_TEMPERATURE], "top_k": [-1, self.vocab_size],
                "seed": [0, MAX_SEED], "max_stop_token_ids": MAX_STOP_IDS}

    def parse_many(self, objs: list[Any]) -> list[GenerateRequest]:
        reqs = [self.parse(o, where=f"requests[{i}]") for i, o in enumerate(objs)]
        seen: set[str] = set()
        for r in reqs:
            if r.request_id in seen:
                raise RequestError(f"duplicate request_id {r.request_id!r} in one batch")
            seen.add(r.request_id)
        return reqs

    def parse(self, obj: Any, where: str = "request") -> GenerateRequest:
        if not isinstance(obj, dict):
            raise RequestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"{where}: unknown field {str(unknown[0])[:64]!r} "
                               f"(valid fields: {', '.join(REQUEST_FIELDS)})")
        rid = obj.get("request_id")
        if rid is None:
            rid = uuid.uuid4().hex
        elif not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID_CHARS:
            raise RequestError(f"{where}: 'request_id' must be a non-empty string of at most "
                               f"{MAX_REQUEST_ID_CHARS} characters, got {_short(rid)}")
        else:
            where = f"request {rid!r}"
        d = self.defaults

        def get(name: str, check, kind: str, default):
            v = obj.get(name)
            if v is None:
                return default
            if not check(v):
                raise RequestError(f"{where}: '{name}' must be {kind}, got {_short(v)}")
            return v

        # the cheap fields first: a request with a bad number is refused before its prompt is tokenised
        max_new = get("max_new_tokens", lambda v: _is_int(v) and 1 <= v <= self.max_new_tokens,
                      f"an integer >= 1 and <= {self.max_new_tokens}", d.max_new_tokens)
        temperature = float(get(
            "temperature", lambda v: _is_finite_num(v) and (v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE),
            f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]", d.temperature))
        top_k = get("top_k", lambda v: _is_int(v) and -1 <= v <= self.vocab_size,
                    f"an integer in [-1, {self.vocab_size}] (<= 0: off)", d.top_k)
        top_p = float(get("top_p", lambda v: _is_finite_num(v) and 0 < v <= 1, "a number in (0, 1]", d.top_p))
        do_sample = get("do_sample", lambda v: isinstance(v, bool), "true or false", d.do_sample)
        stop = get("stop_token_ids", lambda v: isinstance(v, list) and len(v) <= MAX_STOP_IDS and all(
            _is_int(t) and 0 <= t < self.vocab_size for t in v),
            f"a list of at most {MAX_STOP_IDS} token ids in [0, {self.vocab_size})", self.stop_token_ids)
        seed = get("seed", lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]", None)
        min_new = get("min_new_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", 0)
        if min_new > max_new:
            raise RequestError(f"{where}: 'min_new_tokens' ({min_new}) is over 'max_new_tokens' ({max_new})")
        banned = get("banned_token_ids", lambda v: isinstance(v, list) and len(v) <= MAX_STOP_IDS and all(
            _is_int(t) and 0 <= t < self.vocab_size for t in v),
            f"a list of at most {MAX_STOP_IDS} token ids in [0, {self.vocab_size})", [])
        # the engine sets these logits to -inf (stop ids in the first block while min_new_tokens > 0):
        # with none left a softmax is NaN everywhere, and the request would fail its whole batch
        suppressed = set(banned) | (set(stop) if min_new > 0 else set())
        if len(suppressed) >= self.vocab_size:
            both = " and 'stop_token_ids' (suppressed while 'min_new_tokens' > 0)" if min_new > 0 else ""
            raise RequestError(f"{where}: 'banned_token_ids'{both} cover the whole vocabulary of "
                               f"{self.vocab_size} tokens; leave at least one token that can be generated")
        ids = self._prompt(obj, where)
        return GenerateRequest(request_id=rid, input_ids=ids, max_new_tokens=int(max_new), temperature=temperature,
                               top_k=int(top_k), top_p=top_p, do_sample=bool(do_sample),
                               stop_token_ids=[int(t) for t in stop], seed=seed, min_new_tokens=int(min_new),
                               banned_token_ids=sorted(set(int(t) for t in banned)))

    def _prompt(self, obj: dict, where: str) -> list[int]:
        given = [k for k in ("input_ids", "prompt", "messages") if obj.get(k) is not None]
        if len(given) != 1:
            raise RequestError(
                f"{where}: give exactly one of 'input_ids', 'prompt' or 'messages' (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        v = obj[kind]
        too_long = (f"{where}: the prompt is over the server's limit of {self.max_prompt_chars} characters "
                    "(dirl serve --max-prompt-chars)")
        if kind == "input_ids":
            limit = self.max_context if self.max_context is not None else self.max_prompt_chars
            if not isinstance(v, list) or len(v) > limit or not all(_is_int(t) for t in v):
                if isinstance(v, list) and len(v) > limit:
                    raise RequestError(f"{where}: prompt of {len(v)} tokens is over the context limit of {limit}")
                raise RequestError(f"{where}: 'input_ids' must be a list of integers")
            bad = [t for t in v if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"{where}: token id {_short(bad[0])} is outside the vocabulary "
                                   f"(size {self.vocab_size})")
            ids = list(v)
        else:
            if self.tokenizer is None:
                raise RequestError(f"{where}: this server has no tokenizer; send 'input_ids'")
            if kind == "prompt":
                if not isinstance(v, str):
                    raise RequestError(f"{where}: 'prompt' must be a string")
                if len(v) > self.max_prompt_chars:
                    raise RequestError(too_long)
                from dirl.data.chat import encode

                try:
                    ids = encode(self.tokenizer, v) if v else []
                except Exception as e:  # noqa: BLE001 - text the tokenizer cannot take is the request's
                    raise RequestError(f"{where}: the tokenizer cannot encode the prompt ({type(e).__name__})") from None
            else:
                if not isinstance(v, list) or len(v) > MAX_MESSAGES or not all(
                    isinstance(m, dict) and set(m) <= {"role", "content"} and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in v
                ):
                    raise RequestError(f"{where}: 'messages' must be a list of at most {MAX_MESSAGES} "
                                       "{role, content} string objects")
                if not v:
                    raise RequestError(f"{where}: 'messages' is empty")
                if sum(len(m["role"]) + len(m["content"]) for m in v) > self.max_prompt_chars:
                    raise RequestError(too_long)
                from dirl.data.chat import prompt_ids

                try:
                    ids = prompt_ids(self.tokenizer, v)
                except Exception as e:  # noqa: BLE001 - template errors are the request's fault
                    raise RequestError(f"{where}: cannot apply the chat template: {str(e)[:200]}") from None
        if not ids:
            raise RequestError(f"{where}: empty prompt")
        if self.max_context is not None:
            need = (len(ids) // self.block_size + 1) * self.block_size
            if need > self.max_context:
                raise RequestError(
                    f"{where}: prompt of {len(ids)} tokens is over the context limit of {self.max_context} "
                    f"(with its first block it needs {need})"
                )
        return ids


def _short(v: Any) -> str:
    """A value for an error message, cut short (a request may send megabytes)."""
    s = repr(v)
    return s if len(s) <= 64 else s[:61] + "..."


# ----------------------------------------------------------------------------------------------
# The reference backend
# ----------------------------------------------------------------------------------------------


def normalize_weight_name(name: str) -> str:
    """Parameter names as in ``Qwen3ForCausalLM``: drop the ``hf.`` of :class:`SDARModel` and the
    ``module.`` of DDP/DeepSpeed wrappers."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "hf.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


REFERENCE_OPTIONS = ("dtype", "max_batch_size")  # what `dirl serve --backend-option` may set
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ReferenceBackend:
    """The pure-PyTorch engine of :mod:`dirl.rollout.engine` behind the backend protocol.

    Options (keyword arguments, also ``dirl serve --backend-option KEY=VALUE``): ``dtype`` and
    ``max_batch_size``; in-process callers may also hand over a loaded ``model`` and ``tokenizer``.
    Any other option is a :class:`ConfigError`."""

    name = "reference"

    def __init__(self, model_dir: str, decoding: Optional[DecodingConfig] = None, device: str = "cpu",
                 dtype: str = "auto", max_batch_size: int = 64, model=None, tokenizer=None, **unknown):
        if unknown:
            raise ConfigError(f"backend 'reference': unknown option {sorted(unknown)[0]!r} "
                              f"(known: {', '.join(REFERENCE_OPTIONS)})")
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise ConfigError(f"backend 'reference': option 'max_batch_size' must be an integer >= 1, "
                              f"got {max_batch_size!r}")
        if model is None and dtype not in DTYPES:
            raise ConfigError(f"backend 'reference': option 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from dirl import __version__
        from dirl.model.sdar import load_model, load_tokenizer
        from dirl.rollout.engine import Engine

        self.version = __version__
        self.decoding = decoding or DecodingConfig()
        check_decoding(self.decoding)
        self.model_dir = str(model_dir)
        if model is None:
            model = load_model(model_dir, device=device, dtype=dtype, block_size=self.decoding.block_size)
            model.eval()
        elif self.decoding.block_size is not None and self.decoding.block_size != model.block_size:
            raise ConfigError(f"config key 'decoding.block_size': {self.decoding.block_size} disagrees with the "
                              f"model's block size {model.block_size}")
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(model_dir)
            except ConfigError:
                tokenizer = None
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.engine = Engine(model, tokenizer, denoising_steps=self.decoding.denoising_steps,
                             unmasking_strategy=self.decoding.unmasking_strategy,
                             confidence_threshold=self.decoding.confidence_threshold,
                             max_batch_size=max_batch_size)
        self.asleep = {"weights": False, "kv_cache": False}
        # state_dict, not named_parameters: a tied lm_head.weight keeps its own name there
        self._params = {normalize_weight_name(n): p for n, p in model.hf.state_dict(keep_vars=True).items()}
        self._specs = {n: (tuple(p.shape), p.dtype) for n, p in self._params.items()}
        self._staged: dict[str, torch.Tensor] = {}  # segments of an update not yet finished
        self._update_refused = False

    def parser(self) -> RequestParser:
        return RequestParser(self.decoding, self.model.block_size, self.model.config.vocab_size,
                             self.engine.max_context, tokenizer=self.tokenizer)

    def info(self) -> dict:
        return describe_backend(self, block_size=self.model.block_size, mask_token_id=self.model.mask_token_id,
                                vocab_size=self.model.config.vocab_size,
                                dtype=str(self.model.dtype).replace("torch.", ""),
                                max_context=self.engine.max_context, max_batch_size=self.engine.max_batch_size)

    def _check_awake(self) -> None:
        if any(self.asleep.values()):
            raise StateError(f"the backend is asleep ({', '.join(k for k, v in self.asleep.items() if v)}); "
                             "call wakeup first")

    def generate(self, requests: list[GenerateRequest]) -> list[dict]:
        self._check_awake()
        return self.engine.generate(requests)

    def generate_continuous(self, requests: list[GenerateRequest], more, on_result, cancelled=None) -> None:
        """Continuous batching for the server: ``more()`` returns requests that arrived since, which
        join the running batch; ``on_result(i, trajectory)`` fires as each finishes (``i`` counts
        ``requests`` first, then what ``more`` returned, in order); ``cancelled(i)`` true drops
        request ``i`` before the next forward (its caller went away)."""
        self._check_awake()
        self.engine.generate(requests, on_result=on_result, more=more, cancelled=cancelled)

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        self.engine.free_cache()
        self._reset_update()  # a new update starts after a sleep
        self.asleep["kv_cache"] = True
        if level == 2 and not self.asleep["weights"]:
            if self.device.type == "cuda":
                import torch

                self.model.to("cpu")
                torch.cuda.empty_cache()
            self.asleep["weights"] = True

    def wakeup(self, tags: Optional[list[str]] = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        bad = [t for t in tags if t not in ("weights", "kv_cache")]
        if bad:
            raise ValueError(f"unknown wakeup tag {bad[0]!r} (expected 'weights' or 'kv_cache')")
        if "kv_cache" in tags and "weights" not in tags and self.asleep["weights"]:
            # refused before anything changes: a staged update stays staged
            raise StateError("wake the weights before the KV cache")
        if "weights" in tags and self.asleep["weights"]:
            self.model.to(self.device)
            self.asleep["weights"] = False
        if "kv_cache" in tags:
            self._reset_update()  # an update not finished by now is dropped: the old weights serve
            self.asleep["kv_cache"] = False

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], finished: bool) -> None:
        """Stage one segment; the segment with ``finished`` applies every staged tensor at once.

        Each segment is checked against the model first (:func:`dirl.rollout.weights.check_update`:
        names, shapes, dtypes, finite values). A refused segment drops what was staged and refuses the
        rest of that update, so the weights in use are never a mix: the old ones keep serving after
        ``wakeup`` (which also drops an update left unfinished)."""
        from dirl.rollout.weights import PayloadError, check_update

        if not self.asleep["kv_cache"]:
            raise StateError("update_weights needs the KV cache asleep: call sleep first")
        if self._update_refused:
            raise StateError("an earlier segment of this update was refused and nothing was applied; "
                             "wake up (the old weights serve) or sleep again, then send the whole update")
        try:
            names = check_update(named_tensors, self._specs, seen=set(self._staged))
        except PayloadError:
            self.refuse_update(finished)
            raise
        for key, (_, t) in zip(names, named_tensors):
            p = self._params[key]
            # a copy: an ipc segment's views point into the trainer's memory, freed once we answer
            self._staged[key] = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
        if finished:
            import torch

            staged, self._staged = self._staged, {}
            with torch.no_grad():
                for key, t in staged.items():
                    self._params[key].copy_(t)

    def refuse_update(self, finished: bool) -> None:
        """A segment was refused (here, or by the server before it got here: a payload that cannot
        be read): drop what was staged and refuse the rest of that update until the next sleep or
        KV-cache wakeup. A refused update that was one finished segment is simply over."""
        self._update_refused = self._update_refused or bool(self._staged) or not finished
        self._staged.clear()

    def _reset_update(self) -> None:
        self._staged = {}
        self._update_refused = False
