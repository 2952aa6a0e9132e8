"""The rollout client over a pool of two real servers: order, spread, retries, failures."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from dirl.config import DecodingConfig
from dirl.rollout.backend import ReferenceBackend
from dirl.rollout.client import RolloutClient, RolloutError
from dirl.rollout.launch import free_port, start_server

DECODING = DecodingConfig(max_new_tokens=16, do_sample=False)


pytestmark = pytest.mark.usefixtures("one_thread")


class ThreadServer:
    """The same app served by uvicorn on a thread of this process (a real socket on a free port);
    saves starting a second interpreter on a busy 2-core machine."""

    def __init__(self, backend, weights_dir=None):
        import uvicorn

        from dirl.rollout.server import create_app

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(backend, backend.parser(), weights_dir=weights_dir)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:  # uvicorn's own start-up flag (a hang fails by the suite's timeout)
            assert self.thread.is_alive(), "in-thread server did not start"
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def local(tiny_dir):
    torch.set_num_threads(1)
    return ReferenceBackend(str(tiny_dir), decoding=DECODING, device="cpu")


@pytest.fixture(scope="module")
def pool(tiny_dir):
    """Two servers: a ``dirl serve`` subprocess and one on a thread here."""
    sub = start_server(tiny_dir, decoding=DECODING, device="cpu", threads=1, wait=False)
    torch.set_num_threads(1)
    here = ThreadServer(ReferenceBackend(str(tiny_dir), decoding=DECODING, device="cpu"))
    sub.wait_ready()
    yield [here, sub]
    sub.stop()
    here.stop()


def workload(n, prefix="q"):
    reqs = []
    for i in range(n):
        r = {"prompt": f"{i}*{i % 7}=", "max_new_tokens": 4 + (i * 5) % 13}
        if i % 3:
            r["request_id"] = f"{prefix}{i}"
        if i % 4 == 0:
            r.update(do_sample=True, temperature=1.1, seed=i)
        reqs.append(r)
    return reqs


def expected(local, reqs):
    return local.generate(local.parser().parse_many(reqs))


def stats(url):
    return httpx.get(url + "/info").json()["stats"]


def test_results_come_back_in_order_from_both_servers(pool, local):
    before = [stats(h.url)["requests"] for h in pool]
    client = RolloutClient([h.url for h in pool], max_concurrency=3, batch_size=2)
    reqs = workload(30)
    got = client.generate(reqs)
    assert len(got) == 30
    assert "request_id" not in reqs[0]  # the caller's dicts are not modified
    for r, g in zip(reqs, got):
        if "request_id" in r:
            assert g["request_id"] == r["request_id"]
    assert len({g["request_id"] for g in got}) == 30  # assigned ids are distinct
    want = expected(local, [{**r, "request_id": g["request_id"]} for r, g in zip(reqs, got)])
    for g, w in zip(got, want):
        assert (g["token_ids"], g["step_map"], g["prompt_ids"]) == (w["token_ids"], w["step_map"], w["prompt_ids"])
    served = [stats(h.url)["requests"] - b for h, b in zip(pool, before)]
    assert sum(served) == 30 and min(served) > 0, served  # both servers took work


def test_duplicate_ids_are_refused_before_sending(pool):
    with pytest.raises(ValueError, match="duplicate request_id 'x'"):
        RolloutClient([pool[0].url]).generate([{"request_id": "x", "prompt": "a"}, {"request_id": "x", "prompt": "b"}])


def test_sync_wrapper_works_inside_an_event_loop(pool):
    async def main():
        client = RolloutClient([pool[0].url])
        sync = client.generate([{"request_id": "in-loop", "prompt": "1+1="}])
        async_ = await client.agenerate([{"request_id": "in-loop", "prompt": "1+1="}])
        return sync, async_

    sync, async_ = asyncio.run(main())
    assert sync == async_ and sync[0]["request_id"] == "in-loop"


def test_info_of_every_server(pool):
    infos = RolloutClient([h.url for h in pool]).info()
    assert [i["block_size"] for i in infos] == [4, 4]


def test_a_dead_pool_raises_naming_the_requests():
    dead = f"http://127.0.0.1:{free_port()}"
    client = RolloutClient([dead], retries=2, backoff=0.01, batch_size=1)
    with pytest.raises(RolloutError, match=r"request 'lost-\d' failed.*Connect") as e:
        client.generate([{"request_id": "lost-1", "prompt": "a"}, {"request_id": "lost-2", "prompt": "b"}])
    assert e.value.request_ids in (["lost-1"], ["lost-2"])


def test_a_dead_pool_fails_fast_whatever_the_number_of_chunks():
    """Many chunks in flight at once count as one failure per pause, so the call gives up after the
    server missed `retries + 1` growing pauses (0.5 + 1 + 2 + 4 s here), not after every chunk's:
    the error is the pool-wide one, which only that path raises."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    client = RolloutClient(dead, retries=3, backoff=0.5, batch_size=1, max_concurrency=8)
    with pytest.raises(RolloutError, match="no rollout server answers \\(2 tried, 4 times each\\)"):
        client.generate([{"request_id": f"r{i}", "prompt": "a"} for i in range(64)])


class RecordingBackend(ReferenceBackend):
    """Notes, per weight update, which segment files exist under ``watch`` and what it received."""

    def __init__(self, *args, watch=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.watch = watch
        self.updates = []

    def update_weights(self, named_tensors, finished):
        files = sorted(p.name for p in self.watch.rglob("*.safetensors")) if self.watch else []
        self.updates.append((files, [n for n, _ in named_tensors], finished))
        super().update_weights(named_tensors, finished)


def test_push_weights_streams_one_segment_at_a_time(tiny_dir, local, tmp_path):
    """Two servers: every segment reaches both before the next is written, and only it is on disk."""
    torch.set_num_threads(1)
    backends = [RecordingBackend(str(tiny_dir), decoding=DECODING, device="cpu", watch=tmp_path) for _ in range(2)]
    servers = [ThreadServer(b, weights_dir=str(tmp_path)) for b in backends]
    try:
        client = RolloutClient([s.url for s in servers], retries=0)
        probe = [{"request_id": "p", "input_ids": [30, 31, 32]}]
        before = client.generate(probe)
        sd = local.model.hf.state_dict()
        changed = {k: (v * 3.0 if k == "lm_head.weight" else v) for k, v in sd.items()}
        out = client.push_weights(changed, transport="file", segment_bytes=256 << 10, tmp_dir=str(tmp_path))
        n = out["segments"]
        assert out["transport"] == "file" and n >= 3 and out["servers"] == 2
        for b in backends:
            assert [u[0] for u in b.updates] == [[f"segment-{i:04d}.safetensors"] for i in range(n)]
            assert [u[2] for u in b.updates] == [False] * (n - 1) + [True]
            assert sorted(name for u in b.updates for name in u[1]) == sorted(sd)
        assert backends[0].updates == backends[1].updates
        assert list(tmp_path.iterdir()) == []  # segment files and their folder are gone
        assert client.generate(probe) != before
        client.push_weights(sd, transport="inline", segment_bytes=256 << 10)
        assert client.generate(probe) == before
    finally:
        for s in servers:
            s.stop()


def test_iter_payloads_builds_lazily_and_cleans_up(tmp_path, monkeypatch):
    from dirl.rollout import weights as W

    pairs = [(f"w{i}", torch.full((64,), float(i))) for i in range(5)]
    groups = W.segments(pairs, 256)
    assert len(groups) == 5
    built = []
    real = W.to_safetensors_bytes
    monkeypatch.setattr(W, "to_safetensors_bytes", lambda g: built.append(g[0][0]) or real(g))
    stream = W.iter_payloads(groups, "inline")
    assert built == []
    first = next(stream)
    assert built == ["w0"] and first["finished"] is False
    assert [p["finished"] for p in stream] == [False] * 3 + [True] and len(built) == 5

    stream = W.iter_payloads(groups, "file", tmp_dir=tmp_path)
    p0 = Path(next(stream)["path"])
    assert p0.is_file()
    p1 = Path(next(stream)["path"])
    assert p1.is_file() and not p0.exists()  # the previous segment is removed before the next is written
    stream.close()
    assert list(tmp_path.iterdir()) == []


def test_ipc_refused_for_cpu_tensors_before_any_server_sleeps(pool, local):
    from dirl.rollout.weights import PayloadError

    client = RolloutClient([pool[0].url], retries=0)
    with pytest.raises(PayloadError, match="ipc transport needs CUDA tensors"):
        client.push_weights(local.model, transport="ipc")
    assert client.info()[0]["asleep"] == {"weights": False, "kv_cache": False}
    with pytest.raises(ValueError, match="unknown transport 'pigeon'"):
        client.push_weights(local.model, transport="pigeon")


def test_one_http_client_and_loop_for_the_clients_life_closed_with_it(pool, local):
    made = []
    with RolloutClient([h.url for h in pool], batch_size=2) as client:
        real = client._new_http
        client._new_http = lambda: made.append(real()) or made[-1]
        client.info()
        reqs = [{**r, "request_id": f"one{i}"} for i, r in enumerate(workload(6))]
        toks = lambda out: [(g["request_id"], g["token_ids"], g["step_map"]) for g in out]  # noqa: E731
        first = toks(client.generate(reqs))
        second = toks(client.generate(reqs))
        assert toks(asyncio.run(client.agenerate(reqs))) == first  # from another event loop too
        client.health()
        rt = client._rt
        assert len(made) == 1 and rt.http is made[0] and rt.thread.is_alive()
    assert first == second
    assert made[0].is_closed and not rt.thread.is_alive() and rt.loop.is_closed() and client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.info()
    client.close()  # twice is fine


def test_one_client_shared_by_several_threads(pool, local):
    client = RolloutClient([h.url for h in pool], batch_size=1, max_concurrency=2)
    jobs = [workload(5, prefix=f"th{k}-") for k in range(4)]
    out: dict = {}
    start = threading.Barrier(len(jobs))

    def run(k):
        start.wait()
        out[k] = client.generate(jobs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    http = client._rt.http
    client.close()
    assert http.is_closed
    for k, reqs in enumerate(jobs):
        got = out[k]
        want = expected(local, [{**r, "request_id": g["request_id"]} for r, g in zip(reqs, got)])
        assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]


def _child_info(client, conn):
    try:
        conn.send(("ok", [i["block_size"] for i in client.info()], client._rt.pid == os.getpid()))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", repr(e), False))
    finally:
        client.close()
        conn.close()


def test_a_forked_child_makes_its_own_loop_and_connections(pool):
    import multiprocessing as mp

    client = RolloutClient([pool[0].url])
    assert client.info()[0]["block_size"] == 4  # the parent's loop and connections exist
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_child_info, args=(client, there))
    proc.start()
    status, value, own = here.recv()
    proc.join()
    assert (status, value, own) == ("ok", [4], True)
    assert client.info()[0]["block_size"] == 4  # the parent's client still works
    client.close()


def test_g_samples_of_one_prompt_at_t1_are_not_all_identical(pool, local):
    """G = 8 requests of one prompt built as the RL trainer builds them (distinct per-sample seeds),
    T = 1, top-k 50, through both real servers: the samples differ (a backend that reused one
    random stream, or ignored the seeds, would return G copies), and each is its seed's output."""
    from dirl.data.chat import prompt_ids
    from dirl.rewards.shaping import RewardConfig
    from dirl.train.rl.groups import Sampling, build_requests

    G = 8
    dec = DecodingConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=1.0)
    reqs = build_requests([prompt_ids(local.tokenizer, "What is 3+4?")], G, step=1, rnd=0,
                          s=Sampling(dec, [], 0, RewardConfig(), 4))
    assert len({r["seed"] for r in reqs}) == G
    got = RolloutClient([h.url for h in pool], max_concurrency=2, batch_size=2).generate(reqs)
    responses = [tuple(g["token_ids"]) for g in got]
    assert len(set(responses)) > 1, "all G samples are identical"
    assert len(set(responses)) >= G // 2  # a near-uniform tiny model: most samples differ
    assert responses == [tuple(t["token_ids"]) for t in expected(local, reqs)]


def test_a_dead_server_in_the_pool_costs_no_attempt_while_another_can_take_the_chunk(pool, local):
    """A dead URL first in the pool, no retries allowed: its workers fail every chunk they take
    at once, but a chunk's attempt is counted only once every server that is up has failed it, so
    the live servers decode all of them. (Before, a chunk that met the dead server first, or met it
    again while the live ones were busy, used up its attempts there and failed the whole call.)"""
    dead = f"http://127.0.0.1:{free_port()}"
    client = RolloutClient([dead] + [h.url for h in pool], max_concurrency=4, batch_size=1, retries=0, backoff=0.05)
    reqs = [{"request_id": f"d{i}", "prompt": f"{i}+{i}=", "max_new_tokens": 8} for i in range(12)]
    got = client.generate(reqs)
    assert [g["request_id"] for g in got] == [r["request_id"] for r in reqs]
    for g, w in zip(got, expected(local, reqs)):
        assert (g["token_ids"], g["step_map"]) == (w["token_ids"], w["step_map"])
    with RolloutClient([dead, f"http://127.0.0.1:{free_port()}"], retries=0, backoff=0.05, batch_size=1) as gone:
        with pytest.raises(RolloutError, match="failed"):  # every server down: still an error, at once
            gone.generate(reqs[:2])


def test_a_server_killed_mid_run_is_retried_on_the_other(pool, local, tiny_dir):
    """A third server holds every request it gets (tests/helpers_gated_server.py); it is killed once
    its engine reports requests in flight, so the kill always lands during the run; the pool's
    servers take its requests over."""
    from helpers_gated_server import GatedServer

    victim = GatedServer(tiny_dir)
    try:
        # the victim is first: its workers take the first chunks
        client = RolloutClient([victim.url] + [h.url for h in pool], max_concurrency=2, batch_size=2, retries=4,
                               backoff=0.05)
        reqs = [{"request_id": f"k{i}", "prompt": f"{i}-{i}=", "max_new_tokens": 40} for i in range(24)]
        box, ended = {}, threading.Event()

        def run():
            try:
                box["out"] = client.generate(reqs)
            except BaseException as e:  # noqa: BLE001
                box["err"] = e
            finally:
                ended.set()

        t = threading.Thread(target=run)
        t.start()
        assert victim.wait_in_flight() > 0
        assert not ended.is_set()  # the run cannot end while the victim holds requests
        victim.kill()  # in the middle of the run: its in-flight requests fail
        t.join()
        assert not victim.alive()
    finally:
        victim.kill()
    if "err" in box:  # acceptable only as a clear error naming requests
        assert isinstance(box["err"], RolloutError) and box["err"].request_ids
        pytest.fail(f"the surviving servers should have taken over: {box['err']}")
    got = box["out"]
    assert [g["request_id"] for g in got] == [r["request_id"] for r in reqs]
    want = expected(local, reqs)
    for g, w in zip(got, want):
        assert (g["token_ids"], g["step_map"]) == (w["token_ids"], w["step_map"])
