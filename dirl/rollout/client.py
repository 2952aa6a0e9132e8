"""Client of a pool of rollout servers, used by the trainers and the evaluator.

* ``generate(requests)`` returns one trajectory per request, in input order, matched by
  ``request_id`` (assigned when missing) and never by position. Requests travel in small batches,
  many in flight at once, pulled from one shared queue by every server of the pool, so a fast server
  takes more. Connection errors, timeouts and 5xx answers are retried with exponential backoff,
  on any server; a request that still fails raises :class:`RolloutError` naming it. A 4xx answer is
  the request's fault: it raises at once with the server's reason.
* ``push_weights(model_or_state_dict)`` runs sleep → update_weights (segmented, ``finished`` on the
  last) → wakeup on every server (SPEC section 8). Segments are built one at a time and each is sent
  to every server before the next exists, so a push holds one segment (a file, its bytes, or its
  CUDA buckets for ``ipc``) beyond the weights themselves.

The core is async (``agenerate``, ``apush_weights`` ...); the plain methods wrap it and also work when
called from inside a running event loop. A client owns one ``httpx.AsyncClient`` and one event loop
(on a daemon thread) for its whole life, made at its first call: ``close()`` (or ``with
RolloutClient(...) as client:``, or ``async with``) closes both. It may be used from several threads
at once; in a child process forked after its first call it makes its own loop and connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import threading
import uuid
import weakref
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class RolloutError(RuntimeError):
    """A request (or a server operation) that failed for good."""

    def __init__(self, message: str, request_ids: Optional[list[str]] = None, url: Optional[str] = None):
        super().__init__(message)
        self.request_ids = list(request_ids or [])
        self.url = url


class _Retry(Exception):
    pass


class _Runtime:
    """The event loop (on a daemon thread) and the ``httpx.AsyncClient`` of one client.

    Every HTTP call of a :class:`RolloutClient` runs on this loop, whichever thread or event loop
    called it, so one connection pool (one SSL context, kept-alive connections) serves the client's
    whole life. ``shutdown`` closes the HTTP client on the loop, then stops and joins the thread.
    """

    def __init__(self, make_http):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._make_http = make_http
        self.http = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="dirl-client", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def client(self):
        """The HTTP client; only called on the loop's own thread."""
        if self.http is None:
            self.http = self._make_http()
        return self.http

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @staticmethod
    def shutdown(rt: "_Runtime") -> None:
        """Close the HTTP client and stop the loop (a no-op in a forked child: both are the parent's)."""
        if rt.pid != os.getpid() or not rt.thread.is_alive():
            return

        async def close_http():
            if rt.http is not None:
                await rt.http.aclose()
                rt.http = None

        try:
            rt.submit(close_http()).result(timeout=30)
        except Exception:  # noqa: BLE001 - closing is best effort; the loop still stops
            pass
        rt.loop.call_soon_threadsafe(rt.loop.stop)
        if threading.current_thread() is not rt.thread:
            rt.thread.join(30)
        if not rt.thread.is_alive():
            rt.loop.close()


class RolloutClient:
    """``RolloutClient(urls, api_key=None, max_concurrency=8, retries=3, timeout=600)``.

    ``max_concurrency``: HTTP calls in flight per server; ``batch_size``: requests per call;
    ``retries``: further attempts after the first (a chunk that fails on one server is first
    handed to the others that are up; an attempt is counted once every one of them has failed it);
    ``timeout``: seconds per HTTP call.
    """

    def __init__(self, urls: list[str] | str, api_key: Optional[str] = None, max_concurrency: int = 8,
                 retries: int = 3, timeout: float = 600.0, batch_size: int = 16, backoff: float = 0.5):
        if isinstance(urls, str):
            urls = [urls]
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.urls = urls
        self.api_key = api_key
        self.max_concurrency = max(1, int(max_concurrency))
        self.retries = max(0, int(retries))
        self.timeout = timeout
        self.batch_size = max(1, int(batch_size))
        self.backoff = backoff
        self._lock = threading.Lock()
        self._rt: Optional[_Runtime] = None
        self._finalizer = None
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------
    def _new_http(self):
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency * len(self.urls) + len(self.urls))
        return httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits)

    def _runtime(self) -> _Runtime:
        with self._lock:
            if self._closed:
                raise RuntimeError("this RolloutClient is closed")
            rt = self._rt
            if rt is not None and rt.pid != os.getpid():  # forked: the loop thread stayed in the parent
                if self._finalizer is not None:
                    self._finalizer.detach()
                rt = self._rt = None
            if rt is None:
                rt = self._rt = _Runtime(self._new_http)
                self._finalizer = weakref.finalize(self, _Runtime.shutdown, rt)
            return rt

    def _http(self):
        """The client's ``httpx.AsyncClient`` (called on the client's own loop)."""
        return self._runtime().client()

    def _sync(self, coro_fn, *args):
        """Run ``coro_fn(*args)`` on the client's loop and wait for it (from any thread)."""
        rt = self._runtime()
        if rt.in_loop():
            raise RuntimeError("a RolloutClient's blocking methods cannot be called from its own event loop; "
                               "await the a-prefixed methods instead")
        fut = rt.submit(coro_fn(*args))
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    async def _async(self, coro_fn, *args):
        """Await ``coro_fn(*args)`` on the client's loop from any event loop."""
        rt = self._runtime()
        if rt.in_loop():
            return await coro_fn(*args)
        return await asyncio.wrap_future(rt.submit(coro_fn(*args)))

    def close(self) -> None:
        """Close the HTTP client and stop the client's event loop; later calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            rt, self._rt = self._rt, None
            fin, self._finalizer = self._finalizer, None
        if fin is not None:
            fin()  # _Runtime.shutdown(rt), once
        elif rt is not None:
            _Runtime.shutdown(rt)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "RolloutClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @staticmethod
    def _reason(resp) -> str:
        try:
            return str(resp.json().get("error", resp.text))
        except Exception:  # noqa: BLE001
            return resp.text[:500]

    async def _call(self, client, method: str, url: str, path: str, body: Any = None) -> Any:
        """One HTTP call with retries (connection errors, timeouts, 5xx); a 4xx raises at once."""
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                resp = await client.request(method, url + path, json=body)
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code < 500 and resp.status_code != 429:
                    raise RolloutError(f"{url}{path}: HTTP {resp.status_code}: {self._reason(resp)}", url=url)
                err = f"HTTP {resp.status_code}: {self._reason(resp)}"
            except httpx.TransportError as e:
                err = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise RolloutError(f"{url}{path} failed after {self.retries + 1} attempts: {err}", url=url)

    # -- generate ------------------------------------------------------------------------------
    def prepare(self, requests: Iterable[dict]) -> list[dict]:
        """Copies of the requests, each with a ``request_id`` (assigned when missing), all distinct."""
        out, seen = [], set()
        for r in requests:
            if not isinstance(r, dict):
                raise TypeError(f"a request must be a dict, got {type(r).__name__}")
            r = copy.copy(r)
            if r.get("request_id") is None:
                r["request_id"] = uuid.uuid4().hex
            rid = r["request_id"]
            if rid in seen:
                raise ValueError(f"duplicate request_id {rid!r}")
            seen.add(rid)
            out.append(r)
        return out

    async def agenerate(self, requests: Iterable[dict]) -> list[dict]:
        return await self._async(self._agenerate, requests)

    async def _agenerate(self, requests: Iterable[dict]) -> list[dict]:
        reqs = self.prepare(requests)
        if not reqs:
            return []
        chunks = [reqs[i:i + self.batch_size] for i in range(0, len(reqs), self.batch_size)]
        todo: asyncio.Queue = asyncio.Queue()
        for c in chunks:
            todo.put_nowait((c, 0, frozenset()))  # (chunk, attempts counted, servers it failed on since)
        results: dict[str, dict] = {}
        failure: list[BaseException] = []
        done = asyncio.Event()
        remaining = [len(chunks)]
        down_until = {u: 0.0 for u in self.urls}  # a server that failed is left alone for a while
        streak = {u: 0 for u in self.urls}
        loop = asyncio.get_running_loop()

        import httpx

        async def post(client, url: str, chunk: list[dict]) -> list[dict]:
            body = chunk[0] if len(chunk) == 1 else {"requests": chunk}
            try:
                resp = await client.post(url + "/generate", json=body)
            except httpx.TransportError as e:
                now = loop.time()
                if now >= down_until[url]:  # calls that were in flight together count as one failure
                    streak[url] += 1
                    down_until[url] = now + self.backoff * 2 ** min(streak[url], 6)
                if all(streak[u] > self.retries for u in self.urls):
                    # every server has failed to answer `retries + 1` times in a row, each after a
                    # longer pause: give up now rather than wait out every chunk's own retries
                    ids = [r["request_id"] for r in chunk]
                    raise RolloutError(f"request {', '.join(map(repr, ids))} failed: no rollout server answers "
                                       f"({len(self.urls)} tried, {self.retries + 1} times each); last error: "
                                       f"{url}: {type(e).__name__}: {e}", request_ids=ids, url=url) from None
                raise _Retry(f"{url}: {type(e).__name__}: {e}") from None
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Retry(f"{url}: HTTP {resp.status_code}: {self._reason(resp)}")
            streak[url] = 0
            if resp.status_code >= 400:
                ids = [r["request_id"] for r in chunk]
                raise RolloutError(f"request {', '.join(map(repr, ids))} refused by {url}: HTTP {resp.status_code}: "
                                   f"{self._reason(resp)}", request_ids=ids, url=url)
            data = resp.json()
            got = [data] if len(chunk) == 1 else data.get("results")
            want = [r["request_id"] for r in chunk]
            if not isinstance(got, list) or sorted(g.get("request_id") for g in got) != sorted(want):
                raise _Retry(f"{url}: the answer does not match the request ids {want}")
            return got

        def elsewhere(failed_on: frozenset) -> bool:
            """Whether a server this chunk has not failed on since its last counted attempt is up."""
            now = loop.time()
            return any(u not in failed_on and down_until[u] <= now for u in self.urls)

        async def worker(client, url: str):
            while not done.is_set():
                wait = down_until[url] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                chunk, attempt, failed_on = await todo.get()
                # a worker that was waiting for work when its server went down, or a chunk that
                # already failed here while another server can take it: leave it to the others
                if down_until[url] > loop.time() or (url in failed_on and elsewhere(failed_on)):
                    todo.put_nowait((chunk, attempt, failed_on))
                    await asyncio.sleep(max(down_until[url] - loop.time(), self.backoff))
                    continue
                try:
                    for res in await post(client, url, chunk):
                        results[res["request_id"]] = res
                except _Retry as e:
                    failed_on = failed_on | {url}
                    if elsewhere(failed_on):  # another server has not tried it yet: not an attempt
                        todo.put_nowait((chunk, attempt, failed_on))
                        continue
                    if attempt >= self.retries:
                        ids = [r["request_id"] for r in chunk]
                        failure.append(RolloutError(
                            f"request {', '.join(map(repr, ids))} failed after {attempt + 1} attempts; last error: {e}",
                            request_ids=ids))
                        done.set()
                        return
                    await asyncio.sleep(self.backoff * (2 ** attempt))
                    todo.put_nowait((chunk, attempt + 1, frozenset({url})))
                    continue
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # noqa: BLE001 - ends the whole call
                    failure.append(e)
                    done.set()
                    return
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        client = self._http()
        tasks = [asyncio.create_task(worker(client, u)) for u in self.urls for _ in range(self.max_concurrency)]
        try:
            await done.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failure:
            raise failure[0]
        missing = [r["request_id"] for r in reqs if r["request_id"] not in results]
        if missing:  # cannot happen unless a server misbehaves; never return shifted results
            raise RolloutError(f"no result for request {', '.join(map(repr, missing[:5]))}", request_ids=missing)
        return [results[r["request_id"]] for r in reqs]

    def generate(self, requests: Iterable[dict]) -> list[dict]:
        """Trajectories in the order of ``requests`` (see the module docstring)."""
        return self._sync(self._agenerate, requests)

    # -- control -------------------------------------------------------------------------------
    async def _all(self, method: str, path: str, body: Any = None) -> list[Any]:
        return await self._async(self._all_here, method, path, body)

    async def _all_here(self, method: str, path: str, body: Any = None) -> list[Any]:
        client = self._http()
        return list(await asyncio.gather(*(self._call(client, method, u, path, body) for u in self.urls)))

    async def ainfo(self) -> list[dict]:
        return await self._all("GET", "/info")

    def info(self) -> list[dict]:
        """``/info`` of every server, in the order of ``urls``."""
        return self._sync(self._all_here, "GET", "/info")

    async def ahealth(self) -> list[dict]:
        return await self._all("GET", "/health")

    def health(self) -> list[dict]:
        return self._sync(self._all_here, "GET", "/health")

    async def asleep(self, level: int = 1) -> list[dict]:
        return await self._all("POST", "/sleep", {"level": level})

    def sleep(self, level: int = 1) -> list[dict]:
        return self._sync(self._all_here, "POST", "/sleep", {"level": level})

    async def awakeup(self, tags: Optional[list[str]] = None) -> list[dict]:
        return await self._all("POST", "/wakeup", {"tags": tags} if tags else {})

    def wakeup(self, tags: Optional[list[str]] = None) -> list[dict]:
        return self._sync(self._all_here, "POST", "/wakeup", {"tags": tags} if tags else {})

    async def aupdate_weights(self, payload: dict) -> list[dict]:
        return await self._all("POST", "/update_weights", payload)

    def update_weights(self, payload: dict) -> list[dict]:
        """Send one ``/update_weights`` segment (see :mod:`dirl.rollout.weights`) to every server."""
        return self._sync(self._all_here, "POST", "/update_weights", payload)

    # -- weights -------------------------------------------------------------------------------
    def choose_transport(self, pairs: list, infos: Optional[list[dict]] = None) -> str:
        """``ipc`` when the tensors are on CUDA and every server is local and on CUDA; ``file`` when
        every server is local and reads weight files from one folder (``dirl serve --weights-dir``);
        ``inline`` otherwise."""
        local = all(urlparse(u).hostname in _LOCAL_HOSTS for u in self.urls)
        on_cuda = bool(pairs) and all(t.device.type == "cuda" for _, t in pairs)
        if local and on_cuda and infos and all(str(i.get("device", "")).startswith("cuda") for i in infos):
            return "ipc"
        dirs = {i.get("weights_dir") for i in infos or [{}]}
        return "file" if local and len(dirs) == 1 and None not in dirs else "inline"

    async def apush_weights(self, weights: Any, transport: str = "auto", segment_bytes: Optional[int] = None,
                            sleep_level: int = 1, tmp_dir: Optional[str] = None, sleep_first: bool = True) -> dict:
        return await self._async(self._apush_weights, weights, transport, segment_bytes, sleep_level, tmp_dir,
                                 sleep_first)

    async def _apush_weights(self, weights: Any, transport: str, segment_bytes: Optional[int], sleep_level: int,
                             tmp_dir: Optional[str], sleep_first: bool = True) -> dict:
        from dirl.rollout import weights as W

        pairs = W.named_tensors(weights)
        infos = await self.ainfo() if transport in ("auto", "file") else None
        if transport == "auto":
            transport = self.choose_transport(pairs, infos)
        W.check_transport(pairs, transport)  # before any server sleeps
        if transport == "file":
            dirs = {i.get("weights_dir") for i in infos}
            if None in dirs:
                raise W.PayloadError("the file transport needs servers started with --weights-dir DIR; "
                                     "use 'inline' or 'ipc'")
            if tmp_dir is None:
                if len(dirs) != 1:
                    raise W.PayloadError("the servers read weight files from different folders; give tmp_dir")
                tmp_dir = next(iter(dirs))
        groups = W.segments(pairs, segment_bytes or W.default_segment_bytes(transport))

        client = self._http()
        async def everywhere(step: str, path: str, body: dict) -> None:
            # every server answers (or fails) before the caller moves on: an ipc segment's
            # buckets are freed right after, and other servers may still be reading them
            async def one(url: str):
                try:
                    await self._call(client, "POST", url, path, body)
                except RolloutError as e:
                    raise RolloutError(f"push_weights to {url} failed at {step} (the server may be left "
                                       f"asleep): {e}", url=url) from None

            got = await asyncio.gather(*(one(u) for u in self.urls), return_exceptions=True)
            errors = [g for g in got if isinstance(g, BaseException)]
            if errors:
                raise errors[0]

        if sleep_first:  # False: the caller put the servers to sleep already (the RL step's hand-off)
            await everywhere("sleep", "/sleep", {"level": sleep_level})
        # one segment at a time: built, sent to every server, freed (file removed, CUDA buckets
        # released) before the next is built
        stream = W.iter_payloads(groups, transport, tmp_dir=tmp_dir,
                                 bucket_bytes=segment_bytes or W.DEFAULT_SEGMENT_BYTES)
        try:
            for i, payload in enumerate(stream):
                await everywhere(f"update_weights segment {i + 1}/{len(groups)}", "/update_weights", payload)
                del payload
        finally:
            stream.close()
        await everywhere("wakeup", "/wakeup", {})
        return {"transport": transport, "segments": len(groups), "tensors": len(pairs), "servers": len(self.urls)}

    def push_weights(self, weights: Any, transport: str = "auto", segment_bytes: Optional[int] = None,
                     sleep_level: int = 1, tmp_dir: Optional[str] = None, sleep_first: bool = True) -> dict:
        """sleep → update_weights (segmented) → wakeup on every server. ``weights``: a model
        (SDARModel, HF, DDP-wrapped) or a state dict. ``transport``: auto, file, inline or ipc."""
        return self._sync(self._apush_weights, weights, transport, segment_bytes, sleep_level, tmp_dir, sleep_first)
