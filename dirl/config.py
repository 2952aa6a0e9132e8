"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

Every run is described by one top-level dataclass (``SFTConfig``, ``RLConfig``, ``EvalConfig``)
built from sections defined here. ``load_config`` reads a YAML file, applies command-line
overrides, checks every key and type, and raises :class:`ConfigError` with a one-line message that
names the offending key. Nothing heavy (no model, no dataset) is touched before validation ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as a single line."""


class FieldError(ValueError):
    """Raised by a config section's own ``__post_init__`` check about one of its fields; reading a
    config turns it into a :class:`ConfigError` naming the full key (``dist.zero_stage``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


# A section class may declare ``RENAMED: ClassVar[dict[str, str]]``: an old field name -> the full
# new key. Reading the old name is a one-line error that names the new one.
RENAMED_ATTR = "RENAMED"


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """Shape of the embedded default model (``dirl make-tiny-model``)."""

    hidden_size: int = 128  # width of the residual stream
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # KV heads (grouped-query attention); divides num_attention_heads
    head_dim: int = 32  # width of one attention head
    intermediate_size: int = 256  # width of the SwiGLU MLP
    max_position_embeddings: int = 1024  # longest sequence (prompt + response) the RoPE table covers
    block_size: int = 4  # B, tokens per diffusion block, written into the checkpoint
    tie_word_embeddings: bool = False  # lm_head shares the input embedding
    seed: int = 0  # the random initialisation


def embedded_tiny_shape() -> TinyModelConfig:
    """The embedded default model's shape (the quick-start's, what ``dirl sft`` trains with no
    model.path, what ``dirl make-tiny-model`` writes with no shape arguments): hidden 128, 3 layers,
    4 heads / 2 KV heads, intermediate 512, 765,248 parameters. :class:`TinyModelConfig`'s own
    defaults are a smaller 2-layer model (0.32M) that the tests and a freshly made model of
    ``dirl rl`` / ``dirl eval`` (no trained checkpoint found) use."""
    return TinyModelConfig(num_hidden_layers=3, intermediate_size=512)


@dataclass
class ModelConfig:
    # Model folder (SDAR or plain Qwen3 layout), training checkpoint (step_N) or run folder (its
    # newest complete checkpoint). Empty: the embedded tiny model, made on the spot.
    path: str = ""
    # None: read from the checkpoint (an SDAR config carries both); a value that disagrees with the
    # checkpoint is an error.
    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None  # id of the mask token [M]; None: the checkpoint's (or its tokenizer's <|MASK|>)
    # the trainer's weights; auto: fp32 (bf16 under DeepSpeed bf16, which keeps fp32 masters itself).
    # Started servers follow it unless server.dtype is set.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: FlexAttention on CUDA, SDPA with an explicit boolean mask on CPU
    attn_backend: Literal["auto", "flex", "sdpa"] = "auto"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass (less memory)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # the model made when path is empty


@dataclass
class DecodingConfig:
    """Block-diffusion decoding (SPEC section 4). ``block_size`` None: the model's."""

    block_size: Optional[int] = None  # B; must equal the model's
    # steps per block of the static strategies and sequential (max(1, B // steps) tokens kept a step);
    # low_confidence_dynamic takes as many steps as its threshold needs
    denoising_steps: int = 4
    # dynamic: keep every position with confidence >= confidence_threshold (and always the most
    # confident one); static: the most confident max(1, B // steps); sequential: that many, leftmost first
    unmasking_strategy: Literal[
        "low_confidence_dynamic", "low_confidence_static", "sequential"
    ] = "low_confidence_dynamic"
    confidence_threshold: float = 0.9  # tau of low_confidence_dynamic, in [0, 1]
    temperature: float = 1.0  # T; 0 is greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # nucleus filter, in (0, 1]; 1: none
    do_sample: bool = True  # false: argmax at every position (greedy)
    max_new_tokens: int = 512  # response tokens at most (a response that reaches it is "length")


@dataclass
class OptimConfig:
    lr: float = 1e-5  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays, each in [0, 1)
    eps: float = 1e-8  # AdamW's denominator term
    # cosine: linear warm-up, then cosine from lr to min_lr_ratio * lr at the last step;
    # constant_with_warmup: linear warm-up, then lr; constant: lr from the first step (no warm-up)
    schedule: Literal["cosine", "constant_with_warmup", "constant"] = "cosine"
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    min_lr_ratio: float = 0.0  # the cosine schedule's floor, as a fraction of lr, in [0, 1]
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0: none


@dataclass
class LoggingConfig:
    log_every: int = 1  # optimizer steps between metric lines (metrics.jsonl, TensorBoard, W&B)
    tensorboard: bool = True  # also write RUN_DIR/tensorboard
    wandb_project: str = ""  # also log to this Weights & Biases project (empty: no W&B)
    progress_bar: bool = True  # a tqdm bar on the main process


# --------------------------------------------------------------------------------------------
# A checkpoint's config.json (JSON only: checking a config never imports torch)
# --------------------------------------------------------------------------------------------

SDAR_MODEL_TYPE = "sdar"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class CheckpointInfo:
    path: Path
    model_type: str
    block_size: Optional[int]
    mask_token_id: Optional[int]
    raw: dict


def read_checkpoint_config(path: str | os.PathLike, key: str = "model.path") -> CheckpointInfo:
    """Read and check ``config.json`` of a checkpoint folder; one-line :class:`ConfigError` on problems."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key '{key}': model folder '{p}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"config key '{key}': '{p}' is not a folder (expected a checkpoint folder with config.json)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"config key '{key}': '{p}' has no config.json, so it is not a model checkpoint")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config key '{key}': '{cfg_file}' is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key '{key}': '{cfg_file}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{key}': '{cfg_file}' must hold a JSON object")
    mt = raw.get("model_type")
    if mt not in (SDAR_MODEL_TYPE, "qwen3"):
        raise ConfigError(
            f"config key '{key}': '{cfg_file}' has model_type {mt!r}; expected 'sdar' or 'qwen3'"
        )
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise ConfigError(f"config key '{key}': '{p}' has no weights (model.safetensors or pytorch_model.bin)")
    bs = raw.get("block_size")
    mid = raw.get("mask_token_id")
    if bs is not None and (not isinstance(bs, int) or bs <= 0):
        raise ConfigError(f"config key '{key}': '{cfg_file}' has an invalid block_size {bs!r}")
    return CheckpointInfo(path=p, model_type=mt, block_size=bs, mask_token_id=mid, raw=raw)


# --------------------------------------------------------------------------------------------
# Mechanism
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if isinstance(value, bool):  # YAML reads an unquoted no / off / yes / on as a boolean
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (
                ("no", "off", "false") if not value else ("yes", "on", "true"))]
            if len(spelled) == 1:
                return spelled[0]
        if any(a == value and type(a) is type(value) for a in args):  # True is not the choice 1
            return value
        raise ConfigError(
            f"config key '{key}': expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
        )
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):  # nan / inf: no setting means that
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    renamed = getattr(cls, RENAMED_ATTR, {})
    for old in sorted(set(data) & set(renamed)):
        raise ConfigError(f"config key '{prefix}{old}' was renamed to '{renamed[old]}'")
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + str(unknown[0])
        hint = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key '{key}' (valid keys here: {hint})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as e:
        raise ConfigError(f"config key '{prefix}{e.field_name}': {e}") from None
    except (TypeError, ValueError) as e:  # __post_init__ checks
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {e}") from None
    return obj


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _type_at(cls: Any, parts: list[str]) -> Any:
    """The declared type of the dotted key ``parts`` under the dataclass ``cls`` (through sections
    and dict fields), or None when the path names no field (the build reports it)."""
    tp = cls
    for part in parts:
        tp = _unwrap_optional(tp)
        if is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        else:
            return None
    return tp


def _is_text_type(tp: Any) -> bool:
    """A str field, or a Literal of strings only."""
    tp = _unwrap_optional(tp)
    if tp is str:
        return True
    args = typing.get_args(tp)
    return typing.get_origin(tp) is Literal and bool(args) and all(isinstance(a, str) for a in args)


def _override_value(text: str, tp: Any) -> Any:
    """An override's value for a field of type ``tp``. A text field takes the text as written
    (``run_name=0012`` stays 0012, ``data.prompt_template=Q: {question}`` is not a YAML mapping), a
    quoted text is read as a YAML string (``"a\\nb"`` has a newline) and ``null`` is None where the
    field allows None; a plain integer is decimal; everything else is read as YAML (numbers,
    booleans, lists, mappings)."""
    if _unwrap_optional(tp) is int and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)  # decimal, where YAML 1.1 reads 0012 as the octal 10
    if tp is None or not _is_text_type(tp):
        return _parse_scalar(text)
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        v = _parse_scalar(t)
        if isinstance(v, str):
            return v
    if t in ("null", "~") and _unwrap_optional(tp) is not tp:
        return None
    return t


def _merge_typed(tp: Any, base: dict, extra: dict) -> dict:
    """``extra`` over ``base`` for the dataclass ``tp``: a section (a dataclass field) is merged
    key by key; any other value, a dict or list field included, replaces the old one whole (a
    ``rewards.weights`` mapping given is the weights, not an addition to the default ones)."""
    out = dict(base)
    for k, v in extra.items():
        sub = _unwrap_optional(_type_at(tp, [str(k)])) if tp is not None else None
        if isinstance(v, dict) and isinstance(out.get(k), dict) and sub is not None and is_dataclass(sub):
            out[k] = _merge_typed(sub, out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(cls: Any, data: dict, items: list[str]) -> dict:
    """``key.sub=value`` overrides applied in order onto ``data`` (the config tree of ``cls``). A
    dotted key sets one field, or one entry of a dict field (``rewards.weights.speed=0.2`` keeps
    the other weights); a mapping given for a section merges into it; values are read for the
    field's type (:func:`_override_value`)."""
    out = dict(data)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        k, v = item.split("=", 1)
        k = k.strip().lstrip("-")
        if not k:
            raise ConfigError(f"override '{item}' has an empty key")
        parts = k.split(".")
        value = _override_value(v, _type_at(cls, parts))
        node = out
        for depth, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            nxt = dict(nxt) if isinstance(nxt, dict) else ({} if nxt is None else nxt)
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key '{k}': '{'.'.join(parts[:depth + 1])}' is not a section")
            node[part] = nxt
            node = nxt
        last, section = parts[-1], _unwrap_optional(_type_at(cls, parts))
        if isinstance(value, dict) and isinstance(node.get(last), dict) and section is not None \
                and is_dataclass(section):
            node[last] = _merge_typed(section, node[last], value)
        else:
            node[last] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 (byte {e.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{p}{where}' is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                run_defaults: bool = False, base: Any = None) -> T:
    """Build ``cls`` from an optional YAML file plus ``key.sub=value`` overrides, validated. With
    ``run_defaults`` a section given in the file or on the command line is merged onto ``cls()``'s
    own value of it (``SFTConfig().optim`` ...) rather than onto the section class's bare defaults;
    ``base`` (an instance of ``cls``) is the starting point instead of ``cls()``."""
    data = to_dict(base) if base is not None else (to_dict(cls()) if run_defaults else {})
    data = _merge_typed(cls, data, read_yaml(path) if path else {})
    data = apply_overrides(cls, data, overrides or [])
    cfg = _build(cls, data)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)


def check_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value != value or value < 0 or (value == 0 and not allow_zero):  # NaN fails too
        raise ConfigError(f"config key '{key}': must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


MAX_SEED = 2**32 - 1  # numpy's bound; seeds derived from it stay within torch's 64-bit ones


def check_seed(key: str, value: Any) -> None:
    """A seed: an integer in [0, 2**32 - 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"config key '{key}': a seed must be an integer in [0, {MAX_SEED}], got {value!r}")


def check_synthetic_split(source: str, split: str, key: str = "data.split") -> None:
    """Training on the synthetic task reads its train split: the test split is the held-out set
    every evaluation scores."""
    if source == "synthetic" and split != "train":
        raise ConfigError(f"config key '{key}': the synthetic task trains on 'train' (its 'test' split is the "
                          f"held-out set evaluations score), got {split!r}")


def check_training_model(model: "ModelConfig", prefix: str = "model") -> None:
    """What a trainer's model settings need beyond :func:`check_model`: FlexAttention trains on CUDA only."""
    if model.attn_backend == "flex":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"config key '{prefix}.attn_backend': flex needs CUDA to train (FlexAttention has "
                              "no backward on CPU); use auto or sdpa")


def check_logging(cfg: "LoggingConfig", prefix: str = "logging") -> None:
    check_positive(f"{prefix}.log_every", cfg.log_every)
    if cfg.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"config key '{prefix}.wandb_project': needs the wandb package (pip install wandb), "
                              "which is not installed")


def check_optim(optim: "OptimConfig", prefix: str = "optim") -> None:
    """The optimizer's settings in their ranges (AdamW's own checks come only once the model is built)."""
    check_positive(f"{prefix}.lr", optim.lr)
    check_positive(f"{prefix}.eps", optim.eps)
    check_positive(f"{prefix}.weight_decay", optim.weight_decay, allow_zero=True)
    check_positive(f"{prefix}.warmup_steps", optim.warmup_steps, allow_zero=True)
    check_positive(f"{prefix}.max_grad_norm", optim.max_grad_norm, allow_zero=True)
    for b in optim.betas:
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"config key '{prefix}.betas': each must be in [0, 1), got {list(optim.betas)!r}")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"config key '{prefix}.min_lr_ratio': must be in [0, 1], got {optim.min_lr_ratio!r}")


def check_tiny(tiny: "TinyModelConfig", prefix: str = "model.tiny") -> None:
    """A tiny model's shape: positive sizes, query heads a multiple of the KV heads. ``prefix``: the
    section's key (empty for ``dirl make-tiny-model``, whose keys are the fields themselves)."""
    dot = f"{prefix}." if prefix else ""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "max_position_embeddings", "block_size"):
        check_positive(f"{dot}{key}", getattr(tiny, key))
    check_seed(f"{dot}seed", tiny.seed)
    if tiny.head_dim % 2:
        raise ConfigError(f"config key '{dot}head_dim': must be even (rotary embeddings rotate pairs), got {tiny.head_dim}")
    if tiny.num_attention_heads % tiny.num_key_value_heads:
        raise ConfigError(f"config key '{dot}num_attention_heads': {tiny.num_attention_heads} is not a multiple "
                          f"of num_key_value_heads {tiny.num_key_value_heads}")


def check_path_exists(key: str, value: str) -> None:
    if value and not Path(value).exists():
        raise ConfigError(f"config key '{key}': path '{value}' does not exist")


def check_decoding(dec: DecodingConfig, prefix: str = "decoding") -> None:
    check_positive(f"{prefix}.denoising_steps", dec.denoising_steps)
    check_positive(f"{prefix}.block_size", dec.block_size)
    check_positive(f"{prefix}.max_new_tokens", dec.max_new_tokens)
    check_positive(f"{prefix}.temperature", dec.temperature, allow_zero=True)
    check_positive(f"{prefix}.top_k", dec.top_k, allow_zero=True)
    if not 0.0 < dec.top_p <= 1.0:
        raise ConfigError(f"config key '{prefix}.top_p': must be in (0, 1], got {dec.top_p!r}")
    if not 0.0 <= dec.confidence_threshold <= 1.0:
        raise ConfigError(
            f"config key '{prefix}.confidence_threshold': must be in [0, 1], got {dec.confidence_threshold!r}"
        )


def model_folder(path: str, key: str = "model.path") -> Path:
    """The model folder a ``model.path`` names: the folder itself, the model of a training
    checkpoint (``step_N``), or the model of a run folder's newest complete checkpoint."""
    from dirl.train.ckpt_files import resolve_model_dir  # torch-free

    return resolve_model_dir(path, key=key)


def check_model(model: ModelConfig, prefix: str = "model") -> None:
    check_path_exists(f"{prefix}.path", model.path)
    check_positive(f"{prefix}.block_size", model.block_size)
    if model.path:
        info = read_checkpoint_config(model_folder(model.path, f"{prefix}.path"), key=f"{prefix}.path")
        if model.block_size is not None and info.block_size is not None and model.block_size != info.block_size:
            raise ConfigError(
                f"config key '{prefix}.block_size': {model.block_size} disagrees with the checkpoint's "
                f"block_size {info.block_size} ({model.path})"
            )


def check_block_sizes(model: ModelConfig, dec: DecodingConfig, prefix: str = "decoding") -> None:
    """The engine's, the trainer's and the checkpoint's block sizes must agree (SPEC section 11)."""
    if dec.block_size is None:
        return
    model_bs = model.block_size
    if model_bs is None and model.path:
        model_bs = read_checkpoint_config(model_folder(model.path), key="model.path").block_size
    if model_bs is None and not model.path:
        model_bs = model.tiny.block_size
    if model_bs is not None and dec.block_size != model_bs:
        raise ConfigError(
            f"config key '{prefix}.block_size': {dec.block_size} disagrees with the model's block size {model_bs}"
        )


def run_config_command(argv: list[str], prog: str, description: str) -> tuple[Optional[str], list[str]]:
    """Common parsing for ``dirl sft|rl|eval [CONFIG] [key=value ...]``: returns (config_path, overrides)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", nargs="?", default=None, help="YAML config file (omit for the embedded default)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    cfg, ov = args.config, list(args.overrides)
    if cfg is not None and "=" in cfg and not os.path.exists(cfg):
        ov.insert(0, cfg)
        cfg = None
    return cfg, ov
