#!/usr/bin/env python
"""SFT benchmarks.

    python scripts/bench_sft.py packing            packing efficiency of the default data (and other row lengths)
    python scripts/bench_sft.py cpu [--steps N]    step time of the embedded default on this CPU
    python scripts/bench_sft.py gpu [--seq 8192]   FlexAttention vs SDPA training step at 8k tokens on a
                                                   Qwen3-1.7B-shaped SDAR model (random weights; CUDA only)
    python scripts/bench_sft.py memory             CPU fwd+bwd of one [x_t ; x_0] row of 1k/4k/8k tokens on a
                                                   4M-parameter SDAR-shaped model: time, peak RSS (a fresh
                                                   process per length), growth exponents
    python scripts/bench_sft.py all

Results are printed as JSON lines (and appended to --out when given). Targets (exit 1, naming each
one missed, when a measured run misses it):

* packing: the default data packs at least --min-packing (0.70) of row tokens as real tokens, and
  drops no sample;
* memory: peak RSS at the longest length under --max-peak-gb (4 GB);
* gpu: FlexAttention's training step is at least --min-flex-speedup (8.34x, the paper's figure at
  1.7B in the DiRL paper) faster than SDPA with the dense mask, and needs no more peak memory (an SDPA
  run out of memory counts as met when the flex run fits). Without CUDA the gpu bench is skipped and
  checks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def emit(rec: dict, out: str | None) -> None:
    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "torch": torch.__version__, **rec}
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


MISSED: list[str] = []  # targets missed in this run, named


def check(ok: bool, what: str) -> None:
    if not ok:
        MISSED.append(what)


def bench_packing(out: str | None, min_packing: float = 0.70) -> None:
    from dirl.data.sft import build_sft_rows
    from dirl.model.tiny import build_tokenizer
    from dirl.train.sft import SFTConfig, load_sft_examples

    cfg = SFTConfig()
    tok = build_tokenizer()
    examples = load_sft_examples(cfg.data)
    for row_len in sorted({cfg.data.max_length, 64, 96, 128, 176, 256, 512}):
        data = build_sft_rows(tok, examples, cfg.model.tiny.block_size, row_len)
        stats = data.stats.as_dict()
        emit({"bench": "sft_packing", "data": f"synthetic train, {len(examples)} samples", "row_len": row_len,
              "default": row_len == cfg.data.max_length, **stats}, out)
        if row_len == cfg.data.max_length:
            eff = data.stats.efficiency
            check(eff >= min_packing, f"packing efficiency of the default data {eff:.3f} >= {min_packing}")
            check(data.stats.n_dropped == 0, f"no default sample dropped ({data.stats.n_dropped} were)")


def bench_cpu(steps: int, out: str | None) -> None:
    from dirl.data.sft import RowStream
    from dirl.train.common import GradientStepper, build_optimizer, build_scheduler
    from dirl.train.sft import NELBOLoss, SFTConfig, accumulate_step, build_model, build_sft_data, make_micro_batches

    cfg = SFTConfig()
    model, tok = build_model(cfg, torch.device("cpu"))
    data = build_sft_data(cfg, tok, model.block_size)
    stream = RowStream(len(data), seed=0)
    module = NELBOLoss(model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps + 3)
    n_micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    stepper = GradientStepper(None, module, opt, sched, cfg.optim.max_grad_norm, n_micro)
    times = []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        mbs = make_micro_batches(data, stream, step * cfg.train.global_batch_size, cfg, 0, 1, torch.device("cpu"))
        accumulate_step(module, stepper, mbs, None)
        stepper.step()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.data.max_length
    emit({"bench": "sft_cpu_step", "config": "embedded default", "params": sum(p.numel() for p in model.parameters()),
          "rows_per_step": cfg.train.global_batch_size, "row_len": cfg.data.max_length,
          "steps_timed": steps, "step_s_median": round(med, 4), "step_s_min": round(min(times), 4),
          "step_s_max": round(max(times), 4), "tokens_per_s_median": round(tokens / med, 1),
          "forward_tokens_per_step": 2 * tokens}, out)


def _qwen3_17b_shape(layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def bench_gpu(seq: int, steps: int, layers: int, out: str | None, min_speedup: float = 8.34) -> None:
    if not torch.cuda.is_available():
        emit({"bench": "sft_gpu_flex_vs_sdpa", "status": "skipped: CUDA not available"}, out)
        return
    from transformers import Qwen3ForCausalLM

    from dirl.model.sdar import SDARModel
    from dirl.train.sft import NELBOLoss

    dev = torch.device("cuda")
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(_qwen3_17b_shape(layers)).to(dev, torch.bfloat16)
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = SDARModel(hf, block_size=4, mask_token_id=151669, attn_backend="flex")
    module = NELBOLoss(model, chunk_size=2048)
    # one packed row: samples of 1k-3k tokens, then tail padding
    g = torch.Generator().manual_seed(0)
    lens, left = [], seq
    while left > 0:
        n = min(left, int(torch.randint(1024, 3072, (1,), generator=g)))
        lens.append(n)
        left -= n
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].to(dev)
    ids = torch.randint(0, 151643, (1, seq), generator=g).to(dev)
    masked = (torch.rand(1, seq, generator=g) < 0.5).to(dev)
    p = torch.full((1, seq), 0.5, device=dev)
    res = {}
    for backend in ("flex", "sdpa"):
        model.attn_backend = backend
        try:
            times = []
            torch.cuda.reset_peak_memory_stats()
            for i in range(steps + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = module(ids, pos, doc, masked, p) / masked.sum()
                loss.backward()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                hf.zero_grad(set_to_none=True)
            res[backend] = {"step_s": round(statistics.median(times), 4),
                            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        except torch.cuda.OutOfMemoryError:
            res[backend] = {"status": "out of memory"}
            hf.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    speedup = None
    if "step_s" in res.get("flex", {}) and "step_s" in res.get("sdpa", {}):
        speedup = round(res["sdpa"]["step_s"] / res["flex"]["step_s"], 2)
    emit({"bench": "sft_gpu_flex_vs_sdpa", "model": f"Qwen3-1.7B shape, {layers} layers, random bf16 weights, "
          "gradient checkpointing", "tokens": seq, "forward_tokens": 2 * seq, "docs_in_row": len(lens),
          **res, "flex_speedup": speedup}, out)
    flex, sdpa = res.get("flex", {}), res.get("sdpa", {})
    if "step_s" not in flex:
        check(False, f"FlexAttention training step at {seq} tokens runs ({flex.get('status')})")
    elif speedup is not None:
        check(speedup >= min_speedup, f"FlexAttention speed-up over SDPA {speedup}x >= {min_speedup}x")
        check(flex["peak_mem_gib"] <= sdpa["peak_mem_gib"],
              f"FlexAttention peak memory {flex['peak_mem_gib']} GiB <= SDPA's {sdpa['peak_mem_gib']} GiB")


MEMORY_SHAPE = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                    intermediate_size=768, max_position_embeddings=16384)


def memory_child(n: int, split: bool | None) -> dict:
    """In this (fresh) process: the SFT loss's forward + backward of one row of ``n`` tokens."""
    import resource

    from dirl.config import TinyModelConfig
    from dirl.model.tiny import build_tiny_model
    from dirl.model.attention import sft_meta
    from dirl.train.sft import NELBOLoss

    torch.set_num_threads(1)
    model, _ = build_tiny_model(TinyModelConfig(**MEMORY_SHAPE))
    model.train()
    g = torch.Generator().manual_seed(0)

    class Loss(NELBOLoss):  # the trainer's loss with the split forced on or off (None: automatic)
        def forward(self, ids, pos, doc, masked, p):
            real = self.model.hidden_states

            def hs(*a, **k):
                return real(*a, split_noisy=split, **k)

            self.model.hidden_states = hs
            try:
                return super().forward(ids, pos, doc, masked, p)
            finally:
                del self.model.hidden_states

    def row(length):
        ids = torch.randint(5, model.config.vocab_size, (1, length), generator=g)
        pos = torch.arange(length)[None]
        return ids, pos, torch.zeros_like(pos), torch.rand(1, length, generator=g) < 0.5, torch.full((1, length), 0.5)

    loss_fn = Loss(model)
    loss_fn(*row(64)).backward()  # first-call costs out of the timing
    model.zero_grad(set_to_none=True)
    batch = row(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0, c0 = time.perf_counter(), time.process_time()
    loss = loss_fn(*batch)
    loss.backward()
    t1, c1 = time.perf_counter(), time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    meta = sft_meta(batch[1], batch[2], model.block_size)
    return {"tokens": n, "forward_tokens": 2 * n, "split": model._should_split(meta, split),
            "forward_backward_s": round(t1 - t0, 2), "forward_backward_cpu_s": round(c1 - c0, 2),
            "peak_rss_gb": round(peak, 3), "rss_before_gb": round(base, 3), "loss": float(loss.detach())}


def bench_memory(lengths: list[int], out, max_peak_gb: float, unsplit: bool) -> None:
    import math
    import subprocess

    def run(n, no_split=False):
        cmd = [sys.executable, str(Path(__file__).resolve()), "memory-child", "--seq", str(n)]
        cmd += ["--no-split"] if no_split else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"tokens": n, "error": r.stderr.strip().splitlines()[-1:]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = [run(n) for n in lengths]
    extra = [run(lengths[-1], no_split=True)] if unsplit else []
    res = {"bench": "sft_cpu_memory", "machine": machine(), "model": "4M SDAR-shaped (hidden 256, 5 layers, 8/2 heads)",
           "rows": rows + extra}
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:
        f = math.log(ok[-1]["tokens"] / ok[0]["tokens"])
        res["time_exponent"] = round(math.log(ok[-1]["forward_backward_cpu_s"] / ok[0]["forward_backward_cpu_s"]) / f, 2)
        res["memory_exponent"] = round(math.log(ok[-1]["peak_rss_gb"] / ok[0]["peak_rss_gb"]) / f, 2)
        da = ok[0]["peak_rss_gb"] - ok[0]["rss_before_gb"]
        db = ok[-1]["peak_rss_gb"] - ok[-1]["rss_before_gb"]
        if da > 0 and db > 0:
            res["added_memory_exponent"] = round(math.log(db / da) / f, 2)
    if extra and "error" not in extra[0] and ok and ok[-1]["tokens"] == lengths[-1]:
        res["loss_rel_diff_split_vs_unsplit"] = abs(ok[-1]["loss"] - extra[0]["loss"]) / abs(extra[0]["loss"])
    emit(res, out)
    last = rows[-1]
    if "error" in last:
        check(False, f"SFT fwd+bwd at {last['tokens']} tokens runs ({last['error']})")
    else:
        check(last["peak_rss_gb"] < max_peak_gb,
              f"SFT fwd+bwd peak memory at {last['tokens']} tokens {last['peak_rss_gb']} GB < {max_peak_gb} GB")
    if "loss_rel_diff_split_vs_unsplit" in res:
        check(res["loss_rel_diff_split_vs_unsplit"] < 1e-5, "split and one-forward SFT losses agree to 1e-5")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["packing", "cpu", "gpu", "memory", "all", "memory-child"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--min-packing", type=float, default=0.70, help="packing efficiency target of the default data")
    ap.add_argument("--min-flex-speedup", type=float, default=8.34, help="FlexAttention vs SDPA step-time target")
    ap.add_argument("--lengths", default="1024,4096,8192", help="memory: tokens of the row")
    ap.add_argument("--max-peak-gb", type=float, default=4.0, help="memory: target peak RSS at the longest length")
    ap.add_argument("--unsplit", action="store_true", help="memory: also the longest length as one forward")
    ap.add_argument("--no-split", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mode == "memory-child":
        print(json.dumps(memory_child(a.seq, False if a.no_split else None)))
        return 0
    MISSED.clear()
    if a.mode in ("packing", "all"):
        bench_packing(a.out, a.min_packing)
    if a.mode in ("cpu", "all"):
        bench_cpu(a.steps, a.out)
    if a.mode in ("memory", "all"):
        bench_memory([int(x) for x in a.lengths.split(",")], a.out, a.max_peak_gb, a.unsplit)
    if a.mode in ("gpu", "all"):
        bench_gpu(a.seq, max(1, a.steps // 4), a.layers, a.out, a.min_flex_speedup)
    for what in MISSED:
        print(f"bench_sft: target missed: {what}", file=sys.stderr)
    return 1 if MISSED else 0


if __name__ == "__main__":
    sys.exit(main())
