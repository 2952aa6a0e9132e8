"""The rollout server under hostile input, over real HTTP on 127.0.0.1 (docs/SECURITY.md).

One module-scoped server (uvicorn on a thread of this process, a real socket) runs the reference
backend of the tiny model with an API key, a weights folder and a small body limit, so that the
weight-transport, auth, body and range checks are all seen from a client's side. A second small
server serves a backend that fails inside the engine for one request.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from dirl.config import ConfigError, DecodingConfig
from dirl.rollout.backend import ReferenceBackend
from dirl.rollout.client import RolloutClient
from dirl.rollout.server import create_app, parse_json_body, read_api_key
from dirl.rollout import weights as W

KEY = "k-" + "x" * 30
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
DECODING = DecodingConfig(max_new_tokens=8, do_sample=False)
MAX_BODY = 4 << 20
MARKER = "dirl-security-marker"


class ThreadServer:
    def __init__(self, app):
        import uvicorn

        # the socket is bound and listening before the server starts: no port found free and then
        # taken by another job, and requests made before uvicorn serves wait in the backlog
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend(tiny_dir):
    torch.set_num_threads(1)
    return ReferenceBackend(str(tiny_dir), decoding=DECODING, device="cpu")


@pytest.fixture(scope="module")
def wdir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def srv(backend, wdir):
    parser = backend.parser()
    parser.max_prompt_chars = 2000
    s = ThreadServer(create_app(backend, parser, api_key=KEY, weights_dir=str(wdir), max_body_bytes=MAX_BODY,
                                allowed_hosts=("127.0.0.1", "localhost", "::1")))
    yield s
    s.stop()


def post(srv, path, body=None, content=None, headers=AUTH):
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers=headers, timeout=60)


def probe(srv):
    r = post(srv, "/generate", {"requests": [{"request_id": "p0", "input_ids": [30, 31, 32]},
                                             {"request_id": "p1", "input_ids": [40, 41, 42, 43]}]})
    assert r.status_code == 200, r.text
    return [x["token_ids"] for x in r.json()["results"]]


@pytest.fixture
def asleep(srv):
    assert post(srv, "/sleep", {"level": 1}).status_code == 200
    yield
    assert post(srv, "/wakeup", {}).status_code == 200


# ----------------------------------------------------------------------------------------------
# IPC handles: no pickle from a request is ever loaded
# ----------------------------------------------------------------------------------------------


class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Eval:
    def __reduce__(self):
        import builtins

        return (builtins.eval, (f"open({MARKER!r}, 'w')",))


class _TorchLoad:
    def __reduce__(self):  # a function inside torch that reads a file named by the request
        return (torch.load, (MARKER,))


class _Sub(torch.Tensor):  # a subclass of an allowed class
    pass


def _hand_written_pickle() -> bytes:
    # GLOBAL 'posix system', MARK, string, TUPLE, REDUCE, STOP: no class in this process needed
    return b"cposix\nsystem\n(Vtouch " + MARKER.encode() + b"\ntR."


def _getattr_chain() -> bytes:
    # getattr(__import__('os'), 'system')('touch MARKER'), written by hand
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch " + MARKER.encode()
            + b"\ntR.")


HOSTILE = {
    "os.system": pickle.dumps(_System()),
    "builtins.eval": pickle.dumps(_Eval()),
    "getattr chain": _getattr_chain(),
    "torch.load": pickle.dumps(_TorchLoad()),
    "tensor subclass": pickle.dumps(torch.zeros(2).as_subclass(_Sub)),
    "hand-written GLOBAL": _hand_written_pickle(),
    "rebuild_cuda_tensor tuple": pickle.dumps(
        (torch.multiprocessing.reductions.rebuild_cuda_tensor, (torch.Tensor, (4,), (1,), 0))),
}

GOOD_HANDLE = {"storage_handle": base64.b64encode(b"\x00" * 65).decode(), "storage_size_bytes": 4096,
               "storage_offset_bytes": 0, "tensor_offset": 0,
               "ref_counter_handle": base64.b64encode(b"/torch_1_2_3").decode(), "ref_counter_offset": 0,
               "event_handle": None, "event_sync_required": False}


def _bucket(handle, name="lm_head.weight", shape=(2, 3), dtype="float32"):
    numel = shape[0] * shape[1]
    return {"dtype": dtype, "handle": handle,
            "tensors": [{"name": name, "shape": list(shape), "dtype": dtype, "start_idx": 0, "end_idx": numel,
                         "numel": numel}]}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_pickles_are_refused_and_never_run(srv, kind, tmp_path, monkeypatch, asleep):
    monkeypatch.chdir(tmp_path)
    data = base64.b64encode(HOSTILE[kind]).decode()
    for body in ({"transport": "ipc", "buckets": [_bucket(data)]},  # a pickle where the handle goes
                 {"transport": "ipc", "buckets": data},
                 {"transport": "ipc", "buckets": [{**_bucket(GOOD_HANDLE), "dtype": data}]},
                 # as the opaque CUDA handle bytes it is never unpickled either (and needs CUDA here)
                 {"transport": "ipc", "buckets": [_bucket({**GOOD_HANDLE, "storage_handle": data})]}):
        r = post(srv, "/update_weights", body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]
    assert not (tmp_path / MARKER).exists() and not Path(MARKER).exists()


def test_hostile_pickles_as_a_whole_body_are_not_json(srv):
    r = post(srv, "/update_weights", content=HOSTILE["os.system"])
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


BAD_HANDLES = [
    ("a string", "pickled handles are not accepted", lambda h: "gASV"),
    ("extra field", "unknown field 'func'", lambda h: {**h, "func": "os.system"}),
    ("missing field", "missing field 'event_sync_required'",
     lambda h: {k: v for k, v in h.items() if k != "event_sync_required"}),
    ("ref counter path", "not a torch reference-counter name",
     lambda h: {**h, "ref_counter_handle": base64.b64encode(b"/../../etc/shadow").decode()}),
    ("ref counter any shm", "not a torch reference-counter name",
     lambda h: {**h, "ref_counter_handle": base64.b64encode(b"/someone_elses_segment").decode()}),
    ("huge handle", "must hold 1 to", lambda h: {**h, "storage_handle": base64.b64encode(b"x" * 70000).decode()}),
    ("not base64", "not valid base64", lambda h: {**h, "storage_handle": "%%%"}),
    ("negative size", "'storage_size_bytes' must be an integer", lambda h: {**h, "storage_size_bytes": -1}),
    ("bool as int", "'tensor_offset' must be an integer", lambda h: {**h, "tensor_offset": True}),
    ("float as int", "'ref_counter_offset' must be an integer", lambda h: {**h, "ref_counter_offset": 1.5}),
    ("storage too small", "do not fit", lambda h: {**h, "storage_size_bytes": 8}),
    ("sync not bool", "'event_sync_required' must be true or false", lambda h: {**h, "event_sync_required": 1}),
    # torch's reference-counter file has 10,000 slots: the receiver would write past it
    ("ref counter slot", "'ref_counter_offset' must be an integer in [0, 9999]", lambda h: {**h, "ref_counter_offset": 10000}),
]


@pytest.mark.parametrize("case,reason,edit", BAD_HANDLES, ids=[c for c, _, _ in BAD_HANDLES])
def test_ipc_handle_decoder_refuses_bad_fields(srv, case, reason, edit):
    with pytest.raises(W.PayloadError, match=re.escape(reason)):
        W.check_ipc_buckets([_bucket(edit(dict(GOOD_HANDLE)))])
    r = post(srv, "/update_weights", {"transport": "ipc", "buckets": [_bucket(edit(dict(GOOD_HANDLE)))]})
    assert r.status_code == 400 and reason in r.json()["error"], r.text


BAD_ENTRIES = [
    ("dtype", "'dtype' must be one of", lambda b: {**b, "dtype": "complex128"}),
    ("entry dtype", "differs from its bucket", lambda b: {**b, "tensors": [{**b["tensors"][0], "dtype": "int8"}]}),
    ("numel", "not the product", lambda b: {**b, "tensors": [{**b["tensors"][0], "numel": 7, "end_idx": 7}]}),
    ("gap", "expected start_idx 0", lambda b: {**b, "tensors": [{**b["tensors"][0], "start_idx": 1, "end_idx": 7}]}),
    ("shape", "'shape' must be a list", lambda b: {**b, "tensors": [{**b["tensors"][0], "shape": "2x3"}]}),
    ("extra", "unknown field 'loader'", lambda b: {**b, "loader": "x"}),
    ("float index", "expected start_idx 0", lambda b: {**b, "tensors": [{**b["tensors"][0], "start_idx": 0.0}]}),
    ("long dtype", "got 'xxxxxxxx", lambda b: {**b, "dtype": "x" * 100_000}),
]


@pytest.mark.parametrize("case,reason,edit", BAD_ENTRIES, ids=[c for c, _, _ in BAD_ENTRIES])
def test_ipc_bucket_fields_are_checked(case, reason, edit):
    with pytest.raises(W.PayloadError, match=re.escape(reason)) as e:
        W.check_ipc_buckets([edit(_bucket(GOOD_HANDLE))])
    assert len(str(e.value)) < 300  # a bad value is named, not echoed whole


def test_a_well_formed_handle_on_a_cpu_server_is_refused_without_cuda(srv, asleep):
    (b,) = W.check_ipc_buckets([_bucket(GOOD_HANDLE)])
    func, args = b.rebuild_call(0)
    assert func.__name__ == "rebuild_cuda_tensor" and func.__module__ == "torch.multiprocessing.reductions"
    assert args[1] == torch.Size([6]) and args[5] is torch.float32
    r = post(srv, "/update_weights", {"transport": "ipc", "buckets": [_bucket(GOOD_HANDLE)]})
    assert r.status_code == 400 and "needs CUDA on the server" in r.json()["error"]


# ----------------------------------------------------------------------------------------------
# The file transport: only inside --weights-dir, one answer for everything outside
# ----------------------------------------------------------------------------------------------


def test_file_transport_reads_only_inside_the_weights_dir(srv, backend, wdir, tmp_path, asleep):
    lm = backend.model.hf.lm_head.weight.detach().clone()
    inside = wdir / "seg.safetensors"
    W.file_payload([("lm_head.weight", lm)], inside, True)
    outside = tmp_path / "outside.safetensors"
    W.file_payload([("lm_head.weight", lm)], outside, True)
    (wdir / "link.safetensors").symlink_to(outside)
    (wdir / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    (wdir / "sub").mkdir(exist_ok=True)
    os.mkfifo(wdir / "fifo")
    answers = set()
    for path in (str(outside), "../" + outside.name, str(wdir / ".." / outside.parent.name / outside.name),
                 "link.safetensors", "dirlink/outside.safetensors", "/etc/passwd", "/etc/no-such-file",
                 str(tmp_path / "missing.safetensors"), "missing.safetensors", "sub", "fifo", "/proc/self/environ"):
        r = post(srv, "/update_weights", {"transport": "file", "path": path})
        assert r.status_code == 400, (path, r.text)
        answers.add(r.json()["error"].split(":")[0])
    assert answers == {W.NOT_IN_WEIGHTS_DIR}  # the same words whatever exists out there
    for path in ("seg.safetensors", str(inside)):
        r = post(srv, "/update_weights", {"transport": "file", "path": path})
        assert r.status_code == 200 and r.json()["tensors"] == 1, r.text
    (wdir / "junk.safetensors").write_bytes(b"not a safetensors file")
    r = post(srv, "/update_weights", {"transport": "file", "path": "junk.safetensors"})
    assert r.status_code == 400 and "is not a safetensors file" in r.json()["error"]


def test_file_transport_is_off_without_a_weights_dir(backend, tmp_path):
    with pytest.raises(W.PayloadError, match="file transport is off"):
        W.resolve_weights_file(str(tmp_path / "x.safetensors"), None)


# ----------------------------------------------------------------------------------------------
# Key, content type, body size, nesting
# ----------------------------------------------------------------------------------------------


def test_key_and_content_type(srv):
    assert httpx.get(srv.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": KEY[:-1]}):
        for path in ("/info", "/generate", "/sleep", "/update_weights", "/wakeup"):
            method = "GET" if path == "/info" else "POST"
            r = httpx.request(method, srv.url + path, headers={"Content-Type": "application/json", **headers},
                              content=b"{}")
            assert r.status_code == 401 and "API key" in r.json()["error"]
    # a cross-site form or text POST (what a browser sends without a preflight) is refused
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Authorization": AUTH["Authorization"], "Origin": "http://evil.example"}
        if ctype:
            headers["Content-Type"] = ctype
        for path in ("/sleep", "/update_weights", "/generate"):
            r = httpx.post(srv.url + path, headers=headers, content=b'{"level": 1}')
            assert r.status_code in (403, 415) and r.json()["error"], (ctype, path)
            r = httpx.post(srv.url + path, headers={k: v for k, v in headers.items() if k != "Origin"},
                           content=b'{"level": 1}')
            assert r.status_code == 415 and "application/json" in r.json()["error"], (ctype, path)
    assert post(srv, "/generate", {"input_ids": [3, 4]},
                headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}).status_code == 200
    info = httpx.get(srv.url + "/info", headers=AUTH).json()
    assert info["asleep"] == {"weights": False, "kv_cache": False}  # nothing above changed the state
    r = httpx.get(srv.url + "/no-such-path", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]
    r = httpx.get(srv.url + "/generate", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]


def test_foreign_origin_and_host_are_refused(srv):
    """A web page cannot reach a local server: not cross-site (Origin), not by DNS rebinding (Host)."""
    for path in ("/info", "/generate", "/sleep"):
        method = "GET" if path == "/info" else "POST"
        r = httpx.request(method, srv.url + path, headers={**AUTH, "Origin": "http://evil.example"}, content=b"{}")
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
        r = httpx.request(method, srv.url + path, headers={**AUTH, "Host": "evil.example:80"}, content=b"{}")
        assert r.status_code == 421 and "Host header" in r.json()["error"]
        r = httpx.request(method, srv.url + path, headers={"Host": "evil.example", "Origin": "http://evil.example"})
        assert r.status_code == 421  # a rebinding page's own origin is still not this server
    # an Origin no URL parser reads, and a Host that only starts like a loopback address
    for origin in ("http://[", "http://[::1"):
        r = httpx.get(srv.url + "/health", headers={"Origin": origin})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"], r.text
    port = srv.url.rsplit(":", 1)[1]
    for host in ("[::1]evil.example", f"[::1]evil.example:{port}", "[::1]:x"):
        r = httpx.get(srv.url + "/info", headers={**AUTH, "Host": host})
        assert r.status_code == 421, (host, r.text)
    ok = httpx.get(srv.url + "/info", headers={**AUTH, "Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
    assert ok.status_code == 200
    assert post(srv, "/sleep", {"level": 1}).status_code == 200 and post(srv, "/wakeup", {}).status_code == 200


def test_oversized_bodies_are_refused_before_parsing(srv):
    big = b'{"prompt": "' + b"a" * MAX_BODY + b'"}'
    r = post(srv, "/generate", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // (256 << 10) + 2):
            yield b"a" * (256 << 10)
        yield b'"}'

    r = httpx.post(srv.url + "/generate", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # a Content-Length over the limit is answered before any of the body is read
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{".encode())
        sock.shutdown(socket.SHUT_WR)
        head = b""
        while chunk := sock.recv(4096):
            head += chunk
    head = head.decode(errors="replace")
    assert head.startswith("HTTP/1.1 413") and "limit" in head, head
    assert probe(srv)  # still serving


@pytest.mark.parametrize("text,reason", [
    ("[" * 100000 + "]" * 100000, "nested deeper than 32"),
    ('{"a":' * 40 + "1" + "}" * 40, "nested deeper than 32"),
    ("[" * 5000, "nested deeper than 32"),
    ("[1, 2", "malformed JSON"),
    ('{"prompt": "hi", "temperature": NaN}', "NaN"),
    ('{"prompt": "hi", "temperature": Infinity}', "Infinity"),
    ('{"prompt": "hi", "temperature": -Infinity}', "-Infinity"),
    ('{"prompt": "hi", "temperature": 1e999}', "out of range"),
    ('{"prompt": "hi", "seed": 1' + "0" * 5000 + "}", "malformed JSON"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    # unterminated strings of escaped quotes: the depth check took quadratic time on them (32 KB: 16 s,
    # the event loop stalled); ~1 MB parsed on the event loop, and over 1 MiB on a parsing thread
    ('"' + '\\"' * 500_000, "malformed JSON"),
    ('{"prompt": "' + '\\"' * (1 << 19), "malformed JSON"),
])
def test_json_is_strict(srv, text, reason):
    body = text if isinstance(text, bytes) else text.encode()
    r = post(srv, "/generate", content=body)
    assert r.status_code == 400 and reason in r.json()["error"], r.text
    # a body of strings holding brackets is no deeper than it looks
    assert parse_json_body(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": ["]"]}') == {
        "a": "[" * 46, "b": ["]"]}


LONE_SURROGATES = [
    ("/generate", '{"request_id": "\\ud800", "input_ids": [5, 6]}'),
    ("/generate", '{"requests": [{"input_ids": [5, 6]}, {"request_id": "a\\udfffb", "input_ids": [5, 6]}]}'),
    ("/generate", '{"prompt": "\\ude00\\ud83d"}'),  # a pair the wrong way round
    ("/generate", '{"\\ud800": 1}'),
    ("/wakeup", '{"tags": "\\ud800"}'),
    ("/wakeup", '{"tags": ["weights", "\\udbff"]}'),
    ("/sleep", '{"level": "\\ud800"}'),
    ("/update_weights", '{"transport": "file", "path": "\\ud800"}'),
]


@pytest.mark.parametrize("path,text", LONE_SURROGATES, ids=[t for _, t in LONE_SURROGATES])
def test_lone_surrogates_are_refused(srv, path, text):
    """A lone UTF-16 surrogate is no text (it has no UTF-8): a 400, never a 500 from writing the answer."""
    r = post(srv, path, content=text.encode())
    assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["error"], r.text
    assert httpx.get(srv.url + "/info", headers=AUTH).json()["asleep"] == {"weights": False, "kv_cache": False}
    # a surrogate pair is one character, and fine
    r = post(srv, "/generate", content=b'{"request_id": "r\\ud83d\\ude00", "input_ids": [5, 6]}')
    assert r.status_code == 200 and r.json()["request_id"] == "r\U0001f600", r.text


def test_sleep_level_must_be_an_integer(srv):
    for level in (2.0, 1.0, True, "1", [1], 3):
        r = post(srv, "/sleep", {"level": level})
        assert r.status_code == 400 and "'level' must be 1 or 2" in r.json()["error"], (level, r.text)
    assert httpx.get(srv.url + "/info", headers=AUTH).json()["asleep"] == {"weights": False, "kv_cache": False}


# ----------------------------------------------------------------------------------------------
# Fields and ranges: every bad value gets a 400 naming it, before any work
# ----------------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    ({"temperature": 1e-50}, "'temperature' must be 0 (greedy) or a number in [0.001, 100]"),
    ({"temperature": 1000}, "'temperature'"),
    ({"temperature": -1}, "'temperature'"),
    ({"temperature": True}, "'temperature'"),
    ({"top_k": 10**9}, "'top_k' must be an integer in [-1, "),
    ({"top_k": -2}, "'top_k'"),
    ({"top_p": 0}, "'top_p'"),
    ({"top_p": 1.0000001}, "'top_p'"),
    ({"max_new_tokens": 10**9}, "'max_new_tokens' must be an integer >= 1 and <= "),
    ({"max_new_tokens": 2.5}, "'max_new_tokens'"),
    ({"seed": -1}, "'seed' must be an integer in [0, "),
    ({"seed": 2**64}, "'seed'"),
    ({"stop_token_ids": [10**6]}, "'stop_token_ids' must be a list of at most 256 token ids"),
    ({"stop_token_ids": list(range(300))}, "'stop_token_ids'"),
    ({"request_id": "r" * 300}, "'request_id' must be a non-empty string of at most 256"),
    ({"prompt": "x" * 2001}, "over the server's limit of 2000 characters"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, "over the server's limit"),
    ({"messages": [{"role": "user", "content": "hi", "tool": "x"}]}, "'messages' must be a list"),
    ({"input_ids": [-1]}, "outside the vocabulary"),
    ({"input_ids": [3] * 100000}, "over the context limit"),
]


@pytest.mark.parametrize("extra,reason", OUT_OF_RANGE, ids=[str(r) for _, r in OUT_OF_RANGE])
def test_out_of_range_fields_get_400(srv, extra, reason):
    body = {"prompt": "1+1=", **extra}
    if "messages" in extra or "input_ids" in extra:
        body.pop("prompt")
    r = post(srv, "/generate", body)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"], r.json()["error"]
    # inside a batch, the bad request is named
    r = post(srv, "/generate", {"requests": [{"input_ids": [5, 6]}, body]})
    assert r.status_code == 400 and "requests[1]" in r.json()["error"]


def test_limits_are_reported_and_edge_values_pass(srv):
    info = httpx.get(srv.url + "/info", headers=AUTH).json()
    assert info["limits"]["max_body_bytes"] == MAX_BODY and info["limits"]["max_prompt_chars"] == 2000
    vocab = info["vocab_size"]
    for extra in ({"temperature": 0}, {"temperature": 1e-3, "do_sample": True, "seed": 0},
                  {"temperature": 100, "do_sample": True, "seed": 2**63 - 1}, {"top_k": -1}, {"top_k": vocab},
                  {"top_p": 1e-9, "do_sample": True}, {"stop_token_ids": []}):
        r = post(srv, "/generate", {"input_ids": [7, 8, 9], **extra})
        assert r.status_code == 200, (extra, r.text)


def test_requests_that_ban_every_token_get_400(srv):
    """With every logit -inf the softmax is NaN: such a request is refused before it can fail its batch."""
    vocab = httpx.get(srv.url + "/info", headers=AUTH).json()["vocab_size"]
    assert vocab <= 256  # the tiny model: a list of banned ids can hold the whole vocabulary
    good = {"request_id": "good", "input_ids": [7, 8, 9]}
    split = {"banned_token_ids": list(range(60)), "stop_token_ids": list(range(60, vocab))}
    for bad, reason in (({"banned_token_ids": list(range(vocab))}, "'banned_token_ids' cover the whole"),
                        ({**split, "min_new_tokens": 1}, "'banned_token_ids' and 'stop_token_ids'")):
        r = post(srv, "/generate", {"requests": [good, {"request_id": "bad", "input_ids": [7, 8, 9], **bad}]})
        assert r.status_code == 400 and "request 'bad'" in r.json()["error"] and reason in r.json()["error"], r.text
    # one token left, or the stop ids free to end the response (no min_new_tokens): served
    for ok in ({"banned_token_ids": list(range(1, vocab))}, split):
        r = post(srv, "/generate", {"requests": [good, {"request_id": "ok", "input_ids": [7, 8, 9], **ok}]})
        assert r.status_code == 200, (ok, r.text)


# ----------------------------------------------------------------------------------------------
# A request that fails inside the engine fails alone
# ----------------------------------------------------------------------------------------------


class PoisonedBackend(ReferenceBackend):
    """The engine raises for any batch holding a request with id ``poison*`` (as an engine bug
    would); every batch it sees is recorded."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []

    def _check(self, reqs):
        if any(r.request_id.startswith("poison") for r in reqs):
            raise RuntimeError("engine failure")

    def generate_continuous(self, requests, more, on_result):
        self.batches.append([r.request_id for r in requests])
        self._check(requests)
        super().generate_continuous(requests, more, on_result)

    def generate(self, requests):
        self._check(requests)
        return super().generate(requests)


def test_a_poisoned_request_fails_alone(tiny_dir, backend):
    poisoned = PoisonedBackend(str(tiny_dir), decoding=DECODING, device="cpu")
    # a long window: the calls below, sent at once, are decoded in one engine batch
    s = ThreadServer(create_app(poisoned, poisoned.parser(), batch_window_s=2.0))
    try:
        reqs = [{"request_id": f"good{i}", "input_ids": [20 + i, 21, 22]} for i in range(3)]
        reqs.insert(1, {"request_id": "poison", "input_ids": [20, 21, 22]})
        barrier = threading.Barrier(len(reqs))

        def call(r):
            barrier.wait()
            return httpx.post(s.url + "/generate", json=r, timeout=120)

        with ThreadPoolExecutor(len(reqs)) as pool:
            got = list(pool.map(call, reqs))
        assert got[1].status_code == 500 and "engine failure" in got[1].json()["error"]
        want = backend.generate(backend.parser().parse_many([r for r in reqs if r["request_id"] != "poison"]))
        good = [g.json() for g in got if g.status_code == 200]
        assert [g["token_ids"] for g in good] == [w["token_ids"] for w in want]
        assert any("poison" in b and len(b) > 1 for b in poisoned.batches), poisoned.batches
        assert httpx.post(s.url + "/generate", json=reqs[0], timeout=60).json()["token_ids"] == want[0]["token_ids"]
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------------
# Weight updates: checked against the model before anything changes
# ----------------------------------------------------------------------------------------------


def test_refused_updates_leave_the_old_weights_serving(srv, backend):
    before = probe(srv)
    sd = {k: v.detach().clone() for k, v in backend.model.hf.state_dict().items()}
    nan = sd["lm_head.weight"].clone()
    nan[0, 0] = float("nan")
    inf = sd["model.norm.weight"].clone()
    inf[-1] = float("inf")
    assert post(srv, "/sleep", {"level": 1}).status_code == 200
    for pairs, reason in ([[("lm_head.weight", nan)], "NaN or infinite"], [[("model.norm.weight", inf)], "NaN"],
                          [[("lm_head.weight", sd["lm_head.weight"].long())], "dtype int64 does not fit"],
                          [[("lm_head.weight", sd["lm_head.weight"].to(torch.float8_e4m3fn))], "does not fit"],
                          [[("lm_head.weight", sd["lm_head.weight"].to(torch.float8_e5m2))], "does not fit"],
                          [[("lm_head.weight", sd["lm_head.weight"][:-1])], "shape"],
                          [[("model.layers.99.x", torch.zeros(1))], "unknown parameter"]):
        r = post(srv, "/update_weights", W.inline_payload(pairs, True))
        assert r.status_code == 400 and reason in r.json()["error"], r.text
    with pytest.raises(W.PayloadError, match="sent twice"):  # safetensors cannot even carry it
        W.check_update([("lm_head.weight", sd["lm_head.weight"])] * 2, backend._specs)
    # a multi-segment update whose second segment is refused: nothing of it is applied
    r = post(srv, "/update_weights", W.inline_payload([("lm_head.weight", sd["lm_head.weight"].flip(0))], False))
    assert r.status_code == 200
    r = post(srv, "/update_weights", W.inline_payload([("model.norm.weight", inf)], False))
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    r = post(srv, "/update_weights", W.inline_payload([("model.norm.weight", sd["model.norm.weight"])], True))
    assert r.status_code == 409 and "refused" in r.json()["error"]
    assert post(srv, "/wakeup", {}).status_code == 200
    assert probe(srv) == before  # the old weights serve
    # an unfinished update is dropped by the wakeup
    assert post(srv, "/sleep", {"level": 1}).status_code == 200
    r = post(srv, "/update_weights", W.inline_payload([("lm_head.weight", sd["lm_head.weight"].flip(0))], False))
    assert r.status_code == 200
    assert post(srv, "/wakeup", {}).status_code == 200
    assert probe(srv) == before
    # a good update still goes through, and can be undone
    client = RolloutClient([srv.url], api_key=KEY, retries=0)
    changed = dict(sd, **{"lm_head.weight": sd["lm_head.weight"].flip(0)})
    assert client.push_weights(changed, transport="inline", segment_bytes=64 << 10)["segments"] > 1
    assert probe(srv) != before
    assert client.push_weights(sd, transport="file")["transport"] == "file"  # into the weights folder
    assert probe(srv) == before


def test_errors_name_a_bad_value_without_echoing_it_whole(srv):
    """A 400 names the bad field and the start of its value: a 1 MB value is not sent back in full."""
    for body in ({"transport": "inline", "data": "", "finished": "A" * 1_000_000},
                 {"transport": "ipc", "finished": True, "buckets": [{**_bucket(GOOD_HANDLE), "dtype": "B" * 1_000_000}]}):
        r = post(srv, "/update_weights", body)
        assert r.status_code == 400 and len(r.content) < 1000, (r.status_code, len(r.content))


REFUSED_SEGMENTS = {
    "payload check": {"transport": "inline", "data": 5, "finished": False},
    "inline load": {"transport": "inline", "data": base64.b64encode(b"not safetensors").decode(), "finished": False},
    "file load": {"transport": "file", "path": "no-such.safetensors", "finished": False},
    "backend check": {"transport": "inline", "finished": False, "data": base64.b64encode(
        W.to_safetensors_bytes([("model.no_such.weight", torch.zeros(2))])).decode()},
}


@pytest.mark.parametrize("kind", list(REFUSED_SEGMENTS))
def test_a_refused_segment_refuses_the_rest_of_its_update(srv, backend, kind):
    """Wherever a segment is refused (its fields, reading its payload, the backend's checks), the rest
    of that update is refused too: a finishing segment never applies the update without it."""
    before = probe(srv)
    old = {k: v.detach().clone() for k, v in backend.model.hf.state_dict().items()}
    assert post(srv, "/sleep", {"level": 1}).status_code == 200
    try:
        r = post(srv, "/update_weights", W.inline_payload([("lm_head.weight", old["lm_head.weight"].flip(0))], False))
        assert r.status_code == 200, r.text
        r = post(srv, "/update_weights", REFUSED_SEGMENTS[kind])
        assert r.status_code == 400, r.text
        r = post(srv, "/update_weights", W.inline_payload([("model.norm.weight", old["model.norm.weight"] * 2)], True))
        assert r.status_code == 409 and "refused" in r.json()["error"], r.text
    finally:
        assert post(srv, "/wakeup", {}).status_code == 200
    now = backend.model.hf.state_dict()
    assert all(torch.equal(now[k], v) for k, v in old.items())  # exactly the old weights
    assert probe(srv) == before


def test_a_refused_wakeup_keeps_the_staged_segments(srv, backend):
    """A /wakeup refused (the KV cache before the weights) changes nothing: the update it came
    between completes as if it had never been sent."""
    old = {k: v.detach().clone() for k, v in backend.model.hf.state_dict().items()}
    a, b = old["lm_head.weight"].flip(0), old["model.norm.weight"] * 2
    assert post(srv, "/sleep", {"level": 2}).status_code == 200
    try:
        assert post(srv, "/update_weights", W.inline_payload([("lm_head.weight", a)], False)).status_code == 200
        r = post(srv, "/wakeup", {"tags": ["kv_cache"]})
        assert r.status_code == 409 and "weights" in r.json()["error"], r.text
        assert httpx.get(srv.url + "/info", headers=AUTH).json()["asleep"] == {"weights": True, "kv_cache": True}
        r = post(srv, "/update_weights", W.inline_payload([("model.norm.weight", b)], True))
        assert r.status_code == 200 and r.json()["finished"] is True, r.text
    finally:
        assert post(srv, "/wakeup", {}).status_code == 200
    now = backend.model.hf.state_dict()
    assert torch.equal(now["lm_head.weight"], a) and torch.equal(now["model.norm.weight"], b)
    RolloutClient([srv.url], api_key=KEY, retries=0).push_weights(old, transport="inline")
    now = backend.model.hf.state_dict()
    assert all(torch.equal(now[k], v) for k, v in old.items())


# ----------------------------------------------------------------------------------------------
# dirl serve: where it listens and where the key comes from
# ----------------------------------------------------------------------------------------------


def test_read_api_key_sources(tmp_path):
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert read_api_key(None, str(f), {}) == "from-file"
    assert read_api_key("from-arg", None, {"DIRL_SERVER_API_KEY": "env"}) == "from-arg"
    assert read_api_key(None, None, {"DIRL_SERVER_API_KEY": "from-env"}) == "from-env"
    assert read_api_key(None, None, {}) is None
    for args, msg in (((None, str(tmp_path / "none")), "cannot be read"), (("a", str(f)), "one of"),
                      (("  ", None), "empty")):
        with pytest.raises(ConfigError, match=msg):
            read_api_key(*args, {})
    f.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_api_key(None, str(f), {})


UNSAFE_STARTS = [
    (["--host", "0.0.0.0"], "needs an API key"),
    (["--host", "10.1.2.3"], "needs an API key"),
    (["--host", "::"], "needs an API key"),
    (["--host", "0.0.0.0", "--api-key-file", "/no/such/key"], "--api-key-file '/no/such/key': cannot be read"),
    (["--weights-dir", "/no/such/dir"], "--weights-dir '/no/such/dir' is not a folder"),
    (["--max-body-bytes", "10"], "--max-body-bytes must be at least 1024"),
]


@pytest.mark.parametrize("extra,msg", UNSAFE_STARTS, ids=[m for _, m in UNSAFE_STARTS])
def test_serve_refuses_unsafe_starts_with_one_line(tiny_dir, extra, msg, monkeypatch, capsys):
    from dirl import cli

    monkeypatch.delenv("DIRL_SERVER_API_KEY", raising=False)
    monkeypatch.delenv("DIRL_SERVER_WEIGHTS_DIR", raising=False)
    assert cli.main(["serve", "--model", str(tiny_dir), "--port", "9", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], lines


@pytest.mark.parametrize("value", ["inf", "nan", "1e12", "1000.5", "-1"])
def test_serve_range_checks_the_batch_window(tiny_dir, value, capsys):
    """An infinite or huge window would kill the batch worker (every /generate then hangs while
    /health says ok). The missing weights folder is checked later: no server ever starts here."""
    from dirl import cli

    argv = ["serve", "--model", str(tiny_dir), "--port", "9", "--batch-window-ms", value,
            "--weights-dir", "/no/such/dir"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--batch-window-ms must be in [0, 1000], got {float(value):g}" in lines[0], lines


def test_serve_refuses_a_public_bind_without_a_key_as_a_process(tiny_dir):
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DIRL_SERVER_API_KEY", "DIRL_SERVER_WEIGHTS_DIR")}
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "dirl.cli", "serve", "--model", str(tiny_dir), "--port", "9",
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs an API key" in lines[0] and "--insecure" in lines[0], proc.stderr


class BlockingParser:
    """Wraps a parser; a request with prompt 'block' waits inside parsing until released."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def parse(self, obj, where="request"):
        if isinstance(obj, dict) and obj.get("prompt") == "block":
            self.entered.set()
            assert self.release.wait(120)
        return self.inner.parse(obj, where)


def test_parsing_and_tokenising_never_block_the_event_loop(backend):
    parser = BlockingParser(backend.parser())
    s = ThreadServer(create_app(backend, parser))
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, s.url + "/generate", json={"prompt": "block", "max_new_tokens": 2},
                                  timeout=120)
            assert parser.entered.wait(120)  # the request is being parsed now, on a parsing thread
            assert httpx.get(s.url + "/health", timeout=60).status_code == 200
            r = httpx.post(s.url + "/generate", json={"input_ids": [5, 6, 7], "max_new_tokens": 2}, timeout=60)
            assert r.status_code == 200  # other requests are parsed and served meanwhile
            parser.release.set()
            assert pending.result().status_code == 200
    finally:
        parser.release.set()
        s.stop()


def test_the_batch_worker_survives_an_error_outside_the_engine(backend):
    """A window queue.get cannot take (inf: OverflowError) fails the calls it holds with a JSON 500;
    the worker lives on and answers the next call, instead of dying while /health says ok."""
    app = create_app(backend, backend.parser(), batch_window_s=float("inf"))
    s = ThreadServer(app)
    try:
        for i in range(2):
            r = httpx.post(s.url + "/generate", json={"request_id": f"w{i}", "input_ids": [5, 6, 7]}, timeout=60)
            assert r.status_code == 500 and "OverflowError" in r.json()["error"], r.text
        assert app.state.worker.thread.is_alive()
    finally:
        s.server.force_exit = True  # without the fix a call that is never answered would hold the shutdown
        s.stop()
