"""The server launcher of RL and eval: a random API key that never reaches the command line, the
/info check against the model, and a server that never outlives what started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dirl.config import ConfigError, DecodingConfig
from dirl.rollout import launch
from dirl.rollout.launch import ModelFacts, ServerConfig, open_servers

ROOT = Path(__file__).resolve().parents[1]
DEC = DecodingConfig(max_new_tokens=8)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its new parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, bound_s: float = 120.0) -> bool:
    """Wait for the process to exit; the bound only keeps a broken run from hanging."""
    deadline = time.monotonic() + bound_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    return env


@linux_only
def test_started_server_has_a_random_key_off_the_command_line_and_is_checked(tiny_dir):
    seen = []
    real = launch.start_server

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    sc = ServerConfig(device="cpu", max_batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "start_server", spy)
        with open_servers(sc, tiny_dir, ModelFacts(4, None, DEC)) as servers:
            (h,) = seen
            key = servers.client.api_key
            assert key and key == h.api_key and len(key) >= 32
            assert key.encode() not in Path(f"/proc/{h.pid}/cmdline").read_bytes()
            assert httpx.get(h.url + "/info").status_code == 401
            assert httpx.get(h.url + "/info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert servers.infos[0]["block_size"] == 4 and servers.mode == "started"
        assert _wait_gone(h.pid)
        # a server that disagrees with the model is an error naming the key, and leaves nothing running
        seen.clear()
        with pytest.raises(ConfigError, match="config key 'decoding.block_size'"):
            open_servers(sc, tiny_dir, ModelFacts(8, None, DEC))
        (h,) = seen
        assert _wait_gone(h.pid)


def test_a_launcher_never_takes_another_process_on_its_port_for_its_server(tiny_dir):
    """A port already served by another dirl serve: the launched server cannot bind it and exits,
    and the launcher reports that, instead of handing out the other server (its /health answers
    200, but with its own pid)."""
    port = launch.free_port()
    with launch.start_server(tiny_dir, device="cpu", port=port, max_batch_size=4) as first:
        with pytest.raises(RuntimeError, match="exited with code .* during start-up") as e:
            launch.start_server(tiny_dir, device="cpu", port=port, max_batch_size=4, api_key="fresh-key")
        assert "address already in use" in str(e.value).lower(), str(e.value)[-2000:]
        assert httpx.get(first.url + "/health").json()["pid"] == first.pid


def _pid_serving_port(port: int):
    """What any user of the machine can see: the pid of the process started with ``--port PORT``."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and b"--port" in args and args[args.index(b"--port") + 1:][:1] == [str(port).encode()]:
                return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to play the squatter")
def test_a_squatter_that_echoes_the_servers_pid_never_gets_the_key(tiny_dir):
    """Another user's process on the launcher's port, answering /health with the pid of the
    launcher's server (visible to all in the process list): the launcher's challenge goes
    unanswered, so it never takes the squatter for its server nor sends it the key; its own server
    cannot bind and exits, and the launcher says so."""
    import http.server
    import json
    import threading

    seen = []

    class Squatter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("authorization"), self.headers.get("x-api-key")))
            body = json.dumps({"status": "ok", "pid": _pid_serving_port(port), "proof": "0" * 64}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    port = launch.free_port()
    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", port), Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="exited with code .* during start-up") as e:
            launch.start_server(tiny_dir, device="cpu", port=port, max_batch_size=4, api_key="SECRET-KEY")
        assert "address already in use" in str(e.value).lower(), str(e.value)[-2000:]
    finally:
        squatter.shutdown()
        squatter.server_close()
    assert seen and all(p == "/health" and a is None and k is None for p, a, k in seen), seen[:5]
    assert _pid_serving_port(port) is None  # the launcher's server is gone


def test_health_proves_the_key_only_to_a_challenge(tiny_dir, monkeypatch):
    from dirl.rollout.server import health_proof

    with launch.start_server(tiny_dir, device="cpu", max_batch_size=4, api_key="k1") as h:
        plain = httpx.get(h.url + "/health").json()
        assert plain == {"status": "ok", "pid": h.pid}  # no key needed, none shown
        answered = httpx.get(h.url + "/health", headers={"x-dirl-challenge": "abc"}).json()
        assert answered["proof"] == health_proof("k1", "abc") != health_proof("k2", "abc")
    assert _wait_gone(h.pid)
    # a second stop of a reaped server signals nothing: its group id may be another's by now
    signalled = []
    monkeypatch.setattr(launch.os, "killpg", lambda pid, sig: signalled.append((pid, sig)))
    h.stop()
    assert signalled == []


def test_a_stop_cut_short_is_finished_by_the_next(tmp_path, monkeypatch):
    """Ctrl-C while stop() waits for a server that ignores SIGTERM: the next stop() (the atexit
    handler's at the latest) still ends it and its group, and stops after that signal nothing."""
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "up\n"  # SIGTERM is ignored from here on
    h = launch.ServerHandle(proc, "http://127.0.0.1:9", tmp_path / "log", None)
    real = launch.ServerHandle._exited
    calls = []

    def interrupted_once(self, timeout):
        calls.append(timeout)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, timeout)

    monkeypatch.setattr(launch.ServerHandle, "_exited", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        h.stop(timeout=60)
    assert h.alive() and h in launch._LIVE
    monkeypatch.setattr(launch.ServerHandle, "_exited", real)
    h.stop(timeout=0.5)  # SIGTERM ignored: SIGKILL after the timeout
    assert proc.returncode == -signal.SIGKILL and h not in launch._LIVE
    signalled = []
    monkeypatch.setattr(launch.os, "killpg", lambda pid, sig: signalled.append((pid, sig)))
    h.stop()
    assert signalled == []


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_a_server_on_an_ipv6_address_is_reached_through_a_bracketed_url(tiny_dir):
    """``host: ::1`` (with or without brackets): a free port is found on it, and the URL the
    launcher hands out carries the brackets, so a client reaches the server and decodes with it."""
    from dirl.rollout.client import RolloutClient

    assert launch.server_url("::", 80) == "http://[::1]:80" and launch.server_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    for host in ("::1", "[::1]"):
        with launch.start_server(tiny_dir, host=host, device="cpu", max_batch_size=4) as h:
            assert h.url.startswith("http://[::1]:"), h.url
            assert httpx.get(h.url + "/health").json()["pid"] == h.pid
            with RolloutClient(h.url) as client:
                (out,) = client.generate([{"request_id": "a", "prompt": "7+8=", "max_new_tokens": 4}])
            assert out["request_id"] == "a" and out["response_length"] >= 1, out
        assert _wait_gone(h.pid)


_PARENT = """
import sys
from dirl.rollout.launch import start_server, stop_on_signals
stop_on_signals()
h = start_server(sys.argv[1], device="cpu", max_batch_size=4)
try:
    print(h.pid, flush=True)
    sys.stdin.read()
finally:
    h.stop()
"""


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_server_dies_with_the_process_that_started_it(tiny_dir, sig):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tiny_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        line = parent.stdout.readline()  # the server answers /health
        assert line.strip().isdigit(), parent.stderr.read().decode()[-2000:]
        pid = int(line)
        assert not _gone(pid)
        parent.send_signal(sig)
        rc = parent.wait(timeout=120)
        assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
        assert _wait_gone(pid), "the server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
