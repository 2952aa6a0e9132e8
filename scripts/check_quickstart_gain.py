#!/usr/bin/env python3
"""The full-size quick-start gain check (the CI test runs a reduced pipeline; this one is the real size).

    python scripts/check_quickstart_gain.py                 # runs `dirl quickstart` into runs/gain-check-<time>
    python scripts/check_quickstart_gain.py --summary runs/quickstart-.../summary.json   # check a finished run

Passes (exit 0) when held-out accuracy after RL is at least --min-gain points (default 10) above the
SFT model's, on at least 200 problems with at least 4 samples each; a missed target exits 1 with a
line naming it (exit 2: the summary cannot be checked). Prints the numbers, the control
(the same minutes of more SFT) and a Markdown table row for docs/QUICKSTART.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", default="", help="summary.json of a finished quick-start (skip the run)")
    p.add_argument("--out", default="", help="output folder of the run (default runs/gain-check-<time>)")
    p.add_argument("--min-gain", type=float, default=10.0, help="points RL must add over SFT")
    args = p.parse_args()

    if args.summary:
        summary_path = Path(args.summary)
    else:
        out = Path(args.out or f"runs/gain-check-{time.strftime('%Y%m%d-%H%M%S')}")
        rc = subprocess.call([sys.executable, "-m", "dirl.cli", "quickstart", "--out", str(out)])
        if rc != 0:
            print(f"check_quickstart_gain: the quick-start failed (exit {rc})", file=sys.stderr)
            return rc
        summary_path = out / "summary.json"
    s = json.loads(summary_path.read_text())
    ev = s["eval"]
    sft, rl, ctl = ev.get("SFT"), ev.get("SFT + RL"), ev.get("SFT + more SFT")
    if not sft or not rl:
        print(f"check_quickstart_gain: {summary_path} has no SFT and SFT + RL evaluations", file=sys.stderr)
        return 2
    for name, m in (("SFT", sft), ("SFT + RL", rl)):
        if m.get("num_problems", 0) < 200 or m.get("samples_per_problem", 0) < 4:
            print(f"check_quickstart_gain: the {name} evaluation has {m.get('num_problems')} problems x "
                  f"{m.get('samples_per_problem')} samples; the check needs >= 200 x >= 4", file=sys.stderr)
            return 2
    gain = 100 * (rl["accuracy"] - sft["accuracy"])
    print(f"SFT       {100 * sft['accuracy']:.1f}%")
    print(f"SFT + RL  {100 * rl['accuracy']:.1f}%   gain {gain:+.1f} points (need >= {args.min_gain:g})")
    row_ctl = "–"
    if ctl:
        c = s.get("control", {})
        print(f"control   {100 * ctl['accuracy']:.1f}%   ({c.get('steps')} more SFT steps in the RL stage's "
              f"{c.get('seconds', 0):.0f} s): {100 * (ctl['accuracy'] - sft['accuracy']):+.1f} points")
        row_ctl = f"{100 * ctl['accuracy']:.1f}%"
    print(f"total     {s['seconds']:.0f} s")
    print("\n| date | machine | total | SFT | SFT + RL | gain | more SFT (control) |")
    print(f"| {time.strftime('%Y-%m-%d')} | {platform.machine()}, {_cores()} cores | {s['seconds'] / 60:.1f} min | "
          f"{100 * sft['accuracy']:.1f}% | {100 * rl['accuracy']:.1f}% | {gain:+.1f} | {row_ctl} |")
    if gain < args.min_gain:
        print(f"check_quickstart_gain: target missed: RL gain over SFT {gain:+.1f} points >= {args.min_gain:g}",
              file=sys.stderr)
        return 1
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main())
