#!/usr/bin/env python3
"""Benchmarks of the RL trainer's own parts.

    python scripts/bench_rl.py [--model DIR] [--out bench_rl.json] [--skip push,step]

1. ``layouts``: the same trajectories (reference engine, dynamic decoding, tau 0.9) scored by the
   packed and the rounds layout: tokens processed and wall time of the log-prob pass (forward, and
   forward + backward as in training), and the largest log-prob difference between the two.
2. ``push``: in-place weight update of a running server (sleep -> update_weights -> wakeup) against
   the checkpoint round trip it replaces (save the model, stop the server, start one that loads it).
3. ``step``: the per-phase time of RL steps of the embedded default (rollout, reward, log-probs,
   update, weight push), from the run's metrics.
4. ``scaling``: the packed log-prob pass (forward + backward, as the trainer runs it) of one response
   of 1k, 4k and 8k generated tokens on a 4M-parameter SDAR-shaped model (GQA 8/2 heads): time and
   peak memory (each length in a fresh process), growth exponents, and the same numbers through one
   dense mask (the path chunked queries replace) at the shortest length.

Targets (the script exits 1 naming each one missed): packed processes >= 2x fewer tokens than
rounds and its forward is faster by at least half the token ratio (``--min-speedup-per-token-ratio``;
the ratio itself depends on the checkpoint: tokens per step set the number of noisy copies); at the longest ``scaling`` length the
peak memory is under ``--max-peak-gb`` and grows with an exponent <= 1.25; chunked and dense
log-probs agree to 1e-5.

``--model``: a checkpoint folder (default: the newest quick-start SFT checkpoint under runs/, else a
fresh tiny model). Prints a Markdown summary and writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _min_time(fn, repeats: int) -> tuple[float, list[float]]:
    """The fastest of ``repeats`` runs (and all of them): on a shared machine the minimum is the
    best estimate of the uncontended time."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def resolve_model(arg: str, work: Path) -> Path:
    from dirl.train.checkpoint import newest_checkpoint

    if arg:
        return Path(arg)
    found = newest_checkpoint(ROOT / "runs", kinds=("sft",)) or newest_checkpoint("runs", kinds=("sft",))
    if found is not None:
        return found
    from dirl.model.tiny import make_tiny_model

    return make_tiny_model(work / "tiny")


def make_trajectories(model, tok, n: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    from dirl.data.chat import prompt_ids, stop_token_ids
    from dirl.data.synthetic import synthetic_problems
    from dirl.rollout.backend import GenerateRequest
    from dirl.rollout.engine import Engine

    eng = Engine(model, tok, denoising_steps=4, unmasking_strategy="low_confidence_dynamic",
                 confidence_threshold=0.9, max_batch_size=64)
    probs = synthetic_problems("train", n=n, seed=seed)
    stops = stop_token_ids(tok)
    reqs = [GenerateRequest(request_id=f"b{i}", input_ids=prompt_ids(tok, p["prompt"]), max_new_tokens=max_new_tokens,
                            temperature=1.0, top_k=0, top_p=1.0, do_sample=True, stop_token_ids=stops, seed=seed + i)
            for i, p in enumerate(probs)]
    return eng.generate(reqs)


def bench_layouts(model, trajs: list[dict], micro: int, repeats: int) -> dict:
    """Packed vs rounds on the same trajectories (CPU seconds). The runs of the two layouts are
    interleaved and both the minimum and the median are reported (on a shared machine the minimum is the better
    estimate of the uncontended time)."""
    import torch

    from dirl.rewards.shaping import tokens_per_step
    from dirl.train.layouts import build_batch, score_batch

    out: dict = {"trajectories": len(trajs), "micro_batch_size": micro,
                 "mean_response_tokens": statistics.mean(len(t["token_ids"]) for t in trajs),
                 "mean_prompt_tokens": statistics.mean(len(t["prompt_ids"]) for t in trajs),
                 "tokens_per_step": statistics.mean(tokens_per_step(t["step_map"], t["response_length"]) or 0
                                                    for t in trajs)}
    B, M = model.block_size, model.mask_token_id
    chunks = [trajs[i:i + micro] for i in range(0, len(trajs), micro)]
    layouts = ("packed", "rounds")
    batches = {lay: [build_batch(c, B, M, lay, indices=range(i * micro, i * micro + len(c)))
                     for i, c in enumerate(chunks)] for lay in layouts}

    def fwd(lay):
        with torch.no_grad():
            return [score_batch(model, b)[0] for b in batches[lay]]

    def fwd_bwd(lay):
        model.zero_grad(set_to_none=True)
        for b in batches[lay]:
            lp, _ = score_batch(model, b)
            lp.sum().backward()

    for lay in layouts:  # warm-up
        fwd(lay)
        fwd_bwd(lay)
    runs = {(lay, kind): [] for lay in layouts for kind in ("f", "fb")}
    # CPU time of this (one-thread) process: on a shared machine wall time also counts the time other
    # jobs hold the core
    for _ in range(repeats):
        for lay in layouts:
            for kind, fn in (("f", fwd), ("fb", fwd_bwd)):
                t0 = time.process_time()
                fn(lay)
                runs[(lay, kind)].append(time.process_time() - t0)
    lps = {}
    for lay in layouts:
        vals = {}
        for b, lp in zip(batches[lay], fwd(lay)):
            for i, k, v in zip(b.traj.tolist(), b.tok.tolist(), lp.tolist()):
                vals[(i, k)] = v
        lps[lay] = vals
        bs = batches[lay]
        out[lay] = {"tokens": sum(b.num_tokens for b in bs), "padded_tokens": sum(b.padded_tokens for b in bs),
                    "rows": sum(int(b.input_ids.shape[0]) for b in bs), "scored": sum(b.num_scored for b in bs),
                    "forward_s": min(runs[(lay, "f")]), "forward_backward_s": min(runs[(lay, "fb")]),
                    "forward_median_s": statistics.median(runs[(lay, "f")]),
                    "forward_backward_median_s": statistics.median(runs[(lay, "fb")]),
                    "forward_runs_s": runs[(lay, "f")], "forward_backward_runs_s": runs[(lay, "fb")]}
    model.zero_grad(set_to_none=True)
    p, r = out["packed"], out["rounds"]
    out["token_ratio"] = r["tokens"] / p["tokens"]
    out["padded_token_ratio"] = r["padded_tokens"] / p["padded_tokens"]
    out["forward_speedup"] = r["forward_s"] / p["forward_s"]
    out["forward_backward_speedup"] = r["forward_backward_s"] / p["forward_backward_s"]
    out["forward_speedup_median"] = r["forward_median_s"] / p["forward_median_s"]
    out["forward_backward_speedup_median"] = r["forward_backward_median_s"] / p["forward_backward_median_s"]
    out["max_abs_logprob_diff_packed_vs_rounds"] = max(abs(lps["packed"][k] - lps["rounds"][k]) for k in lps["packed"])
    rec = {(i, k): lp for i, t in enumerate(trajs) for k, lp in enumerate(t["logprobs"]) if k < t["response_length"]}
    out["max_abs_logprob_diff_packed_vs_engine"] = max(abs(lps["packed"][k] - rec[k]) for k in lps["packed"])
    return out


def bench_push(model_dir: Path, work: Path, repeats: int) -> dict:
    from dirl.config import DecodingConfig
    from dirl.model.sdar import load_model, load_tokenizer
    from dirl.model.tiny import count_parameters
    from dirl.rollout.client import RolloutClient
    from dirl.rollout.launch import start_server

    model = load_model(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    dec = DecodingConfig(max_new_tokens=16)
    h = start_server(model_dir, decoding=dec, device="cpu")
    client = RolloutClient([h.url])
    res: dict = {"parameters": count_parameters(model)}
    try:
        for transport in ("file", "inline"):
            client.push_weights(model, transport=transport)  # warm-up
            t, runs = _min_time(lambda: client.push_weights(model, transport=transport), repeats)
            res[f"in_place_{transport}_s"] = t
            res[f"in_place_{transport}_runs_s"] = runs
    finally:
        h.stop()

    def round_trip():
        nonlocal h
        ck = work / "ckpt"
        t0 = time.perf_counter()
        model.save_pretrained(ck, tokenizer=tok)
        t1 = time.perf_counter()
        h.stop()
        h = start_server(ck, decoding=dec, device="cpu")
        t2 = time.perf_counter()
        round_trip.parts.append({"save_s": t1 - t0, "restart_s": t2 - t1})

    round_trip.parts = []  # type: ignore[attr-defined]
    h = start_server(model_dir, decoding=dec, device="cpu")
    try:
        t, runs = _min_time(round_trip, max(1, repeats // 2))
    finally:
        h.stop()
    res["save_and_restart_s"] = t
    res["save_and_restart_runs"] = round_trip.parts  # type: ignore[attr-defined]
    res["speedup_file"] = t / res["in_place_file_s"]
    return res


def bench_step(model_dir: Path, work: Path, steps: int) -> dict:
    from dirl.train.rl.config import load_rl_config
    from dirl.train.rl.recipe import train_rl

    cfg = load_rl_config(None, [f"model.path={model_dir}", f"output_dir={work}", "run_name=bench-step",
                                f"train.steps={steps}", "train.save_every=0", "eval.enabled=false",
                                "logging.progress_bar=false", "logging.tensorboard=false"])
    summary = train_rl(cfg)
    rows = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    later = rows[1:] or rows  # the first step also warms up
    keys = ["time/rollout", "time/reward", "time/logprobs", "time/update", "time/weight_push", "time/step"]
    out = {k.split("/")[1] + "_s": statistics.mean(r[k] for r in later) for k in keys}
    out["steps_averaged"] = len(later)
    out["responses_per_step"] = cfg.train.prompts_per_step * cfg.train.num_generations
    out["scored_tokens_per_step"] = statistics.mean(r.get("tokens/scored", 0) for r in later)
    out["forward_tokens_per_step"] = statistics.mean(r.get("tokens/forward", 0) for r in later)
    out["decode_tokens_per_step"] = statistics.mean(r.get("decode/tokens_per_step", 0) for r in later)
    return out


SCALING_SHAPE = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                     intermediate_size=768, max_position_embeddings=16384)


def synthetic_trajectory(n_tokens: int, block_size: int, vocab: int, prompt_len: int = 64, seed: int = 0) -> dict:
    """One response of ``n_tokens`` with a dynamic-decoding-like step map: 1-4 steps per block
    (mean 1.65, i.e. ~2.4 tokens per step, as the quick-start SFT checkpoint decodes at tau 0.9)."""
    import random

    rng = random.Random(seed)
    steps, counter = [], 0
    P = prompt_len
    first = -P % block_size or block_size  # the prompt's last block holds the first response tokens
    lo = 0
    while lo < n_tokens:
        k = min(first if lo == 0 else block_size, n_tokens - lo)
        n_steps = min(k, rng.choices([1, 2, 3, 4], weights=[55, 30, 10, 5])[0])
        order = list(range(k))
        rng.shuffle(order)
        s = [0] * k
        for i, j in enumerate(order):
            s[j] = counter + 1 + min(i, n_steps - 1)
        counter += n_steps
        steps += s
        lo += k
    return {"request_id": f"syn{seed}", "prompt_ids": [rng.randrange(5, vocab) for _ in range(P)],
            "token_ids": [rng.randrange(5, vocab) for _ in range(n_tokens)], "step_map": steps,
            "response_length": n_tokens}


def scaling_child(n_tokens: int, query_chunk: int, gradient_checkpointing: bool = False,
                  split: Optional[bool] = None) -> dict:
    """One measurement in this (fresh) process: packed fwd+bwd of one response of ``n_tokens``."""
    import resource

    import torch

    from dirl.config import TinyModelConfig
    from dirl.model.tiny import build_tiny_model, count_parameters
    from dirl.train.layouts import build_batch

    model, _ = build_tiny_model(TinyModelConfig(**SCALING_SHAPE))
    model.train()
    if gradient_checkpointing:  # the trainers' model.gradient_checkpointing switch
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.hf.config.use_cache = False
    traj = synthetic_trajectory(n_tokens, model.block_size, model.config.vocab_size)
    batch = build_batch([traj], model.block_size, model.mask_token_id, "packed")
    class Chunked(torch.nn.Module):  # score_batch's forward with an explicit query chunk
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, b):
            from dirl.train.logprobs import token_logprobs

            h = self.model.hidden_states(b.input_ids, b.meta, query_chunk=query_chunk,
                                         split_noisy=split)[b.rows, b.cols]
            return token_logprobs(h, self.model.lm_head, b.targets)

    warm = build_batch([synthetic_trajectory(64, model.block_size, model.config.vocab_size, seed=1)],
                       model.block_size, model.mask_token_id, "packed")
    Chunked(model)(warm).sum().backward()  # first-call costs (allocator, kernels) out of the timing
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0, c0 = time.perf_counter(), time.process_time()
    lp = Chunked(model)(batch)
    t1, c1 = time.perf_counter(), time.process_time()
    lp.sum().backward()
    t2, c2 = time.perf_counter(), time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"generated_tokens": n_tokens, "forward_tokens": batch.num_tokens, "scored": batch.num_scored,
            "query_chunk": query_chunk, "gradient_checkpointing": gradient_checkpointing,
            "split": model._should_split(batch.meta, split), "parameters": count_parameters(model), "forward_s": t1 - t0,
            "forward_backward_s": t2 - t0, "forward_cpu_s": c1 - c0, "forward_backward_cpu_s": c2 - c0,
            "peak_rss_gb": peak, "rss_before_gb": base,
            "logprobs": lp.detach().tolist()[:256]}


def bench_scaling(lengths: list[int], query_chunk: int, gradient_checkpointing: bool = False,
                  unsplit: bool = False) -> dict:
    import math
    import subprocess

    def run(n, chunk, gc=False, no_split=False):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scaling-child", str(n), "--query-chunk", str(chunk)]
        cmd += ["--gradient-checkpointing"] if gc else []
        cmd += ["--no-split"] if no_split else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"generated_tokens": n, "query_chunk": chunk, "error": r.stderr.strip().splitlines()[-1:]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = [run(n, query_chunk) for n in lengths]
    dense = run(lengths[0], 0)
    out: dict = {"chunked": rows, "dense": dense}
    if unsplit:  # the single forward at the longest length (what the split replaces)
        out["unsplit"] = run(lengths[-1], query_chunk, no_split=True)
    if gradient_checkpointing:
        out["checkpointed"] = run(lengths[-1], query_chunk, gc=True)
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        f = math.log(b["generated_tokens"] / a["generated_tokens"])
        key = "forward_backward_cpu_s" if "forward_backward_cpu_s" in a and "forward_backward_cpu_s" in b \
            else "forward_backward_s"
        out["time_exponent"] = math.log(b[key] / a[key]) / f
        out["time_exponent_of"] = key
        out["memory_exponent"] = math.log(b["peak_rss_gb"] / a["peak_rss_gb"]) / f
        # growth of what the pass itself adds to the process (model and interpreter excluded)
        da, db = a["peak_rss_gb"] - a["rss_before_gb"], b["peak_rss_gb"] - b["rss_before_gb"]
        if da > 0 and db > 0:
            out["added_memory_exponent"] = math.log(db / da) / f
    if "error" not in dense and ok and ok[0]["generated_tokens"] == dense["generated_tokens"]:
        out["max_abs_logprob_diff_chunked_vs_dense"] = max(
            abs(x - y) for x, y in zip(ok[0]["logprobs"], dense["logprobs"]))
    if "unsplit" in out and "error" not in out["unsplit"] and ok and ok[-1]["generated_tokens"] == lengths[-1]:
        out["max_abs_logprob_diff_split_vs_unsplit"] = max(
            abs(x - y) for x, y in zip(ok[-1]["logprobs"], out["unsplit"]["logprobs"]))
    for r in rows + [dense] + [out[k] for k in ("checkpointed", "unsplit") if k in out]:
        r.pop("logprobs", None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: newest quick-start SFT checkpoint)")
    p.add_argument("--out", default="bench_rl.json")
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=8, help="responses per forward in the layout benchmark")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="RL steps for the phase breakdown")
    p.add_argument("--skip", default="", help="comma-separated: layouts, push, step, scaling")
    p.add_argument("--scaling-lengths", default="1024,4096,8192", help="generated tokens per response (scaling)")
    p.add_argument("--query-chunk", type=int, default=512, help="queries per chunk of the SDPA path (scaling)")
    p.add_argument("--scaling-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="scaling: also measure the longest length with the trainers' gradient checkpointing")
    p.add_argument("--no-split", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unsplit", action="store_true",
                   help="scaling: also measure the longest length as one forward (no clean/noisy split)")
    p.add_argument("--min-speedup-per-token-ratio", type=float, default=0.5,
                   help="target: rounds/packed forward time >= this x rounds/packed tokens (layouts section)")
    p.add_argument("--max-peak-gb", type=float, default=4.0, help="target: peak memory at the longest scaling length")
    p.add_argument("--push-shape", default="",
                   help="also time the weight push for a bigger random model, e.g. "
                        "hidden_size=512,num_hidden_layers=8,intermediate_size=2048,head_dim=64")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    if a.scaling_child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(scaling_child(a.scaling_child, a.query_chunk, a.gradient_checkpointing,
                                       split=False if a.no_split else None)))
        return 0

    import torch

    from dirl.model.sdar import load_model, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dirl-bench-rl-"))
    model_dir = resolve_model(a.model, work)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_avg_start": os.getloadavg()},
        "command": " ".join([sys.executable, *sys.argv]),
        "model": str(model_dir),
    }
    if "layouts" not in skip:
        model = load_model(model_dir, dtype="float32")
        model.eval()
        tok = load_tokenizer(model_dir)
        t0 = time.time()
        trajs = make_trajectories(model, tok, a.trajectories, a.max_new_tokens)
        result["rollout_s"] = time.time() - t0
        model.train()
        result["layouts"] = bench_layouts(model, trajs, a.micro_batch, a.repeats)
    if "push" not in skip:
        result["push"] = bench_push(model_dir, work, a.repeats)
        if a.push_shape:
            from dirl.config import TinyModelConfig
            from dirl.model.tiny import make_tiny_model

            kv = dict(item.split("=", 1) for item in a.push_shape.split(","))
            shape = TinyModelConfig(**{k: int(v) for k, v in kv.items()})
            big = make_tiny_model(work / "push-model", shape)
            result["push_big"] = bench_push(big, work, a.repeats)
    if "step" not in skip:
        result["step"] = bench_step(model_dir, work, a.steps)
    if "scaling" not in skip:
        result["scaling"] = bench_scaling([int(x) for x in a.scaling_lengths.split(",")], a.query_chunk,
                                          a.gradient_checkpointing, a.unsplit)
    result["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n## bench_rl ({result['date']}, {result['machine']['cpus']} CPUs, torch {torch.__version__})")
    print(f"model: {model_dir}")
    if "layouts" in result:
        L = result["layouts"]
        print(f"\n### log-prob pass, {L['trajectories']} trajectories (dynamic tau 0.9, "
              f"{L['tokens_per_step']:.2f} tokens/step, {L['mean_response_tokens']:.1f} response tokens)")
        print("| layout | tokens | padded | forward s (min / median) | forward+backward s (min / median) |\n"
              "|---|---|---|---|---|")
        for k in ("packed", "rounds"):
            v = L[k]
            print(f"| {k} | {v['tokens']} | {v['padded_tokens']} | {v['forward_s']:.3f} / {v['forward_median_s']:.3f} | "
                  f"{v['forward_backward_s']:.3f} / {v['forward_backward_median_s']:.3f} |")
        print(f"rounds/packed: {L['token_ratio']:.2f}x tokens, {L['forward_speedup']:.2f}x forward time, "
              f"{L['forward_backward_speedup']:.2f}x forward+backward time (min; median "
              f"{L['forward_speedup_median']:.2f}x / {L['forward_backward_speedup_median']:.2f}x); max |packed - rounds| "
              f"{L['max_abs_logprob_diff_packed_vs_rounds']:.2e}, max |packed - engine| "
              f"{L['max_abs_logprob_diff_packed_vs_engine']:.2e}")
    for key in ("push", "push_big"):
        if key in result:
            P = result[key]
            print(f"\n### weights to a running server ({P['parameters']:,} parameters)")
            print(f"in place (file transport, fastest of the runs): {P['in_place_file_s'] * 1000:.1f} ms; inline: "
                  f"{P['in_place_inline_s'] * 1000:.1f} ms; save + restart a server: {P['save_and_restart_s']:.2f} s "
                  f"({P['speedup_file']:.0f}x)")
    if "step" in result:
        S = result["step"]
        print(f"\n### one RL step of the embedded default ({S['responses_per_step']} responses, mean of "
              f"{S['steps_averaged']} steps)")
        print("| rollout | reward | log-probs | update | weight push | step |\n|---|---|---|---|---|---|")
        print(f"| {S['rollout_s']:.2f} | {S['reward_s']:.3f} | {S['logprobs_s']:.3f} | {S['update_s']:.2f} | "
              f"{S['weight_push_s']:.3f} | {S['step_s']:.2f} |")
    missed = []
    if "layouts" in result:
        L = result["layouts"]
        if L["token_ratio"] < 2.0:
            missed.append(f"packed processes >= 2x fewer tokens than rounds (measured {L['token_ratio']:.2f}x)")
        want = a.min_speedup_per_token_ratio * L["token_ratio"]
        if L["forward_speedup"] < want:
            missed.append(f"packed forward >= {want:.2f}x faster than rounds ({a.min_speedup_per_token_ratio:g} x the "
                          f"{L['token_ratio']:.2f}x token ratio; measured {L['forward_speedup']:.2f}x)")
    if "scaling" in result:
        S = result["scaling"]
        print("\n### packed log-prob pass, one response, 4M-parameter SDAR-shaped model (forward + backward)")
        print("| generated tokens | forward tokens | query chunk | forward s (CPU) | forward+backward s (CPU) | "
              "peak RSS GB |\n|---|---|---|---|---|---|")
        for r in S["chunked"] + [S["dense"]] + [S[k] for k in ("checkpointed", "unsplit") if k in S]:
            if "error" in r:
                print(f"| {r['generated_tokens']} | | {r['query_chunk'] or 'dense'} | failed: {r['error']} | | |")
                continue
            cpu = lambda k: f" ({r[k]:.2f})" if k in r else ""  # noqa: E731
            name = f"{r['query_chunk'] or 'dense'}" + (", grad. ckpt" if r.get("gradient_checkpointing") else "") \
                + (", clean once + noisy groups" if r.get("split") else "")
            print(f"| {r['generated_tokens']} | {r['forward_tokens']} | {name} | "
                  f"{r['forward_s']:.2f}{cpu('forward_cpu_s')} | {r['forward_backward_s']:.2f}"
                  f"{cpu('forward_backward_cpu_s')} | {r['peak_rss_gb']:.2f} |")
        if "time_exponent" in S:
            print(f"growth exponents (first to last length): time {S['time_exponent']:.2f} "
                  f"({S['time_exponent_of']}), peak memory "
                  f"{S['memory_exponent']:.2f} (memory added by the pass: {S.get('added_memory_exponent', float('nan')):.2f})")
        if "max_abs_logprob_diff_chunked_vs_dense" in S:
            print(f"max |chunked - dense| log-prob: {S['max_abs_logprob_diff_chunked_vs_dense']:.2e}")
        if "max_abs_logprob_diff_split_vs_unsplit" in S:
            print(f"max |split - one forward| log-prob at {S['chunked'][-1]['generated_tokens']} tokens: "
                  f"{S['max_abs_logprob_diff_split_vs_unsplit']:.2e}")
        last = S["chunked"][-1]
        if "error" in last:
            missed.append(f"the {last['generated_tokens']}-token pass runs (failed: {last['error']})")
        elif last["peak_rss_gb"] > a.max_peak_gb:
            missed.append(f"peak memory at {last['generated_tokens']} tokens under {a.max_peak_gb:g} GB "
                          f"(measured {last['peak_rss_gb']:.2f} GB)")
        if S.get("memory_exponent", 0.0) > 1.25:
            missed.append(f"peak memory grows with exponent <= 1.25 (measured {S['memory_exponent']:.2f})")
        if S.get("max_abs_logprob_diff_split_vs_unsplit", 0.0) > 1e-5:
            missed.append(f"split equals one-forward log-probs to 1e-5 "
                          f"(measured {S['max_abs_logprob_diff_split_vs_unsplit']:.2e})")
        if S.get("max_abs_logprob_diff_chunked_vs_dense", 0.0) > 1e-5:
            missed.append(f"chunked equals dense log-probs to 1e-5 "
                          f"(measured {S['max_abs_logprob_diff_chunked_vs_dense']:.2e})")
    print(f"\nwritten: {a.out}")
    for m in missed:
        print(f"TARGET MISSED: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
