#!/usr/bin/env python
"""Attention work per layout, predicted from the metadata the trainer builds (no model, no GPU).

    python scripts/attention_tiles.py [--prompt 1024] [--response 8192] [--batch 4] [--block-size 4]
                                      [--tile 128] [--row-tokens N] [--dist NAME=p1,...,pB]
                                      [--trajectories traj.jsonl] [--only-given] [--seed S]
                                      [--json out.json] [--no-self-check]

For three forwards at the paper's shapes (prompt 1k, response 8k, block size 4, 4 denoising steps)

* ``sft``    : the SFT row ``[x_t ; x_0]`` (``PackedSFTData`` rows + ``sft_meta``, as ``dirl sft`` builds it);
* ``packed`` : the RL packed layout (``build_batch(..., layout="packed")``, as ``dirl rl`` builds it);
* ``rounds`` : DiRL's rounds layout (``build_batch(..., layout="rounds")``),

it prints the tokens of each forward and the non-empty 128 x 128 tiles of the FlexAttention
``BlockMask`` (full and partial), beside the tiles a dense-mask kernel computes and the physical floor
of the step-level layouts, ``(1 + mean steps per block) x L`` tokens (L = prompt + response).

The RL layouts depend on how many denoising steps each block took. With dynamic decoding
(tau = 0.9) that number is between 1 and 4; the script sweeps assumed distributions of it (``--dist``
adds one; ``--trajectories`` adds the empirical distribution of recorded trajectories, e.g. the
output of ``dirl rollout``), draws a step map per response from each (seeded) and builds the
trajectories from it.

Tiles are counted from per-token metadata, tile by tile (``count_tiles``), with the rule of
SPEC section 2; no L x L tensor is formed, so paper shapes (~40k tokens per row) take a second.
A self-check first compares the counter with torch's ``create_block_mask`` (through dirl's own
``flex_block_mask``) on a reduced shape; tests/test_attention_tiles.py does the same and compares
both with a brute-force dense mask.

Tiles measure attention work only: projections and MLP scale with the tokens of a forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dirl.model.attention import TokenMeta  # noqa: E402

BIG = 1 << 40  # offset that keeps (doc, value) keys apart; values stay far below it


# --------------------------------------------------------------------------------------------
# Tile counting from per-token metadata
# --------------------------------------------------------------------------------------------


@dataclass
class TileCount:
    rows: int = 0
    width: int = 0  # tokens per row (padded to one length, as the trainer pads)
    tokens: int = 0  # rows * width: what the forward processes
    nonempty: int = 0
    full: int = 0
    dense: int = 0  # tiles a dense-mask kernel computes: rows * ceil(width / tile)^2
    allowed_pairs: int = 0  # (query, key) pairs the rule allows

    @property
    def partial(self) -> int:
        return self.nonempty - self.full

    def add(self, other: "TileCount") -> None:
        self.rows += other.rows
        self.width = max(self.width, other.width)
        for f in ("tokens", "nonempty", "full", "dense", "allowed_pairs"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


def _row_arrays(meta: TokenMeta, r: int):
    return tuple(getattr(meta, f)[r].cpu().numpy().astype(np.int64) for f in ("doc", "blk", "noisy", "grp"))


def tile_masks(doc, blk, noisy, grp, tile: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``(nonempty, full)``: ``[nt, nt]`` boolean tile maps of one row (query tile, key tile).

    The rule (SPEC section 2): same doc and (k clean and blk(k) < blk(q)) or (k clean, q clean,
    blk(k) == blk(q)) or (k noisy, q noisy, grp(k) == grp(q)). A tile past the row's end is padded
    with "no attention", as ``create_block_mask`` pads it, so such a tile is never full.
    """
    doc, blk, noisy, grp = (np.asarray(a, dtype=np.int64) for a in (doc, blk, noisy, grp))
    W = doc.shape[0]
    nt = -(-W // tile)
    t = np.arange(W) // tile
    _, d = np.unique(doc, return_inverse=True)
    D = int(d.max()) + 1 if W else 0
    clean = noisy == 0
    inf, ninf = np.iinfo(np.int64).max, np.iinfo(np.int64).min

    # --- any allowed pair, clean keys: per (tile, doc) extremes of blk
    kmin_c = np.full((nt, D), inf)  # smallest clean key blk
    qmax_c = np.full((nt, D), ninf)  # largest clean query blk
    qmax_n = np.full((nt, D), ninf)  # largest noisy query blk
    np.minimum.at(kmin_c, (t[clean], d[clean]), blk[clean])
    np.maximum.at(qmax_c, (t[clean], d[clean]), blk[clean])
    np.maximum.at(qmax_n, (t[~clean], d[~clean]), blk[~clean])
    nonempty = np.zeros((nt, nt), dtype=bool)
    for j in range(D):
        kq = kmin_c[None, :, j]
        nonempty |= (kq < qmax_n[:, None, j]) | (kq <= qmax_c[:, None, j])

    # --- any allowed pair, noisy keys: two tiles that hold tokens of one noisy copy (doc, grp)
    if (~clean).any():
        key = d[~clean] * BIG + grp[~clean]
        pairs = np.unique(np.stack([key, t[~clean]], 1), axis=0)  # (copy, tile), sorted by copy
        nonempty[pairs[:, 1], pairs[:, 1]] = True
        starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
        ends = np.r_[starts[1:], len(pairs)]
        for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            ts = pairs[a:b, 1]
            nonempty[np.ix_(ts, ts)] = True

    # --- full tiles: every pair allowed
    def per_tile(values, mask, fill, ufunc):
        out = np.full(nt, fill)
        ufunc.at(out, t[mask], values[mask])
        return out

    everything = np.ones(W, dtype=bool)
    dmin, dmax = per_tile(d, everything, inf, np.minimum), per_tile(d, everything, ninf, np.maximum)
    n_clean = np.bincount(t[clean], minlength=nt)
    n_noisy = np.bincount(t[~clean], minlength=nt)
    kmax_c = per_tile(blk, clean, ninf, np.maximum)
    qmin_c = per_tile(blk, clean, inf, np.minimum)
    qmin_n = per_tile(blk, ~clean, inf, np.minimum)
    gmin, gmax = per_tile(grp, ~clean, inf, np.minimum), per_tile(grp, ~clean, ninf, np.maximum)
    whole = (np.arange(nt) + 1) * tile <= W
    single = whole & (dmin == dmax)
    one_copy = (n_noisy > 0) & (gmin == gmax)
    Q, K = (slice(None), None), (None, slice(None))
    full = single[Q] & single[K] & (dmin[Q] == dmin[K])
    # clean keys of K: earlier than every noisy query, not later than every clean query
    full &= (n_clean[K] == 0) | ((kmax_c[K] < qmin_n[Q]) & (kmax_c[K] <= qmin_c[Q]))
    # noisy keys of K: every query noisy, all in the one copy that K's noisy keys belong to
    full &= (n_noisy[K] == 0) | ((n_clean[Q] == 0) & one_copy[Q] & one_copy[K] & (gmin[Q] == gmin[K]))
    return nonempty, full


def allowed_pairs(doc, blk, noisy, grp) -> int:
    """The number of (query, key) pairs the rule allows in one row, from sorted metadata (O(L log L))."""
    doc, blk, noisy, grp = (np.asarray(a, dtype=np.int64) for a in (doc, blk, noisy, grp))
    clean = noisy == 0
    ck = np.sort(doc[clean] * BIG + blk[clean])
    base = np.searchsorted(ck, doc * BIG, side="left")
    upto = np.where(clean, np.searchsorted(ck, doc * BIG + blk, side="right"),
                    np.searchsorted(ck, doc * BIG + blk, side="left"))
    total = int((upto - base).sum())
    if (~clean).any():
        _, sizes = np.unique(doc[~clean] * BIG + grp[~clean], return_counts=True)
        total += int((sizes.astype(np.int64) ** 2).sum())
    return total


def count_tiles(meta: TokenMeta, tile: int = 128) -> TileCount:
    """Tile counts of a ``[rows, width]`` :class:`TokenMeta` (self-attention of each row)."""
    R, W = meta.shape
    out = TileCount()
    for r in range(R):
        arrs = _row_arrays(meta, r)
        ne, full = tile_masks(*arrs, tile=tile)
        nt = ne.shape[0]
        out.add(TileCount(rows=1, width=W, tokens=W, nonempty=int(ne.sum()), full=int(full.sum()),
                          dense=nt * nt, allowed_pairs=allowed_pairs(*arrs)))
    return out


def block_mask_counts(meta: TokenMeta, tile: int = 128) -> tuple[int, int]:
    """(non-empty, full) tiles of torch's ``BlockMask`` built by dirl's ``flex_block_mask`` (small shapes only:
    ``create_block_mask`` evaluates every pair)."""
    from dirl.model.attention import flex_block_mask

    bm = flex_block_mask(meta, block=tile)
    full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
    return int(bm.kv_num_blocks.sum()) + full, full


# --------------------------------------------------------------------------------------------
# The layouts, built with dirl's own builders
# --------------------------------------------------------------------------------------------


def synth_step_map(prompt_len: int, n_tokens: int, block_size: int, probs: Sequence[float],
                   rng: np.random.Generator) -> list[int]:
    """A step map (1-based global steps, SPEC section 4 item 7) in which each block took k distinct
    steps, k ~ ``probs`` over 1..block_size (capped at the block's response tokens). Inside a block
    step c + i keeps token i for i < k - 1 and the last step keeps the rest."""
    steps: list[int] = []
    c = 1
    S = prompt_len + n_tokens
    for j in range(prompt_len // block_size, (S - 1) // block_size + 1):
        lo, hi = max(j * block_size, prompt_len), min((j + 1) * block_size, S)
        n = hi - lo
        k = min(int(rng.choice(np.arange(1, block_size + 1), p=probs)), n)
        steps += [c + min(i, k - 1) for i in range(n)]
        c += k
    return steps


def make_trajectories(prompt_len: int, response: int, batch: int, block_size: int, probs: Sequence[float],
                      seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        out.append({"request_id": f"t{i}", "prompt_ids": [1] * prompt_len, "token_ids": [2] * response,
                    "step_map": synth_step_map(prompt_len, response, block_size, probs, rng),
                    "response_length": response})
    return out


def mean_steps_per_block(trajs: Sequence[dict], block_size: int) -> float:
    n_blocks, n_steps = 0, 0
    for t in trajs:
        P = len(t["prompt_ids"])
        for j, s in _block_steps(P, t["step_map"], block_size).items():
            n_blocks += 1
            n_steps += len(s)
    return n_steps / max(n_blocks, 1)


def _block_steps(P: int, step_map: Sequence[int], block_size: int) -> dict[int, set]:
    blocks: dict[int, set] = {}
    for k, s in enumerate(step_map):
        blocks.setdefault((P + k) // block_size, set()).add(int(s))
    return blocks


def sft_meta_rows(prompt_len: int, response: int, batch: int, block_size: int) -> TokenMeta:
    """``[x_t ; x_0]`` metadata of ``batch`` SFT rows, each one sample of prompt + response (block-padded),
    as ``dirl sft`` builds them (``PackedSFTData`` then ``sft_meta``). Masking changes ids, not metadata."""
    from dirl.data.sft import PackedSFTData, TokenizedSample, pad_to_block
    from dirl.model.attention import sft_meta

    ids = pad_to_block([1] * prompt_len + [2] * response, block_size, 0)
    data = PackedSFTData([TokenizedSample(ids, prompt_len) for _ in range(batch)], row_len=len(ids), pad_id=0)
    rows = data.rows(range(len(data)))
    return sft_meta(rows["pos"], rows["doc"], block_size)


def rl_batch(trajs: Sequence[dict], block_size: int, layout: str, row_tokens: Optional[int]):
    """The :class:`~dirl.train.layouts.ScoredBatch` the RL trainer builds (``make_batch``) for these trajectories."""
    from dirl.train.layouts import build_batch

    return build_batch(trajs, block_size, mask_id=3, layout=layout, row_tokens=row_tokens)


def rl_meta(trajs: Sequence[dict], block_size: int, layout: str, row_tokens: Optional[int]) -> TokenMeta:
    return rl_batch(trajs, block_size, layout, row_tokens).meta


# --------------------------------------------------------------------------------------------
# Step-count distributions
# --------------------------------------------------------------------------------------------


def preset_distributions(block_size: int) -> dict[str, list[float]]:
    B = block_size
    d = {f"all {B} (static worst case)": [0.0] * (B - 1) + [1.0]}
    if B == 4:
        d["uniform 1-4"] = [0.25, 0.25, 0.25, 0.25]
        d["mix 50/35/10/5% of 1/2/3/4"] = [0.5, 0.35, 0.10, 0.05]
    d["all 1"] = [1.0] + [0.0] * (B - 1)
    return d


def parse_dist(text: str, block_size: int) -> tuple[str, list[float]]:
    if "=" not in text:
        raise SystemExit(f"--dist {text!r}: expected NAME=p1,...,p{block_size}")
    name, vals = text.split("=", 1)
    try:
        p = [float(v) for v in vals.split(",")]
    except ValueError:
        raise SystemExit(f"--dist {text!r}: probabilities must be numbers") from None
    if len(p) != block_size or any(v < 0 for v in p) or sum(p) <= 0:
        raise SystemExit(f"--dist {text!r}: need {block_size} non-negative probabilities (1..{block_size} steps)")
    return name.strip(), [v / sum(p) for v in p]


def trajectory_distribution(path: str, block_size: int) -> tuple[str, list[float], int]:
    """Empirical distribution of distinct steps per response block (whole blocks only) in a JSONL of
    trajectories (``prompt_ids``, ``step_map``)."""
    hist = np.zeros(block_size, dtype=np.int64)
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)
                P, steps = len(t["prompt_ids"]), t["step_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{line_no}: not a trajectory with prompt_ids and step_map ({e})") from None
            S = P + len(steps)
            for j, s in _block_steps(P, steps, block_size).items():
                if j * block_size >= P and (j + 1) * block_size <= S:
                    hist[min(len(s), block_size) - 1] += 1
    if hist.sum() == 0:
        raise SystemExit(f"{path}: no whole response block found")
    return f"trajectories {Path(path).name}", (hist / hist.sum()).tolist(), int(hist.sum())


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def measure(prompt_len: int, response: int, batch: int, block_size: int, tile: int, row_tokens: Optional[int],
            probs: Sequence[float], seed: int) -> dict:
    trajs = make_trajectories(prompt_len, response, batch, block_size, probs, seed)
    m = mean_steps_per_block(trajs, block_size)
    L = prompt_len + response + (-(prompt_len + response)) % block_size
    # tokens per step as dirl eval reports it: mean over responses of |o| / |distinct steps|
    tps = float(np.mean([len(t["token_ids"]) / len(set(t["step_map"])) for t in trajs]))
    out = {"mean_steps_per_block": m, "tokens_per_step": tps}
    for name in ("packed", "rounds"):
        b = rl_batch(trajs, block_size, name, row_tokens)
        out[name] = _record(count_tiles(b.meta, tile), batch, (1 + m) * L, real=b.num_tokens, scored=b.num_scored)
    return out


def _record(c: TileCount, batch: int, floor_per_response: float, real: Optional[int] = None,
            scored: Optional[int] = None) -> dict:
    return {"rows": c.rows, "width": c.width, "tokens": c.tokens, "real_tokens": c.tokens if real is None else real,
            "scored_tokens": scored, "floor_tokens": floor_per_response * batch,
            "nonempty_tiles": c.nonempty, "full_tiles": c.full, "partial_tiles": c.partial,
            "dense_tiles": c.dense, "allowed_pairs": c.allowed_pairs}


def self_check(block_size: int, tile: int, row_tokens: Optional[int], seed: int) -> str:
    """Counter vs ``create_block_mask`` on a reduced shape, for every layout."""
    probs = [0.25] * block_size
    trajs = make_trajectories(61, 300, 2, block_size, probs, seed)
    metas = {"sft": sft_meta_rows(61, 300, 2, block_size),
             "packed": rl_meta(trajs, block_size, "packed", row_tokens),
             "rounds": rl_meta(trajs, block_size, "rounds", row_tokens)}
    parts = []
    for name, meta in metas.items():
        c = count_tiles(meta, tile)
        ref = block_mask_counts(meta, tile)
        if (c.nonempty, c.full) != ref:
            raise SystemExit(f"self-check FAILED for {name}: counter (non-empty, full) = {(c.nonempty, c.full)}, "
                             f"create_block_mask = {ref}")
        parts.append(f"{name} {ref[0]}/{ref[1]}")
    return "counter == create_block_mask (non-empty/full tiles) at prompt 61, response 300, batch 2: " + ", ".join(parts)


def fmt_int(x: float) -> str:
    return f"{int(round(x)):,}"


def table(res: dict) -> str:
    """One Markdown table: the SFT row, then packed and rounds under each steps-per-block distribution."""
    a = res["args"]
    lines = [f"prompt {a['prompt']}, response {a['response']}, batch {a['batch']}, block size {a['block_size']}, "
             f"tile {a['tile']}x{a['tile']}, RL train.row_tokens {a['row_tokens']}; m = mean steps per block", "",
             "| layout | steps per block | rows x width | tokens (real) | floor (1+m)L | non-empty tiles | full | "
             "partial | dense tiles | non-empty / dense | tiles vs packed |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def line(name, dist, rec, ref):
        real = f" ({rec['real_tokens']:,})" if rec["real_tokens"] != rec["tokens"] else ""
        vs = f"{rec['nonempty_tiles'] / ref:.2f}x" if ref else "—"
        lines.append(f"| {name} | {dist} | {rec['rows']} x {rec['width']:,} | {rec['tokens']:,}{real} | "
                     f"{fmt_int(rec['floor_tokens'])} | {rec['nonempty_tiles']:,} | {rec['full_tiles']:,} | "
                     f"{rec['partial_tiles']:,} | {rec['dense_tiles']:,} | "
                     f"{rec['nonempty_tiles'] / rec['dense_tiles']:.3f} | {vs} |")

    line("SFT [x_t ; x_0]", "one noisy copy (m = 1)", res["sft"], None)
    for d in res["distributions"]:
        dist = f"{d['name']}: m = {d['mean_steps_per_block']:.2f}, {d['tokens_per_step']:.2f} tok/step"
        ref = d["packed"]["nonempty_tiles"]
        line("RL packed", dist, d["packed"], ref)
        line("RL rounds", dist, d["rounds"], ref)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dirl.train.rl.config import RLTrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--response", type=int, default=8192, help="response tokens (default 8192)")
    p.add_argument("--batch", type=int, default=4, help="responses (SFT: rows) per forward (default 4)")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=128, help="BlockMask tile (default 128, FlexAttention's)")
    p.add_argument("--row-tokens", type=int, default=RLTrainConfig().row_tokens,
                   help="RL rows: train.row_tokens (default: the trainer's, %(default)s; 0 = all responses in one row)")
    p.add_argument("--dist", action="append", default=[], metavar="NAME=p1,...,pB",
                   help="an extra distribution of steps per block (probabilities of 1..B steps); repeatable")
    p.add_argument("--trajectories", action="append", default=[], metavar="JSONL",
                   help="add the empirical steps-per-block distribution of recorded trajectories")
    p.add_argument("--only-given", action="store_true", help="skip the preset distributions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every number to PATH")
    p.add_argument("--no-self-check", action="store_true", help="skip the create_block_mask cross-check")
    a = p.parse_args(argv)
    for key in ("prompt", "response", "batch", "block_size", "tile"):
        if getattr(a, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0")
    if a.row_tokens < 0:
        p.error("--row-tokens must be >= 0")

    dists: dict[str, list[float]] = {} if a.only_given else preset_distributions(a.block_size)
    notes = {}
    for text in a.dist:
        name, probs = parse_dist(text, a.block_size)
        dists[name] = probs
    for path in a.trajectories:
        name, probs, n = trajectory_distribution(path, a.block_size)
        dists[name] = probs
        notes[name] = f"{n} blocks"
    if not dists:
        p.error("no distribution to measure (--only-given needs --dist or --trajectories)")

    t0 = time.perf_counter()
    check = None if a.no_self_check else self_check(a.block_size, a.tile, a.row_tokens, a.seed)
    if check:
        print(check, flush=True)
    L = a.prompt + a.response + (-(a.prompt + a.response)) % a.block_size
    sft = _record(count_tiles(sft_meta_rows(a.prompt, a.response, a.batch, a.block_size), a.tile), a.batch, 2 * L)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "args": {"prompt": a.prompt, "response": a.response, "batch": a.batch, "block_size": a.block_size,
                    "tile": a.tile, "row_tokens": a.row_tokens, "seed": a.seed},
           "self_check": check, "sft": sft, "distributions": []}
    for name, probs in dists.items():
        rec = measure(a.prompt, a.response, a.batch, a.block_size, a.tile, a.row_tokens, probs, a.seed)
        res["distributions"].append({"name": name, "probs": probs, "note": notes.get(name), **rec})
    res["seconds"] = round(time.perf_counter() - t0, 2)
    print(table(res))
    print(f"({res['seconds']} s; SFT floor = 2L, one noisy copy per block, prompt included; RL floor = (1 + m) L)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
