"""Rollout servers for a trainer or an evaluator: one config, one launcher, one ``/info`` check.

:class:`ServerConfig` is the ``server`` section of both ``dirl rl`` and ``dirl eval``. With
``server.urls`` empty, :func:`open_servers` starts ``dirl serve`` on a free port (one per training
rank), waits for ``/health``, checks every server's ``/info`` against the model (block size, mask
id, dtype, the engine-wide decoding settings) and returns a :class:`Servers` holding the
:class:`~dirl.rollout.client.RolloutClient`; closing it stops what it started.

A server started here

* gets a fresh random API key (``secrets.token_urlsafe``), handed to the child in the environment
  variable ``DIRL_SERVER_API_KEY`` (never on the command line, where ``ps`` shows it) and to the client;
* runs in its own process group and dies with its parent: the server's first act
  (:func:`die_with_parent`, through ``DIRL_SERVER_PARENT_PID``) asks Linux for SIGKILL when the
  thread that started it exits (``PR_SET_PDEATHSIG``), even when the parent is killed with SIGKILL,
  and exits at once if the parent is already gone; :meth:`ServerHandle.stop` ends the whole group;
* is registered for clean-up at interpreter exit, and :func:`stop_on_signals` turns SIGTERM into an
  exception so a terminated ``dirl rl`` / ``dirl eval`` runs its ``finally`` blocks.

Start servers from the main thread (or a thread that lives as long as they should): the
parent-death signal follows the starting thread.
"""

from __future__ import annotations

import atexit
import ctypes
import hmac
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence

import httpx

from dirl.config import ConfigError, DecodingConfig, check_positive
from dirl.rollout.cli import backend_options_to_argv, decoding_to_argv, default_device
from dirl.rollout.client import RolloutClient

API_KEY_ENV = "DIRL_SERVER_API_KEY"
PARENT_PID_ENV = "DIRL_SERVER_PARENT_PID"  # set for a started server: it dies with this process
ENGINE_WIDE = ("denoising_steps", "unmasking_strategy", "confidence_threshold")
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """Rollout servers: given by URL, or started for the run (``urls`` empty)."""

    RENAMED: ClassVar[dict[str, str]] = {"timeout": "server.timeout_s", "startup_timeout": "server.startup_timeout_s"}

    urls: list[str] = field(default_factory=list)  # running servers; empty: start them for the run
    backend: Literal["reference", "lmdeploy"] = "reference"  # of started servers: dirl's engine, or LMDeploy (GPU)
    host: str = "127.0.0.1"  # where a started server listens (IPv6 with or without brackets); beyond loopback needs a key
    port: Optional[int] = None  # a started server's port (None: a free one)
    device: str = "auto"  # auto: a trainer rank's own device; else cuda when present, else cpu
    dtype: str = "auto"  # auto: the model's dtype setting (model.dtype)
    api_key: str = ""  # the key of servers given by URL (started ones get a fresh random key)
    max_batch_size: int = 64  # sequences a server decodes together
    # torch CPU threads of a started server. None: 1 on a CPU device (tiny forwards run fastest on
    # one thread, and the trainer shares the cores), torch's choice elsewhere; 0: torch's choice.
    threads: Optional[int] = None
    # the backend's own options (dirl serve --backend-option), e.g. {cache_max_entry_count: 0.3} for lmdeploy
    backend_options: dict[str, Any] = field(default_factory=dict)
    startup_timeout_s: float = 600.0  # seconds for a started server to load the model
    max_concurrency: int = 8  # HTTP calls in flight per server
    request_batch_size: int = 16  # requests per HTTP call
    # tries again after a connection error, timeout or 5xx; a call that fails on one server goes to
    # the pool's other servers first, and counts as a retry once every server that is up failed it
    retries: int = 3
    timeout_s: float = 3600.0  # seconds per HTTP call


def check_server_config(sc: ServerConfig, prefix: str = "server") -> None:
    for key in ("max_batch_size", "max_concurrency", "request_batch_size", "startup_timeout_s", "timeout_s"):
        check_positive(f"{prefix}.{key}", getattr(sc, key))
    check_positive(f"{prefix}.threads", sc.threads, allow_zero=True)
    check_positive(f"{prefix}.retries", sc.retries, allow_zero=True)
    if sc.port is not None and not 0 < sc.port < 65536:
        raise ConfigError(f"config key '{prefix}.port': must be in 1..65535, got {sc.port!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(sc.device)):
        raise ConfigError(f"config key '{prefix}.device': expected auto, cpu, cuda or cuda:N, got {sc.device!r}")
    if sc.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"config key '{prefix}.dtype': expected auto, float32, bfloat16 or float16, got {sc.dtype!r}")
    backend_options_to_argv(sc.backend_options)  # a value that cannot travel to the server fails here


def server_threads(threads: Optional[int], device: str) -> Optional[int]:
    """torch threads of a started server on ``device``: unset is 1 on CPU, torch's choice (None) elsewhere."""
    if threads is None:
        return 1 if str(device).startswith("cpu") else None
    return threads or None


def server_device(sc: ServerConfig, rank_device: Any = None) -> str:
    """The device of a started server: ``server.device``, or (``auto``) the rank's own device when
    a trainer gives one, else cuda when present, else cpu."""
    if sc.device != "auto":
        return sc.device
    return str(rank_device) if rank_device is not None else default_device()


# --------------------------------------------------------------------------------------------
# One server process
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` (an IPv4 or IPv6 address or a name) right now."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def server_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server listening on ``host`` at: a wildcard
    address (``0.0.0.0``, ``::``, empty) means this machine's loopback; an IPv6 address gets its
    brackets."""
    h = host.strip("[]")
    if h in ("", "0.0.0.0"):
        h = "127.0.0.1"
    elif h == "::":
        h = "::1"
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def die_with_parent() -> None:
    """Called first thing by a server this module started: ask Linux for SIGKILL when the starting
    thread of the parent exits (``PR_SET_PDEATHSIG``), and exit at once if the parent is already
    gone (it died while this process was starting). A no-op for a server started by hand."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(parent):
        os._exit(1)


_LIVE: "weakref.WeakSet[ServerHandle]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for h in list(_LIVE):
        h.stop(timeout=5.0)


class ServerHandle:
    """A ``dirl serve`` subprocess in its own process group. ``.url``, ``.api_key``, ``.stop()``."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, api_key: Optional[str],
                 owns_log: bool = False):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.api_key = api_key
        self.owns_log = owns_log  # a temporary log file, removed by a clean stop()
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self._exited(0)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> "ServerHandle":
        """Wait until this process's ``/health`` answers (its pid, not another server's on the port);
        raise with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:  # one client: certificates load once
            return self._poll_health(client, deadline, timeout)

    def _poll_health(self, client: httpx.Client, deadline: float, timeout: float) -> "ServerHandle":
        from dirl.rollout.server import CHALLENGE_HEADER, health_proof

        challenge = secrets.token_hex(16)
        headers = {CHALLENGE_HEADER: challenge} if self.api_key else {}
        want = health_proof(self.api_key, challenge) if self.api_key else None
        while True:
            if self._exited(0):
                self._signal_unreaped(signal.SIGKILL)  # before the leader is reaped (see stop)
                self.proc.poll()
                raise RuntimeError(f"dirl serve exited with code {self.proc.returncode} during start-up "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                r = client.get(self.url + "/health", headers=headers)
                # ours, not another process already on the port (ours then exits: address in use);
                # with a key, the answer must prove it (a pid anyone can read and echo)
                if r.status_code == 200 and r.json().get("pid") == self.proc.pid and \
                        (want is None or hmac.compare_digest(str(r.json().get("proof", "")), want)):
                    return self
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.owns_log = False  # keep the log: the error points at it
                self.stop()
                raise TimeoutError(f"dirl serve did not answer {self.url}/health within {timeout:.0f} s "
                                   f"(log {self.log_path}):\n{tail}")
            time.sleep(0.2)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _exited(self, timeout: float) -> bool:
        """Whether the server process has ended within ``timeout``, without reaping it: while it is
        an unreaped zombie its pid, and so its process group's id, cannot be taken by another
        process. Where ``os.waitid`` is missing (macOS before Python 3.13), ``poll()`` (which reaps)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:  # reaped: the pid may be another process's by now
                return True
            if not hasattr(os, "waitid"):
                if self.proc.poll() is not None:
                    return True
            else:
                try:
                    if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                        return True
                except ChildProcessError:  # reaped by someone else: treat as ended, signal nothing more
                    self.proc.poll()  # sets returncode (0 when the status is lost)
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def _signal_unreaped(self, sig: int) -> None:
        """Signal the process group while its leader is unreaped (its id still ours)."""
        if self.proc.returncode is None:
            self._signal_group(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """End the server and everything it started (its process group); idempotent. The group is
        signalled only while its leader is not reaped, so a later call never signals a group whose
        id the system may have given to another process; a stop interrupted half-way (Ctrl-C) is
        finished by the next call (the atexit handler's at the latest)."""
        if self.proc.returncode is None:
            self._signal_unreaped(signal.SIGTERM)
            if not self._exited(timeout):
                self._signal_unreaped(signal.SIGKILL)
                self._exited(timeout)
            self._signal_unreaped(signal.SIGKILL)  # whatever of the group outlived the server
            self.proc.wait(timeout=timeout)
        _LIVE.discard(self)
        if self.owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle(url={self.url!r}, pid={self.proc.pid}, alive={self.alive()})"


def start_server(
    model_dir: str | os.PathLike,
    backend: str = "reference",
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    decoding: Optional[DecodingConfig] = None,
    api_key: Optional[str] = None,
    device: Optional[str] = None,
    dtype: str = "auto",
    max_batch_size: int = 64,
    threads: Optional[int] = None,
    startup_timeout: float = 120.0,
    log_path: Optional[str | os.PathLike] = None,
    env: Optional[dict] = None,
    wait: bool = True,
    backend_options: Optional[dict] = None,
) -> ServerHandle:
    """Start ``dirl serve`` in a subprocess (a free port unless given) and wait until it answers
    ``/health``. The API key travels in the environment (``DIRL_SERVER_API_KEY``), never on the
    command line. The server's output goes to ``log_path`` (a temporary file unless given; see
    ``ServerHandle.log_tail``). With ``wait=False`` it returns at once: start several, then
    ``wait_ready()`` on each. ``backend_options``: the backend's own options (``--backend-option
    KEY=VALUE``, e.g. ``{"cache_max_entry_count": 0.3}`` for lmdeploy); they override ``dtype`` /
    ``max_batch_size``."""
    option_argv = backend_options_to_argv(backend_options)  # a value that cannot travel fails here
    if api_key is not None:
        api_key = api_key.strip() or None  # as the server reads it (read_api_key)
    args = dict(model_dir=model_dir, backend=backend, host=host, decoding=decoding, api_key=api_key, device=device,
                dtype=dtype, max_batch_size=max_batch_size, threads=threads, startup_timeout=startup_timeout,
                log_path=log_path, env=env, wait=wait, option_argv=option_argv)
    if port is not None or not wait:
        return _spawn(port=port or free_port(host), **args)
    for attempt in range(3):  # another process may take the free port before the server binds it
        try:
            return _spawn(port=free_port(host), **args)
        except RuntimeError as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _spawn(model_dir, backend, host, port, decoding, api_key, device, dtype, max_batch_size, threads,
           startup_timeout, log_path, env, wait, option_argv) -> ServerHandle:
    cmd = [sys.executable, "-m", "dirl.cli", "serve", "--model", str(model_dir), "--backend", backend,
           "--host", host, "--port", str(port), "--dtype", dtype, "--max-batch-size", str(max_batch_size)]
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += option_argv
    cmd += decoding_to_argv(decoding or DecodingConfig())
    penv = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so a source checkout runs without installing
    penv["PYTHONPATH"] = root + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
    penv.setdefault("TOKENIZERS_PARALLELISM", "false")
    penv.pop(API_KEY_ENV, None)
    if api_key:
        penv[API_KEY_ENV] = api_key
    penv.update(env or {})
    penv[PARENT_PID_ENV] = str(os.getpid())
    owns_log = log_path is None
    if owns_log:
        fd, log_path = tempfile.mkstemp(prefix=f"dirl-serve-{port}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=penv, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()
    url = server_url(host, port)
    handle = ServerHandle(proc, url, log_path, api_key, owns_log=owns_log)
    if wait:
        try:
            handle.wait_ready(startup_timeout)
        except BaseException:
            handle.owns_log = False  # the error points at the log
            handle.stop()
            raise
    return handle


# --------------------------------------------------------------------------------------------
# The servers of a run
# --------------------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    """What every server must agree with: the model's block size and mask id, the decoding settings
    (engine-wide ones must match), and the dtype asked for (``auto``: any)."""

    block_size: Optional[int]
    mask_token_id: Optional[int]
    decoding: DecodingConfig
    dtype: str = "auto"


def check_server_info(infos: Sequence[Any], urls: Sequence[str], facts: ModelFacts,
                      decoding_key: str = "decoding") -> list[dict]:
    """Every server's ``/info`` against the model; a disagreement is a one-line :class:`ConfigError`
    naming the config key to change."""
    out = []
    for url, info in zip(urls, infos):
        if not isinstance(info, dict):
            raise RuntimeError(f"server {url}: /info is not a JSON object")
        bs = info.get("block_size")
        want_bs = facts.decoding.block_size if facts.decoding.block_size is not None else facts.block_size
        if want_bs is not None and bs is not None and int(bs) != int(want_bs):
            raise ConfigError(f"config key '{decoding_key}.block_size': server {url} decodes with block size {bs} "
                              f"but the model's is {want_bs}")
        mid = info.get("mask_token_id")
        if facts.mask_token_id is not None and mid is not None and int(mid) != int(facts.mask_token_id):
            raise ConfigError(f"config key 'model.mask_token_id': server {url} uses mask id {mid} but the "
                              f"model's is {facts.mask_token_id}")
        for key in ENGINE_WIDE:
            if key in info and info[key] != getattr(facts.decoding, key):
                raise ConfigError(f"config key '{decoding_key}.{key}': server {url} decodes with {key}={info[key]!r}, "
                                  f"not {getattr(facts.decoding, key)!r} (an engine-wide setting: restart the server "
                                  "or change the config)")
        if facts.dtype != "auto" and info.get("dtype") not in (None, facts.dtype):
            raise ConfigError(f"config key 'server.dtype': server {url} runs in {info.get('dtype')}, not {facts.dtype}")
        out.append(info)
    return out


class Servers:
    """The rollout servers of a run and the client that talks to them. ``mode``: ``pool`` (given by
    URL) or ``started`` (started here, stopped by :meth:`close`)."""

    def __init__(self, client: RolloutClient, handles: list[ServerHandle], infos: list[dict]):
        self.client, self.handles, self.infos = client, handles, infos
        self.mode = "started" if handles else "pool"

    @property
    def urls(self) -> list[str]:
        return list(self.client.urls)

    def close(self) -> None:
        try:
            self.client.close()  # its HTTP connections and event loop
        finally:
            for h in self.handles:
                h.stop()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_start_args(sc: ServerConfig, model_dir: str | os.PathLike, facts: ModelFacts, *, rank_device: Any = None,
                      log_path: Optional[Path] = None) -> dict:
    """The :func:`start_server` arguments of a server started for a run (without its API key)."""
    device = server_device(sc, rank_device)
    return dict(backend=sc.backend, host=sc.host, port=sc.port, decoding=facts.decoding, device=device,
                dtype=facts.dtype if sc.dtype == "auto" else sc.dtype, max_batch_size=sc.max_batch_size,
                threads=server_threads(sc.threads, device), startup_timeout=sc.startup_timeout_s, log_path=log_path,
                backend_options=dict(sc.backend_options) or None)


def open_servers(sc: ServerConfig, model_dir: Optional[str | os.PathLike], facts: ModelFacts, *,
                 rank_device: Any = None, log_path: Optional[Path] = None,
                 decoding_key: str = "decoding") -> Servers:
    """The servers of ``server.urls``, or one started on ``model_dir`` with a fresh API key;
    ``/info`` checked against ``facts``. Nothing is left running when this raises."""
    handles: list[ServerHandle] = []
    try:
        if sc.urls:
            urls, key = list(sc.urls), sc.api_key or None
        else:
            if model_dir is None:
                raise ConfigError("config key 'server.urls': no model to start a server with; give model.path "
                                  "or server.urls")
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            key = secrets.token_urlsafe(32)
            args = server_start_args(sc, model_dir, facts, rank_device=rank_device, log_path=log_path)
            handles.append(start_server(model_dir, api_key=key, **args))
            urls = [handles[0].url]
        client = RolloutClient(urls, api_key=key, max_concurrency=sc.max_concurrency, retries=sc.retries,
                               timeout=sc.timeout_s, batch_size=sc.request_batch_size)
        if sc.dtype != "auto":
            facts = ModelFacts(facts.block_size, facts.mask_token_id, facts.decoding, sc.dtype)
        infos = check_server_info(client.info(), urls, facts, decoding_key)
        return Servers(client, handles, infos)
    except BaseException:
        for h in handles:
            h.stop()
        raise


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks stop what they started."""


def stop_on_signals() -> None:
    """SIGTERM (and SIGHUP) raise :class:`Terminated` in the main thread; SIGINT already raises
    KeyboardInterrupt. Call it once from a command's entry point."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        raise Terminated(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, handler)
