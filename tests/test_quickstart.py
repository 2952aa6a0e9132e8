"""The quick-start pipeline in a reduced form: every stage runs for real and leaves its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def chance_margin(p1: float, p2: float, problems: int, samples: int, z: float = 3.0) -> float:
    """z standard errors of the difference of two avg@k accuracies on the same problems if the two
    models were one: a problem's mean of k samples has variance p_i(1 - p_i)/k, whose sum over the
    problems is at most n p(1 - p)/k (p(1 - p) is concave), p the pooled accuracy. z = 3: a model that
    is no better passes with probability about 0.1%."""
    p = (p1 + p2) / 2
    return z * math.sqrt(2 * p * (1 - p) / (problems * samples))


@pytest.mark.slow
@pytest.mark.first
@pytest.mark.timeout(2700)  # about 7 minutes alone on 2 idle cores, 11-12 in a `pytest -n 2` worker
def test_reduced_quickstart_pipeline(tmp_path):
    out = tmp_path / "qs"
    # A shorter SFT stage (600 of the default's 800 steps: seed 0 has reached the teacher's ceiling by
    # then; at 450 RL's gain over SFT stayed within chance), a short RL stage (30 of 60 steps), 200
    # held-out problems x 4 samples at T = 1 for every model: RL's effect must stand out from chance at
    # that size. No control here (a fifth of this test's time): the speed-reward test below runs it.
    cmd = [
        sys.executable, "-m", "dirl.cli", "quickstart", "--out", str(out), "--no-control",
        "--sft", "train.max_steps=600", "logging.progress_bar=false", "--rl", "train.steps=30",
        "logging.progress_bar=false",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_quickstart_outputs(out, control=False)


def check_quickstart_outputs(out, control: bool = True) -> None:
    """What a finished quick-start folder must show (also usable on a full-size run's folder);
    ``control=False`` for a ``--no-control`` run."""
    for rel in ("tiny/config.json", "sft/summary.json", "sft/loss.png", "rl/summary.json", "rl/curves.png",
                "eval_untrained/report.md", "eval_sft/metrics.json", "eval_rl/responses.jsonl",
                "accuracy.png", "report.md", "summary.json"):
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "summary.json").read_text())
    if sys.platform.startswith("linux"):
        assert summary["stage_processes"] == "fork"  # not the slower fallback, silently
    ev = summary["eval"]
    assert set(ev) == {"untrained", "SFT", "SFT + RL"} | ({"SFT + more SFT"} if control else set())
    if control:
        check_control(out)
    else:
        assert not (out / "sft_control").exists() and summary["control"] == {}
    # SFT learnt to add (the untrained model never answers right), and RL had an effect: the training
    # reward rose and held-out accuracy after RL beats the SFT model's by more than chance gives.
    sft, after = ev["SFT"], ev["SFT + RL"]
    assert ev["untrained"]["accuracy"] == 0 and sft["accuracy"] >= 0.2, ev
    steps = [json.loads(ln) for ln in (out / "rl" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    third = len(steps) // 3
    first, last = (sum(r["reward/mean"] for r in part) / third for part in (steps[:third], steps[-third:]))
    assert last > first, (first, last)
    n, k = after["num_problems"], after["samples_per_problem"]
    margin = chance_margin(sft["accuracy"], after["accuracy"], n, k)
    print(f"SFT {sft['accuracy']:.3f} -> RL {after['accuracy']:.3f} (chance margin {margin:.3f}); "
          f"training reward {first:.3f} -> {last:.3f}")
    assert after["accuracy"] - sft["accuracy"] > margin, (sft, after, margin)
    # ... and it did so as the toy means it to: SFT learnt the teacher's slip, RL's reward unlearns it.
    slip_margin = chance_margin(sft["teacher_slip"], after["teacher_slip"], n, k)
    assert sft["teacher_slip"] > 0.1 and sft["teacher_slip"] - after["teacher_slip"] > slip_margin, (sft, after)
    # The accuracies reported are those of the stored responses, graded afresh.
    from dirl.rewards import grade_many

    for name, folder in (("untrained", "eval_untrained"), ("SFT", "eval_sft"), ("SFT + RL", "eval_rl")):
        rows = [json.loads(ln) for ln in (out / folder / "responses.jsonl").read_text().splitlines() if ln.strip()]
        fresh = [ok and r["finish_reason"] != "length"
                 for ok, r in zip(grade_many((r["text"], r["gold"]) for r in rows), rows)]
        assert [r["correct"] for r in rows] == fresh, name
        assert abs(ev[name]["accuracy"] - sum(fresh) / len(fresh)) < 1e-9, (name, ev[name])
        # the teacher's slip counted from the text: the true sum's last digit one higher, 9 -> 0
        slipped = sum(not ok and r["answer"] == r["gold"][:-1] + "1234567890"[int(r["gold"][-1])]
                      for ok, r in zip(fresh, rows))
        assert abs(ev[name]["teacher_slip"] - slipped / len(rows)) < 1e-9, (name, ev[name])
    assert summary["sft"]["loss_end"] < 0.4 * summary["sft"]["loss_start"]
    # The embedded default learns, seen through a decoder that shares no code with the engine:
    # greedy, no cache, one masked position a forward (tests/test_sft_train.py).
    from test_sft_train import heldout_scores
    from transformers import AutoTokenizer

    from dirl.data.synthetic import synthetic_problems
    from dirl.model.sdar import load_model

    test = synthetic_problems("test", n=100, seed=1)
    before, after_sft = (heldout_scores(load_model(d), AutoTokenizer.from_pretrained(d), test)
                         for d in (out / "tiny", summary["stages"]["SFT"]))
    print("held-out greedy before", before, "after SFT", after_sft)
    assert after_sft["formatted"] > 0.9 > before["formatted"]
    assert after_sft["digits"] > before["digits"] + 0.3
    assert after_sft["exact"] > 0.4 > before["exact"]
    report = (out / "report.md").read_text()
    assert "SFT + RL" in report and "accuracy.png" in report


def check_control(out) -> None:
    """The control of a quick-start folder: more SFT on the SFT stage's data, with other noise draws,
    for the steps the RL stage's seconds buy at SFT's pace, at the rate SFT ended with; evaluated on
    the problems the others were, and reported."""
    for rel in ("sft_control/summary.json", "eval_control/metrics.json", "eval_control/responses.jsonl"):
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "summary.json").read_text())
    control = summary["control"]
    assert control["steps"] >= 1 and 0 < control["lr"] <= 2e-3 and control["seconds"] > 0, control
    ctl = json.loads((out / "sft_control" / "summary.json").read_text())
    assert ctl["steps"] == control["steps"], (ctl, control)
    # the control trains on the SFT stage's data, with other noise draws
    sft_cfg, ctl_cfg = (yaml.safe_load((out / d / "config.yaml").read_text()) for d in ("sft", "sft_control"))
    assert ctl_cfg["data"] == sft_cfg["data"] and ctl_cfg["train"]["seed"] == sft_cfg["train"]["seed"] + 1
    assert ctl_cfg["optim"]["schedule"] == "constant" and ctl_cfg["optim"]["lr"] == control["lr"]
    sft_summary = json.loads((out / "sft" / "summary.json").read_text())
    pace = summary["stage_seconds"]["SFT"] / sft_summary["steps"]  # the summary's seconds are rounded to 0.1
    assert abs(control["steps"] - max(1, round(summary["stage_seconds"]["RL"] / pace))) <= 1, \
        (control, summary["stage_seconds"])
    assert ctl_cfg["model"]["path"] == summary["stages"]["SFT"]  # continued from the SFT model
    ev = summary["eval"]
    assert {k: ev["SFT + more SFT"][k] for k in ("num_problems", "samples_per_problem")} == \
        {k: ev["SFT"][k] for k in ("num_problems", "samples_per_problem")}
    assert "Control: the same" in (out / "report.md").read_text()


def test_block_size_option_makes_the_tiny_model_with_it(tmp_path, capsys):
    """``--block-size`` reaches the tiny model (SFT, RL and eval read it from the checkpoint), the
    rest of the shape stays, and a bad value stops before any stage runs."""
    from dirl.model.tiny_cli import cli_main as make_tiny
    from dirl.quickstart import TINY_SHAPE, cli_main, tiny_shape

    shape = tiny_shape(seed=3, block_size=8)
    assert "block_size=8" in shape and "seed=3" in shape
    assert [a for a in shape if not a.startswith(("block_size=", "seed="))] == \
        [a for a in TINY_SHAPE if not a.startswith(("block_size=", "seed="))]
    assert tiny_shape() == TINY_SHAPE
    from dirl.config import TinyModelConfig, embedded_tiny_shape, load_config

    assert load_config(TinyModelConfig, None, TINY_SHAPE) == embedded_tiny_shape()  # one shape, stated twice
    assert make_tiny(["--out", str(tmp_path / "tiny"), *shape]) == 0
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg["block_size"] == 8
    with pytest.raises(SystemExit) as e:
        cli_main(["--out", str(tmp_path / "qs"), "--block-size", "0"])
    assert e.value.code == 2
    assert "--block-size: must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


_STAGES = """
import json, sys
from pathlib import Path
from dirl import quickstart as q
out, tiny, port = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = out / "stages.log"
q._run("version", ["--version"], log)
try:
    q._run("bad shape", ["make-tiny-model", "--out", str(out / "t"), "hidden_size=0"], log)
except q.StageError as e:
    print("STAGE ERROR", e, flush=True)
print("MODES", json.dumps(q.STAGE_MODES), flush=True)
q._run("serve", ["serve", "--model", tiny, "--device", "cpu", "--port", port], log)  # until killed
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages are forked on Linux only")
@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_stages_are_forked_commands_that_die_with_the_quickstart(tmp_path, tiny_dir, how):
    """A stage is a fork of the quick-start running the command as ``python -m dirl.cli`` would:
    its output and exit code are the command's, a failure is the stage's error. A SIGKILLed
    quick-start takes the stage with it (and, with the stage, the servers it started); Ctrl-C (to
    the whole process group, as a terminal sends it) lets the stage finish its own shutdown, whose
    output is still read, and then interrupts the quick-start."""
    import os
    import signal

    import httpx
    from test_launch import _wait_gone

    from dirl import __version__
    from dirl.rollout.launch import free_port

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", _STAGES, str(tmp_path), str(tiny_dir), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        for line in parent.stdout:
            seen.append(line)
            if line.startswith("dirl serve:"):  # the server stage listens
                break
        text = "".join(seen)
        assert f"dirl {__version__}" in text, text
        assert ("STAGE ERROR stage 'bad shape' failed (exit code 2)" in text
                and "config key 'hidden_size': must be > 0" in text), text
        assert 'MODES ["fork", "fork"]' in text, text  # this test's parent runs no other thread
        log = (tmp_path / "stages.log").read_text()
        assert f"dirl {__version__}" in log and "hidden_size" in log
        stage = httpx.get(f"http://127.0.0.1:{port}/health").json()["pid"]
        assert stage != parent.pid and Path(f"/proc/{stage}/status").read_text().count(f"PPid:\t{parent.pid}\n") == 1
        if how == "sigkill":
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
        else:
            os.killpg(parent.pid, signal.SIGINT)
            rest = parent.stdout.read()
            assert parent.wait() != 0 and rest.rstrip().endswith("KeyboardInterrupt"), rest[-2000:]
        assert _wait_gone(stage), "the stage outlived the quick-start"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()


@pytest.mark.slow
def test_speed_reward_stage_trains_on_the_speed_reward(tmp_path):
    """``--speed-reward``: a second RL run from the same SFT model whose rewards are the speed reward
    of SPEC section 7 (accuracy weight 0, speed 1), evaluated and reported like the others. Reduced
    stages; the reward's values are checked by hand in tests/test_rewards.py."""
    out = tmp_path / "qs"
    small_eval = ["data.synthetic_size=8", "num_samples=2"]
    cmd = [sys.executable, "-m", "dirl.cli", "quickstart", "--out", str(out), "--speed-reward",
           "--sft", "train.max_steps=40", "logging.progress_bar=false", "--rl", "train.steps=2",
           "logging.progress_bar=false", "rollout.decoding.confidence_threshold=0.2",  # a barely trained
           "--eval", *small_eval, "--baseline-eval", *small_eval]  # model keeps several tokens a step only so
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = {d: yaml.safe_load((out / d / "config.yaml").read_text()) for d in ("rl", "rl_speed")}
    assert runs["rl_speed"]["model"]["path"] == runs["rl"]["model"]["path"]  # both from the SFT model
    assert {k: v for k, v in runs["rl_speed"]["rewards"]["weights"].items() if v} == {"speed": 1}
    assert {k: v for k, v in runs["rl"]["rewards"]["weights"].items() if v} == {"accuracy": 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["RL (speed)"].startswith(str(out / "rl_speed"))
    speed_eval = summary["eval"]["SFT + RL (speed reward)"]
    assert (speed_eval["num_problems"], speed_eval["samples_per_problem"]) == (8, 2)
    assert speed_eval["tokens_per_step"] >= 1
    assert "SFT + RL (speed reward)" in (out / "report.md").read_text()
    check_control(out)  # this test runs the control (the reduced quick-start above does not)

    def samples(run: str) -> list[tuple[bool, float, float]]:
        rows = [json.loads(ln) for ln in (out / run / "samples.jsonl").read_text().splitlines() if ln.strip()]
        return [x for g in rows for x in zip(g["correct"], g["rewards"], g["tokens_per_step"], strict=True)]

    def speed_by_hand(correct: bool, tps: float, B: int = 4) -> float:
        # SPEC section 7: c(t; T, v_min, v_max) = v_max - (v_max - v_min)(1 - cos(pi t / T)) / 2,
        # t = clip(s - 1, 0, B - 1); correct: c(t; B - 1, 1.0, 0.5), wrong: c(t; B - 1, -0.5, 0.0)
        t = min(max(tps - 1, 0.0), B - 1)
        v_min, v_max = (1.0, 0.5) if correct else (-0.5, 0.0)
        return v_max - (v_max - v_min) * (1 - math.cos(math.pi * t / (B - 1))) / 2

    assert all(x == float(c) for c, x, _ in samples("rl"))  # accuracy only: 0 or 1
    speed = samples("rl_speed")
    assert len(speed) == 2 * 8 * 8
    assert all(abs(x - speed_by_hand(c, s)) < 1e-9 for c, x, s in speed), speed
    assert any(s > 1 for _, _, s in speed)  # some samples kept several tokens a step: the reward moved
