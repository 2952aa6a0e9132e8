"""Weight transports for in-place updates of rollout servers (SPEC section 8).

A ``POST /update_weights`` body is one *segment* of a state dict:

    {"transport": "file",   "path": "/local/disk/seg0.safetensors", "finished": false}
    {"transport": "inline", "data": "<base64 of a safetensors file>",  "finished": false}
    {"transport": "ipc",    "buckets": [...],                          "finished": true}

``file`` suits trainer and server on one machine; ``inline`` suits tiny models (the bytes travel in
the request); ``ipc`` hands CUDA IPC handles of flattened same-dtype buckets (LMDeploy's
``flattened_bucket`` idea) to a server on the same GPU node, so no bytes are copied through HTTP.
Parameter names are those of ``Qwen3ForCausalLM`` (``model.layers.0...``, ``lm_head.weight``).

:func:`iter_payloads` builds the segments of a push one at a time: a segment's file, bytes or CUDA
buckets exist only while it is being sent, so a push costs one segment of memory beyond the weights.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

TRANSPORTS = ("file", "inline", "ipc")
PAYLOAD_FIELDS = ("transport", "path", "data", "buckets", "finished")
DEFAULT_SEGMENT_BYTES = 512 << 20
DEFAULT_BUCKET_BYTES = 512 << 20
DEFAULT_INLINE_BYTES = 64 << 20  # inline segments travel base64-encoded in one JSON body


class PayloadError(ValueError):
    """A malformed or unusable weight-update payload (HTTP 400)."""


def normalize_name(name: str) -> str:
    from dirl.rollout.backend import normalize_weight_name

    return normalize_weight_name(name)


def named_tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a model (SDARModel, HF model, DDP wrapper), a state dict, or a
    list of pairs; names normalised to the ``Qwen3ForCausalLM`` layout, tensors detached."""
    if isinstance(obj, torch.nn.Module):
        inner = getattr(obj, "module", obj)  # DDP / DeepSpeed engine
        inner = getattr(inner, "hf", inner)  # SDARModel
        items: Iterable = inner.state_dict().items()
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        items = obj
    out, seen = [], set()
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        key = normalize_name(str(name))
        if key in seen:
            continue
        seen.add(key)
        out.append((key, t.detach()))
    return out


def segments(pairs: list[tuple[str, torch.Tensor]], max_bytes: int = DEFAULT_SEGMENT_BYTES) -> list[list[tuple[str, torch.Tensor]]]:
    """Split into consecutive groups of at most ``max_bytes`` (a larger single tensor is its own group)."""
    groups: list[list[tuple[str, torch.Tensor]]] = []
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in pairs:
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nb
    if cur:
        groups.append(cur)
    return groups


# -- safetensors -------------------------------------------------------------------------------


def to_safetensors_bytes(pairs: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    return save({n: t.detach().to("cpu").contiguous() for n, t in pairs})


def from_safetensors_bytes(data: bytes) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    try:
        return list(load(data).items())
    except Exception as e:  # noqa: BLE001 - the bytes are the caller's
        raise PayloadError(f"inline data is not a safetensors file: {e}") from None


def inline_payload(pairs: list[tuple[str, torch.Tensor]], finished: bool) -> dict:
    return {"transport": "inline", "data": base64.b64encode(to_safetensors_bytes(pairs)).decode("ascii"),
            "finished": finished}


def file_payload(pairs: list[tuple[str, torch.Tensor]], path: str | os.PathLike, finished: bool) -> dict:
    from safetensors.torch import save_file

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    save_file({n: t.detach().to("cpu").contiguous() for n, t in pairs}, str(tmp))
    os.replace(tmp, p)
    return {"transport": "file", "path": str(p.resolve()), "finished": finished}


# -- CUDA IPC of flattened buckets -------------------------------------------------------------


@dataclass
class FlatBucket:
    """Same-dtype tensors flattened into one contiguous CUDA tensor."""

    flat: torch.Tensor
    entries: list[dict]  # {name, shape, offset, numel}


def flatten_buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[FlatBucket]:
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in pairs:
        by_dtype.setdefault(t.dtype, []).append((name, t))
    buckets = []
    for dtype, items in by_dtype.items():
        for group in segments(items, bucket_bytes):
            entries, off = [], 0
            for name, t in group:
                entries.append({"name": name, "shape": list(t.shape), "offset": off, "numel": t.numel()})
                off += t.numel()
            flat = torch.empty(off, dtype=dtype, device=group[0][1].device)
            for e, (_, t) in zip(entries, group):
                flat[e["offset"]: e["offset"] + e["numel"]].copy_(t.reshape(-1))
            buckets.append(FlatBucket(flat, entries))
    return buckets


def ipc_payload(buckets: list[FlatBucket], finished: bool) -> dict:
    """CUDA IPC handles of the buckets. Keep ``buckets`` alive until the server has answered."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for b in buckets:
        if b.flat.device.type != "cuda":
            raise PayloadError("the ipc transport needs CUDA tensors")
        handle = base64.b64encode(pickle.dumps(reduce_tensor(b.flat))).decode("ascii")
        out.append({"dtype": str(b.flat.dtype).replace("torch.", ""), "handle": handle, "tensors": b.entries})
    return {"transport": "ipc", "buckets": out, "finished": finished}


# -- a push, one segment at a time -------------------------------------------------------------


def default_segment_bytes(transport: str) -> int:
    return {"inline": DEFAULT_INLINE_BYTES, "ipc": DEFAULT_BUCKET_BYTES}.get(transport, DEFAULT_SEGMENT_BYTES)


def check_transport(pairs: list[tuple[str, torch.Tensor]], transport: str) -> None:
    """Refuse a transport that cannot carry ``pairs`` before any server is put to sleep."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (expected auto, {', '.join(TRANSPORTS)})")
    if transport == "ipc":
        off = [n for n, t in pairs if t.device.type != "cuda"]
        if off:
            raise PayloadError(f"the ipc transport needs CUDA tensors ({off[0]!r} is on "
                               f"{dict(pairs)[off[0]].device}); use 'file' or 'inline'")


def iter_payloads(groups: list[list[tuple[str, torch.Tensor]]], transport: str,
                  tmp_dir: Optional[str | os.PathLike] = None,
                  bucket_bytes: Optional[int] = None) -> Iterator[dict]:
    """The ``/update_weights`` bodies of ``groups`` (see :func:`segments`), ``finished`` on the last,
    each built only when asked for. What a segment holds (its safetensors file under a temporary
    folder in ``tmp_dir``, its bytes, its CUDA buckets) is released when the next one is asked for
    or the generator is closed, so a caller sends each body (and waits for every answer: an ``ipc``
    body points into memory of this process) before asking for the next."""
    check_transport([p for g in groups for p in g], transport)
    workdir = None
    try:
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            if transport == "inline":
                payload = inline_payload(group, last)
                yield payload
                del payload
            elif transport == "file":
                if workdir is None:
                    import tempfile

                    workdir = tempfile.mkdtemp(prefix="dirl-weights-", dir=tmp_dir)
                path = Path(workdir) / f"segment-{i:04d}.safetensors"
                try:
                    yield file_payload(group, path, last)
                finally:
                    path.unlink(missing_ok=True)
            else:
                buckets = flatten_buckets(group, bucket_bytes or DEFAULT_BUCKET_BYTES)
                try:
                    yield ipc_payload(buckets, last)
                finally:
                    del buckets  # back to this process's allocator, reused by the next segment
                    if torch.cuda.is_initialized():
                        torch.cuda.ipc_collect()  # memory the server held through its handle
    finally:
        if workdir is not None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


class _TorchOnlyUnpickler(pickle.Unpickler):
    """IPC handles are pickles of torch's own rebuild functions; refuse anything else."""

    def find_class(self, module: str, name: str):
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise PayloadError(f"ipc handle refers to {module}.{name}; only torch objects are allowed")


def rebuild_ipc_buckets(buckets: list[dict], device: Optional[torch.device] = None) -> list[tuple[str, torch.Tensor]]:
    """Server side: open the IPC handles and cut the flat buckets back into named views."""
    if not torch.cuda.is_available():
        raise PayloadError("the ipc transport needs CUDA on the server; use 'file' or 'inline'")
    pairs = []
    for b in buckets:
        func, args = _TorchOnlyUnpickler(io.BytesIO(base64.b64decode(b["handle"]))).load()
        args = list(args)
        if device is not None and device.index is not None and len(args) > 6:
            args[6] = device.index  # storage_device: the index this process sees
        pairs += unflatten(func(*args), b["tensors"])
    return pairs


def unflatten(flat: torch.Tensor, entries: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """Named views of a flat bucket (the inverse of :func:`flatten_buckets`)."""
    return [(e["name"], flat[e["offset"]: e["offset"] + e["numel"]].view(e["shape"])) for e in entries]


# -- server side -------------------------------------------------------------------------------


def check_payload(body: Any) -> dict:
    """Validate an ``/update_weights`` body; returns it with ``finished`` filled (default true)."""
    if not isinstance(body, dict):
        raise PayloadError("expected a JSON object")
    unknown = sorted(set(body) - set(PAYLOAD_FIELDS))
    if unknown:
        raise PayloadError(f"unknown field {unknown[0]!r} (valid fields: {', '.join(PAYLOAD_FIELDS)})")
    tr = body.get("transport")
    if tr not in TRANSPORTS:
        raise PayloadError(f"'transport' must be one of {', '.join(TRANSPORTS)}, got {tr!r}")
    need = {"file": "path", "inline": "data", "ipc": "buckets"}[tr]
    if body.get(need) is None:
        raise PayloadError(f"transport {tr!r} needs the field {need!r}")
    if tr in ("file", "inline") and not isinstance(body[need], str):
        raise PayloadError(f"'{need}' must be a string")
    if tr == "ipc" and not (isinstance(body["buckets"], list) and all(
            isinstance(b, dict) and isinstance(b.get("handle"), str) and isinstance(b.get("tensors"), list)
            for b in body["buckets"])):
        raise PayloadError("'buckets' must be a list of {dtype, handle, tensors} objects")
    fin = body.get("finished", True)
    if not isinstance(fin, bool):
        raise PayloadError(f"'finished' must be true or false, got {fin!r}")
    return {**body, "finished": fin}


def load_payload(body: dict, device: Optional[torch.device] = None) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a checked payload (file and inline: CPU tensors)."""
    tr = body["transport"]
    if tr == "inline":
        try:
            data = base64.b64decode(body["data"], validate=True)
        except ValueError:
            raise PayloadError("'data' is not valid base64") from None
        return from_safetensors_bytes(data)
    if tr == "file":
        p = Path(body["path"])
        if not p.is_file():
            raise PayloadError(f"weights file '{p}' does not exist on the server")
        from safetensors.torch import load_file

        try:
            return list(load_file(str(p)).items())
        except Exception as e:  # noqa: BLE001
            raise PayloadError(f"'{p}' is not a safetensors file: {e}") from None
    return rebuild_ipc_buckets(body["buckets"], device)
