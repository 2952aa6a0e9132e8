"""SDAR checkpoints on transformers' Qwen3: load, save, and the block-diffusion forward.

An SDAR checkpoint is a Qwen3 decoder whose ``config.json`` says ``model_type: "sdar"`` and carries
``block_size`` and ``mask_token_id``. We build a :class:`transformers.Qwen3Config` from that file
ourselves, so no remote code runs and nothing is copied into the checkpoint folder, and load the
weights into :class:`transformers.Qwen3ForCausalLM` unchanged. Saving writes the same SDAR layout.

:class:`SDARModel` wraps the HF model with the attention rule of :mod:`dirl.model.attention`:
every forward gets an explicit mask built from per-token metadata (transformers would otherwise
infer a token-causal mask), and logits are *not* shifted (output i predicts token i).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dirl.config import SDAR_MODEL_TYPE, WEIGHT_FILES, ConfigError, read_checkpoint_config
from dirl.model.attention import (SDPA_IMPL, Backend, PackedRows, RaggedRows, TokenMeta, build_mask,
                                  register_attention, resolve_backend)

SDAR_ARCHITECTURE = "SDARForCausalLM"
QWEN_MASK_TOKEN = "<|MASK|>"
# Keys of an SDAR config.json that a Qwen3Config must not receive.
_NON_QWEN_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")


def qwen3_config_from_dict(raw: dict):
    from transformers import Qwen3Config

    d = {k: v for k, v in raw.items() if k not in _NON_QWEN_KEYS}
    return Qwen3Config(**d)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)") from None


# "sdpa" runs dirl's own attention function (dirl.model.attention.sdpa_attention): torch SDPA with
# grouped KV heads kept grouped, and chunked queries for long forwards.
_HF_ATTN = {"flex": "flex_attention", "sdpa": SDPA_IMPL}


def _hf_attn(backend: str) -> str:
    if backend == "sdpa":
        register_attention()
    return _HF_ATTN[backend]


def _cache_kwarg(decoder: nn.Module) -> str:
    """The name of the decoder's KV-cache argument: ``cache`` (transformers >= 5.24), else the older
    ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(type(decoder).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _activation_checkpointing(hf_model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on (the property's name changed in 5.x)."""
    name = "is_activation_checkpointing" if hasattr(type(hf_model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(hf_model, name, False))


class SDARModel(nn.Module):
    """A Qwen3 decoder run under the block-diffusion attention rule."""

    def __init__(self, hf_model: nn.Module, block_size: int, mask_token_id: int, attn_backend: Backend = "auto",
                 source: Optional[Path] = None):
        super().__init__()
        self.hf = hf_model
        self.block_size = int(block_size)
        self.mask_token_id = int(mask_token_id)
        self.attn_backend: Backend = attn_backend
        self.source = source  # folder it was loaded from (for copying layout files on save)
        self._active_backend: Optional[str] = None
        self._cache_kwarg: Optional[str] = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    def backend(self, override: Optional[Backend] = None) -> str:
        return resolve_backend(override or self.attn_backend, self.device)

    def _use_backend(self, backend: str) -> None:
        if self._active_backend != backend:
            self.hf.set_attn_implementation(_hf_attn(backend))
            self._active_backend = backend

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        meta: TokenMeta,
        k_meta: Optional[TokenMeta] = None,
        cache: Any = None,
        backend: Optional[Backend] = None,
        query_chunk: Optional[int] = None,
        fold_query_heads: bool = False,
        split_noisy: Optional[bool] = None,
        packed: Optional[torch.Tensor] = None,
        ragged: Optional[RaggedRows] = None,
    ):
        """Final (normed) hidden states ``[B, L, H]``.

        ``meta`` describes the query tokens (``input_ids``); ``k_meta`` the keys, i.e. the cached
        tokens followed by the query tokens (defaults to ``meta`` when nothing is cached).
        ``cache``: a ``transformers.Cache`` the attention layers read and write (the rollout
        engine's :class:`~dirl.rollout.engine.BlockKVCache`). ``query_chunk`` (SDPA only): queries
        per chunk of a long forward (see :class:`~dirl.model.attention.ChunkedMask`; None: the
        default, 0: one dense mask). ``fold_query_heads`` (SDPA, short forwards such as a decoding
        step): the query heads sharing a KV head are attended as one batch (see
        :class:`~dirl.model.attention.GroupedQueryMask`). ``split_noisy`` (SDPA, no cache): run the
        clean tokens once and the noisy copies in groups against their keys/values, each group
        recomputed in the backward pass (:mod:`dirl.model.split`; same numbers, memory of the clean
        part plus one group); None: when a forward under autograd would keep more activations than
        :data:`~dirl.model.split.DEFAULT_SPLIT_MIN_BYTES` and no activation checkpointing is on.

        ``packed`` (SDPA): the number of real tokens of each row of ``input_ids``/``meta``, the rest
        of the row being padding at its end; the decoder runs on the real tokens only, laid end to
        end (:class:`~dirl.model.attention.PackedRows`), and the result is ``[1, T, H]`` in that order.

        ``ragged`` (SDPA, with ``cache``; the rollout engine's decoding forwards): the attention layout
        ready-made (:class:`~dirl.model.attention.RaggedRows`, which stands for the rule of ``meta``
        and the cached keys); no mask is built, ``k_meta`` is not needed, and when its rows are
        ``packed`` the result is ``[1, T, H]`` as above.
        """
        be = self.backend(backend)
        self._use_backend(be)
        if ragged is not None:
            if be != "sdpa" or cache is None:
                raise ValueError("ragged rows need the sdpa attention backend and a KV cache")
            return self._run(ragged.pack(input_ids), ragged.pack(meta.pos), ragged, be, cache)
        if be == "sdpa" and cache is None and k_meta is None and self._should_split(meta, split_noisy):
            from dirl.model.split import split_hidden_states

            if self._cache_kwarg is None:
                self._cache_kwarg = _cache_kwarg(self.hf.model)
            return split_hidden_states(self.hf.model, input_ids, meta, query_chunk=query_chunk,
                                       cache_kwarg=self._cache_kwarg)
        groups = self.query_groups if fold_query_heads and be == "sdpa" else 1
        mask = build_mask(meta, k_meta, backend=be, query_chunk=query_chunk, query_groups=groups, dtype=self.dtype)
        pos = meta.pos
        if packed is not None:
            if be != "sdpa":
                raise ValueError("packed rows need the sdpa attention backend")
            rows = PackedRows(packed, meta.pos.shape[1], mask)
            input_ids, pos, mask = rows.pack(input_ids), rows.pack(meta.pos), rows
        return self._run(input_ids, pos, mask, be, cache)

    @property
    def query_groups(self) -> int:
        """Query heads per KV head."""
        cfg = self.config
        return int(cfg.num_attention_heads) // int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    def _run(self, input_ids: torch.Tensor, pos: torch.Tensor, mask: Any, be: str, cache: Any) -> torch.Tensor:
        if be != "flex":
            # a ready mask per layer type: transformers then builds none of its own
            mask = {"full_attention": mask, "sliding_attention": mask}
        kwargs = {}
        if cache is not None:
            if self._cache_kwarg is None:
                self._cache_kwarg = _cache_kwarg(self.hf.model)
            kwargs[self._cache_kwarg] = cache
        out = self.hf.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    def _should_split(self, meta: TokenMeta, split_noisy: Optional[bool]) -> bool:
        if split_noisy is not None:
            return bool(split_noisy)
        from dirl.model import split

        tokens = int(meta.pos.shape[0]) * int(meta.pos.shape[1])
        return (torch.is_grad_enabled()
                and split.saved_activation_bytes(self.config, tokens, self.dtype.itemsize) > split.DEFAULT_SPLIT_MIN_BYTES
                and not _activation_checkpointing(self.hf)
                and bool((meta.noisy != 0).any()) and bool((meta.noisy == 0).any()))

    def forward(self, input_ids: torch.Tensor, meta: TokenMeta, k_meta: Optional[TokenMeta] = None,
                backend: Optional[Backend] = None) -> torch.Tensor:
        """Full logits ``[B, L, V]`` (unshifted). Training code should prefer ``hidden_states`` and
        send only the positions it scores through ``lm_head``."""
        return self.lm_head(self.hidden_states(input_ids, meta, k_meta=k_meta, backend=backend))

    # -- save ---------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer: Any = None, extra_files: Optional[dict] = None) -> Path:
        """Write an SDAR-layout checkpoint atomically: config.json (model_type sdar, block_size,
        mask_token_id), model.safetensors, tokenizer files. The folder appears only when complete."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            self.hf.save_pretrained(tmp, safe_serialization=True)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["model_type"] = SDAR_MODEL_TYPE
            cfg["architectures"] = [SDAR_ARCHITECTURE]
            cfg["block_size"] = self.block_size
            cfg["mask_token_id"] = self.mask_token_id
            # Older readers (LMDeploy, transformers 4.x) look for these flat keys.
            rope = cfg.get("rope_parameters") or {}
            if "rope_theta" in rope:
                cfg.setdefault("rope_theta", rope["rope_theta"])
            if "dtype" in cfg:
                cfg.setdefault("torch_dtype", cfg["dtype"])
            src_cfg = self.source / "config.json" if self.source else None
            if src_cfg is not None and src_cfg.is_file():
                src = json.loads(src_cfg.read_text())
                if "auto_map" in src:
                    cfg["auto_map"] = src["auto_map"]
                # keep the source's Python files (e.g. configuration_sdar.py) so SDAR tools load it
                for f in self.source.glob("*.py"):
                    shutil.copy2(f, tmp / f.name)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, content in (extra_files or {}).items():
                (tmp / name).write_text(content)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    attn_backend: Backend = "auto",
    block_size: Optional[int] = None,
    mask_token_id: Optional[int] = None,
    key: str = "model.path",
) -> SDARModel:
    """Load an SDAR (or plain Qwen3) checkpoint folder into an :class:`SDARModel`.

    ``block_size``/``mask_token_id`` fill in what the checkpoint lacks; a value that contradicts the
    checkpoint is a :class:`ConfigError`.
    """
    from transformers import Qwen3ForCausalLM

    info = read_checkpoint_config(path, key=key)
    if block_size is not None and info.block_size is not None and block_size != info.block_size:
        raise ConfigError(
            f"config key 'model.block_size': {block_size} disagrees with the checkpoint's block_size "
            f"{info.block_size} ({info.path})"
        )
    bs = info.block_size if info.block_size is not None else block_size
    if bs is None:
        raise ConfigError(
            f"config key 'model.block_size': the checkpoint '{info.path}' has no block_size; set model.block_size"
        )
    mid = info.mask_token_id if info.mask_token_id is not None else mask_token_id
    if mid is None:
        mid = _mask_id_from_tokenizer(info.path)
    if mid is None:
        raise ConfigError(
            f"config key 'model.mask_token_id': the checkpoint '{info.path}' has no mask_token_id; set model.mask_token_id"
        )
    if mask_token_id is not None and info.mask_token_id is not None and mask_token_id != info.mask_token_id:
        raise ConfigError(
            f"config key 'model.mask_token_id': {mask_token_id} disagrees with the checkpoint's mask_token_id "
            f"{info.mask_token_id} ({info.path})"
        )
    vocab = info.raw.get("vocab_size")
    if isinstance(vocab, int) and not 0 <= mid < vocab:
        raise ConfigError(f"config key 'model.mask_token_id': {mid} is outside the vocabulary (size {vocab})")
    torch_dtype = resolve_dtype(dtype, device)
    backend = resolve_backend(attn_backend, device)
    hf_cfg = qwen3_config_from_dict(info.raw)
    try:
        with quiet_transformers():  # "a model of type sdar ... Qwen3" is the point, not a problem
            hf = Qwen3ForCausalLM.from_pretrained(
                info.path, config=hf_cfg, dtype=torch_dtype, attn_implementation=_hf_attn(backend)
            )
    except Exception as e:  # noqa: BLE001 - a checkpoint that does not load is bad input: say which and why
        raise checkpoint_load_error(info.path, e, key) from e
    hf.to(device)
    model = SDARModel(hf, bs, mid, attn_backend=attn_backend, source=info.path)
    model._active_backend = backend
    return model


def checkpoint_load_error(path: Path, e: Exception, key: str = "model.path") -> Exception:
    """A one-line :class:`ConfigError` for weights that do not load: a truncated or foreign
    safetensors file, or a config.json whose shapes disagree with the weights. Other errors as they are."""
    text = " ".join(str(e).split())
    name = type(e).__name__
    weights = next((path / w for w in WEIGHT_FILES if (path / w).is_file()), path)
    if name == "SafetensorError" or "deserializ" in text.lower() or "header" in text.lower():
        return ConfigError(f"config key '{key}': '{weights}' is truncated or not a safetensors file ({text[:160]})")
    if "size mismatch" in text or "ignore_mismatched_sizes" in text or "mismatch" in text.lower():
        return ConfigError(f"config key '{key}': '{path / 'config.json'}' disagrees with the weights in '{weights}' "
                           "(tensor shapes differ from what config.json describes)")
    if isinstance(e, OSError):
        return ConfigError(f"config key '{key}': '{weights}' cannot be read ({text[:160]})")
    return e


def _mask_id_from_tokenizer(path: Path) -> Optional[int]:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    try:
        data = json.loads(tok_file.read_text())
    except json.JSONDecodeError:
        return None
    for t in data.get("added_tokens", []):
        if t.get("content") == QWEN_MASK_TOKEN:
            return int(t["id"])
    return None


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings for a moment (its config loaders warn about ``model_type: sdar``)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (no remote code)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - re-raised as a one-line error
        raise ConfigError(f"config key 'model.path': cannot load a tokenizer from '{path}': {e}") from None
