"""The rollout engine against the independent decoder of tests/oracle_decoder.py (SPEC section 4).

The oracle shares nothing with dirl's decoding code but the transformers model, so agreement
checks the rules themselves (sampling, confidence at the sampling temperature, the keep rules, the
step map, log-probs, stop and length rules, prompt offsets inside a block), not only the KV cache.
"""

from __future__ import annotations

import pytest
import torch

from dirl.model.sdar import load_model
from dirl.rollout.backend import GenerateRequest
from dirl.rollout.engine import Engine

from oracle_decoder import draw, keep_positions, oracle_generate

STRATEGIES = ["low_confidence_dynamic", "low_confidence_static", "sequential"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp(tiny_dir):
    """The tiny model with a scaled-up lm_head: peaked distributions, so the dynamic rule keeps
    several tokens in some steps and one in others."""
    model = load_model(tiny_dir, device="cpu", dtype="float32")
    model.eval()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(50.0)
    return model


def make_requests(model, lengths, max_new, seed0=0, **kw):
    out = []
    for i, P in enumerate(lengths):
        g = torch.Generator().manual_seed(100 + seed0 + i)
        ids = torch.randint(5, model.config.vocab_size, (P,), generator=g).tolist()
        fields = dict(request_id=f"q{seed0 + i}", input_ids=ids, max_new_tokens=max_new, temperature=1.0, top_k=0,
                      top_p=1.0, do_sample=False, stop_token_ids=[], seed=None)
        fields.update(kw)
        if fields["do_sample"]:
            fields["seed"] = 7000 + seed0 + i
        out.append(GenerateRequest(**fields))
    return out


def agree(got, want, tol=1e-4):
    for g, w in zip(got, want, strict=True):
        rid = g["request_id"]
        assert g["request_id"] == w["request_id"]
        assert g["prompt_ids"] == w["prompt_ids"], rid
        assert g["token_ids"] == w["token_ids"], rid
        assert g["step_map"] == w["step_map"], rid
        assert (g["response_length"], g["finish_reason"]) == (w["response_length"], w["finish_reason"]), rid
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True)) <= tol, rid


def run_both(model, reqs, strategy, steps=2, threshold=0.9, batch=3):
    kw = dict(denoising_steps=steps, unmasking_strategy=strategy, confidence_threshold=threshold)
    got = Engine(model, None, max_batch_size=batch, **kw).generate(reqs)
    want = [oracle_generate(model, r, steps, strategy, threshold) for r in reqs]
    agree(got, want)
    return got


# prompt lengths on a block boundary (4, 8) and at every offset inside a block (1, 2, 3, 5, 7)
LENGTHS = [1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_matches_the_oracle_greedy(sharp, strategy):
    got = run_both(sharp, make_requests(sharp, LENGTHS, max_new=10), strategy)
    if strategy == "low_confidence_dynamic":  # both branches of the rule were taken
        assert any(len(set(r["step_map"])) < len(r["step_map"]) for r in got)
        assert any(len(set(r["step_map"][:4])) == 4 for r in got)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.6, top_k=12, top_p=0.9)])
def test_engine_matches_the_oracle_with_seeded_sampling(sharp, strategy, sampling):
    reqs = make_requests(sharp, LENGTHS, max_new=10, seed0=10, do_sample=True, **sampling)
    got = run_both(sharp, reqs, strategy)
    greedy = Engine(sharp, None, denoising_steps=2, unmasking_strategy=strategy).generate(
        [GenerateRequest(**{**r.__dict__, "do_sample": False}) for r in reqs])
    assert any(a["token_ids"] != b["token_ids"] for a, b in zip(got, greedy))  # really sampled


def test_engine_matches_the_oracle_with_the_paper_settings(sharp):
    """B 4, 4 denoising steps, dynamic tau 0.9, T 1.0, top-k 50 (SPEC section 6 recipe)."""
    reqs = make_requests(sharp, [3, 6, 9], max_new=12, seed0=30, do_sample=True, temperature=1.0, top_k=50)
    run_both(sharp, reqs, "low_confidence_dynamic", steps=4, threshold=0.9)


def test_engine_matches_the_oracle_at_a_lower_threshold(sharp):
    reqs = make_requests(sharp, [2, 5, 6], max_new=12, seed0=40, do_sample=True, temperature=0.8)
    got = run_both(sharp, reqs, "low_confidence_dynamic", threshold=0.3)
    assert any(len(set(r["step_map"][:4])) < 4 for r in got)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stop_tokens_and_max_new_tokens_match_the_oracle(sharp, strategy):
    """A stop token inside a block ends the sequence at that block's end (post-stop tokens kept in
    token_ids, response_length counts through the stop); max_new_tokens not a multiple of B ends at
    the block's end, at most B - 1 tokens over."""
    base = make_requests(sharp, [3, 5, 6], max_new=16, seed0=50, do_sample=True, temperature=1.0)
    free = [oracle_generate(sharp, r, 2, strategy) for r in base]
    # a stop token that the unconstrained runs produce mid-response
    stop = free[0]["token_ids"][5]
    reqs = [GenerateRequest(**{**r.__dict__, "stop_token_ids": [stop]}) for r in base]
    got = run_both(sharp, reqs, strategy)
    assert got[0]["finish_reason"] == "stop" and got[0]["token_ids"][got[0]["response_length"] - 1] == stop
    assert got[0]["response_length"] <= 6
    for r in got:
        assert (len(r["prompt_ids"]) + len(r["token_ids"])) % sharp.block_size == 0
        assert stop not in r["token_ids"][: r["response_length"] - 1]
    short = [GenerateRequest(**{**r.__dict__, "max_new_tokens": 5}) for r in base]
    got = run_both(sharp, short, strategy)
    for r in got:
        assert r["finish_reason"] == "length" and 5 <= len(r["token_ids"]) <= 5 + sharp.block_size - 1


@pytest.mark.parametrize("switch", [dict(top_k=1, temperature=0.7), dict(top_k=0, temperature=0.0)])
def test_greedy_switches_match_the_oracle(sharp, switch):
    """Sampling on but top_k == 1 or T == 0: argmax, no draws; T == 0 scores at T = 1."""
    reqs = make_requests(sharp, [2, 5], max_new=8, seed0=80, do_sample=True, **switch)
    run_both(sharp, reqs, "low_confidence_dynamic")


def test_engine_matches_the_oracle_on_the_plain_tiny_model(tiny):
    model, _ = tiny
    run_both(model, make_requests(model, [2, 7], max_new=9, seed0=60), "low_confidence_dynamic")
    run_both(model, make_requests(model, [3, 6], max_new=9, seed0=62, do_sample=True), "low_confidence_static")


def test_trajectory_text_is_the_response_up_to_the_stop_token(sharp, tiny):
    """SPEC 4.9: ``text`` is ``token_ids[:response_length]`` decoded without special tokens; the
    token ids run to the end of the last block."""
    _, tok = tiny
    base = make_requests(sharp, [3, 6], max_new=16, seed0=70, do_sample=True, temperature=1.0)
    stop = oracle_generate(sharp, base[0], 2, "low_confidence_static")["token_ids"][4]
    reqs = [GenerateRequest(**{**r.__dict__, "stop_token_ids": [stop]}) for r in base]
    got = Engine(sharp, tok, denoising_steps=2, unmasking_strategy="low_confidence_static").generate(reqs)
    for g, r in zip(got, reqs):
        w = oracle_generate(sharp, r, 2, "low_confidence_static")
        assert g["token_ids"] == w["token_ids"] and g["response_length"] == w["response_length"]
        assert g["text"] == tok.decode(w["token_ids"][: w["response_length"]], skip_special_tokens=True)
    assert got[0]["finish_reason"] == "stop" and got[0]["response_length"] <= 5


# ----------------------------------------------------------------------------------------------
# The oracle's own rules on hand-made numbers (so a wrong oracle cannot agree with a wrong engine)
# ----------------------------------------------------------------------------------------------


def test_oracle_draw_by_hand():
    # probabilities 0.5, 0.3, 0.2 for tokens 2, 0, 1
    import math

    scaled = [math.log(0.3), math.log(0.2), math.log(0.5)]
    assert [draw(scaled, 0, 1.0, u) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)] == [2, 2, 0, 0, 1, 1]
    assert [draw(scaled, 2, 1.0, u) for u in (0.6, 0.99)] == [2, 0]  # top-2 renormalised: 0.625 / 0.375
    assert [draw(scaled, 0, 0.5, u) for u in (0.0, 0.99)] == [2, 2]  # mass 0.5 reaches p = 0.5
    assert [draw(scaled, 0, 0.6, u) for u in (0.6, 0.99)] == [2, 0]  # 0.5 < 0.6: token 0 stays, 1 goes
    assert draw([0.0, 0.0, 0.0], 0, 1.0, 0.1) == 0  # ties: lower id first


def test_oracle_keep_rules_by_hand():
    conf = {0: 0.2, 1: 0.95, 2: 0.5, 3: 0.91}
    assert keep_positions(conf, "low_confidence_dynamic", 0.9, 4, 4) == [1, 3]
    assert keep_positions({0: 0.2, 2: 0.5}, "low_confidence_dynamic", 0.9, 4, 4) == [2]  # always the best
    assert keep_positions({0: 0.9, 2: 0.5}, "low_confidence_dynamic", 0.9, 4, 4) == [0]  # >=, not >
    assert keep_positions(conf, "low_confidence_static", 0.9, 4, 2) == [1, 3]
    assert keep_positions(conf, "low_confidence_static", 0.9, 4, 8) == [1]  # max(1, B // steps)
    assert keep_positions({1: 0.1, 2: 0.9, 3: 0.99}, "sequential", 0.9, 4, 2) == [1, 2]
    assert keep_positions({0: 0.5, 1: 0.5}, "low_confidence_static", 0.9, 4, 4) == [0]  # ties: leftmost
