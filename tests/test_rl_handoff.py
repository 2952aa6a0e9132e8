"""The memory hand-off of an RL step on a shared device (SPEC section 8), against real servers: the
servers roll out awake, sleep from the end of the rollout until the weight push (the log-prob pass
and the updates run while their KV cache is freed), then take the new weights and wake. The order
of the calls is read from the server's own access log, the state from its /info during each phase."""

from __future__ import annotations

import contextlib
import itertools
import sys

import pytest

from dirl.train.rl.config import load_rl_config
from dirl.train.rl.recipe import rl_step, setup_run


def _cfg(tmp_path, tiny_dir, extra=()):
    return load_rl_config(None, [
        f"model.path={tiny_dir}", f"output_dir={tmp_path}", "run_name=run", "runs_dir=/nonexistent",
        "train.steps=1", "train.prompts_per_step=2", "train.num_generations=4", "train.micro_batch_size=8",
        "train.filter_groups=false", "rollout.decoding.max_new_tokens=8", "eval.enabled=false",
        "logging.progress_bar=false", "logging.tensorboard=false", "log_samples=false", *extra])


def _posts(log_text: str) -> list[str]:
    """POST paths in the order the server answered them, repeats folded."""
    paths = [ln.split()[3] for ln in log_text.splitlines() if ln.startswith("dirl serve: POST ")]
    return [p for p, _ in itertools.groupby(paths)]


@pytest.mark.parametrize("sleeps", [True, False])
def test_colocated_servers_sleep_while_the_trainer_trains(tiny_dir, tmp_path, monkeypatch, sleeps):
    monkeypatch.setenv("DIRL_SERVER_ACCESS_LOG", "1")
    extra = [] if sleeps else ["rollout.sleep_while_training=false"]
    seen: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as cleanup:
        run = setup_run(_cfg(tmp_path, tiny_dir, extra), cleanup)
        assert run.servers.mode == "started" and run.sleeps is sleeps

        def probe(phase: str) -> None:
            seen.setdefault(phase, []).append(run.servers.client.info()[0]["asleep"])

        run.phase_hook = probe
        metrics = rl_step(run, 0)
        after = run.servers.client.info()[0]["asleep"]
    assert metrics["updates"] == 1
    awake = {"weights": False, "kv_cache": False}
    assert seen["rollout"] and all(a == awake for a in seen["rollout"])
    for phase in ("logprobs", "update"):
        assert seen[phase], phase
        assert all(a["kv_cache"] is sleeps for a in seen[phase]), (phase, seen[phase])
    assert after == awake
    log = (tmp_path / "run" / "logs" / "server-rank0.log").read_text()
    # generate ... sleep (once) ... update_weights ... wakeup; nothing generated while asleep
    assert _posts(log) == ["/generate", "/sleep", "/update_weights", "/wakeup"], log[-2000:]
    assert sum(ln.startswith("dirl serve: POST /sleep ") for ln in log.splitlines()) == 1
    assert metrics["time/sleep"] >= 0 and metrics["time/weight_push"] > 0


def _status_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status (Linux)")
def test_the_reference_engine_holds_no_kv_cache_while_asleep(tmp_path):
    """Measured from the server process: its peak resident memory during a long batched generation
    grows by about the KV cache's size, and asleep its resident memory is back near where it started.
    (The reference engine keeps its cache only inside a generate call; glibc's mmap threshold is
    pinned so freed blocks go back to the system at once.)"""
    from dirl.config import DecodingConfig, TinyModelConfig
    from dirl.model.tiny import make_tiny_model
    from dirl.rollout.client import RolloutClient
    from dirl.rollout.launch import start_server

    shape = TinyModelConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=64, intermediate_size=256, max_position_embeddings=1024)
    model_dir = make_tiny_model(tmp_path / "m", shape)
    rows, new = 32, 256
    server = start_server(model_dir, decoding=DecodingConfig(max_new_tokens=new), device="cpu", max_batch_size=rows,
                          threads=1, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    try:
        client = RolloutClient([server.url], api_key=server.api_key, batch_size=rows, max_concurrency=1)
        req = {"prompt": "What is 12+34?", "max_new_tokens": new, "stop_token_ids": [], "temperature": 1.0,
               "do_sample": True}
        client.generate([dict(req, request_id="warm", max_new_tokens=8, seed=0)])  # kernels, first allocations
        pid = server.proc.pid
        before = _status_kib(pid, "VmRSS")
        out = client.generate([dict(req, request_id=f"r{i}", seed=i) for i in range(rows)])
        assert all(len(t["token_ids"]) >= new for t in out)
        peak = _status_kib(pid, "VmHWM")
        client.sleep(1)
        asleep = _status_kib(pid, "VmRSS")
        assert client.info()[0]["asleep"]["kv_cache"] is True
    finally:
        server.stop()
    # K and V of every layer for every cached token, fp32
    kv_kib = rows * (new + 16) * shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * 4 / 1024
    print(f"RSS before {before} KiB, peak {peak} KiB, asleep {asleep} KiB, KV cache {kv_kib:.0f} KiB")
    assert peak - before >= 0.8 * kv_kib, (before, peak, kv_kib)
    assert asleep - before <= 0.25 * kv_kib, (before, asleep, kv_kib)
