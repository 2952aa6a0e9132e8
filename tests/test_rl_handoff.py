"""The memory hand-off of an RL step on a shared device (SPEC section 8), against real servers: the
servers roll out awake, sleep from the end of the rollout until the weight push (the log-prob pass
and the updates run while their KV cache is freed), then take the new weights and wake. The order
of the calls is read from the server's own access log, the state from its /info during each phase."""

from __future__ import annotations

import contextlib
import itertools

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
