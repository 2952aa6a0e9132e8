#!/usr/bin/env python
"""GPU verification of the LMDeploy rollout backend against the reference engine.

Run on a CUDA machine (H100/H200) where ``lmdeploy==0.18.0`` is importable, e.g. with the wheels
that ``scripts/fetch_lmdeploy_wheels.sh`` puts under ``.whl/`` (no network is needed):

    PYTHONPATH=.whl/site:$PYTHONPATH python scripts/gpu_check_lmdeploy.py --out "$OUT"

Sections (``--sections`` picks some; each writes into one JSON report as it finishes):

* ``env``        versions, GPU, and that the step-map patch applies to the installed LMDeploy.
* ``parity``     greedy decoding of the same prompts by both backends (bf16): identical token ids
                 and step maps, per unmasking strategy, on two tiny random SDAR models: dirl's
                 character-level one (mask id 3: needs the patch's mask-id override) and one with
                 the Qwen vocabulary (151936, mask id 151669, LMDeploy's built-in id). Free-running
                 greedy decoding of a random bf16 model diverges at near-ties, so the reference
                 engine in bf16 vs fp32 is reported next to it as the noise floor.
* ``replay``     every decision of LMDeploy's greedy trajectories re-derived with dirl's model in
                 fp32: at each recorded (block, step) state, the argmax tokens and the kept set
                 under the unmasking rule must equal what the step map says; mismatches are
                 reported with their logit/confidence margins (near-ties are expected, nothing
                 else is).
* ``weights``    sleep → update_weights → wakeup with new weights: in-process tensors, and CUDA IPC
                 buckets from a separate trainer process (LMDeploy opens the handles); outputs
                 must change and agree with the reference engine loaded with the same weights.
* ``logprobs``   the trainer's log-probs (packed layout, fp32) of LMDeploy's sampled trajectories vs
                 the log-probs LMDeploy recorded (bf16 engine: expect ~1e-2, not 1e-5).
* ``http``       ``dirl serve --backend lmdeploy`` as a subprocess: /generate, /sleep (GPU memory
                 freed), push_weights over ``ipc`` from this process, /wakeup.
* ``throughput`` both backends on a ~0.5B random SDAR model, paper decoding settings.

Exit status 0 when every section that ran passed its criterion. One run of everything may take more
than the 10 minutes a device command gets; split it, e.g. ``--sections env,parity,replay`` then
``--sections weights,logprobs,http`` then ``--sections throughput`` (each run rebuilds the models in
under a minute, or reuses ``--work``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN_VOCAB = 151936
QWEN_MASK = 151669
SECTIONS = ("env", "parity", "replay", "weights", "logprobs", "http", "throughput")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _sharpen_and_save(model, out: Path, logit_std: float, tokenizer=None, seed: int = 0) -> Path:
    """Scale ``lm_head`` so the logits of a random model have about ``logit_std`` (confidences then
    spread over (0, 1) and the dynamic threshold is sometimes met), then save in bf16."""
    import torch

    hidden = model.config.hidden_size
    with torch.no_grad():
        w = model.hf.lm_head.weight
        w.mul_(logit_std / (w.float().std().item() * math.sqrt(hidden)))
    model.hf.to(torch.bfloat16)
    return model.save_pretrained(out, tokenizer=tokenizer)


def make_char_model(out: Path) -> Path:
    from dirl.model.tiny import build_tiny_model

    model, tok = build_tiny_model()
    return _sharpen_and_save(model, out, 4.0, tokenizer=tok)


def make_qwen_vocab_model(out: Path, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, inter=512,
                          seed=0) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dirl.model.sdar import SDARModel

    cfg = Qwen3Config(vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=151645, pad_token_id=151643)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for _, p in sorted(hf.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return _sharpen_and_save(SDARModel(hf, 4, QWEN_MASK), out, 4.0)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def requests_for(n, vocab, avoid, max_new, greedy=True, temperature=1.0, top_k=0, stop=(), seed=0, lo=5,
                 prefix="q"):
    import random

    from dirl.rollout.backend import GenerateRequest

    rng = random.Random(seed)
    pool = [t for t in range(min(vocab, 4000)) if t not in set(avoid)]
    out = []
    for i in range(n):
        ids = [rng.choice(pool) for _ in range(lo + i % 9)]
        out.append(GenerateRequest(request_id=f"{prefix}{i}", input_ids=ids, max_new_tokens=max_new,
                                   temperature=temperature, top_k=1 if greedy else top_k, top_p=1.0,
                                   do_sample=not greedy, stop_token_ids=list(stop), seed=1000 + i))
    return out


def compare(a: list[dict], b: list[dict]) -> dict:
    """How far two backends' trajectories agree (same requests, same order)."""
    same_tok = same_all = 0
    first_div, lp_diff, examples = [], [], []
    for x, y in zip(a, b):
        tx, ty = x["token_ids"], y["token_ids"]
        k = next((i for i, (p, q) in enumerate(zip(tx, ty)) if p != q), min(len(tx), len(ty)))
        if tx == ty:
            same_tok += 1
            if x["step_map"] == y["step_map"] and x["response_length"] == y["response_length"] \
                    and x["finish_reason"] == y["finish_reason"]:
                same_all += 1
        else:
            first_div.append(k)
            if len(examples) < 3:
                examples.append({"request_id": x["request_id"], "first_divergence": k, "a": tx[:k + 4],
                                 "b": ty[:k + 4], "a_steps": x["step_map"][:k + 4], "b_steps": y["step_map"][:k + 4]})
        j = next((i for i in range(min(len(tx), len(ty)))
                  if tx[i] != ty[i] or x["step_map"][i] != y["step_map"][i]), min(len(tx), len(ty)))
        lp_diff += [abs(p - q) for p, q in zip(x["logprobs"][:j], y["logprobs"][:j])]
    n = len(a)
    return {"n": n, "identical_tokens": same_tok, "identical_all": same_all,
            "mean_first_divergence": statistics.mean(first_div) if first_div else None,
            "logprob_max_abs_diff_on_agreeing_prefix": max(lp_diff) if lp_diff else None,
            "examples": examples}


def backend(name, model_dir, dec, **kw):
    from dirl.rollout.backends import get_backend

    if name == "lmdeploy":
        kw.setdefault("cache_max_entry_count", 0.25)
        kw.setdefault("eager_mode", True)
    return get_backend(name, str(model_dir), decoding=dec, device="cuda", **kw)


def close(b):
    import gc

    import torch

    if hasattr(b, "close"):
        b.close()
    del b
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def section_env(ctx) -> dict:
    import torch
    import transformers

    from dirl.rollout import lmdeploy_patch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "lmdeploy": lmdeploy_patch.installed_version()}
    lmdeploy_patch.apply_patch()
    info["patch_applied"] = lmdeploy_patch.is_applied()
    info["ok"] = bool(info["gpu"]) and info["lmdeploy"] == lmdeploy_patch.TARGET_VERSION and info["patch_applied"]
    return info


def section_parity(ctx) -> dict:
    from dirl.config import DecodingConfig

    res, ok = {}, True
    cases = [("char", ctx["char"], 105, (0, 2), [0, 2, 3, 4]),
             ("qwen_vocab", ctx["qwen"], QWEN_VOCAB, (151645, 151643), [QWEN_MASK, 151643, 151645])]
    strategies = [("low_confidence_dynamic", 0.9), ("low_confidence_static", 0.9), ("sequential", 0.9)]
    for name, path, vocab, stop, avoid in cases:
        stop = list(stop)
        for strategy, tau in strategies if name == "qwen_vocab" else strategies[:1]:
            dec = DecodingConfig(block_size=4, denoising_steps=4 if strategy == "low_confidence_dynamic" else 2,
                                 unmasking_strategy=strategy, confidence_threshold=tau,
                                 max_new_tokens=ctx["max_new"])
            if len(stop) == 2:  # add the reference's most frequent token, so that some sequences stop
                probe = backend("reference", path, dec, dtype="bfloat16")
                pre = probe.generate(requests_for(ctx["n"], vocab, avoid, ctx["max_new"], stop=stop))
                close(probe)
                counts = {}
                for t in pre:
                    for tok in t["token_ids"]:
                        counts[tok] = counts.get(tok, 0) + 1
                stop.append(max(counts, key=counts.get))
            reqs = requests_for(ctx["n"], vocab, avoid, ctx["max_new"], stop=stop)  # the probe's prompts
            ref = backend("reference", path, dec, dtype="bfloat16")
            a = ref.generate(reqs)
            close(ref)
            lmd = backend("lmdeploy", path, dec, dtype="bfloat16")
            t0 = time.perf_counter()
            b = lmd.generate(reqs)
            lmd_s = time.perf_counter() - t0
            close(lmd)
            ref32 = backend("reference", path, dec, dtype="float32")
            c = ref32.generate(reqs)
            close(ref32)
            key = f"{name}/{strategy}"
            res[key] = {"lmdeploy_vs_reference_bf16": compare(a, b), "reference_bf16_vs_fp32": compare(a, c),
                        "lmdeploy_seconds": lmd_s, "stop_finishes": sum(t["finish_reason"] == "stop" for t in b)}
            ctx.setdefault("greedy_trajs", {})[key] = (path, dec, b)
            floor = res[key]["reference_bf16_vs_fp32"]["identical_all"]
            got = res[key]["lmdeploy_vs_reference_bf16"]["identical_all"]
            # agreement at least as good as two correct implementations that differ only numerically
            res[key]["ok"] = got >= min(floor, ctx["n"]) - max(1, ctx["n"] // 8)
            ok &= res[key]["ok"]
    res["ok"] = ok
    return res


def replay_trajectory(model, traj, dec, mask_id, temperature=1.0):
    """Re-derive each recorded decision of a greedy trajectory with ``model`` (see module doc)."""
    import torch

    from dirl.model.attention import block_causal_meta
    from dirl.rollout.decoding import tokens_to_keep

    B = dec.block_size
    prompt, toks, steps = traj["prompt_ids"], traj["token_ids"], traj["step_map"]
    P = len(prompt)
    x = prompt + toks
    s = [0] * P + steps
    out = {"decisions": 0, "agree": 0, "mismatches": []}
    for lo in range((P // B) * B, len(x), B):
        hi = lo + B
        for st in sorted({s[i] for i in range(max(lo, P), hi)}):
            state = list(x[:hi])
            masked = [i >= P and s[i] >= st for i in range(lo, hi)]
            for j, m in enumerate(masked):
                if m:
                    state[lo + j] = mask_id
            ids = torch.tensor([state], device=model.device)
            with torch.no_grad():
                logits = model(ids, block_causal_meta(hi, B, device=model.device))[0, lo:hi].float() / temperature
            prob = logits.softmax(-1)
            pred = logits.argmax(-1)
            conf = prob.gather(1, pred[:, None]).squeeze(1)
            mt = torch.tensor(masked, device=model.device)
            keep = tokens_to_keep(conf[None], mt[None], dec.unmasking_strategy, dec.confidence_threshold,
                                  dec.denoising_steps)[0].tolist()
            want = [lo + j >= P and s[lo + j] == st for j in range(B)]
            tok_ok = all(int(pred[j]) == x[lo + j] for j in range(B) if want[j])
            out["decisions"] += 1
            if keep == want and tok_ok:
                out["agree"] += 1
            elif len(out["mismatches"]) < 5:
                top2 = logits.topk(2, dim=-1).values
                out["mismatches"].append({
                    "request_id": traj["request_id"], "block_start": lo, "step": st, "kept_by_lmdeploy": want,
                    "kept_by_rule": keep, "tokens_agree": tok_ok,
                    "top2_logit_gap": [round(float(g), 4) for g in (top2[:, 0] - top2[:, 1]).tolist()],
                    "confidence": [round(float(c), 4) for c in conf.tolist()]})
    return out


def section_replay(ctx) -> dict:
    import torch

    from dirl.model.sdar import load_model

    if "greedy_trajs" not in ctx:
        section_parity(ctx)
    res, ok = {}, True
    for key, (path, dec, trajs) in ctx["greedy_trajs"].items():
        model = load_model(path, device="cuda", dtype="float32", attn_backend="sdpa")  # no recompiles per length
        model.eval()
        tot = {"decisions": 0, "agree": 0, "mismatches": []}
        for t in trajs:
            r = replay_trajectory(model, t, dec, model.mask_token_id)
            tot["decisions"] += r["decisions"]
            tot["agree"] += r["agree"]
            tot["mismatches"] += r["mismatches"][: max(0, 5 - len(tot["mismatches"]))]
        tot["agree_fraction"] = tot["agree"] / max(1, tot["decisions"])
        tot["ok"] = tot["agree_fraction"] >= 0.97
        ok &= tot["ok"]
        res[key] = tot
        del model
        torch.cuda.empty_cache()
    res["ok"] = ok
    return res


def _perturbed(path, scale, seed):
    import torch

    from dirl.model.sdar import load_model
    from dirl.rollout.weights import named_tensors

    m = load_model(path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n, t in named_tensors(m):
        if t.is_floating_point() and t.dim() > 1:
            t = t + torch.randn(t.shape, generator=g) * t.std() * scale
        pairs.append((n, t.contiguous()))
    return pairs


def _ipc_trainer(conn, weights_file, bucket_bytes):
    """A separate 'trainer' process: put weights on the GPU, send CUDA IPC payloads, wait for acks."""
    import torch
    from safetensors.torch import load_file

    from dirl.rollout.weights import flatten_buckets, ipc_payload, segments

    pairs = [(n, t.cuda()) for n, t in load_file(weights_file).items()]
    groups = segments(pairs, bucket_bytes)
    for i, g in enumerate(groups):
        buckets = flatten_buckets(g, bucket_bytes)
        torch.cuda.synchronize()
        conn.send(ipc_payload(buckets, i == len(groups) - 1))
        conn.recv()  # the server has loaded it: the buckets may go
        del buckets
    conn.send(None)


def section_weights(ctx) -> dict:
    import multiprocessing as mp

    import torch
    from safetensors.torch import save_file

    from dirl.config import DecodingConfig

    path = ctx["qwen"]
    dec = DecodingConfig(block_size=4, denoising_steps=4, max_new_tokens=ctx["max_new"])
    reqs = requests_for(ctx["n"], QWEN_VOCAB, [QWEN_MASK], ctx["max_new"], prefix="w")
    res = {}
    ref = backend("reference", path, dec, dtype="bfloat16")
    lmd = backend("lmdeploy", path, dec, dtype="bfloat16")
    try:
        before = lmd.generate(reqs)
        # 1) in-process named tensors
        new1 = _perturbed(path, 0.5, 1)
        for b in (ref, lmd):
            b.sleep(1)
            b.update_weights([(n, t.cuda()) for n, t in new1], True)
            b.wakeup()
        a1, b1 = ref.generate(reqs), lmd.generate(reqs)
        res["in_process"] = {"changed": sum(x["token_ids"] != y["token_ids"] for x, y in zip(before, b1)),
                             "vs_reference": compare(a1, b1)}
        # 2) CUDA IPC buckets from another process
        new2 = _perturbed(path, 0.5, 2)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "w.safetensors")
            save_file({n: t.bfloat16() if t.is_floating_point() else t for n, t in new2}, f)
            ref.sleep(1)
            ref.update_weights([(n, t.cuda()) for n, t in new2], True)
            ref.wakeup()
            parent, child = mp.get_context("spawn").Pipe()
            proc = mp.get_context("spawn").Process(target=_ipc_trainer, args=(child, f, 8 << 20))
            proc.start()
            lmd.sleep(1)
            t0 = time.perf_counter()
            segs = 0
            while True:
                payload = parent.recv()
                if payload is None:
                    break
                lmd.update_weights_ipc(payload, payload["finished"])
                segs += 1
                parent.send("ok")
            lmd.wakeup()
            proc.join(60)
            res["ipc"] = {"segments": segs, "seconds": time.perf_counter() - t0}
        a2, b2 = ref.generate(reqs), lmd.generate(reqs)
        res["ipc"].update({"changed": sum(x["token_ids"] != y["token_ids"] for x, y in zip(b1, b2)),
                           "vs_reference": compare(a2, b2)})
        floor = ctx.get("parity_floor", 0)
        res["ok"] = (res["in_process"]["changed"] > 0 and res["ipc"]["changed"] > 0
                     and res["in_process"]["vs_reference"]["identical_all"] >= floor
                     and res["ipc"]["vs_reference"]["identical_all"] >= floor)
    finally:
        close(lmd)
        close(ref)
        torch.cuda.empty_cache()
    return res


def section_logprobs(ctx) -> dict:
    import torch

    from dirl.config import DecodingConfig
    from dirl.model.sdar import load_model
    from dirl.train.layouts import trajectory_logprobs

    res, ok = {}, True
    for name, path, vocab, avoid in (("char", ctx["char"], 105, [0, 2, 3, 4]),
                                     ("qwen_vocab", ctx["qwen"], QWEN_VOCAB, [QWEN_MASK])):
        dec = DecodingConfig(block_size=4, denoising_steps=4, max_new_tokens=ctx["max_new"])
        reqs = requests_for(ctx["n"], vocab, avoid, ctx["max_new"], greedy=False, temperature=1.0, top_k=50,
                            prefix="s")
        lmd = backend("lmdeploy", path, dec, dtype="bfloat16")
        trajs = lmd.generate(reqs)
        close(lmd)
        ref = backend("reference", path, dec, dtype="float32")
        ref_trajs = ref.generate(reqs)
        close(ref)
        out = {}
        for dtype in ("float32", "bfloat16"):
            model = load_model(path, device="cuda", dtype=dtype)
            model.eval()
            for label, tt in (("lmdeploy", trajs), ("reference_fp32", ref_trajs)):
                lps = trajectory_logprobs(model, tt, layout="packed", temperature=1.0)
                diffs = [abs(a - b) for t, l in zip(tt, lps) for a, b in zip(t["logprobs"], l) if b is not None]
                diffs.sort()
                out[f"{label}_vs_trainer_{dtype}"] = {
                    "tokens": len(diffs), "max_abs": diffs[-1] if diffs else None,
                    "mean_abs": statistics.mean(diffs) if diffs else None,
                    "p99_abs": diffs[int(0.99 * (len(diffs) - 1))] if diffs else None}
            del model
            torch.cuda.empty_cache()
        steps = [len(set(t["step_map"])) / max(1, len(t["token_ids"])) for t in trajs]
        out["lmdeploy_steps_per_token"] = statistics.mean(steps)
        out["ok"] = (out["lmdeploy_vs_trainer_float32"]["mean_abs"] or 0) < 0.05
        ok &= out["ok"]
        res[name] = out
    res["ok"] = ok
    return res


def section_http(ctx) -> dict:
    import torch

    from dirl.config import DecodingConfig
    from dirl.model.sdar import load_model
    from dirl.rollout.client import RolloutClient
    from dirl.rollout.launch import start_server

    path = ctx["qwen"]
    dec = DecodingConfig(block_size=4, denoising_steps=4, max_new_tokens=ctx["max_new"])
    reqs = requests_for(ctx["n"], QWEN_VOCAB, [QWEN_MASK], ctx["max_new"], prefix="h")
    body = [{"request_id": r.request_id, "input_ids": r.input_ids, "do_sample": False, "temperature": 1.0,
             "max_new_tokens": r.max_new_tokens, "stop_token_ids": []} for r in reqs]
    res = {}
    log = Path(ctx["out"]) / "lmdeploy_serve.log"
    env = {"DIRL_LMDEPLOY_OPTIONS": json.dumps({"cache_max_entry_count": 0.25, "eager_mode": True})}
    with start_server(path, backend="lmdeploy", device="cuda", dtype="bfloat16", decoding=dec,
                      startup_timeout=400, log_path=log, env=env) as h:
        client = RolloutClient(h.url, timeout=300)
        res["info"] = client.info()[0]
        got = client.generate(body)
        ref = backend("reference", path, dec, dtype="bfloat16")
        want = ref.generate(reqs)
        res["generate_vs_reference"] = compare(want, got)
        free0 = torch.cuda.mem_get_info()[0]
        client.sleep(1)
        free1 = torch.cuda.mem_get_info()[0]
        client.wakeup()
        free2 = torch.cuda.mem_get_info()[0]
        res["memory_gib"] = {"freed_by_sleep": (free1 - free0) / 2**30, "taken_back_by_wakeup": (free1 - free2) / 2**30}
        model = load_model(path, device="cuda", dtype="bfloat16")
        with torch.no_grad():
            for p in model.hf.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn_like(p) * p.float().std().to(p.dtype) * 0.5)
        t0 = time.perf_counter()
        res["push"] = client.push_weights(model, transport="ipc")
        res["push"]["seconds"] = time.perf_counter() - t0
        ref.sleep(1)
        from dirl.rollout.weights import named_tensors

        ref.update_weights(named_tensors(model), True)
        ref.wakeup()
        res["after_push_vs_reference"] = compare(ref.generate(reqs), client.generate(body))
        close(ref)
        del model
    floor = ctx.get("parity_floor", 0)
    res["ok"] = (res["memory_gib"]["freed_by_sleep"] > 0.1
                 and res["generate_vs_reference"]["identical_all"] >= floor
                 and res["after_push_vs_reference"]["identical_all"] >= floor)
    return res


def section_throughput(ctx) -> dict:
    from dirl.config import DecodingConfig

    path = ctx["bench"]
    dec = DecodingConfig(block_size=4, denoising_steps=4, unmasking_strategy="low_confidence_dynamic",
                         confidence_threshold=0.9, temperature=1.0, top_k=50, max_new_tokens=ctx["bench_tokens"])
    reqs = requests_for(ctx["bench_prompts"], QWEN_VOCAB, [QWEN_MASK], ctx["bench_tokens"], greedy=False,
                        temperature=1.0, top_k=50, lo=64, prefix="t")
    res = {}
    for name, kw in (("reference", {"dtype": "bfloat16", "max_batch_size": ctx["bench_prompts"]}),
                     ("lmdeploy", {"dtype": "bfloat16", "max_batch_size": ctx["bench_prompts"], "eager_mode": False,
                                   "cache_max_entry_count": 0.4})):
        b = backend(name, path, dec, **kw)
        b.generate(reqs[:4])  # warm-up
        t0 = time.perf_counter()
        out = b.generate(reqs)
        dt = time.perf_counter() - t0
        close(b)
        tokens = sum(len(t["token_ids"]) for t in out)
        steps = sum(len(set(t["step_map"])) for t in out)
        res[name] = {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "steps": steps,
                     "tokens_per_step": tokens / max(1, steps)}
    res["speedup"] = res["lmdeploy"]["tokens_per_s"] / res["reference"]["tokens_per_s"]
    res["ok"] = True  # reported, not judged
    return res


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_lmdeploy_out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--n", type=int, default=16, help="prompts per parity/replay run")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--bench-prompts", type=int, default=128)
    ap.add_argument("--bench-tokens", type=int, default=256)
    ap.add_argument("--work", default=None, help="folder for the generated models (default: a temporary one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "lmdeploy_gpu_check.json"
    work = Path(args.work or tempfile.mkdtemp(prefix="dirl-lmdeploy-check-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r} (known: {', '.join(SECTIONS)})")

    import torch

    if not torch.cuda.is_available():
        print("gpu_check_lmdeploy: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 2
    ctx = {"out": str(out), "n": args.n, "max_new": args.max_new_tokens, "bench_prompts": args.bench_prompts,
           "bench_tokens": args.bench_tokens}
    t0 = time.perf_counter()
    ctx["char"] = work / "char" if (work / "char").is_dir() else make_char_model(work / "char")
    ctx["qwen"] = work / "qwen" if (work / "qwen").is_dir() else make_qwen_vocab_model(work / "qwen")
    if "throughput" in wanted and not (work / "bench").is_dir():
        make_qwen_vocab_model(work / "bench", hidden=1024, layers=16, heads=16, kv_heads=8, head_dim=64,
                              inter=3072, seed=1)
    ctx["bench"] = work / "bench"
    report = {"models_seconds": time.perf_counter() - t0, "sections": {}}
    status = 0
    for name in wanted:
        t = time.perf_counter()
        try:
            r = globals()[f"section_{name}"](ctx)
        except Exception as e:  # noqa: BLE001 - recorded, the next section still runs
            r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        r["seconds"] = round(time.perf_counter() - t, 2)
        if name == "parity" and "ok" in r:
            ctx["parity_floor"] = min((v["reference_bf16_vs_fp32"]["identical_all"] for k, v in r.items()
                                       if isinstance(v, dict) and "reference_bf16_vs_fp32" in v), default=0) \
                - max(1, args.n // 8)
        report["sections"][name] = r
        report_path.write_text(json.dumps(report, indent=2, default=str))
        status |= 0 if r.get("ok") else 1
        print(f"[{'ok' if r.get('ok') else 'FAIL'}] {name} ({r['seconds']} s)"
              + (f": {r['error']}" if "error" in r else ""), flush=True)
    print(f"report: {report_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
