"""A rendezvous port for the multi-process tests (torchrun's MASTER_PORT).

A port from ``bind(0)`` is free only until the socket closes: the kernel may hand the same number to
any process that binds port 0 or opens a connection (every HTTP client and gloo pair in a parallel
test does), and a rendezvous that loses its port waits out torch's 300 s store timeout and aborts.
Ports below the ephemeral range are never handed out that way, so one that is free when checked
stays free unless a process asks for that very number."""

from __future__ import annotations

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def rendezvous_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range (random, checked by binding it)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
