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


def write_run(out: Path, seed: int, speed_gain: float, problems: int = 200, samples: int = 4) -> Path:
    """A finished quick-start's summary and responses: every answer correct, the speed run's tokens per
    step ``speed_gain`` above the accuracy-only run's on each problem, plus noise; the speed run
    restates every answer, the others half."""
    rng = random.Random(seed)
    ev = {}
    for name, folder in NAMES.items():
        (out / folder).mkdir(parents=True)
        recs = []
        for i in range(problems):
            base = 2.5 + rng.gauss(0, 0.3)
            for j in range(samples):
                tps = base + (speed_gain if folder == "eval_rl_speed" else 0.0) + rng.gauss(0, 0.05)
                restate = folder == "eval_rl_speed" or j % 2 == 0
                text = ("12+34: " if restate else "") + "2+4=6, 1+3=4. \\boxed{46}"
                recs.append({"benchmark": "synthetic", "problem_id": f"p{i}", "sample": j, "text": text,
                             "correct": True, "tokens_per_step": tps, "num_steps": 10})
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
    ok = [write_run(tmp_path / f"s{s}", s, 0.1) for s in range(3)]
    r = check(*ok)
    assert r.returncode == 0, r.stderr
    assert "| 0 | 90.0%" in r.stdout and "100%" in r.stdout and "50%" in r.stdout  # restated shares
    flat = write_run(tmp_path / "flat", 3, 0.0)
    r = check(*ok, flat)
    assert r.returncode == 1
    assert "seed 3: tokens per step" in r.stderr and "not above 2 standard errors" in r.stderr
    assert "seed 0" not in r.stderr


def test_missing_responses_are_named(tmp_path):
    path = write_run(tmp_path / "s0", 0, 0.1)
    (tmp_path / "s0" / "eval_rl_speed" / "responses.jsonl").unlink()
    r = check(path)
    assert r.returncode == 2 and "eval_rl_speed" in r.stderr and "responses" in r.stderr
