"""The cached engine against the naive no-cache decoder, seeds, log-probs, and ``dirl rollout``."""

from __future__ import annotations

import json

import pytest
import torch

from dirl.config import ConfigError
from dirl.model.attention import RaggedRows, TokenMeta, block_causal_meta, dense_mask
from dirl.model.sdar import load_model
from dirl.rollout.backend import GenerateRequest
from dirl.rollout.engine import Engine
from dirl.rollout.naive import naive_generate

pytestmark = pytest.mark.usefixtures("one_thread")


STRATEGIES = ["low_confidence_dynamic", "low_confidence_static", "sequential"]


@pytest.fixture(scope="module")
def sharp(tiny_dir):
    """The tiny model with a scaled-up lm_head: peaked distributions, so dynamic decoding keeps
    several tokens in some steps and one in others, and argmax ties are far apart."""
    model = load_model(tiny_dir, device="cpu", dtype="float32")
    model.eval()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(50.0)
    return model


def requests(model, lengths, max_new=20, seed0=0, **kw):
    out = []
    for i, P in enumerate(lengths):
        g = torch.Generator().manual_seed(seed0 + i)
        ids = torch.randint(5, model.config.vocab_size, (P,), generator=g).tolist()
        fields = dict(request_id=f"r{seed0 + i}", input_ids=ids, max_new_tokens=max_new, temperature=1.0, top_k=0,
                      top_p=1.0, do_sample=False, stop_token_ids=[], seed=None)
        fields.update(kw)
        out.append(GenerateRequest(**fields))
    return out


def same(a, b, logprob_tol=1e-4):
    for x, y in zip(a, b, strict=True):
        assert x["request_id"] == y["request_id"]
        assert x["token_ids"] == y["token_ids"], x["request_id"]
        assert x["step_map"] == y["step_map"], x["request_id"]
        assert (x["response_length"], x["finish_reason"]) == (y["response_length"], y["finish_reason"])
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) <= logprob_tol


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_matches_naive_greedy(sharp, tiny, strategy):
    _, tok = tiny
    # prompt lengths ending on a block boundary and mid-block; max_batch_size 3 < 7 requests makes
    # rows leave and join mid-run
    reqs = requests(sharp, [1, 3, 4, 5, 8, 11, 13], max_new=18)
    kw = dict(denoising_steps=2, unmasking_strategy=strategy, confidence_threshold=0.9)
    got = Engine(sharp, tok, max_batch_size=3, **kw).generate(reqs)
    want = naive_generate(sharp, reqs, tok, **kw)
    same(got, want)
    if strategy == "low_confidence_dynamic":  # the threshold path was exercised
        assert any(len(set(r["step_map"])) < len(r["step_map"]) for r in got)


def test_engine_matches_naive_on_the_plain_tiny_model(tiny):
    model, tok = tiny
    reqs = requests(model, [2, 7, 9], max_new=14)
    same(Engine(model, tok).generate(reqs), naive_generate(model, reqs, tok))


def test_rows_leave_early_and_the_cache_grows(sharp, tiny):
    """Short requests finish and leave while a long one outgrows the cache's first allocation."""
    _, tok = tiny
    reqs = requests(sharp, [3, 5, 9, 2], max_new=6)
    reqs[2].max_new_tokens = 150
    reqs[3].max_new_tokens = 70
    same(Engine(sharp, tok, max_batch_size=3).generate(reqs), naive_generate(sharp, reqs, tok))


def test_batch_composition_does_not_change_results(sharp, tiny):
    _, tok = tiny
    reqs = requests(sharp, [2, 6, 9, 12, 3], max_new=22)
    eng = Engine(sharp, tok)
    together = eng.generate(reqs)
    alone = [eng.generate([r])[0] for r in reqs]
    reordered = eng.generate(list(reversed(reqs)))[::-1]
    same(together, alone)
    same(together, reordered)


@pytest.mark.parametrize("max_batch", [2, 3])
def test_admitted_rows_get_a_forward_of_their_own_with_the_same_results(sharp, tiny, max_batch):
    """Rows admitted mid-run carry their prompts; with the split on (threshold 0) they get a forward
    of their own instead of padding the running rows to their length. Tokens, step maps and
    log-probs are those of one padded forward and of the naive decoder; fewer query tokens are
    computed, in more forwards."""
    _, tok = tiny
    reqs = requests(sharp, [3, 17, 5, 30, 9, 22, 2], max_new=14, do_sample=True, temperature=1.0)
    for i, r in enumerate(reqs):
        r.seed = 50 + i
    kw = dict(max_batch_size=max_batch, ragged_attention=False)  # with ragged rows nothing is padded
    split = Engine(sharp, tok, split_prefill_tokens=0, **kw)
    padded = Engine(sharp, tok, split_prefill_tokens=10 ** 9, **kw)
    a, b = split.generate(reqs), padded.generate(reqs)
    same(a, b)
    same(a, naive_generate(sharp, reqs, tok))
    assert split.forwards > padded.forwards
    assert split.query_tokens < padded.query_tokens
    assert split.row_forwards == padded.row_forwards


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_static"])
def test_packed_rows_give_the_padded_results_with_fewer_linear_tokens(sharp, tiny, strategy):
    """Rows out of phase (prompt lengths 1-8 start mid-block; sampling keeps different numbers of
    tokens a step) commit their blocks in different forwards. Packed, the decoder's linear layers run
    only on the real tokens; tokens, step maps and log-probs are those of the padded forwards and
    of the naive decoder, with the same forwards and attention layout."""
    _, tok = tiny
    reqs = requests(sharp, [1, 2, 3, 5, 6, 7, 8, 4], max_new=26, do_sample=True, temperature=1.0)
    for i, r in enumerate(reqs):
        r.seed = 70 + i
    kw = dict(unmasking_strategy=strategy, denoising_steps=2)
    packed, padded = (Engine(sharp, tok, max_batch_size=5, pack_rows=p, ragged_attention=False, **kw)
                      for p in (True, False))
    a, b = packed.generate(reqs), padded.generate(reqs)
    same(a, b)
    same(a, naive_generate(sharp, reqs, tok, **kw))
    assert (packed.forwards, packed.row_forwards, packed.query_tokens) == \
        (padded.forwards, padded.row_forwards, padded.query_tokens)
    assert padded.linear_tokens == padded.query_tokens
    assert packed.linear_tokens < packed.query_tokens


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_static"])
def test_ragged_rows_give_the_mask_results_with_no_padding(sharp, tiny, strategy):
    """Each row attending only its own keys (the default) gives the tokens, step maps and log-probs of
    the batched forward with the dense mask and of the naive decoder: rows out of phase, rows
    admitted mid-run with prompts of several blocks (block-causal prefill), rows that leave early.
    Attention then computes only real tokens, in no more forwards."""
    _, tok = tiny
    reqs = requests(sharp, [1, 2, 3, 13, 6, 7, 21, 4, 9], max_new=26, do_sample=True, temperature=1.0)
    for i, r in enumerate(reqs):
        r.seed = 90 + i
        r.max_new_tokens = 10 + 3 * i
    # and rows in step: prompts of the same blocks (a batched block-causal prefill), commits together
    reqs += requests(sharp, [13, 13, 14, 15], max_new=12, seed0=20) + requests(sharp, [12] * 4, max_new=12, seed0=30)
    kw = dict(unmasking_strategy=strategy, denoising_steps=2, max_batch_size=4)
    ragged, masked = Engine(sharp, tok, **kw), Engine(sharp, tok, ragged_attention=False, **kw)
    a, b = ragged.generate(reqs), masked.generate(reqs)
    same(a, b)
    same(a, naive_generate(sharp, reqs, tok, **{k: v for k, v in kw.items() if k != "max_batch_size"}))
    # a batch that starts with prompts of the same number of whole blocks: one batched prefill
    first = requests(sharp, [12, 13, 14, 15], max_new=10, seed0=40)
    same(Engine(sharp, tok, **kw).generate(first), Engine(sharp, tok, ragged_attention=False, **kw).generate(first))
    assert ragged.forwards <= masked.forwards
    assert ragged.row_forwards == masked.row_forwards
    assert ragged.query_tokens == ragged.linear_tokens == masked.linear_tokens
    assert ragged.query_tokens < masked.query_tokens


def _engine_layout_rule(pending, cached, B, kv):
    """The dense rule mask of the engine's padded layout, from metadata written out here: cached
    clean keys, then each row's pending clean blocks and its noisy current block, then padding (a
    doc of its own)."""
    n, lq = len(pending), max(pending) + B
    q = {f: torch.zeros(n, lq, dtype=torch.long) for f in ("doc", "pos", "noisy")}
    k = {f: torch.zeros(n, kv, dtype=torch.long) for f in ("doc", "pos", "noisy")}
    for r, (p, c) in enumerate(zip(pending, cached)):
        for t in range(lq):
            q["doc"][r, t] = 0 if t < p + B else -1
            q["pos"][r, t] = c + t if t < p + B else 0
            q["noisy"][r, t] = int(p <= t < p + B)
        for j in range(kv):
            k["doc"][r, j] = 0 if j < c + p + B else -2
            k["pos"][r, j] = j if j < c + p + B else 0
            k["noisy"][r, j] = int(c + p <= j < c + p + B)
    metas = [TokenMeta(doc=d["doc"], pos=d["pos"], blk=d["pos"] // B, noisy=d["noisy"], grp=(d["pos"] // B) * d["noisy"])
             for d in (q, k)]
    return dense_mask(*metas)


@pytest.mark.parametrize("kv_heads,groups", [(2, 2), (1, 4), (3, 1)])
def test_ragged_rows_attend_as_the_rule_says(kv_heads, groups):
    """:class:`RaggedRows.attend` against plain SDPA on the padded layout, K/V repeated per query
    head, under the rule's dense mask (fp64, real tokens only): rows with and without a commit, a
    prefill of several blocks, unequal and equal cached lengths, packed and unpacked layouts, block
    sizes 1, 3 and 4, value width unlike the key width."""
    rng = torch.Generator().manual_seed(kv_heads * 10 + groups)
    cases = [([0, 4, 12, 0, 4], [8, 4, 0, 12, 8], 4), ([0, 0, 0], [4, 8, 0], 4), ([0, 0], [4, 4], 4),
             ([4, 4], [0, 8], 4), ([4, 4], [8, 8], 4), ([12, 12], [0, 4], 4), ([12], [0], 4), ([0], [0], 4),
             ([4, 0], [0, 4], 4), ([0, 2, 0], [3, 1, 2], 1), ([6, 0, 3], [3, 9, 0], 3)]
    for _ in range(12):
        n, B = int(torch.randint(1, 6, (1,), generator=rng)), int(torch.randint(1, 5, (1,), generator=rng))
        cases.append(([B * int(x) for x in torch.randint(0, 4, (n,), generator=rng) * torch.randint(0, 2, (n,), generator=rng)],
                      [B * int(x) for x in torch.randint(0, 6, (n,), generator=rng)], B))
    seen = set()
    for pending, cached, B in cases:
        n, lq = len(pending), max(pending) + B
        kv = max(cached) + lq
        hq = kv_heads * groups
        dt = torch.float64
        q_pad = torch.randn(n, hq, lq, 8, dtype=dt, generator=rng)
        key = torch.randn(n, kv_heads, kv + 3, 8, dtype=dt, generator=rng)[:, :, :kv]  # a view, as from the cache
        value = torch.randn(n, kv_heads, kv + 3, 6, dtype=dt, generator=rng)[:, :, :kv]
        rows = RaggedRows(pending, torch.tensor(cached), B, groups, dt)
        real = torch.tensor([[t < p + B for t in range(lq)] for p in pending])
        q = q_pad.transpose(1, 2)[real][None].transpose(1, 2) if rows.packed else q_pad
        out = rows.attend(q, key, value, None)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q_pad, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
            attn_mask=_engine_layout_rule(pending, cached, B, kv)).transpose(1, 2)[real]
        got = out[0] if rows.packed else out[real]
        assert torch.allclose(got, ref, atol=1e-12), (pending, cached, B)
        seen.add((rows.packed, rows.current_mask is not None))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


def test_folded_attention_takes_strided_kernel_outputs(monkeypatch):
    """CUDA's memory-efficient SDPA kernel returns its output as a transpose (``[B, L, H, D]`` in
    memory). The folded paths must reshape, not view: the same values in that layout give the same
    result."""
    from dirl.model.attention import GroupedQueryMask

    rows = RaggedRows([0, 4, 12], torch.tensor([8, 4, 0]), 4, groups=2)  # 4 + 8 + 16 tokens, keys to 24
    q, k, v = torch.randn(1, 4, 28, 8), torch.randn(3, 2, 24, 8), torch.randn(3, 2, 24, 8)
    grouped = GroupedQueryMask(torch.rand(3, 1, 5, 24) > 0.3, groups=2)
    qg = torch.randn(3, 4, 5, 8)
    want = rows.attend(q, k, v, None), grouped.attend(qg, k, v, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    got = rows.attend(q, k, v, None), grouped.attend(qg, k, v, None)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(sharp, tiny):
    _, tok = tiny
    reqs = requests(sharp, [3, 8, 5, 10], max_new=24, do_sample=True, temperature=1.3, top_k=20, top_p=0.95)
    for i, r in enumerate(reqs):
        r.seed = 1000 + i
    eng = Engine(sharp, tok, max_batch_size=2)
    a = eng.generate(reqs)
    b = eng.generate(reqs)
    same(a, b, 0.0)
    same(a, [eng.generate([r])[0] for r in reqs[::-1]][::-1])
    same(a, naive_generate(sharp, reqs, tok))
    # the seed matters, and the draws are not all argmax
    other = eng.generate([GenerateRequest(**{**r.__dict__, "seed": r.seed + 7}) for r in reqs])
    assert any(x["token_ids"] != y["token_ids"] for x, y in zip(a, other))
    greedy = eng.generate([GenerateRequest(**{**r.__dict__, "do_sample": False}) for r in reqs])
    assert any(x["token_ids"] != y["token_ids"] for x, y in zip(a, greedy))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_match_a_full_recomputation(sharp, tiny, temperature):
    """Rebuild each step's state from the step map (SPEC section 5), run the model over the whole
    sequence with the block-causal mask, and compare log softmax(logits / T)[token]."""
    _, tok = tiny
    B = sharp.block_size
    mask_id = sharp.mask_token_id
    reqs = requests(sharp, [5, 8], max_new=14, do_sample=True, temperature=temperature, top_k=10, seed=3)
    for res in Engine(sharp, tok).generate(reqs):
        P = len(res["prompt_ids"])
        full = res["prompt_ids"] + res["token_ids"]
        steps = [0] * P + res["step_map"]
        worst = 0.0
        with torch.no_grad():
            for s in sorted(set(res["step_map"])):
                pos = [i for i in range(P, len(full)) if steps[i] == s]
                blk_end = (pos[0] // B + 1) * B
                state = [t if (i < P or steps[i] < s) else mask_id for i, t in enumerate(full[:blk_end])]
                ids = torch.tensor([state])
                logits = sharp(ids, block_causal_meta(len(state), B)).float()[0]
                lp = torch.log_softmax(logits / temperature, -1)
                for i in pos:
                    worst = max(worst, abs(lp[i, full[i]].item() - res["logprobs"][i - P]))
        assert worst <= 1e-5


def test_naive_recorded_logits_give_the_engine_logprobs(sharp, tiny):
    _, tok = tiny
    reqs = requests(sharp, [6], max_new=10, do_sample=True, temperature=0.8, seed=11)
    eng = Engine(sharp, tok).generate(reqs)[0]
    ref = naive_generate(sharp, reqs, tok, record_logits=True)[0]
    assert ref["token_ids"] == eng["token_ids"]
    P = len(ref["prompt_ids"])
    B = sharp.block_size
    # step k of the naive decoder is step k of the step map
    for i, (t, s) in enumerate(zip(eng["token_ids"], eng["step_map"])):
        logits = ref["step_logits"][s - 1]
        want = torch.log_softmax(logits / 0.8, -1)[(P + i) % B, t].item()
        assert abs(want - eng["logprobs"][i]) <= 1e-5


def test_temperature_zero_is_greedy(sharp, tiny):
    _, tok = tiny
    reqs = requests(sharp, [7], max_new=12)
    greedy = Engine(sharp, tok).generate(reqs)
    t0 = Engine(sharp, tok).generate(requests(sharp, [7], max_new=12, do_sample=True, temperature=0.0))
    assert greedy[0]["token_ids"] == t0[0]["token_ids"]


def test_empty_prompt_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        Engine(model, tok).generate(requests(model, [0]))


# ----------------------------------------------------------------------------------------------
# dirl rollout
# ----------------------------------------------------------------------------------------------


def test_rollout_cli(tiny_dir, tiny, tmp_path, capsys):
    from dirl.rollout.cli import cli_main

    model, tok = tiny
    inp = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "What is 1+2?"}], "answer": "3"},
        {"prompt": "12+7=", "max_new_tokens": 6},
        {"id": 7, "input_ids": [10, 11, 12, 13, 14], "seed": 5},
    ]
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "traj.jsonl"
    args = ["--model", str(tiny_dir), "--input", str(inp), "--output", str(out), "--max-new-tokens", "9",
            "--temperature", "0.8", "--top-k", "5", "--seed", "1", "--no-progress", "--device", "cpu"]
    assert cli_main(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "line-2", "7"]
    for g in got:
        for k in ("request_id", "prompt_ids", "token_ids", "step_map", "logprobs", "response_length",
                  "finish_reason", "text", "decoding"):
            assert k in g
        assert (len(g["prompt_ids"]) + len(g["token_ids"])) % model.block_size == 0
    assert got[0]["meta"] == {"answer": "3"}
    assert got[0]["decoding"]["top_k"] == 5 and got[0]["decoding"]["seed"] == 1
    assert got[1]["decoding"]["max_new_tokens"] == 6 and got[2]["decoding"]["seed"] == 5
    assert got[2]["prompt_ids"] == [10, 11, 12, 13, 14]
    from dirl.data.chat import prompt_ids

    assert got[0]["prompt_ids"] == prompt_ids(tok, rows[0]["messages"])
    # the same command gives the same trajectories (seeded)
    out2 = tmp_path / "traj2.jsonl"
    assert cli_main(args[:5] + [str(out2)] + args[6:]) == 0
    assert out2.read_text() == out.read_text()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "top_p": "high"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: .*top_p"):
        cli_main(["--model", str(tiny_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), "--no-progress"])
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: invalid JSON"):
        cli_main(["--model", str(tiny_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), "--no-progress"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA engine check needs a GPU")
def test_engine_on_cuda_matches_naive_and_cpu(tiny_dir, tiny):
    _, tok = tiny
    model = load_model(tiny_dir, device="cuda", dtype="float32")
    model.eval()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(50.0)
    reqs = requests(model, [1, 4, 6, 9], max_new=20)
    got = Engine(model, tok, max_batch_size=3).generate(reqs)
    same(got, naive_generate(model, reqs, tok))
    sampled = requests(model, [3, 7], max_new=16, do_sample=True, temperature=1.2, top_k=10, seed=5)
    same(Engine(model, tok).generate(sampled), [Engine(model, tok).generate([r])[0] for r in sampled])
