"""``dirl score``: the trainer's step-level log-probs of recorded trajectories.

    dirl score --model DIR --input traj.jsonl --output scored.jsonl [--layout packed|rounds]

Each output line is the input trajectory plus

* ``trainer_logprobs``: per entry of ``token_ids``, log softmax(f(state) / T)[token] as the trainer
  computes it (fp32), or null for tokens that take no loss (after ``response_length``);
* ``logprob_abs_diff_max`` / ``logprob_abs_diff_mean``: |trainer - recorded| over the scored tokens
  (the train/inference consistency check; null when the trajectory carries no ``logprobs``).

A summary line goes to stderr. The temperature is the trajectory's own (a ``temperature`` field, or
``decoding.temperature`` as ``dirl rollout`` writes it), else ``--temperature``; 0 (greedy) means 1,
as in the engine's recorded log-probs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from dirl.config import ConfigError
from dirl.data.formats import DataError, iter_json_objects
from dirl.model.sdar import load_model
from dirl.train.layouts import trajectory_logprobs


def read_trajectories(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--input: file '{p}' does not exist")
    from dirl.train.layouts import TrajectoryError, parse_trajectory

    out = []
    try:
        for where, _, row in iter_json_objects(p):
            try:
                parse_trajectory(row, index=len(out))  # checked here, where the line is known
            except TrajectoryError as e:
                raise DataError(f"{where}: {e}") from None
            out.append(row)
    except DataError as e:
        raise ConfigError(f"--input: {e}") from None
    return out


def mismatch(recorded: Optional[Sequence[float]], trainer: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(max |diff|, mean |diff|, count) over tokens scored by the trainer that have a recorded value."""
    if not recorded:
        return None, None, 0
    d = [abs(float(a) - b) for a, b in zip(recorded, trainer) if b is not None and a is not None]
    if not d:
        return None, None, 0
    return max(d), sum(d) / len(d), len(d)


def temperature_of(traj: dict, default: float = 1.0) -> float:
    """The sampling temperature a trajectory was decoded with (0, greedy, scores at T = 1)."""
    t = traj.get("temperature")
    if t is None and isinstance(traj.get("decoding"), dict):
        t = traj["decoding"].get("temperature")
    t = default if t is None else float(t)
    return t if t > 0 else 1.0


def score_trajectories(model, trajectories: list[dict], layout: str = "packed", temperature: float = 1.0,
                       score_after_eos: bool = False, batch_size: int = 8) -> list[dict]:
    """Add ``trainer_logprobs`` and the mismatch fields to each trajectory (new dicts)."""
    by_temp: dict[float, list[int]] = {}
    for i, t in enumerate(trajectories):
        by_temp.setdefault(temperature_of(t, temperature), []).append(i)
    result: list[Optional[dict]] = [None] * len(trajectories)
    for temp, idx in by_temp.items():
        subset = [trajectories[i] for i in idx]
        lps = trajectory_logprobs(model, subset, layout=layout, temperature=temp, score_after_eos=score_after_eos,
                                  batch_size=batch_size)
        for i, t, lp in zip(idx, subset, lps):
            mx, mean, _ = mismatch(t.get("logprobs"), lp)
            result[i] = dict(t, trainer_logprobs=lp, logprob_abs_diff_max=mx, logprob_abs_diff_mean=mean)
    return result  # type: ignore[return-value]


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dirl score", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (SDAR layout)")
    p.add_argument("--input", required=True, help="trajectories, JSON Lines (dirl rollout output)")
    p.add_argument("--output", required=True, help="where to write the scored trajectories (JSON Lines)")
    p.add_argument("--layout", choices=["packed", "rounds"], default="packed")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the trajectories")
    p.add_argument("--score-after-eos", action="store_true", help="also score tokens after response_length")
    p.add_argument("--batch-size", type=int, default=8, help="trajectories per forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights' dtype (log-softmax is always fp32)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "flex", "sdpa"])
    a = p.parse_args(argv)
    if a.temperature <= 0:
        raise ConfigError("--temperature: must be > 0 (greedy trajectories have no sampling log-probs)")
    if a.batch_size <= 0:
        raise ConfigError("--batch-size: must be > 0")

    import torch

    trajs = read_trajectories(a.input)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model = load_model(a.model, device=device, dtype=a.dtype, attn_backend=a.attn_backend, key="--model")
    model.eval()
    scored = score_trajectories(model, trajs, layout=a.layout, temperature=a.temperature,
                                score_after_eos=a.score_after_eos, batch_size=a.batch_size)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for row in scored:
            f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    diffs = [r["logprob_abs_diff_max"] for r in scored if r["logprob_abs_diff_max"] is not None]
    means = [r["logprob_abs_diff_mean"] for r in scored if r["logprob_abs_diff_mean"] is not None]
    n_tok = sum(sum(v is not None for v in r["trainer_logprobs"]) for r in scored)
    summary = f"scored {len(scored)} trajectories, {n_tok} tokens ({a.layout} layout) -> {out}"
    if diffs:
        summary += f"; |trainer - recorded| max {max(diffs):.3g}, mean {sum(means) / len(means):.3g}"
    print(summary, file=sys.stderr)
    return 0
