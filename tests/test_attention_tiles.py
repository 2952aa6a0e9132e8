"""scripts/attention_tiles.py: the tile counter agrees with torch's create_block_mask (through dirl's
flex_block_mask) and with a brute-force dense mask written here from SPEC section 2, on the layouts the
trainer builds and on random metadata."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dirl.model.attention import TokenMeta

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attention_tiles.py"


@pytest.fixture(scope="module")
def at():
    spec = importlib.util.spec_from_file_location("attention_tiles", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def dense_rule(doc, blk, noisy, grp) -> np.ndarray:
    """[W, W] (query, key) -> allowed, from the SPEC's wording (numpy broadcasting, not dirl's code)."""
    q = {n: np.asarray(a)[:, None] for n, a in zip(("doc", "blk", "noisy", "grp"), (doc, blk, noisy, grp))}
    k = {n: np.asarray(a)[None, :] for n, a in zip(("doc", "blk", "noisy", "grp"), (doc, blk, noisy, grp))}
    k_clean = k["noisy"] == 0
    q_clean_rule = k_clean & (k["blk"] <= q["blk"])
    q_noisy_rule = (k_clean & (k["blk"] < q["blk"])) | (~k_clean & (k["grp"] == q["grp"]))
    return (q["doc"] == k["doc"]) & np.where(q["noisy"] == 0, q_clean_rule, q_noisy_rule)


def dense_tiles(mask: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    W = mask.shape[0]
    nt = -(-W // tile)
    padded = np.zeros((nt * tile, nt * tile), dtype=bool)  # past the end: no attention
    padded[:W, :W] = mask
    t = padded.reshape(nt, tile, nt, tile).transpose(0, 2, 1, 3)
    return t.any(axis=(2, 3)), t.all(axis=(2, 3))


def check_meta(at, meta: TokenMeta, tile: int, with_block_mask: bool = True) -> None:
    total_ne = total_full = 0
    for r in range(meta.shape[0]):
        arrs = [getattr(meta, f)[r].numpy() for f in ("doc", "blk", "noisy", "grp")]
        ne, full = at.tile_masks(*arrs, tile=tile)
        dense = dense_rule(*arrs)
        ref_ne, ref_full = dense_tiles(dense, tile)
        assert np.array_equal(ne, ref_ne), f"row {r}: non-empty tiles differ"
        assert np.array_equal(full, ref_full), f"row {r}: full tiles differ"
        assert at.allowed_pairs(*arrs) == int(dense.sum())
        total_ne += int(ref_ne.sum())
        total_full += int(ref_full.sum())
    c = at.count_tiles(meta, tile)
    assert (c.nonempty, c.full) == (total_ne, total_full)
    if with_block_mask:
        assert at.block_mask_counts(meta, tile) == (c.nonempty, c.full)


@pytest.mark.parametrize("block_size,tile,prompt,response", [(4, 16, 13, 50), (4, 32, 8, 60), (16, 8, 5, 40)])
def test_trainer_layouts(at, block_size, tile, prompt, response):
    B = block_size
    probs = {"all": [0.0] * (B - 1) + [1.0], "one": [1.0] + [0.0] * (B - 1), "mix": [1.0 / B] * B}
    check_meta(at, at.sft_meta_rows(prompt, response, 2, B), tile)
    for name, p in probs.items():
        trajs = at.make_trajectories(prompt, response, 3, B, p, seed=1)
        for layout in ("packed", "rounds"):
            # every doc in one row (dense oracle only: create_block_mask is slow on wide rows), greedy rows
            for row_tokens in (0, 60):
                check_meta(at, at.rl_meta(trajs, B, layout, row_tokens), tile, with_block_mask=row_tokens > 0)


def test_full_noisy_tiles(at):
    """Large blocks put whole tiles inside one noisy copy: those are full, as are clean tiles below."""
    meta = at.sft_meta_rows(0, 96, 1, 32)
    check_meta(at, meta, 8)
    ne, full = at.tile_masks(*[getattr(meta, f)[0].numpy() for f in ("doc", "blk", "noisy", "grp")], tile=8)
    assert full[:12, :12].any()  # noisy-noisy tiles of the x_t half


@pytest.mark.parametrize("seed", range(12))
def test_random_metadata(at, seed):
    """Arbitrary metadata (docs interleaved, copies split, grp shared across docs)."""
    g = torch.Generator().manual_seed(seed)
    W = int(torch.randint(5, 60, (1,), generator=g))
    R = 2
    meta = TokenMeta(doc=torch.randint(0, 3, (R, W), generator=g) // 2,
                     pos=torch.zeros((R, W), dtype=torch.long),
                     blk=torch.randint(0, 4, (R, W), generator=g),
                     noisy=torch.randint(0, 2, (R, W), generator=g),
                     grp=torch.randint(0, 3, (R, W), generator=g))
    meta.grp = torch.where(meta.noisy == 0, torch.zeros_like(meta.grp), meta.grp)
    check_meta(at, meta, tile=int(torch.randint(2, 9, (1,), generator=g)))


def test_step_maps_follow_the_distribution(at):
    rng = np.random.default_rng(0)
    steps = at.synth_step_map(6, 30, 4, [0.0, 0.0, 0.0, 1.0], rng)
    assert steps[:2] == [1, 2]  # partial first block (2 response tokens): 2 steps at most
    assert steps[2:6] == [3, 4, 5, 6]
    assert sorted(steps) == steps and len(set(steps)) == len(steps)
    trajs = at.make_trajectories(6, 30, 2, 4, [1.0, 0.0, 0.0, 0.0], seed=0)
    assert at.mean_steps_per_block(trajs, 4) == 1.0


def test_script_runs_and_writes_json(at, tmp_path, capsys):
    out = tmp_path / "tiles.json"
    traj = tmp_path / "traj.jsonl"
    traj.write_text(json.dumps({"prompt_ids": [1] * 4, "token_ids": [2] * 8, "step_map": [1, 1, 2, 2, 3, 4, 5, 6]})
                    + "\n")
    assert at.main(["--prompt", "20", "--response", "64", "--batch", "2", "--tile", "16", "--row-tokens", "0",
                    "--trajectories", str(traj), "--dist", "half=0.5,0.5,0,0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "counter == create_block_mask" in text and "RL packed" in text
    res = json.loads(out.read_text())
    names = [d["name"] for d in res["distributions"]]
    assert "half" in names and "trajectories traj.jsonl" in names
    emp = next(d for d in res["distributions"] if d["name"] == "trajectories traj.jsonl")
    assert emp["probs"] == pytest.approx([0, 0.5, 0, 0.5])  # blocks of 2 and 4 distinct steps
    static = res["distributions"][0]
    assert static["mean_steps_per_block"] == 4.0
    # rounds: B rows of 2L per response when some block takes B steps; packed below that
    assert static["rounds"]["tokens"] == 2 * 4 * 2 * 84
    assert static["packed"]["nonempty_tiles"] < static["rounds"]["nonempty_tiles"]
