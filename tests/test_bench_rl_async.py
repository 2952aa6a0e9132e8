"""scripts/bench_rl_async.py end to end on the tiny model (two real `dirl rl` runs with their rollout
servers, 2 steps each): it runs, the second run is one step off-policy from its second step, and every
number it reports lands in its JSON. The speed-up target is the script's own (here set to 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sync_and_one_step_off_policy_side_by_side(tiny_dir, tmp_path):
    out = tmp_path / "async.json"
    scratch = tmp_path / "tmp"  # the script's temporary folder and its servers' logs land here
    scratch.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rl_async.py"), "--model", str(tiny_dir),
                        "--steps", "2", "--no-eval", "--min-speedup", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list(scratch.iterdir()), list(scratch.iterdir())  # nothing left behind
    d = json.loads(out.read_text())
    assert d["steps"] == 2 and d["model"] == str(tiny_dir)
    for mode, lag in (("staleness0", [0.0, 0.0]), ("staleness1", [0.0, 1.0])):
        m = d[mode]
        assert m["staleness_per_step"] == lag, m  # the first step has nothing to lag behind
        assert len(m["accuracy"]) == len(m["ratio_mean"]) == 2
        assert m["step_s"] > 0 and m["rollout_s"] > 0 and m["train_s"] > 0
    assert d["speedup"] > 0 and "| staleness 1 |" in r.stdout
