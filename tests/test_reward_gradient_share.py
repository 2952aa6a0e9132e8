"""scripts/reward_gradient_share.py end to end on the tiny model: three real one-step `dirl rl` runs
(reference server, same rollouts), the steps read back from the checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_three_steps_on_the_same_rollouts(tiny_dir, tmp_path):
    out = tmp_path / "share"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "reward_gradient_share.py"), "--model", str(tiny_dir),
                        "--prompts", "3", "--out", str(out), "--rl", "train.num_generations=4",
                        "rollout.decoding.max_new_tokens=12"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + (out / "runs.log").read_text()[-3000:]
    groups = re.search(r"groups: groups (\d+), all correct (\d+), all correct, speeds differ (\d+), mixed (\d+), "
                       r"all wrong (\d+)", r.stdout)
    assert groups, r.stdout
    n, correct, differ, mixed, wrong = map(int, groups.groups())
    assert n == 3 and correct + mixed + wrong == n and differ <= correct
    # the untrained model answers nothing right, one token per step: no accuracy step and no speed
    # ranking, but the control ranks its different wrong answers at random, so its step is not zero
    assert wrong == n and "no group has both correct and wrong answers" in r.stdout, r.stdout
    assert float(re.search(r"speed reward: +\|step\| ([0-9.]+)", r.stdout).group(1)) == 0.0, r.stdout
    assert float(re.search(r"random ranking reward: +\|step\| ([0-9.]+)", r.stdout).group(1)) > 0, r.stdout
    for name in ("accuracy", "speed", "random-ranking"):
        assert (out / name / "checkpoints" / "step_00000001" / "model" / "config.json").is_file()
