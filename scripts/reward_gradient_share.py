#!/usr/bin/env python3
"""How much of an RL step is the speed reward's own (a diagnostic, not a benchmark).

From one model, three RL steps on the same rollouts: with the accuracy reward, with the speed reward
(SPEC section 7; ``rewards.weights``: accuracy 0, speed 1), and with a control that has the speed
reward's ranges (correct 0.5 to 1, wrong -0.5 to 0) but ranks the correct answers at random (a value
drawn from the response's tokens and step map) instead of by speed. Each run is ``dirl rl`` with one
step of ``--prompts`` groups, every group kept, Adam with eps 1 and no gradient clipping, so the
first update is lr * g / (|g| + 1) ~ lr * g elementwise: each step is the gradient of its reward
times the learning rate. The same model and seeds give both runs the same rollouts (the script
checks their tokens per step), so the difference of the two steps is what the speed reward adds:
the ranking of the correct answers by speed, mostly in the groups whose answers are all correct
(accuracy gives them no advantage, the speed reward gives them +-1 once their speeds differ).

Prints the groups (all correct, of those how many with different speeds, mixed, all wrong), the
norms of the steps, their cosines with the accuracy step, the norm of each one's difference from it
as a share of its step, and the speed reward's own part against the random ranking's. With ``--eval``
it also evaluates the model before and the models after (configs/eval_default.yaml: held-out
problems, the same sampling seeds for all) and prints accuracy and tokens per step with the
per-problem paired differences from the model before.

    python scripts/reward_gradient_share.py --model runs/quickstart-.../sft/checkpoints/step_00000800/model
    python scripts/reward_gradient_share.py --model DIR --prompts 256 --lr 0.03 --eval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARDS = {"accuracy": [], "speed": ["rewards.weights.accuracy=0", "rewards.weights.speed=1"],
           "random ranking": ["custom_rewards.random_ranking=dirl_share_rewards:random_ranking",
                              "rewards.weights.accuracy=0", "rewards.weights.random_ranking=1"]}
# The control: the speed reward's ranges (correct 0.5 to 1, wrong -0.5 to 0), but the value within the
# range drawn from the response's tokens and step map instead of its speed.
CONTROL_MODULE = """import hashlib
import json
import random


def random_ranking(c):
    t = c.trajectory
    key = json.dumps([list(t.get("token_ids") or ()), list(t.get("step_map") or ())])
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())  # the same draw in every run
    return rng.uniform(0.5, 1.0) if c.correct else rng.uniform(-0.5, 0.0)
"""


def dirl(*args: str, log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(log.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with log.open("a") as f:
        r = subprocess.run([sys.executable, "-m", "dirl.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        sys.exit(f"reward_gradient_share: 'dirl {args[0]}' failed (exit {r.returncode}); see {log}")


def run_name(reward: str) -> str:
    return reward.replace(" ", "-")


def after_model(out: Path, reward: str) -> Path:
    return out / run_name(reward) / "checkpoints" / "step_00000001" / "model"


def weights(model_dir: Path):
    import torch
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        sys.exit(f"reward_gradient_share: no .safetensors weights in {model_dir}")
    w: dict = {}
    for f in files:
        w.update(load_file(str(f)))
    return {k: v.to(torch.float64) for k, v in w.items()}


def step_of(base: dict, after: dict):
    import torch

    return torch.cat([(after[k] - base[k]).flatten() for k in sorted(base)])


def cosine(a, b) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def group_counts(samples: Path) -> dict:
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    out = {"groups": len(rows), "all correct": 0, "all correct, speeds differ": 0, "mixed": 0, "all wrong": 0}
    for r in rows:
        c = sum(bool(x) for x in r["correct"])
        if c == len(r["correct"]):
            out["all correct"] += 1
            out["all correct, speeds differ"] += statistics.pstdev(r["rewards"]) > 0
        elif c == 0:
            out["all wrong"] += 1
        else:
            out["mixed"] += 1
    return out


def per_problem(eval_dir: Path) -> tuple[dict, dict]:
    tps: dict = {}
    acc: dict = {}
    for line in (eval_dir / "responses.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            tps.setdefault(r["problem_id"], []).append(float(r["tokens_per_step"] or 0.0))
            acc.setdefault(r["problem_id"], []).append(float(r["correct"]))
    return ({k: sum(v) / len(v) for k, v in tps.items()}, {k: sum(v) / len(v) for k, v in acc.items()})


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error over problems of b - a."""
    d = [b[k] - a[k] for k in a if k in b]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return m, se


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder to step from (SDAR layout)")
    ap.add_argument("--prompts", type=int, default=256, help="groups in the step (default 256)")
    ap.add_argument("--lr", type=float, default=0.03,
                    help="step size: the step is lr x the gradient (default 0.03; the shares do not depend on it)")
    ap.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed of the step (default 0)")
    ap.add_argument("--eval", action="store_true", help="also evaluate the model before and both models after")
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--rl", nargs="*", default=[], metavar="K=V", help="more overrides for both dirl rl runs")
    args = ap.parse_args()
    model = Path(args.model).resolve()
    if not (model / "config.json").is_file():
        ap.error(f"--model: no config.json in {model}")
    if args.prompts < 1 or args.lr <= 0:
        ap.error("--prompts must be >= 1 and --lr > 0")

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="dirl-share-")
    out = Path(args.out or tmp.name).resolve()  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    (out / "dirl_share_rewards.py").write_text(CONTROL_MODULE)
    common = [f"model.path={model}", f"output_dir={out}", "eval.enabled=false", "train.steps=1",
              f"train.prompts_per_step={args.prompts}", "train.filter_groups=false", f"train.seed={args.seed}",
              f"data.seed={args.seed}", f"optim.lr={args.lr}", "optim.eps=1.0", "optim.max_grad_norm=0",
              "optim.schedule=constant", "optim.warmup_steps=0", "train.resume=never", "logging.progress_bar=false",
              *args.rl]
    steps, metrics = {}, {}
    base = weights(model)
    for name, extra in REWARDS.items():
        print(f"one RL step with the {name} reward ({args.prompts} groups) ...", flush=True)
        dirl("rl", *common, f"run_name={run_name(name)}", *extra, log=log)
        steps[name] = step_of(base, weights(after_model(out, name)))
        metrics[name] = json.loads((out / run_name(name) / "metrics.jsonl").read_text().splitlines()[0])
    tps = {n: metrics[n]["decode/tokens_per_step"] for n in REWARDS}
    if max(tps.values()) - min(tps.values()) > 1e-9:
        sys.exit(f"reward_gradient_share: the runs' rollouts differ (tokens per step {tps}); "
                 "the differences of the steps are not the rewards' own")

    counts = group_counts(out / "speed" / "samples.jsonl")
    print("\ngroups: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    a = steps["accuracy"]
    print(f"|accuracy step| {float(a.norm()):.5f}" + ("" if float(a.norm()) > 0 else
          " (no group has both correct and wrong answers)"))
    for name in ("speed", "random ranking"):
        s = steps[name]
        d = s - a
        line = f"{name + ' reward:':<24} |step| {float(s.norm()):.5f}"
        if float(a.norm()) > 0 and float(s.norm()) > 0:
            line += (f", cosine with the accuracy step {cosine(a, s):.4f}, |step - accuracy step| {float(d.norm()):.5f} "
                     f"({100 * float(d.norm() / s.norm()):.1f}% of its step)")
        print(line)
    own, ctl = steps["speed"] - a, steps["random ranking"] - a
    if float(own.norm()) > 0 and float(ctl.norm()) > 0:
        print(f"the speed ranking's own part against a random ranking's of the same answers: "
              f"{float(own.norm() / ctl.norm()):.2f}x its norm, cosine {cosine(own, ctl):.3f}")

    if args.eval:
        cfg = str(ROOT / "configs" / "eval_default.yaml")
        dirs = {"before": model, **{f"after the {n} step": after_model(out, n) for n in REWARDS}}
        res = {}
        for label, m in dirs.items():
            print(f"evaluating {label} ...", flush=True)
            e = out / ("eval-" + run_name(label))
            dirl("eval", cfg, f"model.path={m}", f"output_dir={e}", "resume=false", log=log)
            res[label] = per_problem(e)
        t0, a0 = res["before"]
        print(f"\n{'model':<26} {'accuracy':>9} {'tokens/step':>12}   paired vs before: accuracy, tokens/step")
        for label, (t, acc) in res.items():
            line = f"{label:<26} {100 * sum(acc.values()) / len(acc):>8.1f}% {sum(t.values()) / len(t):>12.3f}"
            if label != "before":
                (da, sa), (dt, st) = paired(a0, acc), paired(t0, t)
                line += f"   {100 * da:+.1f} ± {100 * sa:.1f} points, {dt:+.3f} ± {st:.3f}"
            print(line)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
