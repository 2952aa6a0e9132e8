"""A bounded load benchmark of one real ``dirl serve`` process (reference backend, tiny model).

    python scripts/bench_server_load.py [--clients 200] [--seconds 30] [--bad-fraction 0.1]
                                        [--max-rss-growth-mib 150]

``--clients`` concurrent clients (one connection each) send ``/generate`` requests back to back for
``--seconds`` seconds; a ``--bad-fraction`` of them are hostile or malformed (out-of-range numbers,
NaN, deep JSON, oversized prompts, wrong content type, no key) and must be answered 4xx with a JSON
reason. A separate probe times ``/health`` meanwhile. Printed: requests, errors (any answer other
than 200 for a good request or 4xx-with-reason for a bad one, and any transport failure), p50 / p99
latency of good requests and of ``/health``, the server's RSS after warm-up and at the end.

Exits 1, naming the target, when errors > 0 or the RSS grew by more than ``--max-rss-growth-mib``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "bench-" + os.urandom(8).hex()

BAD = [
    ({"input_ids": [5, 6, 7], "temperature": float("nan")}, None),  # sent as the NaN literal
    ({"input_ids": [5, 6, 7], "temperature": 1e-50}, None),
    ({"input_ids": [5, 6, 7], "top_k": 10**9}, None),
    ({"input_ids": [5, 6, 7], "max_new_tokens": 10**9}, None),
    ({"input_ids": [10**7]}, None),
    ({"prompt": "x" * 200_000}, None),
    (None, "[" * 20000 + "]" * 20000),
    ({"input_ids": [5, 6, 7]}, "text/plain"),
    ({"input_ids": [5, 6, 7]}, "no-key"),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


async def run_load(url: str, clients: int, seconds: float, bad_fraction: float, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    stats = {"good": 0, "bad": 0, "errors": 0, "lat": [], "health": [], "examples": []}
    auth = {"Authorization": f"Bearer {KEY}"}
    stop = time.monotonic() + seconds

    def error(msg: str) -> None:
        stats["errors"] += 1
        if len(stats["examples"]) < 5:
            stats["examples"].append(msg[:200])

    async def one_client(cid: int) -> None:
        r_local = random.Random(seed * 1000 + cid)
        async with httpx.AsyncClient(base_url=url, timeout=120.0,
                                     limits=httpx.Limits(max_connections=1)) as c:
            while time.monotonic() < stop:
                if r_local.random() < bad_fraction:
                    body, mode = BAD[r_local.randrange(len(BAD))]
                    headers = dict(auth, **{"Content-Type": "application/json"})
                    if mode == "text/plain":
                        headers["Content-Type"] = "text/plain"
                    if mode == "no-key":
                        headers.pop("Authorization")
                    content = mode if mode and mode.startswith("[") else json.dumps(body)
                    try:
                        r = await c.post("/generate", content=content.encode(), headers=headers)
                        ok = 400 <= r.status_code < 500 and bool(r.json().get("error"))
                    except Exception as e:  # noqa: BLE001
                        error(f"bad request: {type(e).__name__}: {e}")
                        continue
                    stats["bad"] += 1
                    if not ok:
                        error(f"bad request answered {r.status_code}: {r.text}")
                    continue
                n = r_local.randint(3, 12)
                body = {"input_ids": [r_local.randrange(10, 90) for _ in range(n)],
                        "max_new_tokens": r_local.choice([4, 8, 12]), "do_sample": True, "seed": r_local.randrange(1 << 30)}
                t0 = time.perf_counter()
                try:
                    r = await c.post("/generate", json=body, headers=auth)
                except Exception as e:  # noqa: BLE001
                    error(f"good request: {type(e).__name__}: {e}")
                    continue
                stats["good"] += 1
                if r.status_code != 200 or "token_ids" not in r.json():
                    error(f"good request answered {r.status_code}: {r.text}")
                    continue
                stats["lat"].append(time.perf_counter() - t0)

    async def health_probe() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await c.get("/health")
                    if r.status_code != 200:
                        error(f"/health answered {r.status_code}")
                except Exception as e:  # noqa: BLE001
                    error(f"/health: {type(e).__name__}: {e}")
                stats["health"].append(time.perf_counter() - t0)
                await asyncio.sleep(0.1)

    rng.random()
    await asyncio.gather(health_probe(), *(one_client(i) for i in range(clients)))
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup-seconds", type=float, default=5.0)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--max-rss-growth-mib", type=float, default=150.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from dirl.config import DecodingConfig
    from dirl.model.tiny import make_tiny_model
    from dirl.rollout import start_server

    with tempfile.TemporaryDirectory(prefix="dirl-bench-load-") as tmp:
        model = Path(tmp) / "model"
        make_tiny_model(model)
        dec = DecodingConfig(max_new_tokens=8)
        with start_server(model, decoding=dec, api_key=KEY, device="cpu", threads=a.threads) as srv:
            asyncio.run(run_load(srv.url, min(a.clients, 32), a.warmup_seconds, 0.0, a.seed + 1))
            rss0 = rss_kib(srv.pid)
            t0 = time.perf_counter()
            s = asyncio.run(run_load(srv.url, a.clients, a.seconds, a.bad_fraction, a.seed))
            wall = time.perf_counter() - t0
            rss1 = rss_kib(srv.pid)
            alive = srv.alive()
    growth = (rss1 - rss0) / 1024
    print(f"clients {a.clients}, {wall:.1f} s, good requests {s['good']} ({s['good'] / wall:.1f}/s), "
          f"hostile/malformed {s['bad']} (all 4xx with a reason unless counted below), errors {s['errors']}")
    print(f"latency of good requests: p50 {pct(s['lat'], 0.5) * 1000:.0f} ms, p99 {pct(s['lat'], 0.99) * 1000:.0f} ms; "
          f"/health: p50 {pct(s['health'], 0.5) * 1000:.1f} ms, p99 {pct(s['health'], 0.99) * 1000:.1f} ms "
          f"({len(s['health'])} probes)")
    print(f"server RSS: {rss0 / 1024:.1f} MiB after warm-up, {rss1 / 1024:.1f} MiB at the end "
          f"({growth:+.1f} MiB; bound {a.max_rss_growth_mib:g} MiB)")
    for ex in s["examples"]:
        print("  error:", ex)
    failed = []
    if s["errors"] or not alive:
        failed.append(f"errors == 0 (got {s['errors']}{'; server died' if not alive else ''})")
    if growth > a.max_rss_growth_mib:
        failed.append(f"RSS growth <= {a.max_rss_growth_mib:g} MiB (got {growth:.1f})")
    if failed:
        print("TARGET MISSED: " + "; ".join(failed))
        return 1
    print("targets met: 0 errors, RSS growth within bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
