"""The rollout server over real HTTP: a ``dirl serve`` subprocess on 127.0.0.1, a free port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from dirl.config import ConfigError, DecodingConfig
from dirl.rollout.backend import ReferenceBackend
from dirl.rollout.backends import get_backend
from dirl.rollout.client import RolloutClient, RolloutError
from dirl.rollout.launch import start_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DECODING = DecodingConfig(max_new_tokens=12, do_sample=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def server(tiny_dir, weights_dir):
    # a backend option (not the default 64) must reach the backend: /info reports it
    with start_server(tiny_dir, decoding=DECODING, api_key=KEY, device="cpu", threads=1,
                      backend_options={"max_batch_size": 16},
                      env={"DIRL_SERVER_WEIGHTS_DIR": str(weights_dir)}) as handle:
        yield handle
    assert not handle.alive()


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same backend in this process: what the server must reproduce."""
    torch.set_num_threads(1)
    return ReferenceBackend(str(tiny_dir), decoding=DECODING, device="cpu")


def in_process(local, reqs):
    return local.generate(local.parser().parse_many(reqs))


def post(server, path, body=None, content=None, headers=AUTH):
    if content is not None:
        return httpx.post(server.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json", **headers})
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["request_id"] == w["request_id"]
        for k in ("prompt_ids", "token_ids", "step_map", "response_length", "finish_reason", "text"):
            assert g[k] == w[k], (g["request_id"], k)
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= 1e-5


REQS = [
    {"request_id": "msg", "messages": [{"role": "user", "content": "What is 12+30?"}]},
    {"request_id": "raw", "prompt": "7+8=", "max_new_tokens": 5},
    {"request_id": "ids", "input_ids": [20, 21, 22, 23, 24, 25, 26, 27]},
    {"request_id": "sampled", "prompt": "3+4=", "do_sample": True, "temperature": 0.9, "top_k": 8, "seed": 4},
]


def test_health_info_and_api_key(server):
    health = httpx.get(server.url + "/health").json()  # open for liveness probes
    assert health["status"] == "ok" and isinstance(health["pid"], int) and set(health) == {"status", "pid"}
    info = httpx.get(server.url + "/info", headers=AUTH).json()
    for k in ("engine", "version", "block_size", "denoising_steps", "unmasking_strategy", "confidence_threshold",
              "mask_token_id", "dtype", "max_context", "asleep"):
        assert k in info
    assert info["block_size"] == 4 and info["asleep"] == {"weights": False, "kv_cache": False}
    assert info["max_batch_size"] == 16  # from backend_options, over max_batch_size=64
    assert info["defaults"]["max_new_tokens"] == 12 and info["defaults"]["do_sample"] is False
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        for method, path in (("GET", "/info"), ("POST", "/generate"), ("POST", "/sleep"), ("POST", "/update_weights")):
            r = httpx.request(method, server.url + path, headers=headers, json=REQS[0])
            assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.get(server.url + "/info", headers={"X-API-Key": KEY}).status_code == 200


def test_generate_equals_in_process(server, local):
    want = in_process(local, REQS)
    single = [post(server, "/generate", r).json() for r in REQS]
    assert_same(single, want)
    batch = post(server, "/generate", {"requests": REQS}).json()["results"]
    assert_same(batch, want)
    assert want[0]["prompt_ids"][-3:] != want[1]["prompt_ids"][-3:]
    assert len(want[1]["token_ids"]) >= 5 and want[3]["token_ids"] != in_process(
        local, [{**REQS[3], "do_sample": False}])[0]["token_ids"]


def test_concurrent_requests_share_engine_batches(tiny_dir, local):
    """HTTP calls that arrive while a batch runs join it (the engine's ``more()``) and each gets its
    own results. Event-driven: the backend holds its first batch until the eleven other calls have
    reached it through ``more()``, so the outcome does not depend on the machine's speed."""
    import threading

    from helpers_gated_server import serve_in_thread

    class Collecting(ReferenceBackend):
        entered = threading.Event()

        def generate_continuous(self, requests, more, on_result):
            if self.entered.is_set():
                return super().generate_continuous(requests, more, on_result)
            self.entered.set()
            held = list(requests)
            while len(held) < 12:  # wait for the other calls to be queued (a hang fails by timeout)
                new = more()
                held += new
                if not new:
                    time.sleep(0.005)
            return super().generate_continuous(held, more, on_result)

    backend = Collecting(str(tiny_dir), decoding=DECODING, device="cpu")
    url, stop = serve_in_thread(backend)
    reqs = [{"request_id": f"c{i}", "prompt": f"{i}+{i}=", "max_new_tokens": 8} for i in range(12)]
    try:
        with ThreadPoolExecutor(12) as pool:
            futs = [pool.submit(httpx.post, url + "/generate", json=reqs[0], timeout=None)]
            Collecting.entered.wait()
            futs += [pool.submit(httpx.post, url + "/generate", json=r, timeout=None) for r in reqs[1:]]
            got = [f.result().json() for f in futs]
        stats = httpx.get(url + "/info").json()["stats"]
    finally:
        stop()
    assert_same(got, in_process(local, reqs))
    assert stats["http_calls"] == 12 and stats["engine_calls"] == 1  # one engine batch for all twelve


BAD = [
    ("{not json", "malformed JSON"),
    ("", "empty body"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "hi", "temprature": 1.0}), "unknown field 'temprature'"),
    (json.dumps({"prompt": "hi", "top_k": "3"}), "'top_k' must be an integer"),
    (json.dumps({"prompt": "hi", "max_new_tokens": 0}), "'max_new_tokens' must be an integer >= 1"),
    (json.dumps({"prompt": "hi", "do_sample": "yes"}), "'do_sample' must be true or false"),
    (json.dumps({"prompt": "hi", "top_p": 1.5}), "'top_p'"),
    (json.dumps({"request_id": 5, "prompt": "hi"}), "'request_id' must be a non-empty string"),
    (json.dumps({"input_ids": [1, "2"]}), "'input_ids' must be a list of integers"),
    (json.dumps({"input_ids": [1, 10**6]}), "outside the vocabulary"),
    (json.dumps({"prompt": ""}), "empty prompt"),
    (json.dumps({"input_ids": []}), "empty prompt"),
    (json.dumps({"messages": []}), "'messages' is empty"),
    (json.dumps({"prompt": "a", "input_ids": [1]}), "exactly one of"),
    (json.dumps({"input_ids": [5] * 2000}), "over the context limit"),
    (json.dumps({"requests": []}), "non-empty list"),
    (json.dumps({"requests": [{"prompt": "a"}], "extra": 1}), "unknown field 'extra'"),
    (json.dumps({"requests": [{"request_id": "x", "prompt": "a"}, {"request_id": "x", "prompt": "b"}]}),
     "duplicate request_id"),
    # an unterminated string of escaped quotes (~1 MB): the depth check once took quadratic time on it
    # and froze the server; here in a server process of its own, so a regression fails by the timeout
    ('"' + '\\"' * 500_000, "malformed JSON"),
]


@pytest.mark.parametrize("body,reason", BAD, ids=[r for _, r in BAD])
def test_malformed_requests_get_4xx_with_a_reason(server, body, reason):
    r = post(server, "/generate", content=body.encode())
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]


def test_server_keeps_serving_after_bad_requests(server, local):
    for body, _ in BAD[:4]:
        post(server, "/generate", content=body.encode())
    assert_same([post(server, "/generate", REQS[1]).json()], in_process(local, REQS[1:2]))


def test_sleep_state_machine_and_weight_updates(server, local, tiny_dir, tmp_path):
    client = RolloutClient([server.url], api_key=KEY, retries=0)
    probe = [{"request_id": f"p{i}", "input_ids": ids} for i, ids in enumerate([[30, 31, 32], [40, 41, 42, 43, 44]])]
    original = client.generate(probe)

    # weights can only change while the KV cache sleeps
    r = post(server, "/update_weights", {"transport": "inline", "data": ""})
    assert r.status_code == 409 and "sleep" in r.json()["error"]
    assert post(server, "/sleep", {"level": 3}).status_code == 400
    assert post(server, "/sleep", {"level": 1}).json()["asleep"] == {"weights": False, "kv_cache": True}
    r = post(server, "/generate", probe[0])
    assert r.status_code == 409 and "asleep" in r.json()["error"]
    assert httpx.get(server.url + "/info", headers=AUTH).json()["asleep"]["kv_cache"] is True

    # bad payloads while asleep: 400, nothing loaded
    sd = {k: v.clone() for k, v in local.model.hf.state_dict().items()}
    for payload, reason in [
        ({"transport": "carrier-pigeon"}, "'transport' must be one of"),
        ({"transport": "file", "path": str(tmp_path / "none.safetensors")}, "no such weights file"),
        ({"transport": "inline", "data": "!!"}, "base64"),
        ({"transport": "inline", "data": "", "finished": "yes"}, "'finished'"),
        ({"transport": "inline", "data": "", "color": 1}, "unknown field 'color'"),
    ]:
        r = post(server, "/update_weights", payload)
        assert r.status_code == 400 and reason in r.json()["error"], r.text
    from dirl.rollout.weights import inline_payload

    r = post(server, "/update_weights", inline_payload([("model.no_such.weight", torch.zeros(2))], True))
    assert r.status_code == 400 and "unknown parameter" in r.json()["error"]
    r = post(server, "/update_weights", inline_payload([("lm_head.weight", torch.zeros(2, 2))], True))
    assert r.status_code == 400 and "shape" in r.json()["error"]
    assert post(server, "/wakeup", {"tags": ["kv_cache"]}).json()["asleep"]["kv_cache"] is False
    assert client.generate(probe) == original  # the refused payloads changed nothing

    # a real update, in several segments (inline), changes the greedy outputs
    changed = dict(sd)
    changed["lm_head.weight"] = sd["lm_head.weight"] * 40.0
    changed["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].flip(0)
    out = client.push_weights(changed, transport="inline", segment_bytes=64 << 10)
    assert out["segments"] > 1
    new = client.generate(probe)
    assert [x["token_ids"] for x in new] != [x["token_ids"] for x in original]
    local_changed = ReferenceBackend(str(tiny_dir), decoding=DECODING, device="cpu")
    local_changed.sleep()
    local_changed.update_weights(list(changed.items()), True)
    local_changed.wakeup()
    assert_same(new, in_process(local_changed, probe))

    # pushing the old weights back (file transport, a model object) restores the outputs exactly
    out = client.push_weights(local.model, transport="file")
    assert out["transport"] == "file"
    assert client.generate(probe) == original
    assert httpx.get(server.url + "/info", headers=AUTH).json()["asleep"] == {"weights": False, "kv_cache": False}


def test_client_reports_a_4xx_at_once_with_the_request_id(server):
    client = RolloutClient([server.url], api_key=KEY, retries=3)
    with pytest.raises(RolloutError, match=r"'bad-one'.*unknown field 'colour'"):
        client.generate([{"request_id": "bad-one", "prompt": "x", "colour": "red"}])
    with pytest.raises(RolloutError, match="401"):
        RolloutClient([server.url], api_key="nope").info()


def test_backend_options_parse_and_check(tiny_dir):
    from dirl.rollout.cli import backend_options_to_argv, parse_backend_options

    got = parse_backend_options(["cache_max_entry_count=0.3", "eager_mode=true", "max_context=4096",
                                 "name=abc", "quoted='7'", "none=null", "tiny=1e-5", "max_context=8192"])
    assert got == {"cache_max_entry_count": 0.3, "eager_mode": True, "max_context": 8192, "name": "abc",
                   "quoted": "7", "none": None, "tiny": 1e-5}
    for bad in ("novalue", "=3", "two words=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_backend_options([bad])
    opts = {"a": 1, "b": 0.25, "c": False, "d": None, "e": "text", "f": "7", "g": "yes", "h": "", "i": 2e-7}
    assert parse_backend_options(backend_options_to_argv(opts)[1::2]) == opts
    # the reference backend refuses what it does not know, before loading anything
    known = r"\(known: dtype, max_batch_size\)"
    with pytest.raises(ConfigError, match=r"backend 'reference': unknown option 'colour' " + known):
        get_backend("reference", str(tiny_dir), colour="red")
    with pytest.raises(ConfigError, match="'max_batch_size' must be an integer >= 1"):
        get_backend("reference", str(tiny_dir), max_batch_size="lots")
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        get_backend("reference", str(tiny_dir), dtype="float8")


def test_serve_with_a_bad_backend_option_exits_2_with_one_line(tiny_dir):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "dirl.cli", "serve", "--model", str(tiny_dir), "--device", "cpu", "--port", "9",
         "--backend-option", "max_batch_size=8", "--backend-option", "colour=red"],
        capture_output=True, text=True, timeout=120, cwd=root, env=_env(root))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown option 'colour'" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_serve_hands_backend_options_to_the_lmdeploy_constructor(tiny_dir, monkeypatch, capsys):
    """``--backend-option`` values reach LMDeployBackend's keyword arguments, typed (checked without
    LMDeploy: the constructor is replaced by one that reports what it got)."""
    from dirl import cli
    from dirl.rollout import lmdeploy_backend

    def fake(model_dir, **kwargs):
        raise ConfigError(f"reached with {sorted(kwargs.items(), key=str)}")

    monkeypatch.setattr(lmdeploy_backend, "LMDeployBackend", fake)
    argv = ["serve", "--model", str(tiny_dir), "--backend", "lmdeploy", "--device", "cuda", "--max-batch-size", "8",
            "--backend-option", "cache_max_entry_count=0.3", "--backend-option", "eager_mode=true",
            "--backend-option", "weight_segment_bytes=1048576"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for part in ("('cache_max_entry_count', 0.3)", "('eager_mode', True)", "('weight_segment_bytes', 1048576)",
                 "('max_batch_size', 8)", "('device', 'cuda')"):
        assert part in err, err
    assert cli.main(argv[:-2] + ["--backend-option", "eager_mode=maybe"]) == 2
    assert "option 'eager_mode' must be bool, got 'maybe'" in capsys.readouterr().err


def _env(root: Path) -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class SleepsWholly(ReferenceBackend):
    """Like LMDeploy 0.18: any sleep level also offloads the weights, and a weight update wakes them
    first (the KV cache stays asleep)."""

    def sleep(self, level: int = 1) -> None:
        super().sleep(2)

    def update_weights(self, named_tensors, finished):
        if self.asleep["weights"]:
            self.wakeup(["weights"])
        super().update_weights(named_tensors, finished)


def test_info_reports_what_the_backend_says_is_asleep(tiny_dir):
    from fastapi.testclient import TestClient

    from dirl.rollout.server import create_app
    from dirl.rollout.weights import inline_payload

    backend = SleepsWholly(str(tiny_dir), decoding=DECODING, device="cpu")
    both, awake = {"weights": True, "kv_cache": True}, {"weights": False, "kv_cache": False}
    with TestClient(create_app(backend, backend.parser())) as http:
        assert http.post("/sleep", json={"level": 1}).json()["asleep"] == both  # more than asked
        assert http.get("/info").json()["asleep"] == both
        r = http.post("/generate", json={"input_ids": [30, 31, 32]})
        assert r.status_code == 409 and "weights" in r.json()["error"]
        lm = backend.model.hf.lm_head.weight.detach().clone()
        r = http.post("/update_weights", json=inline_payload([("lm_head.weight", lm)], True))
        assert r.status_code == 200 and r.json()["asleep"] == {"weights": False, "kv_cache": True}
        assert http.get("/info").json()["asleep"] == {"weights": False, "kv_cache": True}
        assert http.post("/generate", json={"input_ids": [30, 31, 32]}).status_code == 409
        assert http.post("/wakeup", json={}).json()["asleep"] == awake
        assert http.get("/info").json()["asleep"] == awake
        assert http.post("/generate", json={"input_ids": [30, 31, 32]}).status_code == 200
        backend.asleep["kv_cache"] = True  # whatever the backend says, /info says
        assert http.get("/info").json()["asleep"] == {"weights": False, "kv_cache": True}
        backend.asleep["kv_cache"] = False


class InfoBug(ReferenceBackend):
    def info(self):
        raise RuntimeError("a bug in info")


def test_access_log_names_the_500_of_a_handler_bug(tiny_dir, capsys):
    """A bug in a handler is answered 500 with its reason, and the access log says 500 (not '-'),
    while the answered and refused requests around it keep their own codes."""
    from fastapi.testclient import TestClient

    from dirl.rollout.server import add_access_log, create_app

    backend = InfoBug(str(tiny_dir), decoding=DECODING, device="cpu")
    app = create_app(backend, backend.parser())
    add_access_log(app)
    with TestClient(app, raise_server_exceptions=False) as http:
        capsys.readouterr()
        assert http.get("/health").status_code == 200
        r = http.get("/info")
        assert r.status_code == 500 and "a bug in info" in r.json()["error"], r.text
        assert http.post("/generate", json={"input_ids": "x"}).status_code == 400
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dirl serve:")]
    assert lines == ["dirl serve: GET /health 200", "dirl serve: GET /info 500", "dirl serve: POST /generate 400"], lines


def test_flattened_buckets_round_trip():
    from dirl.rollout.weights import flatten_buckets, unflatten

    pairs = [("a", torch.randn(3, 4)), ("b", torch.arange(6).view(2, 3)), ("c", torch.randn(5)),
             ("d", torch.randn(2, 2).to(torch.bfloat16))]
    buckets = flatten_buckets(pairs, bucket_bytes=64)
    assert len({b.flat.dtype for b in buckets}) == 3 and len(buckets) >= 4
    back = dict(p for b in buckets for p in unflatten(b.flat, b.entries))
    assert set(back) == {"a", "b", "c", "d"}
    for name, t in pairs:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA IPC weight transport needs a GPU (trainer and server on one CUDA device)")
def test_ipc_weight_update_on_gpu(tiny_dir):
    from dirl.model.sdar import load_model

    model = load_model(tiny_dir, device="cuda", dtype="float32")
    with start_server(tiny_dir, decoding=DECODING, device="cuda", dtype="float32") as srv:
        client = RolloutClient([srv.url])
        probe = [{"request_id": "g", "input_ids": [30, 31, 32]}]
        before = client.generate(probe)
        with torch.no_grad():
            model.hf.lm_head.weight.mul_(40.0)
        assert client.push_weights(model, transport="ipc")["transport"] == "ipc"
        assert client.generate(probe)[0]["token_ids"] != before[0]["token_ids"]
        with torch.no_grad():
            model.hf.lm_head.weight.div_(40.0)
        client.push_weights(model, transport="ipc")
        assert client.generate(probe) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA IPC weight transport needs a GPU (trainer and server on one CUDA device)")
def test_ipc_push_keeps_one_segment_alive(tiny_dir, monkeypatch):
    """Each segment's CUDA buckets are freed once every server has loaded them, before the next
    segment is built: the trainer's extra GPU memory is one segment, not a copy of the model."""
    from dirl.model.sdar import load_model
    from dirl.rollout import weights as W

    model = load_model(tiny_dir, device="cuda", dtype="float32")
    seg = 128 << 10
    extra = []
    real = W.flatten_buckets

    def spy(group, bucket_bytes=W.DEFAULT_BUCKET_BYTES):
        torch.cuda.synchronize()
        extra.append(torch.cuda.memory_allocated() - base)
        return real(group, bucket_bytes)

    monkeypatch.setattr(W, "flatten_buckets", spy)
    with start_server(tiny_dir, decoding=DECODING, device="cuda", dtype="float32") as srv:
        client = RolloutClient([srv.url])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = client.push_weights(model, transport="ipc", segment_bytes=seg)
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated() - base
    total = sum(t.numel() * t.element_size() for t in model.hf.state_dict().values())
    assert out["transport"] == "ipc" and out["segments"] == len(extra) >= 4
    assert max(extra) < 2 * seg < total / 2, extra  # a segment's buckets die before the next is built
    assert after < seg, after


def _until(cond, what: str, bound_s: float = 120.0) -> None:
    """Wait for a state the server reaches on its own; the bound only keeps a broken run from hanging."""
    deadline = time.monotonic() + bound_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_client_that_goes_away_has_its_requests_dropped(tiny_dir):
    """A /generate caller that disconnects mid-decode (killed, timed out) costs the server no more
    forwards: the engine drops its rows before the next one, and the server keeps serving. The
    engine is held inside its first forward (an event, not a delay) until the server has seen the
    client go, so the drop always lands mid-decode. A real uvicorn server on 127.0.0.1."""
    import socket
    import threading

    import uvicorn

    from dirl.rollout.server import create_app

    backend = ReferenceBackend(str(tiny_dir), decoding=DecodingConfig(max_new_tokens=200, do_sample=False),
                               device="cpu")
    engine = backend.engine
    inside, release = threading.Event(), threading.Event()
    forward = engine._forward_rows

    def held_forward(*args, **kwargs):
        inside.set()
        release.wait()
        return forward(*args, **kwargs)

    engine._forward_rows = held_forward
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(backend, backend.parser()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        body = json.dumps({"requests": [{"request_id": f"r{i}", "prompt": "1+1=", "max_new_tokens": 200}
                                        for i in range(3)]}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert inside.wait(120), "the batch never reached the engine"
        client.close()  # the caller goes away while its batch is being decoded
        stats = lambda: httpx.get(url + "/info", timeout=60).json()["stats"]  # noqa: E731
        _until(lambda: stats()["cancelled_calls"] == 1, "the server to see the client go")
        engine._forward_rows = forward
        release.set()
        _until(lambda: engine.requests_cancelled == 3, "the engine to drop the rows")
        assert engine.forwards == 1, engine.forwards  # 200 tokens would take dozens of forwards
        assert stats()["cancelled_requests"] == 3
        # and the server serves the next caller as before
        r = httpx.post(url + "/generate", json={"request_id": "next", "prompt": "2+2=", "max_new_tokens": 4},
                       timeout=120)
        assert r.status_code == 200 and r.json()["request_id"] == "next", r.text
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)
