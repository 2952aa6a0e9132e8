"""Weight transports for in-place updates of rollout servers (SPEC section 8).

A ``POST /update_weights`` body is one *segment* of a state dict:

    {"transport": "file",   "path": "seg0.safetensors", "finished": false}
    {"transport": "inline", "data": "<base64 of a safetensors file>", "finished": false}
    {"transport": "ipc",    "buckets": [{"dtype", "handle", "tensors"}, ...], "finished": true}

``file`` suits trainer and server on one machine: the server reads only inside the folder it was
started with (``dirl serve --weights-dir DIR``; a relative ``path`` is taken inside it, and a path
whose real location is elsewhere is refused with the same words as one that does not exist).
``inline`` suits tiny models (the bytes travel in the request, :data:`DEFAULT_INLINE_BYTES` per
segment so a body stays under the server's ``--max-body-bytes``). ``ipc`` hands CUDA IPC handles of
flattened same-dtype buckets to a server on the same GPU node, so no bytes are copied through HTTP.

One bucket format serves both backends: LMDeploy's ``flattened_bucket`` layout (a 1-D tensor per
dtype and :class:`BucketEntry` rows ``name, shape, dtype, start_idx, end_idx, numel``), built by
:func:`plan_buckets` / :func:`flatten_bucket`, segments of at most :data:`DEFAULT_SEGMENT_BYTES`.
A handle is a JSON object of plain fields (:func:`encode_ipc_handle`), never a pickle: the server
builds the one call torch's CUDA IPC needs (``rebuild_cuda_tensor``) from checked numbers and bytes
(:func:`decode_ipc_handle`), so a request cannot name anything to run.
Parameter names are those of ``Qwen3ForCausalLM`` (``model.layers.0...``, ``lm_head.weight``).

:func:`iter_payloads` builds the segments of a push one at a time: a segment's file, bytes or CUDA
buckets exist only while it is being sent, so a push costs one segment of memory beyond the weights.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from dirl.rollout.backend import _short  # a bad value named, not echoed whole

TRANSPORTS = ("file", "inline", "ipc")
PAYLOAD_FIELDS = ("transport", "path", "data", "buckets", "finished")
DEFAULT_SEGMENT_BYTES = 512 << 20  # file and ipc segments, and LMDeploy's in-process buckets
DEFAULT_BUCKET_BYTES = DEFAULT_SEGMENT_BYTES  # the same number (kept as a name for callers)
DEFAULT_INLINE_BYTES = 16 << 20  # base64 makes 21.4 MiB: under the server's default body limit of 32 MiB
WEIGHTS_DIR_ENV = "DIRL_SERVER_WEIGHTS_DIR"


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


# -- flat buckets (LMDeploy's ``flattened_bucket`` layout, one format for both backends) ----------


@dataclass
class BucketEntry:
    """Where one tensor lies in a flat bucket. The attribute names are those of LMDeploy 0.18.0's
    ``FlattenedTensorMetadata`` (``lmdeploy/utils.py``), so LMDeploy rebuilds our buckets as its own;
    the JSON of an ``ipc`` bucket's ``tensors`` uses the same names."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "start_idx": self.start_idx, "end_idx": self.end_idx, "numel": self.numel}


@dataclass
class FlatBucket:
    """Same-dtype tensors flattened into one contiguous 1-D tensor, with their entries."""

    flat: torch.Tensor
    entries: list[BucketEntry]


DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan_buckets(pairs: Sequence[tuple[str, torch.Tensor]], segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """Indices of ``pairs`` grouped into buckets: one dtype per bucket (after casting floating
    tensors to ``dtype`` when given), at most ``segment_bytes`` each (a larger single tensor is a
    bucket of its own), in the order tensors appear within each dtype."""
    if segment_bytes <= 0:
        raise ValueError(f"segment_bytes must be positive, got {segment_bytes!r}")
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    plan: list[list[int]] = []
    for i, (_, t) in enumerate(pairs):
        d = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=d).element_size()
        idx, size = open_bucket.get(d, ([], 0))
        if idx and size + nbytes > segment_bytes:
            plan.append(idx)
            idx, size = [], 0
        open_bucket[d] = (idx + [i], size + nbytes)
    plan += [idx for idx, _ in open_bucket.values() if idx]
    return plan


def flatten_bucket(pairs: Sequence[tuple[str, torch.Tensor]], device: Optional[torch.device | str] = None,
                   dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, list[BucketEntry]]:
    """One contiguous 1-D tensor holding ``pairs`` (all of one dtype once cast) and their entries."""
    if not pairs:
        raise ValueError("an empty bucket")
    cast = [(n, t.to(dtype) if (dtype is not None and t.is_floating_point()) else t) for n, t in pairs]
    kinds = {t.dtype for _, t in cast}
    if len(kinds) != 1:
        raise ValueError(f"a bucket holds one dtype, got {sorted(str(k) for k in kinds)}")
    bucket_dtype = cast[0][1].dtype
    total = sum(t.numel() for _, t in cast)
    flat = torch.empty(total, dtype=bucket_dtype, device=device if device is not None else cast[0][1].device)
    entries, off = [], 0
    for name, t in cast:
        n = t.numel()
        flat[off:off + n].copy_(t.reshape(-1))
        entries.append(BucketEntry(name=name, shape=torch.Size(t.shape), dtype=bucket_dtype, start_idx=off,
                                   end_idx=off + n, numel=n))
        off += n
    return flat, entries


def iter_buckets(pairs: Sequence[tuple[str, torch.Tensor]], segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None) -> Iterator[tuple[torch.Tensor, list[BucketEntry]]]:
    """:func:`flatten_bucket` over :func:`plan_buckets`, one bucket alive at a time."""
    for idx in plan_buckets(pairs, segment_bytes, dtype):
        yield flatten_bucket([pairs[i] for i in idx], device=device, dtype=dtype)


def flatten_buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_SEGMENT_BYTES) -> list[FlatBucket]:
    """All buckets of ``pairs`` at once (what one ``ipc`` segment holds)."""
    return [FlatBucket(flat, entries) for flat, entries in iter_buckets(pairs, bucket_bytes)]


def rebuild_bucket(flat: torch.Tensor, entries: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a bucket (views of ``flat``), as LMDeploy rebuilds them."""
    out = []
    for e in entries:
        t = flat[e.start_idx:e.end_idx].reshape(e.shape)
        if t.dtype != e.dtype:
            t = t.to(e.dtype)
        out.append((e.name, t))
    return out


unflatten = rebuild_bucket


# -- CUDA IPC handles: plain JSON, never a pickle ------------------------------------------------
#
# torch's ``reduce_tensor`` describes a CUDA tensor as ``(rebuild_cuda_tensor, args)``. A request
# carries only the data fields of ``args`` (bytes as base64, numbers), checked one by one; the
# server puts back the fixed parts itself (torch.Tensor, TypedStorage, the bucket's dtype and size,
# its own device). Nothing in a request names a function or class, so nothing a request sends can
# be called.

IPC_HANDLE_FIELDS = ("storage_handle", "storage_size_bytes", "storage_offset_bytes", "tensor_offset",
                     "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
_REF_COUNTER_NAME = re.compile(rb"/torch_[0-9]{1,10}_[0-9]{1,20}_[0-9]{1,20}")  # at::NewProcessWideShmHandle
MAX_IPC_HANDLE_BYTES = 64 << 10  # a plain allocation: 65 bytes; an expandable segment: one handle per page
MAX_INDEX = 1 << 62


def _b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(bytes(b)).decode("ascii")


def encode_ipc_handle(flat: torch.Tensor) -> dict:
    """The JSON handle of a contiguous 1-D CUDA tensor (keep the tensor alive while it is used)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    if flat.device.type != "cuda" or flat.dim() != 1 or not flat.is_contiguous():
        raise PayloadError("an ipc bucket is a contiguous 1-D CUDA tensor")
    func, args = reduce_tensor(flat)
    if func is not rebuild_cuda_tensor:
        raise PayloadError(f"torch described the bucket with {func.__name__}, not rebuild_cuda_tensor")
    (_cls, _size, _stride, tensor_offset, _scls, _dtype, _device, handle, size_bytes, offset_bytes, _grad,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return {"storage_handle": _b64(handle), "storage_size_bytes": int(size_bytes),
            "storage_offset_bytes": int(offset_bytes), "tensor_offset": int(tensor_offset),
            "ref_counter_handle": _b64(ref_handle), "ref_counter_offset": int(ref_offset),
            "event_handle": _b64(event_handle), "event_sync_required": bool(event_sync)}


def _bytes_field(where: str, h: dict, key: str, optional: bool = False, max_len: int = MAX_IPC_HANDLE_BYTES) -> Optional[bytes]:
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > 2 * max_len:
        raise PayloadError(f"{where}: '{key}' must be a base64 string")
    try:
        b = base64.b64decode(v, validate=True)
    except ValueError:
        raise PayloadError(f"{where}: '{key}' is not valid base64") from None
    if not b or len(b) > max_len:
        raise PayloadError(f"{where}: '{key}' must hold 1 to {max_len} bytes, got {len(b)}")
    return b


REF_COUNTER_SLOTS = 10_000


def _int_field(where: str, h: dict, key: str, lo: int = 0, hi: int = MAX_INDEX) -> int:
    v = h.get(key)
    if not (isinstance(v, int) and not isinstance(v, bool)) or not lo <= v <= hi:
        raise PayloadError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def decode_ipc_handle(h: Any, dtype: torch.dtype, numel: int, device_index: int = 0,
                      where: str = "ipc handle") -> tuple[Any, tuple]:
    """``(rebuild_cuda_tensor, args)`` for a JSON handle of :func:`encode_ipc_handle`: what LMDeploy
    calls (after setting ``args[6]`` to its device) and what the reference backend calls itself.
    Every field is checked here; the function and classes are fixed, never read from the request."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not isinstance(h, dict):
        raise PayloadError(f"{where}: must be a JSON object of {', '.join(IPC_HANDLE_FIELDS)} "
                           f"(got {type(h).__name__}; pickled handles are not accepted)")
    _exact_fields(where, h, IPC_HANDLE_FIELDS)
    handle = _bytes_field(where, h, "storage_handle")
    size_bytes = _int_field(where, h, "storage_size_bytes")
    offset_bytes = _int_field(where, h, "storage_offset_bytes")
    tensor_offset = _int_field(where, h, "tensor_offset")
    ref_handle = _bytes_field(where, h, "ref_counter_handle", max_len=128)
    if not _REF_COUNTER_NAME.fullmatch(ref_handle):
        raise PayloadError(f"{where}: 'ref_counter_handle' is not a torch reference-counter name")
    # torch's reference-counter file holds CUDA_IPC_REF_COUNTER_FILE_SIZE (10,000) int64 slots
    # (torch/csrc/CudaIPCTypes.h); the receiver decrements the slot named here
    ref_offset = _int_field(where, h, "ref_counter_offset", hi=REF_COUNTER_SLOTS - 1)
    event_handle = _bytes_field(where, h, "event_handle", optional=True, max_len=128)
    sync = h.get("event_sync_required")
    if not isinstance(sync, bool):
        raise PayloadError(f"{where}: 'event_sync_required' must be true or false")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (tensor_offset + numel) * itemsize > size_bytes:
        raise PayloadError(f"{where}: {numel} {dtype_name(dtype)} elements at offset {tensor_offset} do not fit "
                           f"in a storage of {size_bytes} bytes")
    args = (torch.Tensor, torch.Size([numel]), (1,), tensor_offset, torch.storage.TypedStorage, dtype,
            int(device_index), handle, size_bytes, offset_bytes, False, ref_handle, ref_offset, event_handle, sync)
    return rebuild_cuda_tensor, args


def ipc_payload(buckets: list[FlatBucket], finished: bool) -> dict:
    """The ``ipc`` body of CUDA buckets. Keep ``buckets`` alive until the server has answered."""
    out = []
    for b in buckets:
        if b.flat.device.type != "cuda":
            raise PayloadError("the ipc transport needs CUDA tensors")
        out.append({"dtype": dtype_name(b.flat.dtype), "handle": encode_ipc_handle(b.flat),
                    "tensors": [e.to_json() for e in b.entries]})
    return {"transport": "ipc", "buckets": out, "finished": finished}


BUCKET_FIELDS = ("dtype", "handle", "tensors")
ENTRY_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")
MAX_BUCKETS = 4096
MAX_ENTRIES = 1 << 16
MAX_NAME_CHARS = 512


@dataclass
class IpcBucket:
    """A checked ``ipc`` bucket: its dtype, entries and (still unopened) rebuild call."""

    dtype: torch.dtype
    numel: int
    entries: list[BucketEntry]
    handle: dict

    def rebuild_call(self, device_index: int = 0) -> tuple[Any, tuple]:
        return decode_ipc_handle(self.handle, self.dtype, self.numel, device_index)


def check_ipc_buckets(buckets: Any) -> list[IpcBucket]:
    """Check the ``buckets`` of an ``ipc`` body field by field (dtype, contiguous entries that add up,
    a well-formed handle); nothing is opened."""
    if not isinstance(buckets, list) or len(buckets) > MAX_BUCKETS:
        raise PayloadError(f"'buckets' must be a list of at most {MAX_BUCKETS} {{dtype, handle, tensors}} objects")
    out, n_entries = [], 0
    for k, b in enumerate(buckets):
        where = f"ipc bucket {k}"
        if not isinstance(b, dict):
            raise PayloadError(f"{where}: expected a {{dtype, handle, tensors}} object")
        _exact_fields(where, b, BUCKET_FIELDS)
        dtype = DTYPES.get(b["dtype"]) if isinstance(b["dtype"], str) else None
        if dtype is None:
            raise PayloadError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}, got {_short(b['dtype'])}")
        tensors = b["tensors"]
        if not isinstance(tensors, list) or not tensors:
            raise PayloadError(f"{where}: 'tensors' must be a non-empty list")
        n_entries += len(tensors)
        if n_entries > MAX_ENTRIES:
            raise PayloadError(f"an ipc segment holds at most {MAX_ENTRIES} tensors")
        entries, off = [], 0
        for j, e in enumerate(tensors):
            w = f"{where} tensor {j}"
            if not isinstance(e, dict):
                raise PayloadError(f"{w}: expected an object of {', '.join(ENTRY_FIELDS)}")
            _exact_fields(w, e, ENTRY_FIELDS)
            name = e["name"]
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
                raise PayloadError(f"{w}: 'name' must be a non-empty string of at most {MAX_NAME_CHARS} characters")
            shape = e["shape"]
            if not (isinstance(shape, list) and len(shape) <= 8
                    and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_INDEX for s in shape)):
                raise PayloadError(f"{w} ({name!r}): 'shape' must be a list of at most 8 integers >= 0")
            if e["dtype"] != b["dtype"]:
                raise PayloadError(f"{w} ({name!r}): dtype {_short(e['dtype'])} differs from its bucket's {_short(b['dtype'])}")
            numel = _int_field(w, e, "numel")
            prod = 1
            for s in shape:
                prod *= s
            if prod != numel:
                raise PayloadError(f"{w} ({name!r}): 'numel' {numel} is not the product of its shape {shape}")
            if type(e["start_idx"]) is not int or type(e["end_idx"]) is not int or e["start_idx"] != off \
                    or e["end_idx"] != off + numel:
                raise PayloadError(f"{w} ({name!r}): expected start_idx {off} and end_idx {off + numel}")
            entries.append(BucketEntry(name=name, shape=torch.Size(shape), dtype=dtype, start_idx=off,
                                       end_idx=off + numel, numel=numel))
            off += numel
        decode_ipc_handle(b["handle"], dtype, off, where=f"{where} handle")  # checks only; opens nothing
        out.append(IpcBucket(dtype=dtype, numel=off, entries=entries, handle=b["handle"]))
    return out


def rebuild_ipc_buckets(buckets: list[IpcBucket], device: Optional[torch.device] = None) -> list[tuple[str, torch.Tensor]]:
    """Server side: open checked IPC handles and cut the flat buckets back into named views."""
    if not torch.cuda.is_available():
        raise PayloadError("the ipc transport needs CUDA on the server; use 'file' or 'inline'")
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    pairs = []
    for k, b in enumerate(buckets):
        func, args = b.rebuild_call(index)
        try:
            flat = func(*args)
        except Exception as e:  # noqa: BLE001 - a handle that does not open is the sender's
            raise PayloadError(f"ipc bucket {k}: the CUDA IPC handle does not open ({type(e).__name__}: {e})") from None
        pairs += rebuild_bucket(flat, b.entries)
    return pairs


def _exact_fields(where: str, obj: dict, fields: tuple[str, ...]) -> None:
    keys = set(obj)
    extra, missing = sorted(keys - set(fields)), [f for f in fields if f not in keys]
    if extra:
        raise PayloadError(f"{where}: unknown field {str(extra[0])[:64]!r} (valid fields: {', '.join(fields)})")
    if missing:
        raise PayloadError(f"{where}: missing field {missing[0]!r}")


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


# -- server side -------------------------------------------------------------------------------


def check_payload(body: Any) -> dict:
    """Validate an ``/update_weights`` body; returns it with ``finished`` filled (default true) and,
    for ``ipc``, its buckets checked (``"ipc_buckets"``: :class:`IpcBucket` list, nothing opened)."""
    if not isinstance(body, dict):
        raise PayloadError("expected a JSON object")
    unknown = sorted(set(body) - set(PAYLOAD_FIELDS))
    if unknown:
        raise PayloadError(f"unknown field {str(unknown[0])[:64]!r} (valid fields: {', '.join(PAYLOAD_FIELDS)})")
    tr = body.get("transport")
    if tr not in TRANSPORTS:
        raise PayloadError(f"'transport' must be one of {', '.join(TRANSPORTS)}, got {str(tr)[:64]!r}")
    need = {"file": "path", "inline": "data", "ipc": "buckets"}[tr]
    if body.get(need) is None:
        raise PayloadError(f"transport {tr!r} needs the field {need!r}")
    other = [f for f in ("path", "data", "buckets") if f != need and f in body]
    if other:
        raise PayloadError(f"transport {tr!r} takes no field {other[0]!r}")
    if tr in ("file", "inline") and not isinstance(body[need], str):
        raise PayloadError(f"'{need}' must be a string")
    if tr == "file" and (not body["path"] or len(body["path"]) > 4096 or "\x00" in body["path"]):
        raise PayloadError("'path' must be a non-empty file path of at most 4096 characters")
    fin = body.get("finished", True)
    if not isinstance(fin, bool):
        raise PayloadError(f"'finished' must be true or false, got {_short(fin)}")
    out = {**body, "finished": fin}
    if tr == "ipc":
        out["ipc_buckets"] = check_ipc_buckets(body["buckets"])
    return out


NOT_IN_WEIGHTS_DIR = "no such weights file in the server's weights directory"


def resolve_weights_file(path: str, weights_dir: Optional[str | os.PathLike]) -> int:
    """An open read-only file descriptor of ``path`` inside ``weights_dir`` (a relative path is taken
    inside it). Whatever the reason it cannot be (no such file, a directory, a symlink or ``..`` out of
    the folder, no permission), the error text is the same, so an answer tells nothing about what
    exists elsewhere. The check is made on the opened file (``/proc/self/fd``), so swapping a link
    after the check changes nothing."""
    if weights_dir is None:
        raise PayloadError("the file transport is off on this server (start it with --weights-dir DIR); "
                           "use 'inline' or 'ipc'")
    root = os.path.realpath(weights_dir)
    joined = os.path.join(root, path)  # an absolute path replaces root
    try:
        if not _inside(os.path.realpath(joined), root):
            raise OSError
        fd = os.open(joined, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        raise PayloadError(f"{NOT_IN_WEIGHTS_DIR}: {path[:256]!r}") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else os.path.realpath(joined)
        if not _inside(real, root) or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError
    except OSError:
        os.close(fd)
        raise PayloadError(f"{NOT_IN_WEIGHTS_DIR}: {path[:256]!r}") from None
    return fd


def _inside(real: str, root: str) -> bool:
    return real.startswith(root.rstrip(os.sep) + os.sep)


def load_payload(body: dict, device: Optional[torch.device] = None,
                 weights_dir: Optional[str | os.PathLike] = None) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a checked payload (file and inline: CPU tensors)."""
    tr = body["transport"]
    if tr == "inline":
        try:
            data = base64.b64decode(body["data"], validate=True)
        except ValueError:
            raise PayloadError("'data' is not valid base64") from None
        return from_safetensors_bytes(data)
    if tr == "file":
        from safetensors.torch import load_file

        fd = resolve_weights_file(body["path"], weights_dir)
        try:
            if os.path.isdir("/proc/self/fd"):  # the file already opened and checked, not the path again
                return list(load_file(f"/proc/self/fd/{fd}").items())
            with os.fdopen(os.dup(fd), "rb") as f:
                return from_safetensors_bytes(f.read())
        except Exception:  # noqa: BLE001 - the file is the sender's
            raise PayloadError(f"weights file {body['path'][:256]!r} is not a safetensors file") from None
        finally:
            os.close(fd)
    return rebuild_ipc_buckets(body.get("ipc_buckets") or check_ipc_buckets(body["buckets"]), device)


# -- checking an update against the model ----------------------------------------------------------

TensorSpecs = dict  # normalised name -> (shape tuple, torch.dtype)


def check_update(pairs: Sequence[tuple[str, torch.Tensor]], specs: TensorSpecs, seen: Optional[set] = None) -> list[str]:
    """Refuse a segment unless every tensor is a parameter of the model (``specs``), with its shape,
    a dtype of its kind (float16, bfloat16, float32 or float64 for a floating parameter, the same
    dtype otherwise) and only finite values; a name may come once per update (``seen``: names of
    earlier segments).
    Returns the normalised names. Nothing is changed here."""
    seen = set() if seen is None else seen
    names = []
    for name, t in pairs:
        key = normalize_name(str(name))
        spec = specs.get(key)
        if spec is None:
            raise PayloadError(f"unknown parameter {str(name)[:MAX_NAME_CHARS]!r}")
        if key in seen or key in names:
            raise PayloadError(f"parameter {key!r} is sent twice in one update")
        shape, dtype = spec
        if tuple(t.shape) != tuple(shape):
            raise PayloadError(f"parameter {key!r}: shape {list(t.shape)} does not match the model's {list(shape)}")
        if t.is_floating_point() != dtype.is_floating_point or (not dtype.is_floating_point and t.dtype != dtype) \
                or (t.is_floating_point() and t.dtype not in FLOAT_WEIGHT_DTYPES):
            raise PayloadError(f"parameter {key!r}: dtype {dtype_name(t.dtype)} does not fit the model's "
                               f"{dtype_name(dtype)}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"parameter {key!r} holds NaN or infinite values")
        names.append(key)
    return names


# the floating dtypes a floating parameter may arrive in (cast to the model's); float8 kinds are
# refused: too lossy for a weight push, and torch cannot check them for NaN
FLOAT_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def checkpoint_tensor_specs(model_dir: str | os.PathLike) -> Optional[TensorSpecs]:
    """Names, shapes and dtypes of a checkpoint's tensors read from its safetensors headers (no tensor
    is loaded); ``None`` when the checkpoint has no safetensors files. A tied ``lm_head.weight`` is
    listed as the embedding's twin when ``tie_word_embeddings`` is set."""
    import json
    import struct

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    specs: TensorSpecs = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            specs[normalize_name(name)] = (tuple(meta["shape"]), _SAFETENSORS_DTYPES.get(meta["dtype"], torch.float32))
    try:
        tied = json.loads((d / "config.json").read_text()).get("tie_word_embeddings", False)
    except (OSError, ValueError):
        tied = False
    if "lm_head.weight" not in specs and "model.embed_tokens.weight" in specs and tied:
        specs["lm_head.weight"] = specs["model.embed_tokens.weight"]
    return specs
