"""``dirl rollout --model DIR --input prompts.jsonl --output traj.jsonl [decoding options]``.

Each input line is a JSON object with exactly one of ``messages`` (chat-templated with the
generation header), ``prompt`` (raw text, tokenised as is) or ``input_ids``; optionally ``id`` and the
per-request sampling fields of the generate request (``max_new_tokens``, ``temperature``, ``top_k``,
``top_p``, ``do_sample``, ``stop_token_ids``, ``seed``). Any other field is carried to the output
under ``meta``. Each output line is the trajectory (docs/CONTRACTS.md) plus ``id``, ``meta`` and
``decoding``: the settings it was decoded with.

Also the decoding options shared with ``dirl serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import yaml

from dirl.config import ConfigError, DecodingConfig, check_decoding, model_folder
from dirl.data.formats import DataError, iter_json_objects
from dirl.rollout.backend import REQUEST_FIELDS, ReferenceBackend, RequestError

_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "stop_token_ids", "seed",
                    "min_new_tokens", "banned_token_ids")


def default_device() -> str:
    import torch  # here, not at the top: config checks that import this module stay quick

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where the model runs: shared by ``dirl serve`` and ``dirl rollout``."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models)")


def parse_backend_options(items: Optional[list[str]]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``dirl serve --backend-option``) as a dict; each value parsed like a
    YAML scalar (``true`` is a bool, ``0.3`` a float, ``null`` None, ``'7'`` the string 7). A
    malformed item is a :class:`ConfigError`; a later item for the same key wins."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"--backend-option {item!r} is not of the form KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _EXPONENT.match(value.strip()):
            value = float(value)  # 1e-5: a float, as in YAML 1.2 (PyYAML reads a string)
        out[key] = value
    return out


def backend_options_to_argv(options: Optional[dict[str, Any]]) -> list[str]:
    """The ``--backend-option`` arguments that :func:`parse_backend_options` reads back as ``options``."""
    out: list[str] = []
    for key, value in (options or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"backend option name {key!r} is not an identifier")
        try:
            text = json.dumps(value)  # JSON is YAML; a string comes out quoted
        except (TypeError, ValueError):
            raise ConfigError(f"backend option {key!r}: {value!r} cannot be passed on the command line") from None
        if isinstance(value, str) and value.strip() and value == parse_backend_options([f"{key}={value}"])[key]:
            text = value  # reads back the same unquoted
        if parse_backend_options([f"{key}={text}"])[key] != value:
            raise ConfigError(f"backend option {key!r}: {value!r} cannot be passed on the command line")
        out += ["--backend-option", f"{key}={text}"]
    return out


def apply_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    d = DecodingConfig()
    g = p.add_argument_group("decoding (engine-wide: block size, steps, strategy, threshold; "
                             "the rest are defaults a request may override)")
    g.add_argument("--block-size", type=int, default=None, help="must match the model's (default: the model's)")
    g.add_argument("--denoising-steps", type=int, default=d.denoising_steps)
    g.add_argument("--unmasking-strategy", default=d.unmasking_strategy,
                   choices=["low_confidence_dynamic", "low_confidence_static", "sequential"])
    g.add_argument("--confidence-threshold", type=float, default=d.confidence_threshold)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-k", type=int, default=d.top_k, help="<= 0: off")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=d.do_sample,
                   help="--no-do-sample: greedy (argmax)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)


def decoding_from_args(args: argparse.Namespace) -> DecodingConfig:
    dec = DecodingConfig(**{f.name: getattr(args, f.name) for f in fields(DecodingConfig)})
    check_decoding(dec)
    return dec


def decoding_to_argv(dec: DecodingConfig) -> list[str]:
    out = []
    for f in fields(DecodingConfig):
        v = getattr(dec, f.name)
        flag = "--" + f.name.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def read_prompts(path: str | os.PathLike, parser, seed: Optional[int] = None) -> tuple[list, list[dict]]:
    """Parse a prompts JSONL file into requests; a bad row is a :class:`ConfigError` naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"input file '{p}' does not exist")
    reqs, metas, seen = [], [], {}
    try:
        rows = list(iter_json_objects(p))
    except DataError as e:
        raise ConfigError(str(e)) from None
    for where, n, row in rows:
        rid = row.get("id", f"line-{n}")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ConfigError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
        rid = str(rid)
        if rid in seen:
            raise ConfigError(f"{where}: id {rid!r} already used on line {seen[rid]}")
        seen[rid] = n
        req = {k: v for k, v in row.items() if k in REQUEST_FIELDS and k != "request_id"}
        if seed is not None and req.get("seed") is None:
            req["seed"] = seed + len(reqs)
        try:
            reqs.append(parser.parse({**req, "request_id": rid}))
        except RequestError as e:
            raise ConfigError(f"{where}: {e}") from None
        metas.append({k: v for k, v in row.items() if k not in REQUEST_FIELDS and k != "id"})
    if not reqs:
        raise ConfigError(f"input file '{p}' holds no prompts")
    return reqs, metas


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dirl rollout", description="Decode prompts from a JSONL file into trajectories "
                                "with the reference engine.")
    p.add_argument("--model", required=True, help="model folder (SDAR layout), training checkpoint or run folder")
    p.add_argument("--input", required=True, help="prompts JSONL (messages | prompt | input_ids, optional id)")
    p.add_argument("--output", required=True, help="trajectories JSONL")
    add_runtime_args(p)
    p.add_argument("--seed", type=int, default=None, help="row i gets seed SEED + i unless it has its own")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_decoding_args(p)
    args = p.parse_args(argv)
    args.model = str(model_folder(args.model, key="--model"))  # also a checkpoint or run folder
    decoding = decoding_from_args(args)
    apply_threads(args.threads)

    backend = ReferenceBackend(args.model, decoding=decoding, device=args.device or default_device(),
                               dtype=args.dtype, max_batch_size=args.max_batch_size)
    reqs, metas = read_prompts(args.input, backend.parser(), seed=args.seed)
    info = backend.info()
    engine_wide = {k: info[k] for k in ("block_size", "denoising_steps", "unmasking_strategy", "confidence_threshold")}

    from tqdm import tqdm

    bar = tqdm(total=len(reqs), unit="seq", desc="rollout", disable=args.no_progress)
    n_tokens = [0]

    def progress(i: int, res: dict) -> None:
        n_tokens[0] += len(res["token_ids"])
        bar.update(1)
        bar.set_postfix(tokens=n_tokens[0], refresh=False)

    try:
        results = backend.engine.generate(reqs, on_result=progress)
    finally:
        bar.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as fh:
        for req, meta, res in zip(reqs, metas, results):
            used: dict[str, Any] = dict(engine_wide)
            used.update({k: getattr(req, k) for k in _SAMPLING_FIELDS})
            row = {"id": req.request_id, **res, "decoding": used, "model": str(args.model)}
            if meta:
                row["meta"] = meta
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    total = sum(len(r["token_ids"]) for r in results)
    stops = sum(r["finish_reason"] == "stop" for r in results)
    print(f"dirl rollout: {len(results)} trajectories, {total} tokens ({stops} stopped, "
          f"{len(results) - stops} hit the length limit) -> {out}")
    return 0
