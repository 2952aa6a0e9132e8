"""Evaluating on DiRL's terms: the preset carries DiRL's eval-script settings, and the engine honours
``min_new_tokens`` and ``banned_token_ids`` through a real ``dirl serve`` on 127.0.0.1."""

from __future__ import annotations

import httpx
import pytest

from dirl.config import ConfigError, DecodingConfig, load_config
from dirl.eval.run import EvalConfig, _build_request, _grade, read_responses, request_seed, run_eval
from dirl.rollout.server import start_server

PRESET = "configs/eval_dirl_compat.yaml"
B = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tiny_dir):
    with start_server(tiny_dir, decoding=DecodingConfig(max_new_tokens=32, do_sample=False), device="cpu",
                      threads=1) as handle:
        yield handle


def generate(server, reqs):
    r = httpx.post(server.url + "/generate", json={"requests": reqs}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"]


# --------------------------------------------------------------------------------------------
# the preset
# --------------------------------------------------------------------------------------------


def test_the_preset_sets_what_dirls_eval_script_sets():
    """DiRL's eval/eval_lmdeploy.py: GenerationConfig(min_new_tokens=128, bad_words=["<|endoftext|>"],
    stop_words=["<|im_end|>"], max_new_tokens=8192, T 1.0, top-k 50, top-p 1.0), B 4, 4 steps,
    dynamic threshold 0.9; its reward is computed on every response, truncated or not."""
    cfg = load_config(EvalConfig, PRESET)
    d = cfg.decoding
    assert cfg.min_new_tokens == 128
    assert cfg.banned_tokens == ["<|endoftext|>"]
    assert cfg.truncated_is_wrong is False
    assert (d.temperature, d.top_k, d.top_p, d.do_sample, d.max_new_tokens) == (1.0, 50, 1.0, True, 8192)
    assert (d.block_size, d.denoising_steps, d.unmasking_strategy, d.confidence_threshold) == (
        4, 4, "low_confidence_dynamic", 0.9)
    assert cfg.num_samples == 16 and len(cfg.data.benchmarks) == 5
    # the prompt text DiRL's script writes by hand, for a math question
    from dirl.data.benchmarks import format_prompt

    q = "What is $1+2$?"
    dirl_prompt = ("<|im_start|>user\n{problem}\nPlease reason step by step, and put your final answer within "
                   "$\\boxed{{}}$.<|im_end|>\n<|im_start|>assistant\n").format(problem=q)
    assert _build_request(cfg, {"benchmark": "math500", "id": "0", "index": 0, "prompt": format_prompt(q)}, 0) == {
        "request_id": "math500/0/0", "prompt": dirl_prompt, "max_new_tokens": 8192, "temperature": 1.0,
        "top_k": 50, "top_p": 1.0, "do_sample": True, "min_new_tokens": 128,
        "seed": request_seed(0, "math500:0", 0)}
    # ours stay the default
    ours = load_config(EvalConfig, "configs/eval_sdar8b.yaml")
    assert (ours.min_new_tokens, ours.banned_tokens, ours.truncated_is_wrong) == (0, [], True)
    assert EvalConfig().truncated_is_wrong is True and EvalConfig().min_new_tokens == 0


def test_preset_config_errors():
    with pytest.raises(ConfigError, match="'min_new_tokens'"):
        load_config(EvalConfig, None, ["min_new_tokens=100", "decoding.max_new_tokens=50"])
    with pytest.raises(ConfigError, match="'min_new_tokens'"):
        load_config(EvalConfig, None, ["min_new_tokens=-1"])
    with pytest.raises(ConfigError, match="'banned_tokens'"):
        load_config(EvalConfig, None, ["banned_tokens=[<|endoftext|>]", "server.urls=[http://127.0.0.1:1]"])


def test_truncated_responses_are_graded_only_under_the_dirl_rule():
    from dirl.rewards import Grader

    items = [({"answer": "3"}, {"text": "so \\boxed{3}", "finish_reason": "length"}),
             ({"answer": "3"}, {"text": "so \\boxed{3}", "finish_reason": "stop"}),
             ({"answer": "3"}, {"text": "so \\boxed{4}", "finish_reason": "length"})]
    grader = Grader(workers=0)
    try:
        assert _grade(load_config(EvalConfig, None, []), grader, items) == [False, True, False]
        assert _grade(load_config(EvalConfig, None, ["truncated_is_wrong=false"]), grader, items) == [True, True, False]
    finally:
        grader.close()


# --------------------------------------------------------------------------------------------
# the engine, through a real server
# --------------------------------------------------------------------------------------------

PROMPTS = ["What is 12+30?", "7+8=", "Say hi.", "2*9?"]


def _eager_stops(server):
    """For each prompt, a stop id the untrained tiny model emits at once: the first generated token."""
    base = generate(server, [{"request_id": f"b{i}", "prompt": p, "max_new_tokens": 8} for i, p in enumerate(PROMPTS)])
    return [b["token_ids"][0] for b in base]


def test_min_new_tokens_never_lets_a_response_stop_early(server):
    stops = _eager_stops(server)
    m = 13
    reqs = []
    for i, (p, s) in enumerate(zip(PROMPTS, stops)):
        reqs.append({"request_id": f"free{i}", "prompt": p, "stop_token_ids": [s], "max_new_tokens": 32})
        reqs.append({"request_id": f"min{i}", "prompt": p, "stop_token_ids": [s], "max_new_tokens": 32,
                     "min_new_tokens": m})
        for seed in range(3):
            reqs.append({"request_id": f"smin{i}-{seed}", "prompt": p, "stop_token_ids": [s], "max_new_tokens": 32,
                         "min_new_tokens": m, "do_sample": True, "temperature": 1.0, "seed": seed})
    out = {r["request_id"]: r for r in generate(server, reqs)}
    for i, s in enumerate(stops):
        free = out[f"free{i}"]
        assert free["finish_reason"] == "stop" and free["response_length"] == 1  # stops at once without it
        for rid in [f"min{i}"] + [f"smin{i}-{seed}" for seed in range(3)]:
            r = out[rid]
            assert s not in r["token_ids"][:m], rid  # no stop token among the first m tokens
            assert r["response_length"] > m, rid
            if r["finish_reason"] == "stop":
                assert r["token_ids"][r["response_length"] - 1] == s
            if r["finish_reason"] == "stop":
                # the rule is per block (LMDeploy's): a stop token only in a block that starts once m
                # response tokens are finished (blocks are aligned to position 0 of prompt + response)
                i, P = r["response_length"] - 1, len(r["prompt_ids"])
                block_start = max(0, (P + i) // B * B - P)
                assert block_start >= m, rid


def test_a_banned_token_is_never_generated(server):
    base = generate(server, [{"request_id": f"b{i}", "prompt": p, "max_new_tokens": 24, "stop_token_ids": []}
                             for i, p in enumerate(PROMPTS)])
    counts: dict[int, int] = {}
    for b in base:
        for t in b["token_ids"]:
            counts[t] = counts.get(t, 0) + 1
    banned = sorted(counts, key=lambda t: -counts[t])[:2]  # the model's favourite tokens
    reqs = [{"request_id": f"g{i}", "prompt": p, "max_new_tokens": 24, "stop_token_ids": [],
             "banned_token_ids": banned} for i, p in enumerate(PROMPTS)]
    reqs += [{"request_id": f"s{i}-{seed}", "prompt": p, "max_new_tokens": 24, "stop_token_ids": [],
              "banned_token_ids": banned, "do_sample": True, "temperature": 1.5, "seed": seed}
             for i, p in enumerate(PROMPTS) for seed in range(3)]
    for r in generate(server, reqs):
        assert not set(banned) & set(r["token_ids"]), r["request_id"]
        assert all(lp > float("-inf") for lp in r["logprobs"])


@pytest.mark.parametrize("body,reason", [
    ({"prompt": "x", "max_new_tokens": 8, "min_new_tokens": 9}, "'min_new_tokens' (9) is over 'max_new_tokens' (8)"),
    ({"prompt": "x", "min_new_tokens": -1}, "'min_new_tokens' must be an integer >= 0"),
    ({"prompt": "x", "min_new_tokens": 2.5}, "'min_new_tokens' must be an integer >= 0"),
    ({"prompt": "x", "banned_token_ids": [10 ** 9]}, "'banned_token_ids' must be a list of at most 256 token ids in [0, "),
    ({"prompt": "x", "banned_token_ids": "0"}, "'banned_token_ids' must be a list of at most 256 token ids"),
])
def test_bad_constraint_fields_get_400_with_a_reason(server, body, reason):
    r = httpx.post(server.url + "/generate", json=body, timeout=30)
    assert r.status_code == 400
    assert reason in r.json()["error"]


def test_eval_sends_the_preset_settings_to_the_server(server, tiny_dir, tmp_path):
    """``dirl eval`` with the DiRL settings (scaled down) against the running server: the minimum
    length and the banned token reach the engine."""
    from dirl.model.sdar import load_tokenizer

    out = tmp_path / "eval"
    cfg = load_config(EvalConfig, None, [
        f"model.path={tiny_dir}", f"server.urls=[{server.url}]", f"output_dir={out}", "data.benchmarks=[synthetic]",
        "data.synthetic_size=4", "num_samples=2", "decoding.max_new_tokens=16", "progress_bar=false",
        "grading_workers=0", "min_new_tokens=9", "banned_tokens=[<|endoftext|>]", "truncated_is_wrong=false",
        "save_token_ids=true", r'prompt_text_template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"',
    ])
    assert cfg.prompt_text_template == load_config(EvalConfig, PRESET).prompt_text_template
    run_eval(cfg)
    tok = load_tokenizer(tiny_dir)
    vocab = tok.get_vocab()
    eot, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    recs = read_responses(out / "responses.jsonl")
    assert len(recs) == 8
    for r in recs:
        assert eot not in r["token_ids"]
        assert im_end not in r["token_ids"][:9]
        assert r["response_length"] > 9
        want = f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n"  # the text as given
        assert r["prompt_length"] == len(tok(want, add_special_tokens=False)["input_ids"])
    assert "at least 9 new tokens" in (out / "report.md").read_text()
    # another truncation rule in the same folder is other settings
    with pytest.raises(ConfigError, match="other settings"):
        run_eval(load_config(EvalConfig, None, [
            f"model.path={tiny_dir}", f"server.urls=[{server.url}]", f"output_dir={out}",
            "data.benchmarks=[synthetic]", "data.synthetic_size=4", "num_samples=2", "decoding.max_new_tokens=16",
            "progress_bar=false", "grading_workers=0", "min_new_tokens=9", "banned_tokens=[<|endoftext|>]"]))
