"""Decoding rules (SPEC section 4) on hand-made logits, and step-map invariants on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from dirl.rollout.backend import GenerateRequest
from dirl.rollout.decoding import is_greedy, sample_tokens, tokens_per_step, tokens_to_keep
from dirl.rollout.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Unmasking strategies
# ----------------------------------------------------------------------------------------------


def keep(conf, masked, strategy, threshold=0.9, steps=4):
    return tokens_to_keep(torch.tensor([conf]), torch.tensor([masked]), strategy, threshold, steps)[0].tolist()


def test_dynamic_keeps_everything_over_the_threshold():
    assert keep([0.95, 0.5, 0.91, 0.2], [True] * 4, "low_confidence_dynamic") == [True, False, True, False]
    assert keep([0.95, 0.5, 0.9, 0.2], [True] * 4, "low_confidence_dynamic") == [True, False, True, False]


def test_dynamic_always_keeps_the_most_confident_position():
    assert keep([0.3, 0.5, 0.4, 0.2], [True] * 4, "low_confidence_dynamic") == [False, True, False, False]
    # ties go to the leftmost
    assert keep([0.5, 0.5, 0.4, 0.2], [True] * 4, "low_confidence_dynamic") == [True, False, False, False]


def test_only_masked_positions_are_kept():
    masked = [False, True, False, True]
    assert keep([0.99, 0.3, 0.99, 0.2], masked, "low_confidence_dynamic") == [False, True, False, False]
    assert keep([0.99, 0.3, 0.99, 0.2], masked, "low_confidence_static", steps=2) == [False, True, False, True]
    assert keep([0.99, 0.3, 0.99, 0.2], masked, "sequential", steps=4) == [False, True, False, False]
    none = [False] * 4
    for s in ("low_confidence_dynamic", "low_confidence_static", "sequential"):
        assert keep([0.99] * 4, none, s) == none


@pytest.mark.parametrize("steps,count", [(1, 4), (2, 2), (4, 1), (8, 1)])
def test_static_keeps_the_most_confident_max_1_b_over_steps(steps, count):
    assert tokens_per_step(4, steps) == count
    conf = [0.1, 0.7, 0.3, 0.5]
    got = keep(conf, [True] * 4, "low_confidence_static", threshold=0.0, steps=steps)
    ranked = sorted(range(4), key=lambda i: -conf[i])[:count]
    assert got == [i in ranked for i in range(4)]
    # the threshold plays no part in static decoding
    assert keep(conf, [True] * 4, "low_confidence_static", threshold=0.0, steps=steps) == \
        keep(conf, [True] * 4, "low_confidence_static", threshold=1.0, steps=steps)


@pytest.mark.parametrize("steps,count", [(1, 4), (2, 2), (4, 1)])
def test_sequential_keeps_the_leftmost_masked(steps, count):
    masked = [False, True, True, True]
    got = keep([0.9, 0.1, 0.8, 0.7], masked, "sequential", steps=steps)
    want = [False] + [i < count for i in range(3)]
    assert got == want


def test_rows_are_independent():
    conf = torch.tensor([[0.95, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]])
    masked = torch.ones(2, 4, dtype=torch.bool)
    got = tokens_to_keep(conf, masked, "low_confidence_dynamic", 0.9, 4).tolist()
    assert got == [[True, False, False, False], [False, False, False, True]]


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def draw(logits, T=1.0, k=0, p=1.0, greedy=False, u=0.5):
    logits = torch.tensor(logits, dtype=torch.float32)
    R = logits.shape[0]
    return sample_tokens(logits, torch.full((R,), T), torch.full((R,), k, dtype=torch.long), torch.full((R,), p),
                         torch.full((R,), greedy, dtype=torch.bool), torch.as_tensor(u, dtype=torch.float32).expand(R))


def test_greedy_is_argmax_and_logprob_is_unfiltered():
    logits = [[0.0, 3.0, 1.0, 2.0]]
    for T in (1.0, 0.5):
        tok, lp = draw(logits, T=T, greedy=True)
        assert tok.tolist() == [1]
        want = torch.log_softmax(torch.tensor(logits) / T, -1)[0, 1]
        assert abs(lp.item() - want.item()) < 1e-6


def test_greedy_switches():
    assert is_greedy(False, 1.0, 0) and is_greedy(True, 1.0, 1) and is_greedy(True, 0.0, 50)
    assert not is_greedy(True, 1.0, 50)


def test_confidence_is_taken_before_top_k_top_p_filtering():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]])
    T = 0.7
    full = torch.log_softmax(logits / T, -1)[0]
    for u in (0.1, 0.6, 0.95):
        tok, lp = draw(logits.tolist(), T=T, k=2, u=u)
        assert tok.item() in (0, 1)
        assert abs(lp.item() - full[tok.item()].item()) < 1e-6  # not the renormalised top-2 value
        assert lp.exp().item() < 1.0 and abs(lp.item() - math.log(0.5)) > 1e-3


def _one_step(logits, T, strategy, threshold=0.9, steps=4):
    """denoise_step on hand-made logits ``[1, 4, V]`` for a greedy request at temperature T."""
    from dirl.rollout.decoding import SamplingSettings, Sequence, denoise_step

    settings = SamplingSettings(max_new_tokens=8, temperature=T, top_k=0, top_p=1.0, do_sample=False)
    seq = Sequence("h", [1, 2, 3, 4], settings, 4, mask_token_id=0)
    logits = torch.tensor([logits], dtype=torch.float32)
    keep_, tok, lp, _ = denoise_step(logits, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool),
                                     [seq], strategy, threshold, steps)
    return keep_[0].tolist(), lp[0]


def test_the_keep_rule_ranks_confidence_at_the_sampling_temperature():
    """SPEC 4.3: confidence = softmax(logits / T)[token]. At T = 0.5 positions 0 and 1 are over
    tau = 0.9 (0.97 and 0.95), at T = 1 neither is (0.8 and 0.75): a rule at T = 1 keeps one."""
    V = 3
    a = [math.log(0.8), math.log(0.1), math.log(0.1)]
    b = [math.log(0.75), math.log(0.125), math.log(0.125)]
    low = [0.0] * V
    got, lp = _one_step([a, b, low, low], 0.5, "low_confidence_dynamic")
    assert got == [True, True, False, False]
    assert lp[0].exp().item() == pytest.approx(0.64 / 0.66, abs=1e-6)
    assert _one_step([a, b, low, low], 1.0, "low_confidence_dynamic")[0] == [True, False, False, False]
    # static ranking flips with T: a flat row with a clear leader (A) against two close leaders (B)
    A = [1.0] + [0.0] * 9
    Bq = [5.0, 4.5] + [0.0] * 8
    flat = [0.0] * 10
    assert _one_step([flat, A, Bq, flat], 0.1, "low_confidence_static")[0] == [False, True, False, False]
    assert _one_step([flat, A, Bq, flat], 1.0, "low_confidence_static")[0] == [False, False, True, False]


def test_inverse_cdf_matches_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    grid = (torch.arange(1000, dtype=torch.float32) + 0.5) / 1000
    rows = logits.expand(1000, 3)

    def freqs(k=0, p=1.0):
        tok, _ = sample_tokens(rows, torch.ones(1000), torch.full((1000,), k, dtype=torch.long), torch.full((1000,), p),
                               torch.zeros(1000, dtype=torch.bool), grid)
        return (torch.bincount(tok, minlength=3).float() / 1000).tolist()

    assert freqs() == pytest.approx([0.5, 0.3, 0.2], abs=2e-3)
    assert freqs(k=2) == pytest.approx([0.625, 0.375, 0.0], abs=2e-3)
    assert freqs(p=0.6) == pytest.approx([0.625, 0.375, 0.0], abs=2e-3)  # 0.5 < 0.6: the 2nd token stays
    assert freqs(p=0.5) == pytest.approx([1.0, 0.0, 0.0], abs=2e-3)  # 0.5 already reaches p
    assert freqs(k=2, p=0.55) == pytest.approx([1.0, 0.0, 0.0], abs=2e-3)  # top-p after top-k renormalising


# ----------------------------------------------------------------------------------------------
# Step maps and stop rules on the tiny model
# ----------------------------------------------------------------------------------------------


def make_requests(model, lengths, max_new=24, seed0=0, **kw):
    out = []
    for i, P in enumerate(lengths):
        g = torch.Generator().manual_seed(seed0 + i)
        ids = torch.randint(5, model.config.vocab_size, (P,), generator=g).tolist()
        fields = dict(request_id=f"r{i}", input_ids=ids, max_new_tokens=max_new, temperature=1.0, top_k=0,
                      top_p=1.0, do_sample=False, stop_token_ids=[], seed=None)
        fields.update(kw)
        out.append(GenerateRequest(**fields))
    return out


def check_step_map(res, B):
    P, n = len(res["prompt_ids"]), len(res["token_ids"])
    s = res["step_map"]
    assert len(s) == n == len(res["logprobs"])
    assert (P + n) % B == 0
    assert min(s) == 1
    assert sorted(set(s)) == list(range(1, max(s) + 1))  # every counted step kept >= 1 token
    blocks: dict[int, list[int]] = {}
    for i, v in enumerate(s):
        blocks.setdefault((P + i) // B, []).append(v)
    ordered = [blocks[b] for b in sorted(blocks)]
    for a, b in zip(ordered, ordered[1:]):
        assert max(a) < min(b)  # later blocks, larger steps
    return ordered


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_static", "sequential"])
def test_step_map_invariants(tiny, strategy):
    model, tok = tiny
    eng = Engine(model, tok, denoising_steps=2, unmasking_strategy=strategy)
    for res in eng.generate(make_requests(model, [1, 4, 6, 9], max_new=17)):
        check_step_map(res, model.block_size)
        assert len(res["token_ids"]) >= 17 and len(res["token_ids"]) <= 17 + model.block_size - 1
        assert res["finish_reason"] == "length" and res["response_length"] == len(res["token_ids"])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_static_uses_exactly_denoising_steps_per_full_block(tiny, steps):
    model, tok = tiny
    B = model.block_size
    eng = Engine(model, tok, denoising_steps=steps, unmasking_strategy="low_confidence_static")
    for res in eng.generate(make_requests(model, [4, 7], max_new=16)):
        P = len(res["prompt_ids"])
        for j, block in enumerate(check_step_map(res, B)):
            if len(block) == B:  # a block that started all-masked
                assert len(set(block)) == steps
                assert all(block.count(v) == B // steps for v in set(block))
            else:  # the prompt's partial block: as many steps as it needs
                assert len(set(block)) == math.ceil(len(block) / (B // steps))
        assert P % B != 0 or len(check_step_map(res, B)[0]) == B


def test_dynamic_threshold_zero_keeps_the_whole_block_in_one_step(tiny):
    model, tok = tiny
    eng = Engine(model, tok, unmasking_strategy="low_confidence_dynamic", confidence_threshold=0.0)
    res = eng.generate(make_requests(model, [8], max_new=12))[0]
    assert res["step_map"] == [1] * 4 + [2] * 4 + [3] * 4


def test_stop_token_ends_the_sequence_at_its_block(tiny):
    model, tok = tiny
    B = model.block_size
    eng = Engine(model, tok)
    base = eng.generate(make_requests(model, [6], max_new=40))[0]
    # pick a token first produced after the first block: the sequence must stop at its first occurrence
    first_block = B - 6 % B
    stop = next(t for t in base["token_ids"][first_block:] if t not in base["token_ids"][:first_block])
    first = base["token_ids"].index(stop)
    res = eng.generate(make_requests(model, [6], max_new=40, stop_token_ids=[stop]))[0]
    assert res["finish_reason"] == "stop"
    assert res["response_length"] == first + 1
    end = ((6 + first) // B + 1) * B - 6  # through the end of that block, post-stop tokens included
    assert res["token_ids"] == base["token_ids"][:end]
    assert res["step_map"] == base["step_map"][:end]


def test_context_limit_ends_with_length(tiny):
    model, tok = tiny
    eng = Engine(model, tok, max_context=24)
    res = eng.generate(make_requests(model, [10], max_new=100))[0]
    assert res["finish_reason"] == "length"
    assert len(res["prompt_ids"]) + len(res["token_ids"]) == 24
    with pytest.raises(ValueError, match="context limit"):
        eng.generate(make_requests(model, [24], max_new=4))  # no room for its first block
    assert len(eng.generate(make_requests(model, [23], max_new=4))[0]["token_ids"]) == 1
