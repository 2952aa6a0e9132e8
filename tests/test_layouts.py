"""Trajectory -> step-level targets: packed and rounds layouts against the decoder's own log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from dirl.model.attention import block_causal_meta
from dirl.train.layouts import (
    TrajectoryError,
    build_batch,
    build_docs,
    layout_cost,
    trajectory_logprobs,
)


@torch.no_grad()
def naive_decode(model, prompt, max_new_tokens=12, strategy="dynamic", steps=2, tau=0.9, temperature=1.0,
                 seed=0, stop_ids=()):
    """A plain no-cache block-diffusion decoder (SPEC section 4), written for the tests: every step
    is one forward of [clean earlier blocks ; current block state] under the block-causal rule.
    Returns a trajectory dict with step map and the log-probs it sampled from."""
    B, M = model.block_size, model.mask_token_id
    g = torch.Generator().manual_seed(seed)
    P = len(prompt)
    x = list(prompt) + [M] * (-P % B)
    lo = (P // B) * B
    step_of, logp_of = {}, {}
    counter = 0
    while True:
        hi = lo + B
        if len(x) < hi:
            x += [M] * (hi - len(x))
        while any(x[i] == M and i >= P for i in range(lo, hi)):
            ids = torch.tensor([x[:hi]])
            logits = model(ids, block_causal_meta(hi, B))[0, lo:hi].float() / temperature
            probs = torch.softmax(logits, -1)
            masked = [i for i in range(lo, hi) if i >= P and x[i] == M]
            cand = {}
            for i in masked:
                t = int(torch.multinomial(probs[i - lo], 1, generator=g))
                cand[i] = (t, float(probs[i - lo, t]))
            order = sorted(masked, key=lambda i: -cand[i][1])
            if strategy == "dynamic":
                keep = [i for i in masked if cand[i][1] >= tau] or [order[0]]
                if order[0] not in keep:
                    keep.append(order[0])
            else:
                keep = order[:max(1, B // steps)]
            counter += 1
            for i in keep:
                t = cand[i][0]
                x[i] = t
                step_of[i] = counter
                logp_of[i] = float(torch.log_softmax(logits[i - lo], -1)[t])
        resp = x[P:hi]
        stop = next((k for k, t in enumerate(resp) if t in stop_ids), None)
        if stop is not None or len(resp) >= max_new_tokens:
            n = len(resp) if stop is None else stop + 1
            return {
                "request_id": f"r{seed}", "prompt_ids": list(prompt), "token_ids": resp,
                "step_map": [step_of[i] for i in range(P, hi)], "logprobs": [logp_of[i] for i in range(P, hi)],
                "response_length": n, "finish_reason": "length" if stop is None else "stop", "text": "",
            }
        lo = hi


def _prompt(n, seed=0, vocab=100):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def trajectories(tiny):
    """Real trajectories of the tiny model: dynamic (tau low enough that steps keep 1-4 tokens) and
    static decoding, prompts ending mid-block and on a block boundary."""
    model, _ = tiny
    out = []
    for i, (plen, strat) in enumerate([(5, "dynamic"), (8, "dynamic"), (11, "static"), (6, "static"), (9, "dynamic")]):
        out.append(naive_decode(model, _prompt(plen, i), max_new_tokens=10, strategy=strat, steps=2,
                                tau=0.0125, seed=i))
    return out


def _max_diff(traj, lps):
    d = [abs(a - b) for a, b in zip(traj["logprobs"], lps) if b is not None]
    return max(d), len(d)


def test_decoder_fixture_covers_multi_token_and_single_token_steps(trajectories):
    per_step = []
    for t in trajectories:
        for s in set(t["step_map"]):
            per_step.append(t["step_map"].count(s))
    assert min(per_step) == 1 and max(per_step) >= 2
    assert {len(t["prompt_ids"]) % 4 for t in trajectories} >= {0, 1, 2, 3}


@pytest.mark.parametrize("layout", ["packed", "rounds"])
def test_layout_logprobs_equal_the_decoders(tiny, trajectories, layout):
    model, _ = tiny
    for t in trajectories:  # one at a time
        (lps,) = trajectory_logprobs(model, [t], layout=layout, score_after_eos=True)
        diff, n = _max_diff(t, lps)
        assert n == len(t["token_ids"])
        assert diff <= 1e-4, (layout, diff)


@pytest.mark.parametrize("layout", ["packed", "rounds"])
def test_mixed_batch_in_one_forward(tiny, trajectories, layout):
    model, _ = tiny
    all_lps = trajectory_logprobs(model, trajectories, layout=layout, score_after_eos=True, batch_size=len(trajectories))
    for t, lps in zip(trajectories, all_lps):
        diff, n = _max_diff(t, lps)
        assert n == len(t["token_ids"]) and diff <= 1e-4


def test_several_rows_give_the_same_numbers(tiny, trajectories):
    model, _ = tiny
    one = trajectory_logprobs(model, trajectories, score_after_eos=True, batch_size=5)
    rows = trajectory_logprobs(model, trajectories, score_after_eos=True, batch_size=5, row_tokens=30)
    for a, b in zip(one, rows):
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_tokens_after_response_length_are_context_only(tiny, trajectories):
    model, _ = tiny
    t = dict(trajectories[0], response_length=3, finish_reason="stop")
    (lps,) = trajectory_logprobs(model, [t])
    assert all(v is None for v in lps[3:])
    assert all(v is not None for v in lps[:3])
    assert max(abs(a - b) for a, b in zip(lps[:3], t["logprobs"][:3])) <= 1e-4
    (rl,) = trajectory_logprobs(model, [t], layout="rounds")
    assert all(v is None for v in rl[3:])
    # scoring them on request gives the decoder's numbers too
    (allp,) = trajectory_logprobs(model, [t], score_after_eos=True)
    assert _max_diff(t, allp)[1] == len(t["token_ids"])


def test_packed_layout_structure_by_hand():
    """Prompt of 2 tokens, B = 4: block 0 holds the prompt and 2 response tokens, block 1 four more."""
    traj = {"prompt_ids": [10, 11], "token_ids": [20, 21, 22, 23, 24, 25],
            "step_map": [2, 1, 3, 3, 4, 3], "response_length": 6}
    (doc,) = build_docs([traj], block_size=4, mask_id=99)
    M = 99
    # clean block 0 (needed by the copies of block 1), then block 0 at steps 1, 2; block 1 at steps 3, 4
    assert doc.ids == [10, 11, 20, 21,
                       10, 11, M, M,
                       10, 11, M, 21,
                       M, M, M, M,
                       22, 23, M, 25]
    assert doc.pos == [0, 1, 2, 3] + [0, 1, 2, 3] * 2 + [4, 5, 6, 7] * 2
    assert doc.noisy == [0] * 4 + [1] * 16
    assert doc.grp == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert list(zip(doc.scored_at, doc.scored_tok, doc.scored_tgt)) == [
        (7, 1, 21), (10, 0, 20), (12, 2, 22), (13, 3, 23), (15, 5, 25), (18, 4, 24)]
    rounds = build_docs([traj], block_size=4, mask_id=M, layout="rounds")
    assert len(rounds) == 2  # both blocks have two distinct steps
    assert rounds[0].ids[:8] == [10, 11, M, M, M, M, M, M] and rounds[0].ids[8:] == [10, 11, 20, 21, 22, 23, 24, 25]
    assert rounds[1].ids[:8] == [10, 11, M, 21, 22, 23, M, 25]
    assert rounds[1].grp[:8] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_packed_processes_fewer_tokens_than_rounds(trajectories):
    p = layout_cost(trajectories, 4, "packed")
    r = layout_cost(trajectories, 4, "rounds")
    assert p["scored"] == r["scored"]
    assert p["tokens"] < r["tokens"]


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("step_map"), "step_map"),
    (lambda t: t.update(step_map=[1, 2]), "entries"),
    (lambda t: t.update(step_map=[0] * 4), ">= 1"),
    (lambda t: t.update(response_length=9), "response_length"),
])
def test_bad_trajectories_are_named(change, match):
    t = {"request_id": "abc", "prompt_ids": [1, 2, 3, 4], "token_ids": [5, 6, 7, 8], "step_map": [1, 1, 2, 2],
         "response_length": 4}
    change(t)
    with pytest.raises(TrajectoryError, match=match) as e:
        build_batch([t], 4, 99)
    assert "abc" in str(e.value)


def test_temperature_is_applied(tiny):
    model, _ = tiny
    t = naive_decode(model, _prompt(6, 3), max_new_tokens=8, strategy="static", steps=4, temperature=0.7, seed=3)
    (lps,) = trajectory_logprobs(model, [t], temperature=0.7, score_after_eos=True)
    assert _max_diff(t, lps)[0] <= 1e-4
    (wrong,) = trajectory_logprobs(model, [t], temperature=1.0, score_after_eos=True)
    assert _max_diff(t, wrong)[0] > 1e-3
    assert all(math.isfinite(v) for v in lps)


@pytest.mark.parametrize("layout", ["packed", "rounds"])
def test_score_command(tiny_dir, tiny, trajectories, tmp_path, layout, capsys):
    import json

    from dirl.cli import main

    inp, out = tmp_path / "traj.jsonl", tmp_path / "scored.jsonl"
    rows = [dict(t, response_length=len(t["token_ids"]) - 1) for t in trajectories[:3]]
    inp.write_text("".join(json.dumps(t) + "\n" for t in rows))
    rc = main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out), "--layout", layout])
    assert rc == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["request_id"] for s in scored] == [t["request_id"] for t in rows]
    for s in scored:
        assert s["trainer_logprobs"][-1] is None and None not in s["trainer_logprobs"][:-1]
        assert s["logprob_abs_diff_max"] <= 1e-4 and s["logprob_abs_diff_mean"] <= s["logprob_abs_diff_max"]
    assert "|trainer - recorded| max" in capsys.readouterr().err
    assert main(["score", "--model", str(tiny_dir), "--input", str(tmp_path / "nope.jsonl"),
                 "--output", str(out)]) == 2


# -- against the reference rollout engine (KV cache, batched) ---------------------------------------


@pytest.fixture(scope="module")
def engine_trajectories(tiny):
    """Trajectories of the reference engine: dynamic (paper threshold 0.9, and a low one so that
    steps keep several tokens) and static decoding, prompt lengths 4..11, decoded as one batch."""
    from dirl.rollout.backend import GenerateRequest
    from dirl.rollout.engine import Engine

    model, tok = tiny
    out = []
    for strat, tau, steps in [("low_confidence_dynamic", 0.9, 4), ("low_confidence_dynamic", 0.0125, 4),
                              ("low_confidence_static", 0.9, 2)]:
        eng = Engine(model, tok, denoising_steps=steps, unmasking_strategy=strat, confidence_threshold=tau)
        reqs = [GenerateRequest(request_id=f"{strat}-{tau}-{n}", input_ids=_prompt(n, n), max_new_tokens=10,
                                temperature=1.0, top_k=0, top_p=1.0, do_sample=True, stop_token_ids=[0, 2], seed=n)
                for n in (4, 5, 6, 7, 11)]
        out.append(eng.generate(reqs))
    return out


@pytest.mark.parametrize("layout", ["packed", "rounds"])
def test_layouts_equal_the_engines_recorded_logprobs(tiny, engine_trajectories, layout):
    model, _ = tiny
    multi = 0
    for trajs in engine_trajectories:
        lps = trajectory_logprobs(model, trajs, layout=layout, score_after_eos=True, batch_size=len(trajs))
        for t, lp in zip(trajs, lps):
            diff, n = _max_diff(t, lp)
            assert n == len(t["token_ids"]) and diff <= 1e-4, (t["request_id"], diff)
            multi += any(t["step_map"].count(s) > 1 for s in set(t["step_map"]))
        # scored only up to response_length (the default): the same numbers where scored
        for t, lp in zip(trajs, trajectory_logprobs(model, trajs, layout=layout)):
            n = t["response_length"]
            assert all(v is None for v in lp[n:]) and _max_diff(dict(t, logprobs=t["logprobs"][:n]), lp[:n])[0] <= 1e-4
    assert multi > 0  # some steps kept several tokens at once


def test_rollout_then_score_pipeline(tiny_dir, tmp_path, capsys):
    """`dirl rollout` (reference engine) then `dirl score`: the temperature is read from the file and
    the trainer's log-probs match the recorded ones."""
    import json

    from dirl.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "id": f"p{a}"}) + "\n"
                               for a, b in [(12, 34), (56, 78), (9, 91)]))
    traj, scored = tmp_path / "traj.jsonl", tmp_path / "scored.jsonl"
    assert main(["rollout", "--model", str(tiny_dir), "--input", str(prompts), "--output", str(traj),
                 "--temperature", "0.7", "--max-new-tokens", "12", "--confidence-threshold", "0.02",
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["score", "--model", str(tiny_dir), "--input", str(traj), "--output", str(scored),
                 "--score-after-eos"]) == 0
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == 3 and all(r["logprob_abs_diff_max"] <= 1e-4 for r in rows)
