#!/usr/bin/env python3
"""The quick-start's claims, checked over several seeds (the CI test runs a reduced pipeline; this is
the real size).

    python scripts/check_quickstart_gain.py                        # `dirl quickstart --seed S`, S = 0 1 2
    python scripts/check_quickstart_gain.py --seeds 0 1 2 --speed-reward
    python scripts/check_quickstart_gain.py --speed-only -- --no-control --sft data.teacher_echo=0.5 \
        data.teacher_echo_at=end data.max_length=112     # the speed reward with two texts per answer
    python scripts/check_quickstart_gain.py --summary runs/qs-seed0/summary.json runs/qs-seed1/summary.json

For each seed (the tiny model's initialisation, the SFT data and noise, the RL prompts and samples
all change with it) the held-out accuracy after RL must be at least --min-gain points (default 10)
above the SFT model's and at least --min-over-control points (default 5) above the control (the
RL stage's seconds spent on more SFT), on at least 200 problems x 4 samples; the default pipeline
must finish within --max-minutes (default 8; the speed-reward stages are not counted). With
--speed-reward, RL with the speed reward must decode more tokens per step than accuracy-only RL, by
more than 2 standard errors of the per-problem difference (each problem's mean over its samples;
the two evaluations pose the same problems), with no accuracy loss beyond what sampling gives at
that size (2 standard errors). --speed-only runs the quick-starts with --speed-reward and checks
only that claim, with the steps per answer and the share of answers that restate the sum (the
`data.teacher_echo` task variant, docs/QUICKSTART.md) in its table. Prints the per-seed
table with mean, min and max (Markdown, for README.md and docs/QUICKSTART.md); exits 1 naming each
missed target, 2 when a summary cannot be checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SFT, RL, CTL, SPEED = "SFT", "SFT + RL", "SFT + more SFT", "SFT + RL (speed reward)"
EXTRA_STAGES = ("RL (speed)", "eval SFT + RL (speed)")  # not part of the default pipeline's time
EVAL_DIRS = {RL: "eval_rl", SPEED: "eval_rl_speed"}  # the quick-start's folders of these evaluations
RESTATED = re.compile(r"^\s*\d+\+\d+:|\(\d+\+\d+\)\s*$")  # data.teacher_echo's text, at the start or the end


def chance_margin(p1: float, p2: float, problems: int, samples: int, z: float) -> float:
    """z standard errors of the difference of two avg@k accuracies on the same problems when the models
    are equal: per problem the mean of k samples has variance p_i(1 - p_i)/k, and summed over problems
    that is at most n p(1 - p)/k (concavity), so sqrt(2 p(1 - p)/(n k)) bounds the standard error, p the
    pooled accuracy."""
    p = (p1 + p2) / 2
    return z * math.sqrt(2 * p * (1 - p) / (problems * samples))


def per_problem(responses: Path) -> dict[str, dict[str, float]]:
    """Each problem's mean tokens per step and steps over its samples and the share of its samples
    that restate the sum, from an evaluation's responses.jsonl. Like the evaluation's own metric,
    samples with no step map or no tokens are left out of the first two (a problem with none left has
    None there). Keyed by benchmark and problem id, with the question, so two evaluations can be
    paired."""
    by: dict[str, list[dict]] = {}
    with open(responses, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by.setdefault(f"{r['benchmark']}/{r['problem_id']}", []).append(r)

    def mean(vals: list[float]):
        return statistics.fmean(vals) if vals else None

    out = {}
    for k, v in by.items():
        timed = [r for r in v if r.get("tokens_per_step") is not None and (r.get("response_length") or 0) > 0]
        out[k] = {"question": v[0].get("question"),
                  "tps": mean([float(r["tokens_per_step"]) for r in timed]),
                  "steps": mean([float(r["num_steps"]) for r in timed]),
                  "restated": statistics.fmean(float(bool(RESTATED.search(r["text"]))) for r in v)}
    if not any(x["tps"] is not None for x in out.values()):
        raise ValueError(f"{responses} has no response with tokens per step")
    return out


def paired(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Mean over the problems of b's value minus a's, and its standard error. The two evaluations
    must pose the same problems (ids and questions); problems without a value in either are left out."""
    if set(a) != set(b):
        raise ValueError(f"the two evaluations pose different problems ({len(set(a) ^ set(b))} ids in one only)")
    bad = [k for k in a if a[k]["question"] != b[k]["question"]]
    if bad:
        raise ValueError(f"the two evaluations pose different questions under one id ({bad[0]})")
    d = [b[k][key] - a[k][key] for k in a if a[k][key] is not None and b[k][key] is not None]
    if len(d) < 2:
        raise ValueError(f"fewer than 2 problems have {key} in both evaluations")
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def overall(x: dict, key: str):
    vals = [v[key] for v in x.values() if v[key] is not None]
    return statistics.fmean(vals) if vals else None


def run_seed(seed: int, out: Path, speed: bool, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "dirl.cli", "quickstart", "--out", str(out), "--seed", str(seed), *extra]
    if speed and "--speed-reward" not in cmd:
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
    row = {"path": str(path), "seed": seed, "sft": acc(SFT), "rl": acc(RL), "ctl": acc(CTL), "speed": acc(SPEED),
           "slips": " / ".join(fmt(slip(x)) for x in (SFT, RL, CTL)),
           "tps_sft": tps(SFT), "tps_rl": tps(RL), "tps_speed": tps(SPEED), "minutes": default_s / 60,
           "n": ev[RL]["num_problems"], "k": ev[RL]["samples_per_problem"]}
    if SPEED in ev:
        found = {name: path.parent / d / "responses.jsonl" for name, d in EVAL_DIRS.items()}
        for name, f in found.items():
            if not f.is_file():
                raise ValueError(f"the {name} evaluation's responses are not at {f}")
        a, b = per_problem(found[RL]), per_problem(found[SPEED])
        row["dtps"], row["dtps_se"] = paired(a, b, "tps")
        row["steps_rl"], row["steps_speed"] = overall(a, "steps"), overall(b, "steps")
        row["restated_rl"], row["restated_speed"] = (100 * overall(x, "restated") for x in (a, b))
        sft = path.parent / "eval_sft" / "responses.jsonl"
        if sft.is_file():
            c = per_problem(sft)
            row["steps_sft"] = overall(c, "steps")
            row["restated_sft"] = 100 * overall(c, "restated")
    return row


def fmt(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--summary", nargs="+", default=[], help="summary.json files of finished quick-starts (no runs)")
    p.add_argument("--out", default="", help="parent folder of the runs (default runs/gain-check-<time>)")
    p.add_argument("--speed-reward", action="store_true", help="also run and check RL with the speed reward")
    p.add_argument("--speed-only", action="store_true",
                   help="run with --speed-reward and check only the speed reward's claim")
    p.add_argument("--min-gain", type=float, default=10.0, help="points RL must add over SFT")
    p.add_argument("--min-over-control", type=float, default=5.0, help="points RL must add over the control")
    p.add_argument("--max-minutes", type=float, default=8.0, help="wall time of the default pipeline")
    p.add_argument("extra", nargs="*", help="further `dirl quickstart` arguments (after --)")
    args = p.parse_args()

    if args.summary:
        paths = [Path(x) for x in args.summary]
    else:
        parent = Path(args.out or f"runs/gain-check-{time.strftime('%Y%m%d-%H%M%S')}")
        paths = [run_seed(sd, parent / f"seed{sd}", args.speed_reward or args.speed_only, args.extra) for sd in args.seeds]
    try:
        rows = [row_of(x) for x in paths]
        if args.speed_only and any(r["speed"] is None for r in rows):
            raise ValueError("--speed-only needs quick-starts run with --speed-reward")
    except (ValueError, KeyError, OSError) as e:
        print(f"check_quickstart_gain: {e}", file=sys.stderr)
        return 2

    if args.speed_only:
        lines, misses = speed_table(rows)
    else:
        lines, misses = gain_table(rows, args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nHeld-out problems, {rows[0]['n']} problems × {rows[0]['k']} samples, T = 1 "
          f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {cores} cores):\n")
    print("\n".join(lines))
    for m in misses:
        print(f"check_quickstart_gain: target missed: {m}", file=sys.stderr)
    return 1 if misses else 0


def speed_misses(r: dict) -> list[str]:
    """The speed reward's claim on one seed: more tokens per step than accuracy-only RL by more than
    2 standard errors of the per-problem difference, and no accuracy lost beyond 2 standard errors."""
    tag, out = f"seed {r['seed']}", []
    if r["speed"] is None or r.get("dtps") is None:
        return [f"{tag}: no speed-reward evaluation"]
    margin = chance_margin(r["rl"] / 100, r["speed"] / 100, r["n"], r["k"], 2.0) * 100
    if r["speed"] < r["rl"] - margin:
        out.append(f"{tag}: speed-reward accuracy {r['speed']:.1f}% below accuracy-only RL "
                   f"{r['rl']:.1f}% by more than {margin:.1f} points (2 standard errors)")
    if not r["dtps"] > 2 * r["dtps_se"]:
        out.append(f"{tag}: tokens per step {r['dtps']:+.3f} ± {r['dtps_se']:.3f} per problem with the speed "
                   f"reward against accuracy-only RL, not above 2 standard errors")
    return out


def stat(rows: list[dict], key: str, f, spec: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return fmt(f(vals), spec) if vals else "–"


SUMMARIES = (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max))


def speed_table(rows: list[dict]) -> tuple[list[str], list[str]]:
    lines = ["| seed | SFT: accuracy, tokens/step, steps, restated | accuracy-only RL: accuracy, tokens/step, steps, restated | speed reward: accuracy, "
             "tokens/step, steps, restated | tokens/step, speed − accuracy-only (per problem) |",
             "|---:|---:|---:|---:|---:|"]
    misses: list[str] = []
    for r in rows:
        lines.append(f"| {r['seed']} | {fmt(r['sft'])}%, {fmt(r['tps_sft'], '.2f')}, {fmt(r.get('steps_sft'), '.2f')}, "
                     f"{fmt(r.get('restated_sft'), '.0f')}% | {fmt(r['rl'])}%, {fmt(r['tps_rl'], '.2f')}, "
                     f"{fmt(r['steps_rl'], '.2f')}, {fmt(r['restated_rl'], '.0f')}% | {fmt(r['speed'])}%, "
                     f"{fmt(r['tps_speed'], '.2f')}, {fmt(r['steps_speed'], '.2f')}, {fmt(r['restated_speed'], '.0f')}% | "
                     f"{r['dtps']:+.3f} ± {r['dtps_se']:.3f} |")
        misses += speed_misses(r)
    for label, f in SUMMARIES:
        lines.append(f"| {label} | {stat(rows, 'sft', f, '.1f')}%, {stat(rows, 'tps_sft', f, '.2f')}, "
                     f"{stat(rows, 'steps_sft', f, '.2f')}, {stat(rows, 'restated_sft', f, '.0f')}% | "
                     f"{stat(rows, 'rl', f, '.1f')}%, "
                     f"{stat(rows, 'tps_rl', f, '.2f')}, {stat(rows, 'steps_rl', f, '.2f')}, "
                     f"{stat(rows, 'restated_rl', f, '.0f')}% | {stat(rows, 'speed', f, '.1f')}%, "
                     f"{stat(rows, 'tps_speed', f, '.2f')}, {stat(rows, 'steps_speed', f, '.2f')}, "
                     f"{stat(rows, 'restated_speed', f, '.0f')}% | {stat(rows, 'dtps', f, '+.3f')} |")
    return lines, misses


def gain_table(rows: list[dict], args) -> tuple[list[str], list[str]]:
    misses = []
    speed = any(r["speed"] is not None for r in rows)
    head = ("| seed | SFT | SFT + RL | more SFT (control) | RL − SFT | RL − control | the teacher's slip, % "
            "(SFT / RL / control) | minutes |")
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if speed:
        head += " RL (speed) | tokens/step RL → speed (per-problem difference) |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        gain = r["rl"] - r["sft"]
        over = None if r["ctl"] is None else r["rl"] - r["ctl"]
        r["gain"], r["over"] = gain, over
        line = (f"| {fmt(r['seed'], 'd') if isinstance(r['seed'], int) else '?'} | {fmt(r['sft'])}% | {fmt(r['rl'])}% | "
                f"{fmt(r['ctl'])}% | {gain:+.1f} | {fmt(over, '+.1f')} | {r['slips']} | {r['minutes']:.1f} |")
        if speed:
            diff = "" if r.get("dtps") is None else f" ({r['dtps']:+.3f} ± {r['dtps_se']:.3f})"
            line += f" {fmt(r['speed'])}% | {fmt(r['tps_rl'], '.2f')} → {fmt(r['tps_speed'], '.2f')}{diff} |"
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
            misses += speed_misses(r)

    for label, f in SUMMARIES:
        line = (f"| {label} | {stat(rows, 'sft', f, '.1f')}% | {stat(rows, 'rl', f, '.1f')}% | "
                f"{stat(rows, 'ctl', f, '.1f')}% | {stat(rows, 'gain', f, '+.1f')} | {stat(rows, 'over', f, '+.1f')} | | "
                f"{stat(rows, 'minutes', f, '.1f')} |")
        if speed:
            line += (f" {stat(rows, 'speed', f, '.1f')}% | {stat(rows, 'tps_rl', f, '.2f')} → "
                     f"{stat(rows, 'tps_speed', f, '.2f')} ({stat(rows, 'dtps', f, '+.3f')}) |")
        lines.append(line)
    return lines, misses


if __name__ == "__main__":
    sys.exit(main())
