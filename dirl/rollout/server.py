"""The rollout server: ``dirl serve --model DIR --backend reference|lmdeploy [--host --port --api-key]
[--backend-option KEY=VALUE ...]``.

HTTP contract (docs/CONTRACTS.md):

* ``GET /health`` (never needs the API key), ``GET /info`` (its ``asleep`` is what the backend itself
  reports: LMDeploy's sleep level 1 also offloads the weights);
* ``POST /generate``: one request object, or ``{"requests": [...]}`` → ``{"results": [...]}``;
* ``POST /sleep`` ``{"level": 1|2}``, ``POST /wakeup`` ``{"tags": [...]}``, ``POST /update_weights``
  (a segment, see :mod:`dirl.rollout.weights`), with the state machine of SPEC section 8: weights can
  only be updated while the KV cache is asleep, and nothing is generated while anything is asleep
  (HTTP 409 otherwise).

Malformed requests get a 4xx with ``{"error": reason}``; the server keeps serving. Generation runs on
one worker thread; requests that arrive while it is busy (or within a few milliseconds of each
other) are decoded together in one engine batch.

:mod:`dirl.rollout.launch` starts this server in a subprocess for the trainers and the evaluator.
"""

# No "from __future__ import annotations": FastAPI must see the real `Request` class of the
# handlers defined inside create_app.
import argparse
import asyncio
import concurrent.futures
import hmac
import json
import os
import queue
import threading
import time
from typing import Any, Optional

from dirl.config import DecodingConfig
from dirl.rollout.backend import RequestError, RequestParser, StateError
from dirl.rollout.backends import get_backend
from dirl.rollout.launch import ServerHandle, die_with_parent, free_port, start_server  # noqa: F401 (launching lives there)

API_KEY_ENV = "DIRL_API_KEY"
SERVER_API_KEY_ENV = "DIRL_SERVER_API_KEY"  # how a launching trainer or evaluator hands over its key


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


class BatchWorker:
    """One thread that decodes everything waiting in one engine batch.

    The first waiting request waits ``window_s`` for others to join. With a backend that has
    ``generate_continuous`` (the reference engine), requests that arrive while a batch runs join it
    as soon as a row is free; with others they form the next batch. Results are handed back per
    HTTP call by position in the batch, checked against the request ids.
    """

    def __init__(self, backend: Any, state: "SleepState", lock: threading.Lock, window_s: float = 0.005):
        self.backend = backend
        self.state = state
        self.lock = lock
        self.window_s = window_s
        self.queue: "queue.Queue[tuple[list, concurrent.futures.Future]]" = queue.Queue()
        self.paused = threading.Event()  # set while a sleep waits for the running batch: admit no more
        self.stats = {"engine_calls": 0, "requests": 0, "http_calls": 0}
        self.thread = threading.Thread(target=self._run, name="dirl-generate", daemon=True)
        self.thread.start()

    def submit(self, requests: list) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((requests, fut))
        return fut

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            while True:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._generate(items)

    def _generate(self, items: list) -> None:
        reqs: list = []
        owner: list[tuple[int, int]] = []  # batch index -> (item, position in the item)
        got: list[list] = []
        open_items: set[int] = set()

        def add(new_items: list) -> list:
            added = []
            for it in new_items:
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

        def on_result(i: int, res: dict) -> None:
            k, j = owner[i]
            want = items_all[k][0][j].request_id
            if res.get("request_id") != want:
                raise RuntimeError(f"backend answered request {res.get('request_id')!r} in the place of {want!r}")
            got[k][j] = res
            if all(x is not None for x in got[k]):
                open_items.discard(k)
                fut = items_all[k][1]
                if not fut.done():  # a caller that went away cancelled its future
                    fut.set_result(got[k])

        def more() -> list:
            return [] if self.paused.is_set() else add(self._drain())

        items_all: list = []
        add(items)
        self.stats["engine_calls"] += 1
        try:
            with self.lock:
                self.state.check_awake()
                if hasattr(self.backend, "generate_continuous"):
                    self.backend.generate_continuous(list(reqs), more, on_result)
                else:
                    for i, res in enumerate(self.backend.generate(list(reqs))):
                        on_result(i, res)
            if open_items:
                raise RuntimeError("the backend returned fewer results than requests")
        except BaseException as e:  # noqa: BLE001 - handed to every caller still waiting
            for k in sorted(open_items):
                if not items_all[k][1].done():
                    items_all[k][1].set_exception(e)


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


def create_app(backend: Any, parser: RequestParser, api_key: Optional[str] = None, batch_window_s: float = 0.005):
    """The FastAPI app around a backend."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="dirl rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    state = SleepState()
    lock = threading.Lock()
    worker = BatchWorker(backend, state, lock, window_s=batch_window_s)
    app.state.backend, app.state.worker, app.state.sleep_state = backend, worker, state

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
        return await call_next(request)

    async def read_json(request: Request, allow_empty: bool = False):
        body = await request.body()
        if not body.strip():
            if allow_empty:
                return {}
            raise RequestError("empty body; expected a JSON object")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON: {e}") from None

    def info() -> dict:
        out = dict(backend.info())
        # the backend's own view of what sleeps (it may put more to sleep than asked, or wake the
        # weights for an update); the server's copy only when the backend reports none
        reported = out.get("asleep")
        out["asleep"] = ({k: bool(v) for k, v in reported.items()} if isinstance(reported, dict)
                         else dict(state.asleep))
        out["stats"] = dict(worker.stats)  # engine calls vs HTTP calls shows the batching
        return out

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return info()

    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = await read_json(request)
            batch = isinstance(body, dict) and "requests" in body
            if batch:
                extra = sorted(set(body) - {"requests"})
                if extra:
                    raise RequestError(f"unknown field {extra[0]!r} next to 'requests'")
                if not isinstance(body["requests"], list) or not body["requests"]:
                    raise RequestError("'requests' must be a non-empty list of request objects")
                reqs = parser.parse_many(body["requests"])
            else:
                reqs = [parser.parse(body)]
            state.check_awake()
            results = await asyncio.wrap_future(worker.submit(reqs))
        except RequestError as e:
            return error(400, str(e))
        except StateError as e:
            return error(409, str(e))
        except Exception as e:  # noqa: BLE001 - reported, the server keeps serving
            return error(500, f"{type(e).__name__}: {e}")
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

    def _update(payload: dict) -> dict:
        from dirl.rollout.weights import load_payload

        with lock:
            if not state.asleep["kv_cache"]:
                raise StateError("update_weights needs the KV cache asleep: POST /sleep first")
            try:
                if payload["transport"] == "ipc" and hasattr(backend, "update_weights_ipc"):
                    backend.update_weights_ipc(payload, payload["finished"])
                    n = sum(len(b["tensors"]) for b in payload["buckets"])
                else:
                    pairs = load_payload(payload, device=getattr(backend, "device", None))
                    backend.update_weights(pairs, payload["finished"])
                    n = len(pairs)
                    del pairs  # an ipc segment's views: the trainer may free its buckets once we answer
            finally:
                state.sync(backend, state.asleep)  # e.g. LMDeploy wakes its weights to load them
        return {"ok": True, "tensors": n, "finished": payload["finished"], "asleep": dict(state.asleep)}

    async def control(request: Request, fn, parse):
        try:
            arg = parse(await read_json(request, allow_empty=True))
            return await run_in_threadpool(fn, arg)
        except ValueError as e:  # RequestError, PayloadError, unknown parameter or shape
            return error(400, str(e))
        except StateError as e:
            return error(409, str(e))
        except Exception as e:  # noqa: BLE001
            return error(500, f"{type(e).__name__}: {e}")

    def parse_sleep(body: Any) -> int:
        _only(body, ("level",))
        level = body.get("level", 1)
        if level not in (1, 2) or isinstance(level, bool):
            raise RequestError(f"'level' must be 1 or 2, got {level!r}")
        return level

    def parse_wakeup(body: Any) -> list[str]:
        _only(body, ("tags",))
        tags = body.get("tags")
        if tags is None:
            return ["weights", "kv_cache"]
        if not isinstance(tags, list) or not tags or any(t not in ("weights", "kv_cache") for t in tags):
            raise RequestError(f"'tags' must be a non-empty list of 'weights' / 'kv_cache', got {tags!r}")
        return [t for t in ("weights", "kv_cache") if t in tags]  # weights first

    def parse_update(body: Any) -> dict:
        from dirl.rollout.weights import check_payload

        return check_payload(body)

    @app.post("/sleep")
    async def sleep(request: Request):
        return await control(request, _sleep, parse_sleep)

    @app.post("/wakeup")
    async def wakeup(request: Request):
        return await control(request, _wakeup, parse_wakeup)

    @app.post("/update_weights")
    async def update_weights(request: Request):
        return await control(request, _update, parse_update)

    return app


def _only(body: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object")
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise RequestError(f"unknown field {extra[0]!r} (valid fields: {', '.join(allowed)})")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def cli_main(argv: list[str]) -> int:
    die_with_parent()  # first: a server started by a trainer or evaluator never outlives it
    from dirl.rollout.cli import (add_decoding_args, add_runtime_args, apply_threads, decoding_from_args,
                                  default_device, parse_backend_options)

    p = argparse.ArgumentParser(prog="dirl serve", description="Start a rollout server (HTTP).")
    p.add_argument("--model", required=True, help="checkpoint folder (SDAR layout)")
    p.add_argument("--backend", default="reference", choices=["reference", "lmdeploy"])
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require this key (default: ${SERVER_API_KEY_ENV}, else ${API_KEY_ENV}, if set)")
    add_runtime_args(p)
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the backend's own (repeatable; VALUE read as YAML: 0.3, true, null), "
                        "e.g. lmdeploy's cache_max_entry_count=0.3, max_context, eager_mode, "
                        "weight_segment_bytes; overrides --dtype / --max-batch-size")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first waiting request waits for others to join its batch")
    add_decoding_args(p)
    args = p.parse_args(argv)
    options = parse_backend_options(args.backend_option)
    decoding = decoding_from_args(args)
    apply_threads(args.threads)
    api_key = args.api_key or os.environ.pop(SERVER_API_KEY_ENV, None) or os.environ.get(API_KEY_ENV) or None
    device = args.device or default_device()

    kwargs: dict[str, Any] = {"dtype": args.dtype, "max_batch_size": args.max_batch_size, **options}
    backend = get_backend(args.backend, args.model, decoding=decoding, device=device, **kwargs)
    parser = make_parser(backend, decoding, args.model)
    app = create_app(backend, parser, api_key=api_key, batch_window_s=args.batch_window_ms / 1000)

    import uvicorn

    info = backend.info()
    print(f"dirl serve: {info.get('engine')} on {device}, block_size {info['block_size']}, "
          f"{info['unmasking_strategy']}, http://{args.host}:{args.port}"
          + (" (API key required)" if api_key else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

