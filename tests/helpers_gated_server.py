"""A real rollout server (dirl's app, the reference backend, uvicorn on 127.0.0.1) whose engine never
finishes a batch: fault tests kill it while requests are verifiably in flight.

Run as ``python tests/helpers_gated_server.py MODEL_DIR``. It binds a listening socket first and
prints ``PORT <n>``; whenever a batch reaches the engine it prints ``IN_FLIGHT <k>`` (k requests)
and blocks for good. A test reads those lines from the pipe (events, no sleeps), kills the process
while it holds the requests, and so the kill always lands during the work, on any machine.
:func:`GatedServer` starts one and reads the events.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the test process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(model_dir: str) -> None:
    _die_with_parent()
    import uvicorn

    from dirl.config import DecodingConfig
    from dirl.rollout.backend import ReferenceBackend
    from dirl.rollout.server import create_app

    class Gated(ReferenceBackend):
        def _hold(self, requests) -> None:
            print(f"IN_FLIGHT {len(requests)}", flush=True)
            threading.Event().wait()  # never returns: the test kills the process

        def generate_continuous(self, requests, more, on_result):
            self._hold(requests)

        def generate(self, requests):
            self._hold(requests)

    backend = Gated(model_dir, decoding=DecodingConfig(max_new_tokens=32), device="cpu")
    app = create_app(backend, backend.parser())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn serves them
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


class GatedServer:
    """The gated server in a subprocess: ``.url``, ``.pid``, ``wait_in_flight()``, ``kill()``."""

    def __init__(self, model_dir):
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["OMP_NUM_THREADS"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.proc = subprocess.Popen([sys.executable, __file__, str(model_dir)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, text=True)
        self.events: "queue.Queue[str]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.events.get()  # blocks until the socket listens (or the process died)
        if not first.startswith("PORT "):
            self.kill()
            raise RuntimeError(f"the gated server did not start: {first!r}")
        self.url = f"http://127.0.0.1:{int(first.split()[1])}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(line.strip())
        self.events.put("EXIT")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_in_flight(self, also: threading.Event | None = None) -> int:
        """Blocks until the engine holds a batch; returns its size. Returns 0 when ``also`` is set
        first (checked whenever an event line arrives or the run ends: set ``also`` and put a line)."""
        while True:
            ev = self.events.get()
            if ev.startswith("IN_FLIGHT "):
                return int(ev.split()[1])
            if ev == "EXIT" or (also is not None and also.is_set()):
                return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    stop = kill


def serve_in_thread(backend):
    """dirl's app over ``backend`` served by uvicorn on a thread of this process (a real socket);
    returns ``(url, stop)``."""
    import uvicorn

    from dirl.rollout.server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(backend, backend.parser()), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()

    def stop():
        server.should_exit = True
        th.join()
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


if __name__ == "__main__":
    _serve(sys.argv[1])
