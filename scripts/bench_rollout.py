"""Rollout benchmarks, measured side by side in one run (not a test).

1. Reference engine (KV cache) vs the naive no-cache decoder, one sequence, greedy:
   tokens/s at 256 and 1024 new tokens (target: >= 5x at 1024 on CPU).
2. Tokens per forward and per step, static vs dynamic decoding, a batch of sequences.
3. HTTP throughput (``dirl serve`` subprocess, one batch-form call and the client) vs the same
   engine in this process (target: within 1.3x).

Default model: the tiny SDAR model made on the spot (max_position_embeddings 2048 so that 1024 new
tokens fit), with its lm_head scaled up (``--sharpen``) so that distributions are peaked like a
trained model's and dynamic decoding has confident tokens to keep; or ``--model DIR``.

    python scripts/bench_rollout.py [--threads 1] [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dirl.config import DecodingConfig, TinyModelConfig  # noqa: E402
from dirl.rollout.backend import GenerateRequest  # noqa: E402
from dirl.rollout.engine import Engine  # noqa: E402
from dirl.rollout.naive import naive_generate  # noqa: E402


def make_requests(vocab: int, n: int, new_tokens: int, prompt_len: int = 21, seed: int = 0) -> list[GenerateRequest]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        ids = torch.randint(5, vocab, (prompt_len + i % 4,), generator=g).tolist()
        out.append(GenerateRequest(request_id=f"b{i}", input_ids=ids, max_new_tokens=new_tokens, temperature=1.0,
                                   top_k=0, top_p=1.0, do_sample=False, stop_token_ids=[]))
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ntok(results) -> int:
    return sum(len(r["token_ids"]) for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the tiny model, made here)")
    ap.add_argument("--sharpen", type=float, default=50.0, help="lm_head scale of the made-here tiny model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the server")
    ap.add_argument("--repeat", type=int, default=3,
                    help="section 3: interleaved repeats, best time kept (the machine may be shared)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dirl.model.sdar import load_model, load_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="dirl-bench-")
    model_dir = args.model
    if model_dir is None:
        from dirl.model.tiny import build_tiny_model

        model, tok = build_tiny_model(TinyModelConfig(max_position_embeddings=2048))
        with torch.no_grad():
            model.hf.lm_head.weight.mul_(args.sharpen)
        model_dir = str(model.save_pretrained(Path(tmp.name) / "model", tokenizer=tok))
    model = load_model(model_dir, device="cpu", dtype="float32")
    model.eval()
    tok = load_tokenizer(model_dir)
    V = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# dirl rollout benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average {os.getloadavg()[0]:.2f}")
    print(f"# model: {model_dir if args.model else 'tiny (made here)'}, {n_params / 1e6:.2f}M parameters, "
          f"vocab {V}, block {model.block_size}" + ("" if args.model else f", lm_head x{args.sharpen:g}"))

    # 1. engine vs naive ----------------------------------------------------------------------
    print("\n## 1. engine (KV cache) vs naive (no cache): one sequence, greedy, dynamic tau 0.9")
    print(f"{'new tokens':>10} {'engine tok/s':>13} {'naive tok/s':>12} {'speed-up':>9}  same tokens")
    lengths = [64, 256] if args.quick else [256, 1024]
    for n in lengths:
        reqs = make_requests(V, 1, n)
        eng = Engine(model, tok)
        eng.generate(make_requests(V, 1, 8))  # warm-up
        a, te = timed(lambda: eng.generate(reqs))
        b, tn = timed(lambda: naive_generate(model, reqs, tok))
        same = a[0]["token_ids"] == b[0]["token_ids"] and a[0]["step_map"] == b[0]["step_map"]
        print(f"{n:>10} {ntok(a) / te:>13.1f} {ntok(b) / tn:>12.1f} {tn / te:>8.2f}x  {same}")

    # 2. static vs dynamic ----------------------------------------------------------------------
    batch, new = (4, 64) if args.quick else (8, 256)
    print(f"\n## 2. static vs dynamic decoding: batch of {batch}, {new} new tokens each, greedy, 4 steps/block")
    print("(tok/forward: tokens kept per sequence per forward it took part in; commits share the next "
          "block's first forward)")
    print(f"{'strategy':>24} {'tok/forward':>12} {'tok/step':>9} {'forwards':>9} {'tok/s':>8}")
    for strategy, tau in (("low_confidence_static", 0.9), ("low_confidence_dynamic", 0.9),
                          ("low_confidence_dynamic", 0.5)):
        eng = Engine(model, tok, denoising_steps=4, unmasking_strategy=strategy, confidence_threshold=tau)
        reqs = make_requests(V, batch, new)
        res, t = timed(lambda: eng.generate(reqs))
        per_step = sum(len(r["token_ids"]) / len(set(r["step_map"])) for r in res) / len(res)
        name = strategy.replace("low_confidence_", "") + (f" tau={tau}" if "dynamic" in strategy else "")
        print(f"{name:>24} {eng.tokens_kept / eng.row_forwards:>12.2f} {per_step:>9.2f} {eng.forwards:>9} "
              f"{ntok(res) / t:>8.1f}")

    # 3. HTTP vs in-process -----------------------------------------------------------------------
    from dirl.rollout.client import RolloutClient
    from dirl.rollout.launch import start_server

    nreq, new = (8, 32) if args.quick else (32, 128)
    dec = DecodingConfig(max_new_tokens=new, do_sample=False)
    print(f"\n## 3. HTTP vs in-process: {nreq} requests x {new} new tokens, greedy, dynamic tau 0.9, "
          f"best of {max(1, args.repeat)}")
    bodies = [{"request_id": r.request_id, "input_ids": r.input_ids} for r in make_requests(V, nreq, new, seed=100)]
    eng = Engine(model, tok)
    reqs = make_requests(V, nreq, new, seed=100)
    eng.generate(reqs[:2])
    with start_server(model_dir, decoding=dec, device="cpu", threads=args.threads) as srv:
        import httpx

        httpx.post(srv.url + "/generate", json={"requests": bodies[:2]}, timeout=600)  # warm-up
        client = RolloutClient([srv.url], max_concurrency=4, batch_size=8)
        t_local = t_batch = t_client = float("inf")
        for _ in range(max(1, args.repeat)):  # interleaved, best of each: load from others hits all alike
            local, t = timed(lambda: eng.generate(reqs))
            t_local = min(t_local, t)
            remote, t = timed(lambda: httpx.post(srv.url + "/generate", json={"requests": bodies},
                                                 timeout=600).json()["results"])
            t_batch = min(t_batch, t)
            via_client, t = timed(lambda: client.generate(bodies))
            t_client = min(t_client, t)
    same = [r["token_ids"] for r in remote] == [r["token_ids"] for r in local] == \
        [r["token_ids"] for r in via_client]
    print(f"{'path':>28} {'tok/s':>8} {'time vs in-process':>19}")
    print(f"{'in-process Engine.generate':>28} {ntok(local) / t_local:>8.1f} {1.0:>18.2f}x")
    print(f"{'HTTP, one batch-form call':>28} {ntok(remote) / t_batch:>8.1f} {t_batch / t_local:>18.2f}x")
    print(f"{'HTTP, RolloutClient (4x8)':>28} {ntok(via_client) / t_client:>8.1f} {t_client / t_local:>18.2f}x")
    print(f"same tokens on all three paths: {same}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
