"""The rollout server: ``dirl serve --model DIR --backend reference|lmdeploy [--host --port]
[--api-key-file FILE | --api-key KEY | $DIRL_SERVER_API_KEY] [--insecure] [--weights-dir DIR]
[--max-body-bytes N] [--max-prompt-chars N] [--backend-option KEY=VALUE ...]``.

HTTP contract (docs/CONTRACTS.md; what is refused and why: docs/SECURITY.md):

* ``GET /health`` (never needs the API key), ``GET /info`` (its ``asleep`` is what the backend itself
  reports: LMDeploy's sleep level 1 also offloads the weights; ``limits`` the request bounds);
* ``POST /generate``: one request object, or ``{"requests": [...]}`` → ``{"results": [...]}``;
* ``POST /sleep`` ``{"level": 1|2}``, ``POST /wakeup`` ``{"tags": [...]}``, ``POST /update_weights``
  (a segment, see :mod:`dirl.rollout.weights`), with the state machine of SPEC section 8: weights can
  only be updated while the KV cache is asleep, and nothing is generated while anything is asleep
  (HTTP 409 otherwise).

It listens on 127.0.0.1 unless told otherwise, and refuses a non-loopback bind without a key unless
``--insecure``. POST bodies must be ``application/json`` (415), at most ``--max-body-bytes`` (413,
counted as they arrive), strict JSON nested at most 32 deep; every field is range-checked before any
work. Malformed requests get a 4xx with ``{"error": reason}``; the server keeps serving. Requests are
parsed and tokenised on threads of their own; generation runs on one worker thread, and requests
that arrive while it is busy (or within a few milliseconds of each other) are decoded together in
one engine batch, where a request that fails fails alone.

:mod:`dirl.rollout.launch` starts this server in a subprocess for the trainers and the evaluator.
"""

# No "from __future__ import annotations": FastAPI must see the real `Request` class of the
# handlers defined inside create_app.
import argparse
import asyncio
import concurrent.futures
import hashlib
import hmac
import inspect
import ipaddress
import json
import math
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from dirl.config import ConfigError, DecodingConfig, model_folder
from dirl.rollout.backend import RequestError, RequestParser, StateError
from dirl.rollout.backends import get_backend
from dirl.rollout.launch import ServerHandle, die_with_parent, free_port, start_server  # noqa: F401 (launching lives there)

API_KEY_ENV = "DIRL_SERVER_API_KEY"  # also how a launching trainer or evaluator hands over its key


def make_parser(backend: Any, decoding: DecodingConfig, model_dir: str) -> RequestParser:
    """The request parser of a backend: its own when it has one, else built from ``info()``."""
    if hasattr(backend, "parser"):
        return backend.parser()
    info = backend.info()
    tokenizer = None
    try:
        from dirl.model.sdar import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    except Exception:  # noqa: BLE001 - a server without tokenizer takes input_ids only
        tokenizer = None
    return RequestParser(decoding, info["block_size"], info["vocab_size"], info.get("max_context"),
                         tokenizer=tokenizer, stop_token_ids=info.get("stop_token_ids"))


def _settle(fut: concurrent.futures.Future, result: Any = None, exception: Optional[BaseException] = None) -> None:
    """Answer a call, unless it is already answered or its caller went away: the cancel comes from
    the event loop's thread and may land between any check here and the set."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class BatchWorker:
    """One thread that decodes everything waiting in one engine batch.

    The first waiting request waits ``window_s`` for others to join. With a backend that has
    ``generate_continuous`` (the reference engine), requests that arrive while a batch runs join it
    as soon as a row is free; with others they form the next batch. Results are handed back per
    HTTP call by position in the batch, checked against the request ids.

    A request that fails inside the engine fails alone: a backend's ``generate_each`` answers an
    exception in a failed request's place (LMDeploy's does), and when a whole batch raises, each request not yet answered is
    run again on its own, so only the one that fails again gets the error.
    """

    def __init__(self, backend: Any, state: "SleepState", lock: threading.Lock, window_s: float = 0.005):
        self.backend = backend
        self.state = state
        self.lock = lock
        self.window_s = window_s
        self.queue: "queue.Queue[tuple[list, concurrent.futures.Future]]" = queue.Queue()
        self.paused = threading.Event()  # set while a sleep waits for the running batch: admit no more
        # cancelled_calls: HTTP calls whose client went away before the answer; cancelled_requests:
        # their requests, never decoded or dropped mid-decode (the continuous engine checks before
        # every forward; another backend only before it starts a batch)
        self.stats = {"engine_calls": 0, "requests": 0, "http_calls": 0, "failed_calls": 0, "cancelled_calls": 0,
                      "cancelled_requests": 0}
        cont = getattr(backend, "generate_continuous", None)
        self._takes_cancelled = cont is not None and "cancelled" in inspect.signature(cont).parameters
        self.thread = threading.Thread(target=self._run, name="dirl-generate", daemon=True)
        self.thread.start()

    def submit(self, requests: list) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((requests, fut))
        return fut

    def cancel(self, fut: concurrent.futures.Future) -> None:
        """The caller of ``fut`` went away: its requests are decoded no further."""
        if fut.cancel():
            self.stats["cancelled_calls"] += 1

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        while True:
            items: list = []
            # all of it inside the try: an error while collecting (a window queue.get cannot take)
            # fails the calls it holds instead of killing the worker, after which every call would hang
            try:
                items.append(self.queue.get())
                deadline = time.monotonic() + self.window_s
                while True:
                    try:
                        items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
                self._generate(items)
            except BaseException as e:  # noqa: BLE001 - never let the worker thread die
                for _, fut in items:
                    _settle(fut, exception=e)

    def _generate(self, items: list) -> None:
        reqs: list = []
        owner: list[tuple[int, int]] = []  # batch index -> (item, position in the item)
        got: list[list] = []
        open_items: set[int] = set()
        items_all: list = []

        def add(new_items: list) -> list:
            added = []
            for it in new_items:
                if it[1].cancelled():  # its caller went away while it waited
                    self.stats["cancelled_requests"] += len(it[0])
                    continue
                k = len(items_all)
                items_all.append(it)
                got.append([None] * len(it[0]))
                open_items.add(k)
                for j, r in enumerate(it[0]):
                    owner.append((k, j))
                    added.append(r)
            reqs.extend(added)
            self.stats["http_calls"] += len(new_items)
            self.stats["requests"] += len(added)
            return added

        def fail(k: int, e: BaseException) -> None:
            if k in open_items:
                open_items.discard(k)
                self.stats["failed_calls"] += 1
                _settle(items_all[k][1], exception=e)

        def deliver(k: int, j: int, res: Any) -> None:
            if k not in open_items:
                return
            if isinstance(res, BaseException):
                fail(k, res)
                return
            want = items_all[k][0][j].request_id
            if not isinstance(res, dict) or res.get("request_id") != want:
                rid = res.get("request_id") if isinstance(res, dict) else type(res).__name__
                raise RuntimeError(f"backend answered request {rid!r} in the place of {want!r}")
            got[k][j] = res
            if all(x is not None for x in got[k]):
                open_items.discard(k)
                _settle(items_all[k][1], result=got[k])

        def on_result(i: int, res: Any) -> None:
            deliver(*owner[i], res)

        def more() -> list:
            return [] if self.paused.is_set() else add(self._drain())

        def cancelled(i: int) -> bool:
            k = owner[i][0]
            if not items_all[k][1].cancelled():
                return False
            if k in open_items:  # counted once, however many of its requests the engine drops
                open_items.discard(k)
                self.stats["cancelled_requests"] += sum(x is None for x in got[k])
            return True

        add(items)
        if not reqs:  # every caller went away while waiting
            return
        self.stats["engine_calls"] += 1
        try:
            with self.lock:
                self.state.check_awake()
                if hasattr(self.backend, "generate_continuous"):
                    extra = {"cancelled": cancelled} if self._takes_cancelled else {}  # older backends: not
                    self.backend.generate_continuous(list(reqs), more, on_result, **extra)
                else:  # generate_each: a failed request's exception in its place
                    run = getattr(self.backend, "generate_each", self.backend.generate)
                    for i, res in enumerate(run(list(reqs))):
                        on_result(i, res)
            if open_items:
                raise RuntimeError("the backend returned fewer results than requests")
        except Exception as e:  # noqa: BLE001 - isolate the request that fails
            if isinstance(e, StateError) or len(reqs) == 1:
                for k in sorted(open_items):
                    fail(k, e)
                return
            self._one_by_one(items_all, got, open_items, deliver, fail)
        except BaseException as e:  # noqa: BLE001 - handed to every caller still waiting
            for k in sorted(open_items):
                fail(k, e)

    def _one_by_one(self, items_all, got, open_items, deliver, fail) -> None:
        for k in sorted(open_items):
            if items_all[k][1].cancelled():  # its caller went away: nothing to retry for
                open_items.discard(k)
                continue
            for j, r in enumerate(items_all[k][0]):
                if k not in open_items:
                    break
                if got[k][j] is not None:
                    continue
                try:
                    with self.lock:
                        self.state.check_awake()
                        self.stats["engine_calls"] += 1
                        (res,) = self.backend.generate([r])
                    deliver(k, j, res)
                except Exception as e:  # noqa: BLE001 - this request's own failure
                    fail(k, e)


class SleepState:
    """SPEC section 8: sleep(1) frees the KV cache, sleep(2) also the weights; wakeup restores.

    After every transition the state is read back from the backend's ``info()["asleep"]`` (a
    backend may put more to sleep than asked, e.g. LMDeploy's level 1 also offloads weights)."""

    def __init__(self):
        self.asleep = {"weights": False, "kv_cache": False}

    def sync(self, backend: Any, expected: dict) -> None:
        reported = backend.info().get("asleep")
        self.asleep = {k: bool(v) for k, v in (reported or expected).items()}

    def check_awake(self) -> None:
        sleeping = [k for k, v in self.asleep.items() if v]
        if sleeping:
            raise StateError(f"the server is asleep ({', '.join(sleeping)}); POST /wakeup first")


# ----------------------------------------------------------------------------------------------
# Reading request bodies: size, content type, JSON nesting and numbers bounded before parsing
# ----------------------------------------------------------------------------------------------

DISCONNECT_POLL_S = 0.1  # how often a waiting /generate call checks that its client is still there
DEFAULT_MAX_BODY_BYTES = 32 << 20  # an inline segment of 16 MiB is 21.4 MiB of base64
DEFAULT_MAX_JSON_DEPTH = 32
MAX_BATCH_REQUESTS = 4096


class BodyError(Exception):
    """A request body refused before it is parsed: ``status`` 400, 413 or 415."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# possessive, and an unterminated string runs to the end: linear time on any text (the backtracking
# form took quadratic time on '"' + '\\"' * k: 16 s for 32 KB, with the event loop stalled)
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r'[^\[\]{}]+')
_INNER_PAIR = re.compile(r'\[\]|\{\}')


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` without parsing it (a pass per level, each in C:
    strings dropped, then innermost bracket pairs removed)."""
    s = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(max_depth):
        if not s:
            return
        s, n = _INNER_PAIR.subn("", s)
        if n == 0:
            return  # unbalanced: the parser says where
    if _INNER_PAIR.search(s):
        raise BodyError(400, f"JSON nested deeper than {max_depth} levels")


_SURROGATE_ESCAPE = re.compile(r'\\u[dD][89a-fA-F]')  # the only way a surrogate gets into UTF-8 JSON
_SURROGATE = re.compile(r'[\ud800-\udfff]')


def _check_surrogates(obj: Any) -> None:
    """Refuse a lone UTF-16 surrogate (``"\\ud800"``) in any key or string: it is no text (it has
    no UTF-8), so no tokenizer takes it and no answer that repeats it could be sent."""
    stack = [("", obj)]
    while stack:
        where, o = stack.pop()
        if isinstance(o, str):
            if _SURROGATE.search(o):
                raise BodyError(400, f"malformed JSON: the string at {where[:64] or 'the top'} holds a lone "
                                     "UTF-16 surrogate (\\ud800-\\udfff)")
        elif isinstance(o, dict):
            for k, v in o.items():
                if _SURROGATE.search(k):
                    raise BodyError(400, f"malformed JSON: a key in {where[:64] or 'the body'} holds a lone "
                                         "UTF-16 surrogate (\\ud800-\\udfff)")
                stack.append((f"{where}.{k}" if where else k, v))
        elif isinstance(o, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(o))


def _refuse_constant(name: str):
    raise BodyError(400, f"malformed JSON: {name} is not a number JSON allows")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise BodyError(400, f"malformed JSON: the number {s[:32]} is out of range")
    return v


def parse_json_body(body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, every number finite, nesting bounded, no lone surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(400, "malformed JSON: the body is not UTF-8") from None
    _check_depth(text, max_depth)
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BodyError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise BodyError(400, f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BodyError(400, f"malformed JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):  # walked only when an escape could have made one
        _check_surrogates(obj)
    return obj


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


CHALLENGE_HEADER = "x-dirl-challenge"
MAX_CHALLENGE_CHARS = 128


def health_proof(api_key: str, challenge: str) -> str:
    """HMAC-SHA256 of a launcher's challenge under the server's key: proves to the launcher that the
    process on the port holds the key it was started with, before the launcher sends that key."""
    return hmac.new(api_key.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def _host_name(host_header: str) -> str:
    """The name part of a Host header (``[::1]:8000`` -> ``::1``, ``Localhost:80`` -> ``localhost``)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        rest = h[end + 1:] if end >= 0 else ""
        if end < 0 or not (rest == "" or (rest.startswith(":") and rest[1:].isdigit())):
            return h  # "[::1]evil.example" is no loopback name
        return h[1:end]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(backend: Any, parser: RequestParser, api_key: Optional[str] = None, batch_window_s: float = 0.005,
               weights_dir: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_json_depth: int = DEFAULT_MAX_JSON_DEPTH, parse_threads: int = 4,
               allowed_hosts: Optional[tuple[str, ...]] = None):
    """The FastAPI app around a backend (docs/CONTRACTS.md, docs/SECURITY.md).

    ``weights_dir``: the only folder the ``file`` weight transport reads from (None: the transport is
    off). Bodies over ``max_body_bytes`` get 413 before they are parsed (counted as they arrive, so a
    missing or wrong Content-Length changes nothing); POSTs need ``Content-Type: application/json``
    (415); JSON deeper than ``max_json_depth`` gets 400. Requests are parsed and tokenised on
    ``parse_threads`` threads of their own, never on the event loop. A request whose ``Origin``
    (sent by browsers) is not the server itself gets 403; with ``allowed_hosts`` (a loopback server:
    its own names) a ``Host`` header naming anything else gets 421, which stops a web page from
    reaching a local server through DNS rebinding."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dirl.rollout.weights import PayloadError

    app = FastAPI(title="dirl rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    state = SleepState()
    lock = threading.Lock()
    worker = BatchWorker(backend, state, lock, window_s=batch_window_s)
    parse_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parse_threads),
                                                       thread_name_prefix="dirl-parse")
    app.state.backend, app.state.worker, app.state.sleep_state = backend, worker, state
    weights_dir = os.path.realpath(weights_dir) if weights_dir else None

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug, never the request's fault
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def refusal(request: Request) -> Optional[JSONResponse]:
        """The answer to a request refused from its headers alone, or None."""
        host = request.headers.get("host", "")
        if allowed_hosts is not None and _host_name(host) not in allowed_hosts:
            return error(421, f"Host header {host[:64]!r} does not name this server")
        origin = request.headers.get("origin")
        if origin is not None:
            try:
                netloc = urlsplit(origin).netloc.lower()
            except ValueError:  # "http://[": no origin this server could be
                netloc = None
            if netloc != host.lower():
                return error(403, f"cross-origin request from {origin[:64]!r} refused")
        if api_key and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
        if request.method == "POST":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error(415, f"POST bodies must be sent as 'Content-Type: application/json', "
                                  f"got {ctype[:64] or 'none'!r}")
            length = request.headers.get("content-length")
            if length is not None and (not length.strip().isascii() or not length.strip().isdigit()
                                       or int(length) > max_body_bytes):
                return error(413, f"request body over the server's limit of {max_body_bytes} bytes "
                                  "(dirl serve --max-body-bytes)")
        return None

    class CheckRequest:
        """The header checks, as a plain ASGI middleware: the app gets the server's own ``receive``,
        so a handler can see its client disconnect (Starlette's ``BaseHTTPMiddleware`` hides that)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                refused = refusal(Request(scope))
                if refused is not None:
                    await refused(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(CheckRequest)

    async def read_json(request: Request, allow_empty: bool = False):
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: Content-Length may be absent or wrong
            size += len(chunk)
            if size > max_body_bytes:
                raise BodyError(413, f"request body over the server's limit of {max_body_bytes} bytes "
                                     "(dirl serve --max-body-bytes)")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        if not body.strip():
            if allow_empty:
                return {}
            raise BodyError(400, "empty body; expected a JSON object")
        if len(body) > (1 << 20):  # large bodies (inline weights) are decoded off the event loop
            return await asyncio.get_running_loop().run_in_executor(parse_pool, parse_json_body, body, max_json_depth)
        return parse_json_body(body, max_json_depth)

    def info() -> dict:
        out = dict(backend.info())
        # the backend's own view of what sleeps (it may put more to sleep than asked, or wake the
        # weights for an update); the server's copy only when the backend reports none
        reported = out.get("asleep")
        out["asleep"] = ({k: bool(v) for k, v in reported.items()} if isinstance(reported, dict)
                         else dict(state.asleep))
        out["stats"] = dict(worker.stats)  # engine calls vs HTTP calls shows the batching
        out["weights_dir"] = weights_dir
        out["limits"] = {"max_body_bytes": max_body_bytes, "max_json_depth": max_json_depth,
                         **parser.limits()}
        return out

    def parse_generate(body: Any) -> tuple[list, bool]:
        batch = isinstance(body, dict) and "requests" in body
        if batch:
            extra = sorted(set(body) - {"requests"})
            if extra:
                raise RequestError(f"unknown field {str(extra[0])[:64]!r} next to 'requests'")
            if not isinstance(body["requests"], list) or not body["requests"]:
                raise RequestError("'requests' must be a non-empty list of request objects")
            if len(body["requests"]) > MAX_BATCH_REQUESTS:
                raise RequestError(f"'requests' holds {len(body['requests'])} requests; at most "
                                   f"{MAX_BATCH_REQUESTS} per call")
            return parser.parse_many(body["requests"]), True
        return [parser.parse(body)], False

    def status_of(e: BaseException) -> int:
        if isinstance(e, BodyError):
            return e.status
        if isinstance(e, (RequestError, PayloadError)):
            return 400
        if isinstance(e, StateError):
            return 409
        return 500

    def answer(e: BaseException) -> JSONResponse:
        status = status_of(e)
        msg = str(e) if status < 500 else f"internal error: {type(e).__name__}: {e}"
        return error(status, msg)

    @app.get("/health")
    async def health(request: Request):
        # the pid lets a launcher tell its own server from another process answering on the port;
        # a pid can be read (and answered) by anyone, so a launcher that gave its server a key also
        # sends a challenge, and only the holder of the key can answer it (health_proof)
        out: dict = {"status": "ok", "pid": os.getpid()}
        challenge = request.headers.get(CHALLENGE_HEADER)
        if challenge is not None and api_key:
            out["proof"] = health_proof(api_key, challenge[:MAX_CHALLENGE_CHARS])
        return out

    @app.get("/info")
    async def get_info():
        return info()

    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = await read_json(request)
            # tokenising a long prompt takes time: never on the event loop
            reqs, batch = await asyncio.get_running_loop().run_in_executor(parse_pool, parse_generate, body)
            state.check_awake()
            fut = worker.submit(reqs)
            waiting = asyncio.wrap_future(fut)
            # a client that goes away (closed, timed out, killed) has its requests dropped: the engine
            # stops decoding them, rather than spend the batch's rows on answers nobody reads
            while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    worker.cancel(fut)
                    waiting.cancel()
                    return Response(status_code=499)  # nobody reads it
            results = waiting.result()
        except Exception as e:  # noqa: BLE001 - every error is a JSON answer; the server keeps serving
            return answer(e)
        return {"results": results} if batch else results[0]

    def _sleep(level: int) -> dict:
        worker.paused.set()  # the running batch finishes what it holds; new requests wait
        try:
            with lock:
                backend.sleep(level)
                state.sync(backend, {"kv_cache": True, "weights": level == 2 or state.asleep["weights"]})
        finally:
            worker.paused.clear()
        return {"ok": True, "asleep": dict(state.asleep)}

    def _wakeup(tags: list[str]) -> dict:
        with lock:
            try:
                backend.wakeup(tags)
            finally:
                state.sync(backend, {k: v and k not in tags for k, v in state.asleep.items()})
        return {"ok": True, "asleep": dict(state.asleep)}

    def refuse_rest(finished: bool) -> None:
        """A segment refused before the backend saw it refuses the rest of its update, as one the
        backend refuses does: else a later finishing segment would apply the update without it."""
        refuse = getattr(backend, "refuse_update", None)
        if refuse is not None and state.asleep["kv_cache"]:  # awake: no update is open
            refuse(finished)

    def _update(body: Any) -> dict:
        from dirl.rollout.weights import check_payload, load_payload

        with lock:
            try:
                payload = check_payload(body)  # a bad body is a 400 whatever the state
            except Exception:
                # only an explicit false says more segments follow (with staged ones, refused anyway)
                refuse_rest(not isinstance(body, dict) or body.get("finished", True) is not False)
                raise
            if not state.asleep["kv_cache"]:
                raise StateError("update_weights needs the KV cache asleep: POST /sleep first")
            try:
                if payload["transport"] == "ipc" and hasattr(backend, "update_weights_ipc"):
                    backend.update_weights_ipc(payload, payload["finished"])
                    n = sum(len(b.entries) for b in payload["ipc_buckets"])
                else:
                    pairs = load_payload(payload, device=getattr(backend, "device", None), weights_dir=weights_dir)
                    backend.update_weights(pairs, payload["finished"])
                    n = len(pairs)
                    del pairs  # an ipc segment's views: the trainer may free its buckets once we answer
            except Exception:  # unreadable payload, refused by the backend, or a failure while loading
                refuse_rest(payload["finished"])
                raise
            finally:
                state.sync(backend, state.asleep)  # e.g. LMDeploy wakes its weights to load them
        return {"ok": True, "tensors": n, "finished": payload["finished"], "asleep": dict(state.asleep)}

    async def control(request: Request, fn, parse):
        try:
            arg = parse(await read_json(request, allow_empty=True))
            return await run_in_threadpool(fn, arg)
        except ValueError as e:  # RequestError, PayloadError, unknown parameter or shape
            return error(400, str(e))
        except Exception as e:  # noqa: BLE001
            return answer(e)

    def parse_sleep(body: Any) -> int:
        _only(body, ("level",))
        level = body.get("level", 1)
        if not isinstance(level, int) or isinstance(level, bool) or level not in (1, 2):  # 2.0 == 2: not a level
            raise RequestError(f"'level' must be 1 or 2, got {str(level)[:64]!r}")
        return level

    def parse_wakeup(body: Any) -> list[str]:
        _only(body, ("tags",))
        tags = body.get("tags")
        if tags is None:
            return ["weights", "kv_cache"]
        if not isinstance(tags, list) or not tags or any(t not in ("weights", "kv_cache") for t in tags):
            raise RequestError(f"'tags' must be a non-empty list of 'weights' / 'kv_cache', got {str(tags)[:64]!r}")
        return [t for t in ("weights", "kv_cache") if t in tags]  # weights first

    @app.post("/sleep")
    async def sleep(request: Request):
        return await control(request, _sleep, parse_sleep)

    @app.post("/wakeup")
    async def wakeup(request: Request):
        return await control(request, _wakeup, parse_wakeup)

    @app.post("/update_weights")
    async def update_weights(request: Request):
        return await control(request, _update, lambda body: body)  # checked in _update, under the lock

    return app


def _only(body: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object")
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise RequestError(f"unknown field {str(extra[0])[:64]!r} (valid fields: {', '.join(allowed)})")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def read_api_key(arg_key: Optional[str], key_file: Optional[str], environ: Optional[dict] = None) -> Optional[str]:
    """The server's key: ``--api-key``, else ``--api-key-file`` (its first line), else
    ``$DIRL_SERVER_API_KEY``; ``None`` when none is given. Giving two is a :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    if arg_key is not None and key_file is not None:
        raise ConfigError("give one of --api-key and --api-key-file")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file '{key_file}': cannot be read "
                              f"({getattr(e, 'strerror', None) or type(e).__name__})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file '{key_file}': the file is empty")
        return key
    if arg_key is not None:
        if not arg_key.strip():
            raise ConfigError("--api-key: the key is empty")
        return arg_key.strip()
    env_key = (environ.get(API_KEY_ENV) or "").strip()
    return env_key or None


ACCESS_LOG_ENV = "DIRL_SERVER_ACCESS_LOG"


def add_access_log(app) -> None:
    """One stdout line per request handled, in the order they finish: ``dirl serve: POST /sleep 200``
    (no bodies, no keys). The server's log file then shows the order of a trainer's calls."""

    class AccessLog:  # plain ASGI, like the header checks (a handler still sees its client go)
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            status = []

            async def send_noting_status(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            try:
                await self.inner(scope, receive, send_noting_status)
            except Exception:
                # a bug in a handler: the outermost error middleware (outside this one) answers 500
                if not status:
                    status.append(500)
                raise
            finally:
                print(f"dirl serve: {scope['method']} {scope['path']} {status[0] if status else '-'}", flush=True)

    app.add_middleware(AccessLog)


def cli_main(argv: list[str]) -> int:
    die_with_parent()  # first: a server started by a trainer or evaluator never outlives it
    from dirl.rollout.cli import (add_decoding_args, add_runtime_args, apply_threads, decoding_from_args,
                                  default_device, parse_backend_options)
    from dirl.rollout.weights import WEIGHTS_DIR_ENV

    p = argparse.ArgumentParser(prog="dirl serve", description="Start a rollout server (HTTP); see docs/SECURITY.md.")
    p.add_argument("--model", required=True, help="model folder (SDAR layout), training checkpoint or run folder")
    p.add_argument("--backend", default="reference", choices=["reference", "lmdeploy"])
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; any other "
                                                       "needs an API key or --insecure)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (visible in the process list: prefer "
                                                   f"--api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the key from the first line of FILE")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback interface without an API key")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help=f"the only folder the 'file' weight transport reads from (default ${WEIGHTS_DIR_ENV}; "
                        "unset: the file transport is off)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"refuse request bodies over this size with 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="refuse text prompts longer than this before tokenising (default 8 per token of the "
                        "model's context)")
    add_runtime_args(p)
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the backend's own (repeatable; VALUE read as YAML: 0.3, true, null), "
                        "e.g. lmdeploy's cache_max_entry_count=0.3, max_context, eager_mode, "
                        "weight_segment_bytes; overrides --dtype / --max-batch-size")
    p.add_argument("--access-log", action="store_true",
                   help=f"print one line per HTTP request handled (method, path, status; also ${ACCESS_LOG_ENV}=1)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first waiting request waits for others to join its batch")
    add_decoding_args(p)
    args = p.parse_args(argv)
    args.host = args.host.strip("[]")  # an IPv6 address with or without its URL brackets
    api_key = read_api_key(args.api_key, args.api_key_file)
    if not is_loopback(args.host) and not api_key and not args.insecure:
        raise ConfigError(f"--host {args.host}: listening beyond this machine needs an API key (--api-key-file "
                          f"FILE or ${API_KEY_ENV}); --insecure to allow it without one")
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if not 0 <= args.batch_window_ms <= 1000:  # also nan; inf or a huge one kills the batch worker's queue.get
        raise ConfigError(f"--batch-window-ms must be in [0, 1000], got {args.batch_window_ms:g}")
    if args.max_prompt_chars is not None and args.max_prompt_chars < 1:
        raise ConfigError(f"--max-prompt-chars must be at least 1, got {args.max_prompt_chars}")
    weights_dir = args.weights_dir or os.environ.get(WEIGHTS_DIR_ENV) or None
    if weights_dir is not None and not os.path.isdir(weights_dir):
        raise ConfigError(f"--weights-dir '{weights_dir}' is not a folder")
    args.model = str(model_folder(args.model, key="--model"))  # also a checkpoint or run folder
    options = parse_backend_options(args.backend_option)
    decoding = decoding_from_args(args)
    apply_threads(args.threads)
    device = args.device or default_device()

    kwargs: dict[str, Any] = {"dtype": args.dtype, "max_batch_size": args.max_batch_size, **options}
    backend = get_backend(args.backend, args.model, decoding=decoding, device=device, **kwargs)
    parser = make_parser(backend, decoding, args.model)
    if args.max_prompt_chars is not None:
        parser.max_prompt_chars = args.max_prompt_chars
    loopback = is_loopback(args.host)
    app = create_app(backend, parser, api_key=api_key, batch_window_s=args.batch_window_ms / 1000,
                     weights_dir=weights_dir, max_body_bytes=args.max_body_bytes,
                     allowed_hosts=(LOOPBACK_NAMES + (_host_name(args.host),)) if loopback else None)

    if args.access_log or os.environ.get(ACCESS_LOG_ENV, "") == "1":
        add_access_log(app)

    import uvicorn

    info = backend.info()
    print(f"dirl serve: {info.get('engine')} on {device}, block_size {info['block_size']}, "
          f"{info['unmasking_strategy']}, http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
          + (" (API key required)" if api_key else " (no API key)"), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

