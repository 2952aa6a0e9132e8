#!/usr/bin/env python3
"""Synchronous vs one-step off-policy RL (``train.staleness`` 0 vs 1), side by side in one run.

    python scripts/bench_rl_async.py [--model DIR] [--steps 20] [--seed 0] [--out bench_rl_async.json]

Both runs are the embedded default (``dirl rl`` with no config) from the same checkpoint, seed and
number of steps, one after the other in this process: the trainer on one torch thread, its rollout
server (a separate process, started by the run) on one thread. Reported per mode: the mean step
time (steps after the first), its phases (rollout, the trainer's wait for it, log-probs, update,
weight push), the training accuracy and reward per step (the accuracy curve), and the held-out
accuracy before and after. The bound of the overlap, from the synchronous run's own phases:
max(rollout + reward, log-probs + update) + weight push per step.

Target (exit 1 naming it when missed): the one-step off-policy step is faster than the synchronous
one by ``--min-speedup`` (default 1.0: not slower).

``--model``: a checkpoint folder (default: the newest quick-start SFT checkpoint under runs/, else a
fresh tiny model, whose accuracy stays at 0). Prints a Markdown summary and writes every number to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(ROOT / "scripts"))
from bench_rl import resolve_model  # noqa: E402  (the same checkpoint choice as the RL benchmark)


def run_mode(model_dir: Path, work: Path, staleness: int, steps: int, seed: int, extra: list[str]) -> dict:
    from dirl.train.rl.config import load_rl_config
    from dirl.train.rl.recipe import train_rl

    cfg = load_rl_config(None, [f"model.path={model_dir}", f"output_dir={work}", f"run_name=staleness{staleness}",
                                f"train.steps={steps}", f"train.seed={seed}", "train.save_every=0",
                                "train.filter_groups=false",  # as the quick-start: most SFT groups are flat
                                f"train.staleness={staleness}", "server.threads=1", "logging.progress_bar=false",
                                "logging.tensorboard=false", *extra])
    t0 = time.perf_counter()
    summary = train_rl(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "time/step" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    later = steps_rows[1:] or steps_rows  # the first step also warms up (and has nothing to overlap)

    def avg(key):
        return statistics.mean(r.get(key, 0.0) for r in later)

    out = {
        "staleness": staleness,
        "wall_s": wall,
        "train_time_s": summary["train_time_s"],
        "step_s": avg("time/step"),
        "step_median_s": statistics.median(r["time/step"] for r in later),
        "rollout_s": avg("time/rollout") + avg("time/reward"),
        "rollout_wait_s": avg("time/rollout_wait"),
        "train_s": avg("time/logprobs") + avg("time/update"),
        "weight_push_s": avg("time/weight_push"),
        "sleep_s": avg("time/sleep"),
        "steps_averaged": len(later),
        "accuracy": [r["accuracy"] for r in steps_rows],
        "reward": [r["reward/mean"] for r in steps_rows],
        "staleness_per_step": [r.get("staleness") for r in steps_rows],
        "ratio_mean": [r.get("ratio/mean") for r in steps_rows],
        "ratio_min": [r.get("ratio/min") for r in steps_rows],
        "ratio_max": [r.get("ratio/max") for r in steps_rows],
        "clip_fraction": [r.get("clip_fraction") for r in steps_rows],
        "eval": [{"step": r["step"], "accuracy": r["eval/accuracy"]} for r in evals],
        "accuracy_first": summary["accuracy_first"],
        "accuracy_last": summary["accuracy_last"],
        "param_digest": summary["param_digest_per_rank"][0],
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: newest quick-start SFT checkpoint)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_rl_async.json")
    p.add_argument("--min-speedup", type=float, default=1.0,
                   help="target: synchronous step time / one-step off-policy step time >= this")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
    p.add_argument("--work", default="", help="keep the two runs' folders here (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("overrides", nargs="*", metavar="K=V", help="more dirl rl overrides, for both runs")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if a.work:
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
        return bench(a, work)
    work = Path(tempfile.mkdtemp(prefix="dirl-bench-rl-async-"))
    try:
        return bench(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(a: argparse.Namespace, work: Path) -> int:
    import torch

    model_dir = resolve_model(a.model, work)
    extra = list(a.overrides) + (["eval.enabled=false"] if a.no_eval else [])
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "command": " ".join([sys.executable, *sys.argv]),
        "model": str(model_dir),
        "steps": a.steps,
        "seed": a.seed,
    }
    modes = {}
    for lag in (0, 1):
        modes[lag] = run_mode(model_dir, work, lag, a.steps, a.seed, extra)
        result[f"staleness{lag}"] = modes[lag]
    result["machine"]["load_avg_end"] = os.getloadavg()
    s, o = modes[0], modes[1]
    bound = max(s["rollout_s"], s["train_s"]) + s["weight_push_s"]
    result["speedup"] = s["step_s"] / o["step_s"]
    result["overlap_bound_s"] = bound
    result["speedup_bound"] = s["step_s"] / bound
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n## bench_rl_async ({result['date']}, {result['machine']['cpus']} CPUs, load "
          f"{result['machine']['load_avg_start'][0]:.1f} -> {result['machine']['load_avg_end'][0]:.1f}, torch "
          f"{torch.__version__})")
    print(f"model: {model_dir}; {a.steps} steps, seed {a.seed}; step times: mean of steps 2-{a.steps}")
    print("| mode | step s (mean / median) | rollout + reward s | trainer waits s | log-probs + update s | "
          "weight push s | run s | train accuracy first 5 -> last 5 | held-out accuracy |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for lag, m in modes.items():
        ev = " -> ".join(f"{e['accuracy']:.3f}" for e in m["eval"]) or "-"
        print(f"| staleness {lag} | {m['step_s']:.2f} / {m['step_median_s']:.2f} | {m['rollout_s']:.2f} | "
              f"{m['rollout_wait_s'] if lag else m['rollout_s']:.2f} | {m['train_s']:.2f} | {m['weight_push_s']:.3f} | "
              f"{m['train_time_s']:.0f} | {m['accuracy_first']:.3f} -> {m['accuracy_last']:.3f} | {ev} |")
    print(f"speed-up of the step: {result['speedup']:.2f}x (bound from the synchronous phases: "
          f"max({s['rollout_s']:.2f}, {s['train_s']:.2f}) + {s['weight_push_s']:.3f} = {bound:.2f} s, "
          f"{result['speedup_bound']:.2f}x)")
    print("accuracy per step:")
    for lag, m in modes.items():
        print(f"  staleness {lag}: " + " ".join(f"{x:.2f}" for x in m["accuracy"]))
    rm = [x for x in o["ratio_mean"][1:] if x is not None]
    cf = [x for x in o["clip_fraction"][1:] if x is not None]
    if rm:
        print(f"one-step off-policy ratio mean per step {min(rm):.4f}..{max(rm):.4f}, min "
              f"{min(x for x in o['ratio_min'][1:] if x is not None):.3f}, max "
              f"{max(x for x in o['ratio_max'][1:] if x is not None):.3f}; clipped fraction mean "
              f"{statistics.mean(cf):.4f}")
    print(f"\nwritten: {a.out}")
    if result["speedup"] < a.min_speedup:
        print(f"TARGET MISSED: one-step off-policy step >= {a.min_speedup:g}x faster than synchronous "
              f"(measured {result['speedup']:.2f}x)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
