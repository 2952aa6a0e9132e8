"""scripts/check_quickstart_gain.py's speed claim, on quick-start folders written here: the per-problem
difference of tokens per step and its standard error come from the stored responses."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_quickstart_gain.py"
NAMES = {"SFT": "eval_sft", "SFT + RL": "eval_rl", "SFT + RL (speed reward)": "eval_rl_speed"}


def write_run(out: Path, seed: int, speed_gain: float, problems: int = 200, samples: int = 4,
              speed_ids: str = "p") -> Path:
    """A finished quick-start's summary and responses: every answer correct; each problem has its own
    tokens per step (spread 0.3 across problems, the same in every evaluation), the speed run's
    ``speed_gain`` above the others', plus 0.05 of noise per sample. Only a difference taken per
    problem sees a small gain: across problems the spread hides it. The speed run restates every
    answer, the others half; ``speed_ids`` prefixes its problem ids."""
    rng = random.Random(seed)
    ev = {}
    for name, folder in NAMES.items():
        (out / folder).mkdir(parents=True)
        recs = []
        for i in range(problems):
            base = 2.5 + random.Random(i).gauss(0, 0.3)
            for j in range(samples):
                tps = base + (speed_gain if folder == "eval_rl_speed" else 0.0) + rng.gauss(0, 0.05)
                restate = folder == "eval_rl_speed" or j % 2 == 0
                text = "2+4=6, 1+3=4. \\boxed{46}"  # restated first or, every other problem, after the answer
                text = (f"{text} (12+34)" if i % 2 else f"12+34: {text}") if restate else text
                pid = f"{speed_ids if folder == 'eval_rl_speed' else 'p'}{i}"
                recs.append({"benchmark": "synthetic", "problem_id": pid, "sample": j, "text": text,
                             "question": f"q{i}", "correct": True, "tokens_per_step": tps, "num_steps": 10,
                             "response_length": 20})
        (out / folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        ev[name] = {"num_problems": problems, "samples_per_problem": samples, "accuracy": 0.9,
                    "tokens_per_step": sum(r["tokens_per_step"] for r in recs) / len(recs)}
    path = out / "summary.json"
    path.write_text(json.dumps({"seed": seed, "seconds": 300.0, "eval": ev}))
    return path


def check(*summaries: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--speed-only", "--summary", *map(str, summaries)],
                          capture_output=True, text=True, cwd=ROOT)


def test_a_speed_gain_well_above_its_standard_error_passes_and_one_within_it_fails(tmp_path):
    # 0.03 is about 12 standard errors of the per-problem difference and 1 of an unpaired one
    ok = [write_run(tmp_path / f"s{s}", s, 0.03) for s in range(3)]
    r = check(*ok)
    assert r.returncode == 0, r.stderr
    assert "| 0 | 90.0%" in r.stdout and "100%" in r.stdout and "50%" in r.stdout  # restated shares
    flat = write_run(tmp_path / "flat", 3, 0.0)
    r = check(*ok, flat)
    assert r.returncode == 1
    assert "seed 3: tokens per step" in r.stderr and "not above 2 standard errors" in r.stderr
    assert "seed 0" not in r.stderr


def test_missing_responses_unpaired_problems_and_missing_step_maps_are_named(tmp_path):
    path = write_run(tmp_path / "s0", 0, 0.1)
    (tmp_path / "s0" / "eval_rl_speed" / "responses.jsonl").unlink()
    r = check(path)
    assert r.returncode == 2 and "eval_rl_speed" in r.stderr and "responses" in r.stderr
    r = check(write_run(tmp_path / "s1", 1, 0.1, speed_ids="x"))
    assert r.returncode == 2 and "pose different problems" in r.stderr
    path = write_run(tmp_path / "s2", 2, 0.1)
    f = tmp_path / "s2" / "eval_rl_speed" / "responses.jsonl"
    f.write_text("".join(json.dumps(dict(json.loads(x), tokens_per_step=None)) + "\n" for x in f.read_text().splitlines()))
    r = check(path)
    assert r.returncode == 2 and "no response with tokens per step" in r.stderr


def test_a_run_without_the_speed_evaluation_is_a_missed_target_not_a_crash(tmp_path):
    with_speed = write_run(tmp_path / "s0", 0, 0.1)
    without = write_run(tmp_path / "s1", 1, 0.1)
    s = json.loads(without.read_text())
    del s["eval"]["SFT + RL (speed reward)"]
    without.write_text(json.dumps(s))
    r = subprocess.run([sys.executable, str(SCRIPT), "--summary", str(with_speed), str(without)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "seed 1: no speed-reward evaluation" in r.stderr
