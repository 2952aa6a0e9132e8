#!/usr/bin/env python3
"""The quick-start's claims, checked over several seeds (the CI test runs a reduced pipeline; this is
the real size).

    python scripts/check_quickstart_gain.py                        # `dirl quickstart --seed S`, S = 0 1 2
    python scripts/check_quickstart_gain.py --seeds 0 1 2 --speed-reward
    python scripts/check_quickstart_gain.py --summary runs/qs-seed0/summary.json runs/qs-seed1/summary.json

For each seed (the tiny model's initialisation, the SFT data and noise, the RL prompts and samples
all change with it) the held-out accuracy after RL must be at least --min-gain points (default 10)
above the SFT model's and at least --min-over-control points (default 5) above the control (the
RL stage's seconds spent on more SFT), on at least 200 problems x 4 samples; the default pipeline
must finish within --max-minutes (default 8; the speed-reward stages are not counted). With
--speed-reward, RL with the speed reward must decode more tokens per step than accuracy-only RL with
no accuracy loss beyond what sampling gives at that size (2 standard errors). Prints the per-seed
table with mean, min and max (Markdown, for README.md and docs/QUICKSTART.md); exits 1 naming each
missed target, 2 when a summary cannot be checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SFT, RL, CTL, SPEED = "SFT", "SFT + RL", "SFT + more SFT", "SFT + RL (speed reward)"
EXTRA_STAGES = ("RL (speed)", "eval SFT + RL (speed)")  # not part of the default pipeline's time


def chance_margin(p1: float, p2: float, problems: int, samples: int, z: float) -> float:
    """z standard errors of the difference of two avg@k accuracies on the same problems when the models
    are equal: per problem the mean of k samples has variance p_i(1 - p_i)/k, and summed over problems
    that is at most n p(1 - p)/k (concavity), so sqrt(2 p(1 - p)/(n k)) bounds the standard error, p the
    pooled accuracy."""
    p = (p1 + p2) / 2
    return z * math.sqrt(2 * p * (1 - p) / (problems * samples))


def run_seed(seed: int, out: Path, speed: bool, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "dirl.cli", "quickstart", "--out", str(out), "--seed", str(seed), *extra]
    if speed:
        cmd.append("--speed-reward")
    print(f"\n##### seed {seed}: {' '.join(cmd[2:])}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"check_quickstart_gain: the quick-start of seed {seed} failed (exit {rc})")
    return out / "summary.json"


def row_of(path: Path) -> dict:
    s = json.loads(path.read_text())
    ev = s["eval"]
    if SFT not in ev or RL not in ev:
        raise ValueError(f"{path} has no SFT and SFT + RL evaluations")
    for name in (SFT, RL, CTL, SPEED):
        m = ev.get(name)
        if m and (m.get("num_problems", 0) < 200 or m.get("samples_per_problem", 0) < 4):
            raise ValueError(f"the {name} evaluation of {path} has {m.get('num_problems')} problems x "
                             f"{m.get('samples_per_problem')} samples; the check needs >= 200 x >= 4")
    stage_s = s.get("stage_seconds", {})
    default_s = sum(v for k, v in stage_s.items() if k not in EXTRA_STAGES) if stage_s else s["seconds"]

    def acc(name: str):
        return None if name not in ev else 100 * ev[name]["accuracy"]

    def tps(name: str):
        return None if name not in ev else ev[name].get("tokens_per_step")

    def slip(name: str):
        return None if name not in ev or "teacher_slip" not in ev[name] else 100 * ev[name]["teacher_slip"]

    seed = s.get("seed")
    return {"path": str(path), "seed": seed, "sft": acc(SFT), "rl": acc(RL), "ctl": acc(CTL), "speed": acc(SPEED),
            "slips": " / ".join(fmt(slip(x)) for x in (SFT, RL, CTL)),
            "tps_rl": tps(RL), "tps_speed": tps(SPEED), "minutes": default_s / 60,
            "n": ev[RL]["num_problems"], "k": ev[RL]["samples_per_problem"]}


def fmt(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--summary", nargs="+", default=[], help="summary.json files of finished quick-starts (no runs)")
    p.add_argument("--out", default="", help="parent folder of the runs (default runs/gain-check-<time>)")
    p.add_argument("--speed-reward", action="store_true", help="also run and check RL with the speed reward")
    p.add_argument("--min-gain", type=float, default=10.0, help="points RL must add over SFT")
    p.add_argument("--min-over-control", type=float, default=5.0, help="points RL must add over the control")
    p.add_argument("--max-minutes", type=float, default=8.0, help="wall time of the default pipeline")
    p.add_argument("extra", nargs="*", help="further `dirl quickstart` arguments (after --)")
    args = p.parse_args()

    if args.summary:
        paths = [Path(x) for x in args.summary]
    else:
        parent = Path(args.out or f"runs/gain-check-{time.strftime('%Y%m%d-%H%M%S')}")
        paths = [run_seed(sd, parent / f"seed{sd}", args.speed_reward, args.extra) for sd in args.seeds]
    try:
        rows = [row_of(x) for x in paths]
    except (ValueError, KeyError, OSError) as e:
        print(f"check_quickstart_gain: {e}", file=sys.stderr)
        return 2

    misses = []
    speed = any(r["speed"] is not None for r in rows)
    head = ("| seed | SFT | SFT + RL | more SFT (control) | RL − SFT | RL − control | the teacher's slip, % "
            "(SFT / RL / control) | minutes |")
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if speed:
        head += " RL (speed) | tokens/step RL → speed |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        gain = r["rl"] - r["sft"]
        over = None if r["ctl"] is None else r["rl"] - r["ctl"]
        r["gain"], r["over"] = gain, over
        line = (f"| {fmt(r['seed'], 'd') if isinstance(r['seed'], int) else '?'} | {fmt(r['sft'])}% | {fmt(r['rl'])}% | "
                f"{fmt(r['ctl'])}% | {gain:+.1f} | {fmt(over, '+.1f')} | {r['slips']} | {r['minutes']:.1f} |")
        if speed:
            line += f" {fmt(r['speed'])}% | {fmt(r['tps_rl'], '.2f')} → {fmt(r['tps_speed'], '.2f')} |"
        lines.append(line)
        tag = f"seed {r['seed']}"
        if gain < args.min_gain:
            misses.append(f"{tag}: RL − SFT {gain:+.1f} points < {args.min_gain:g}")
        if over is None:
            misses.append(f"{tag}: no control evaluation")
        elif over < args.min_over_control:
            misses.append(f"{tag}: RL − control {over:+.1f} points < {args.min_over_control:g}")
        if r["minutes"] > args.max_minutes:
            misses.append(f"{tag}: the default pipeline took {r['minutes']:.1f} min > {args.max_minutes:g}")
        if speed:
            if r["speed"] is None:
                misses.append(f"{tag}: no speed-reward evaluation")
            else:
                margin = chance_margin(r["rl"] / 100, r["speed"] / 100, r["n"], r["k"], 2.0) * 100
                if r["speed"] < r["rl"] - margin:
                    misses.append(f"{tag}: speed-reward accuracy {r['speed']:.1f}% below accuracy-only RL "
                                  f"{r['rl']:.1f}% by more than {margin:.1f} points (2 standard errors)")
                if not (r["tps_speed"] or 0) > (r["tps_rl"] or 0):
                    misses.append(f"{tag}: tokens per step {fmt(r['tps_speed'], '.2f')} with the speed reward, "
                                  f"not above accuracy-only RL's {fmt(r['tps_rl'], '.2f')}")

    def stat(key: str, f, spec: str) -> str:
        vals = [r[key] for r in rows if r[key] is not None]
        return fmt(f(vals), spec) if vals else "–"

    for label, f in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        line = (f"| {label} | {stat('sft', f, '.1f')}% | {stat('rl', f, '.1f')}% | {stat('ctl', f, '.1f')}% | "
                f"{stat('gain', f, '+.1f')} | {stat('over', f, '+.1f')} | | {stat('minutes', f, '.1f')} |")
        if speed:
            line += f" {stat('speed', f, '.1f')}% | {stat('tps_rl', f, '.2f')} → {stat('tps_speed', f, '.2f')} |"
        lines.append(line)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nHeld-out accuracy, {rows[0]['n']} problems × {rows[0]['k']} samples, T = 1 "
          f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {cores} cores):\n")
    print("\n".join(lines))
    for m in misses:
        print(f"check_quickstart_gain: target missed: {m}", file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
