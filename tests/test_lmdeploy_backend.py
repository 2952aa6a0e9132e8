"""The LMDeploy backend on CPU: step-map patch logic on hand-made engine states, request and output
translation, weight buckets, the sleep/update/wakeup state machine over a stand-in engine, and the
one-line errors on a machine without CUDA or lmdeploy. Nothing here proves LMDeploy itself works:
that is scripts/gpu_check_lmdeploy.py on a GPU machine (and the ``gpu`` tests at the end).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.util
import math
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dirl.config import ConfigError, DecodingConfig
from dirl.rollout import lmdeploy_backend as lb
from dirl.rollout import lmdeploy_patch as lp
from dirl.rollout.backend import GenerateRequest, RequestError, StateError

M, U, C = lp.MASKED, lp.UNMASKED, lp.CACHED
RUNNING, STOPPED = "RUNNING", "STOPPED"
MASK_ID = 3
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Pure step-map logic
# ----------------------------------------------------------------------------------------------


def test_kept_positions_are_masked_to_unmasked_only():
    assert lp.kept_positions([M, M, U, M], [U, M, U, U]).tolist() == [0, 3]
    assert lp.kept_positions([U, U, U, U], [C, C, C, C]).tolist() == []  # the commit forward
    assert lp.kept_positions([M, M, M, M], [M, M, M, M]).tolist() == []
    with pytest.raises(lp.PatchError):
        lp.kept_positions([M, M], [M, M, M])


def test_record_forward_counts_only_forwards_that_keep():
    rec = lp.StepRecord()
    # block 1 (positions 4..7), prompt holds 4 and 5
    assert lp.record_forward(rec, 4, [U, U, M, M], [U, U, M, U], [10, 11, 50, 51], [0, 0, -1.0, -0.5]) == [7]
    assert lp.record_forward(rec, 4, [U, U, M, U], [U, U, U, U], [10, 11, 52, 51], [0, 0, -0.25, 0]) == [6]
    assert lp.record_forward(rec, 4, [U, U, U, U], [C, C, C, C], [10, 11, 52, 51]) == []  # commit
    assert lp.record_forward(rec, 8, [M] * 4, [U, U, M, M], [60, 61, 9, 9], [-0.1, -0.2, 0, 0]) == [8, 9]
    assert lp.record_forward(rec, 8, [U, U, M, M], [U, U, M, M], [60, 61, 9, 9]) == []  # kept nothing
    assert lp.record_forward(rec, 8, [U, U, M, M], [U, U, U, U], [60, 61, 62, 63], [0, 0, -2.0, -3.0]) == [10, 11]
    assert rec.counter == 4 and rec.forwards == 6
    assert rec.steps == {7: 1, 6: 2, 8: 3, 9: 3, 10: 4, 11: 4}
    assert rec.tokens == {7: 51, 6: 52, 8: 60, 9: 61, 10: 62, 11: 63}
    assert rec.logprobs[6] == -0.25 and rec.logprobs[11] == -3.0
    toks, steps, lps = lp.response_arrays(rec, prompt_len=6, block_size=4)
    assert toks == [52, 51, 60, 61, 62, 63] and steps == [2, 1, 3, 3, 4, 4]
    assert lps == [-0.25, -0.5, -0.1, -0.2, -2.0, -3.0]


def test_record_forward_refuses_a_second_keep():
    rec = lp.StepRecord()
    lp.record_forward(rec, 0, [M, M], [U, M], [1, 2], [0.0, 0.0])
    with pytest.raises(lp.PatchError, match="kept twice"):
        # a position reported masked again and kept again: the patch misread the engine
        lp.record_forward(rec, 0, [M, M], [U, M], [1, 2], [0.0, 0.0])


def test_response_arrays_needs_complete_blocks_and_logprobs():
    rec = lp.StepRecord()
    lp.record_forward(rec, 4, [M, M, M, M], [U, M, M, M], [1, 2, 3, 4], [0.0] * 4)
    with pytest.raises(lp.PatchError, match="incomplete"):
        lp.response_arrays(rec, 4, 4)
    rec2 = lp.StepRecord()
    lp.record_forward(rec2, 4, [M, M, M, M], [U, U, U, U], [1, 2, 3, 4])  # no log-probs
    with pytest.raises(lp.PatchError, match="log-prob"):
        lp.response_arrays(rec2, 4, 4)
    assert lp.response_arrays(lp.StepRecord(), 4, 4) == ([], [], [])


def test_registry_lifecycle():
    reg = lp.StepRegistry()
    rec = reg.register(7)
    assert reg.get(7) is rec and len(reg) == 1
    with pytest.raises(lp.PatchError):
        reg.register(7)
    assert reg.pop(7) is rec and reg.pop(7) is None and len(reg) == 0


def test_version_check():
    lp.check_version(lp.TARGET_VERSION)
    with pytest.raises(lp.PatchError, match="not installed"):
        lp.check_version(None)
    with pytest.raises(lp.PatchError, match="targets lmdeploy 0.18.0, but 0.17.1 is installed"):
        lp.check_version("0.17.1")


@pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is not None, reason="lmdeploy is installed here")
def test_apply_patch_refuses_without_lmdeploy():
    with pytest.raises(lp.PatchError, match="not installed"):
        lp.apply_patch()
    assert not lp.is_applied()


# ----------------------------------------------------------------------------------------------
# A stand-in for LMDeploy 0.18.0's dLLM engine state (what the wrappers see)
# ----------------------------------------------------------------------------------------------


class FakeSeq:
    """The fields of LMDeploy's ``SchedulerSequenceDLLM`` that the patch reads, with its update
    rules (``lmdeploy/pytorch/strategies/dllm/sequence.py`` in 0.18.0) re-stated for the test."""

    def __init__(self, session_id: int, prompt: list[int], B: int):
        self.session_id = session_id
        self.status = RUNNING
        self.B = B
        pad = (-len(prompt)) % B  # the prompt's last block completed with [M]
        self.history_dllm_mask = np.array([U] * len(prompt) + [M] * pad, dtype=np.uint8)
        self.tokens = np.array(list(prompt) + [MASK_ID] * pad, dtype=np.int64)
        self.num_history_ids = 0
        self.num_token_ids = len(self.tokens)
        self.prompt_len = len(prompt)
        self.generated: list[int] = []  # what LMDeploy returns: trimmed at the stop token / max_new_tokens

    @property
    def num_all_ids(self) -> int:
        return self.num_history_ids + self.num_token_ids

    def block(self):
        end = self.num_all_ids
        return self.tokens[end - self.B:end].copy(), self.history_dllm_mask[end - self.B:end].copy()


def fake_update_running(self, running, batched_outputs, model_inputs=None, delta=None):
    """LMDeploy's ``DLLMSequenceStrategy.update_running`` re-stated: write the block's new states and
    tokens; a block that is all ``CACHED`` makes room for the next, all-masked block."""
    n = len(running)
    masks = batched_outputs.extra_outputs.dllm_mask.view(n, -1).numpy()
    toks = batched_outputs.next_token_ids.view(n, -1).numpy()
    for i, msg in enumerate(running):
        if msg.status != RUNNING:
            continue
        B = msg.B
        end = msg.num_all_ids
        msg.num_history_ids, msg.num_token_ids = end - B, B  # prefill: earlier prompt blocks are cached
        tok = toks[i].copy()
        tok[masks[i] == M] = MASK_ID
        msg.history_dllm_mask[end - B:end] = masks[i]
        msg.tokens[end - B:end] = tok
        if (masks[i] == C).all():
            msg.history_dllm_mask = np.concatenate([msg.history_dllm_mask, np.full(B, M, np.uint8)])
            msg.tokens = np.concatenate([msg.tokens, np.full(B, MASK_ID)])
            msg.num_history_ids = end
        if batched_outputs.stopped[i]:
            msg.status = STOPPED
    return "orig-result"


@dataclasses.dataclass
class FakeExtraOutputs:
    dllm_mask: torch.Tensor


def lmdeploy_unmask(conf: np.ndarray, masked: np.ndarray, strategy: str, threshold: float, steps: int) -> np.ndarray:
    """LMDeploy's ``UnmaskingProcessor`` rule for one block, re-stated here (not dirl's code):
    scores of unmasked positions count as -inf; ``low_confidence_dynamic`` unmasks every score >=
    threshold plus the argmax; ``low_confidence_static`` the top ``max(1, B // steps)`` scores;
    ``sequential`` the first that many masked positions."""
    B = len(conf)
    n = max(1, B // steps)
    keep = np.zeros(B, dtype=bool)
    idx = [i for i in range(B) if masked[i]]
    if not idx:
        return keep
    if strategy == "sequential":
        keep[idx[:n]] = True
        return keep
    scores = np.where(masked, conf.astype(np.float64), -np.inf)
    if strategy == "low_confidence_dynamic":
        keep |= masked & (scores >= threshold)
        keep[int(np.argmax(scores))] = True
    elif strategy == "low_confidence_static":
        for i in np.argsort(-scores, kind="stable")[: min(n, len(idx))]:  # never an unmasked one
            keep[int(i)] = True
    else:
        raise ValueError(strategy)
    return keep


class FakeDLLMEngine:
    """Decodes FakeSeqs with the unmasking rules of LMDeploy's ``UnmaskingProcessor`` and hands
    every forward to the (patched) ``update_running``, as the engine process does."""

    def __init__(self, B=4, strategy="low_confidence_dynamic", threshold=0.9, steps=4, vocab=40, seed=0,
                 stop_ids=(2,), max_new_tokens=12):
        self.B, self.strategy, self.threshold, self.steps = B, strategy, threshold, steps
        self.vocab, self.stop_ids, self.max_new_tokens = vocab, set(stop_ids), max_new_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.outputs_cls = lp._extra_outputs_class(FakeExtraOutputs)
        self.update_running = lp.wrap_update_running(fake_update_running, RUNNING, REGISTRY_UNDER_TEST)
        self.truth: dict[int, dict[int, tuple[int, int, float]]] = {}  # the simulator's own step maps
        self.counters: dict[int, int] = {}

    def forward(self, seqs: list[FakeSeq]):
        B = self.B
        toks, masks, lps, stopped = [], [], [], []
        for s in seqs:
            tok, mask = s.block()
            start = s.num_all_ids - B
            if (mask == U).all():  # commit forward: cached, nothing sampled into it
                masks.append(np.full(B, C, np.uint8))
                toks.append(tok)
                lps.append(np.zeros(B, np.float32))
                stopped.append(False)
                continue
            logits = torch.randn(B, self.vocab, generator=self.gen) * 3
            logits[:, MASK_ID] = -1e9
            logp = torch.log_softmax(logits, -1)
            sampled = logits.argmax(-1)
            conf = logp.gather(1, sampled[:, None]).squeeze(1).exp()
            masked = torch.as_tensor(mask == M)
            keep = lmdeploy_unmask(conf.numpy(), masked.numpy(), self.strategy, self.threshold, self.steps)
            new_tok = np.where(mask != M, tok, sampled.numpy())
            new_mask = mask.copy()
            new_mask[keep] = U
            if keep.any():
                self.counters[s.session_id] = self.counters.get(s.session_id, 0) + 1
                for i in np.nonzero(keep)[0]:
                    self.truth.setdefault(s.session_id, {})[start + int(i)] = (
                        self.counters[s.session_id], int(new_tok[i]), float(logp[i, new_tok[i]]))
            stop = False
            if (new_mask == U).all():  # block done: LMDeploy's stop check
                first = max(0, s.prompt_len - start)
                resp = [int(t) for t in new_tok[first:]]
                cut = next((k + 1 for k, t in enumerate(resp) if t in self.stop_ids), None)
                room = self.max_new_tokens - len(s.generated)
                s.generated += resp[: min(cut or len(resp), max(room, 0))]
                stop = cut is not None or len(s.generated) >= self.max_new_tokens
            toks.append(new_tok)
            masks.append(new_mask)
            lps.append(np.array([float(logp[i, new_tok[i]]) for i in range(B)], np.float32))
            stopped.append(stop)
        outs = SimpleNamespace(
            next_token_ids=torch.as_tensor(np.concatenate(toks)),
            stopped=stopped,
            extra_outputs=self.outputs_cls(dllm_mask=torch.as_tensor(np.concatenate(masks)),
                                           **{lp.LOGPROB_FIELD: torch.as_tensor(np.concatenate(lps))}),
        )
        strategy = SimpleNamespace(block_size=B)
        assert self.update_running(strategy, seqs, outs, None, None) == "orig-result"

    def run(self, seqs: list[FakeSeq], max_forwards=500):
        for _ in range(max_forwards):
            live = [s for s in seqs if s.status == RUNNING]
            if not live:
                return
            self.forward(live)
        raise AssertionError("the fake engine did not finish")


REGISTRY_UNDER_TEST = lp.StepRegistry()


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_static", "sequential"])
@pytest.mark.parametrize("prompt_len", [5, 6, 7, 8])
def test_patch_records_step_maps_of_a_simulated_engine(strategy, prompt_len):
    eng = FakeDLLMEngine(strategy=strategy, threshold=0.5, steps=2, seed=prompt_len, stop_ids=(), max_new_tokens=10)
    seqs = [FakeSeq(100 + i, list(range(10, 10 + prompt_len + i)), 4) for i in range(3)]
    for s in seqs:
        REGISTRY_UNDER_TEST.register(s.session_id)
    bystander = FakeSeq(999, list(range(10, 16)), 4)  # not registered: never recorded
    eng.run(seqs + [bystander])
    for s in seqs:
        rec = REGISTRY_UNDER_TEST.pop(s.session_id)
        truth = eng.truth[s.session_id]
        assert rec.steps == {p: v[0] for p, v in truth.items()}
        assert rec.tokens == {p: v[1] for p, v in truth.items()}
        assert all(math.isclose(rec.logprobs[p], v[2], rel_tol=1e-5, abs_tol=1e-6) for p, v in truth.items())
        toks, steps, lps = lp.response_arrays(rec, s.prompt_len, 4)
        assert (s.prompt_len + len(toks)) % 4 == 0
        assert steps[0] >= 1 and min(steps) == 1  # 1-based, global over blocks
        assert toks[: len(s.generated)] == s.generated
        assert len(toks) >= 10 and len(s.generated) == 10  # max_new_tokens, then the rest of the block
        # commit forwards never count: the counter is the number of distinct steps, and the
        # forwards seen include one commit per finished block but the last
        assert rec.counter == len(set(steps)) == max(steps)
        assert rec.forwards == rec.counter + (s.prompt_len + len(toks)) // 4 - s.prompt_len // 4 - 1 + (
            1 if s.prompt_len % 4 == 0 else 0)
    assert REGISTRY_UNDER_TEST.get(999) is None and len(REGISTRY_UNDER_TEST) == 0


def test_patch_with_stop_tokens_keeps_the_whole_last_block():
    eng = FakeDLLMEngine(stop_ids=tuple(range(0, 40, 3)), seed=5, max_new_tokens=40)
    seqs = [FakeSeq(200 + i, list(range(10, 15 + i)), 4) for i in range(4)]
    for s in seqs:
        REGISTRY_UNDER_TEST.register(s.session_id)
    eng.run(seqs)
    for s in seqs:
        toks, steps, _ = lp.response_arrays(REGISTRY_UNDER_TEST.pop(s.session_id), s.prompt_len, 4)
        assert toks[: len(s.generated)] == s.generated and s.generated[-1] in eng.stop_ids
        assert len(toks) - len(s.generated) < 4  # post-stop tokens of the last block only


def test_patch_ignores_stopped_and_unregistered_sequences():
    eng = FakeDLLMEngine()
    s = FakeSeq(1, [10, 11, 12, 13, 14], 4)
    s.status = STOPPED
    REGISTRY_UNDER_TEST.register(1)
    out = SimpleNamespace(next_token_ids=torch.zeros(4, dtype=torch.long), stopped=[False],
                          extra_outputs=eng.outputs_cls(dllm_mask=torch.full((4,), U, dtype=torch.uint8)))
    eng.update_running(SimpleNamespace(block_size=4), [s], out)
    rec = REGISTRY_UNDER_TEST.pop(1)
    assert rec.forwards == 0 and rec.steps == {}


def test_post_sampling_wrapper_adds_token_logprobs():
    logits = torch.randn(8, 11)
    chosen = torch.tensor([0, 3, 5, 10, 1, 1, 2, 7])

    def orig(self, inputs, lg, next_ids, extra):
        return chosen, extra

    extra = SimpleNamespace(dllm_mask=torch.zeros(8))
    ids, extra2 = lp.wrap_post_sampling(orig)(None, None, logits, torch.zeros(8, dtype=torch.long), extra)
    assert torch.equal(ids, chosen) and extra2 is extra
    want = torch.log_softmax(logits, -1).gather(1, chosen[:, None]).squeeze(1)
    torch.testing.assert_close(getattr(extra2, lp._LOGPROB_ATTR), want)
    bf = lp.token_logprobs(logits.bfloat16(), chosen)
    assert bf.dtype == torch.float32


def test_extra_outputs_class_keeps_lmdeploy_dataclass_behaviour():
    cls = lp._extra_outputs_class(FakeExtraOutputs)
    assert issubclass(cls, FakeExtraOutputs)
    assert [f.name for f in dataclasses.fields(cls)] == ["dllm_mask", lp.LOGPROB_FIELD]

    def orig(self, extra_inputs):
        return FakeExtraOutputs(dllm_mask=extra_inputs.dllm_mask)

    wrapped = lp.wrap_make_extra_outputs(orig, cls)
    ei = SimpleNamespace(dllm_mask=torch.tensor([0, 1]))
    setattr(ei, lp._LOGPROB_ATTR, torch.tensor([-1.0, -2.0]))
    out = wrapped(None, ei)
    assert isinstance(out, cls) and torch.equal(out.dirl_logprobs, torch.tensor([-1.0, -2.0]))
    # LMDeploy moves outputs between devices with type(self)(**fields): the field survives
    again = type(out)(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)})
    assert torch.equal(again.dirl_logprobs, out.dirl_logprobs)
    assert pickle.loads(pickle.dumps(out)).dirl_logprobs.tolist() == [-1.0, -2.0]
    assert wrapped(None, SimpleNamespace(dllm_mask=torch.tensor([0]))).dirl_logprobs is None


def test_config_builder_wrapper_sets_the_checkpoint_mask_token():
    class Builder:
        @classmethod
        def build(cls, hf_config, model_path=None, **kwargs):
            return SimpleNamespace(dllm_mask_token=151669, path=model_path)

    override = {"id": None}
    Builder.build = lp.wrap_config_build(Builder.__dict__["build"].__func__, lambda: override["id"])
    assert Builder.build(SimpleNamespace(), "p").dllm_mask_token == 151669  # nothing known: upstream's id
    assert Builder.build(SimpleNamespace(mask_token_id=3), "p").dllm_mask_token == 3
    override["id"] = 7
    cfg = Builder.build(SimpleNamespace(mask_token_id=3), model_path="p")
    assert cfg.dllm_mask_token == 7 and cfg.path == "p"


# ----------------------------------------------------------------------------------------------
# Translation
# ----------------------------------------------------------------------------------------------

# Field names of LMDeploy 0.18.0's PytorchEngineConfig and GenerationConfig (lmdeploy/messages.py)
PYTORCH_ENGINE_CONFIG_FIELDS = {
    "dtype", "tp", "dp", "dp_rank", "ep", "session_len", "max_batch_size", "attn_tp_size", "mlp_tp_size",
    "moe_tp_size", "cache_max_entry_count", "prefill_interval", "block_size", "kernel_block_size",
    "num_cpu_blocks", "num_gpu_blocks", "adapters", "max_prefill_token_num", "cudagraph_capture_batch_sizes",
    "thread_safe", "enable_prefix_caching", "prefix_cache_state_budget", "prefix_cache_decode_state_interval",
    "device_type", "eager_mode", "custom_module_map", "download_dir", "revision", "quant_policy",
    "distributed_executor_backend", "empty_init", "enable_microbatch", "enable_eplb", "enable_mp_engine",
    "mp_engine_backend", "model_format", "enable_metrics", "hf_overrides", "language_model_only", "logprobs_mode",
    "enable_return_routed_experts", "enable_transfer_obj_ref", "dllm_block_length", "dllm_unmasking_strategy",
    "dllm_denoising_steps", "dllm_confidence_threshold", "role", "migration_backend", "kv_transfer_config",
    "piecewise_cudagraph_max_tokens",
}
GENERATION_CONFIG_FIELDS = {
    "n", "max_new_tokens", "do_sample", "top_p", "top_k", "min_p", "temperature", "repetition_penalty",
    "ignore_eos", "random_seed", "stop_words", "bad_words", "stop_token_ids", "bad_token_ids", "min_new_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "logprobs", "logprob_start_len", "response_format",
    "logits_processors", "output_logits", "output_last_hidden_state", "include_stop_str_in_output", "return_ppl",
    "with_cache", "preserve_cache", "migration_request", "return_routed_experts", "repetition_ngram_size",
    "repetition_ngram_threshold",
}
LMDEPLOY_STRATEGIES = {"sequential", "low_confidence_dynamic", "low_confidence_static"}


def test_engine_kwargs_map_our_decoding_rules():
    dec = DecodingConfig(denoising_steps=2, unmasking_strategy="low_confidence_static", confidence_threshold=0.8)
    kw = lb.engine_kwargs(dec, 4, dtype="auto", max_batch_size=32, cache_max_entry_count=0.3, max_context=2048)
    assert set(kw) <= PYTORCH_ENGINE_CONFIG_FIELDS
    assert kw["dllm_block_length"] == 4 and kw["dllm_denoising_steps"] == 2
    assert kw["dllm_unmasking_strategy"] == "low_confidence_static" and kw["dllm_confidence_threshold"] == 0.8
    assert kw["dtype"] == "bfloat16" and kw["tp"] == 1 and kw["distributed_executor_backend"] == "uni"
    assert kw["session_len"] == 2048 and kw["max_batch_size"] == 32 and kw["cache_max_entry_count"] == 0.3
    assert kw["enable_prefix_caching"] is False
    for s in ("low_confidence_dynamic", "low_confidence_static", "sequential"):
        kw_s = lb.engine_kwargs(DecodingConfig(unmasking_strategy=s), 4)
        assert kw_s["dllm_unmasking_strategy"] in LMDEPLOY_STRATEGIES
    assert lb.lmdeploy_dtype("float16") == "float16"
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        lb.engine_kwargs(dec, 4, dtype="float32")
    with pytest.raises(ConfigError, match="cache_max_entry_count"):
        lb.engine_kwargs(dec, 4, cache_max_entry_count=1.0)


def test_options_from_env():
    env = {lb.OPTIONS_ENV: '{"cache_max_entry_count": 0.3, "eager_mode": true, "max_context": 4096}'}
    assert lb.options_from_env(env) == {"cache_max_entry_count": 0.3, "eager_mode": True, "max_context": 4096}
    assert lb.options_from_env({}) == {}
    for bad, why in (("{", "not valid JSON"), ("[1]", "JSON object"), ('{"tp": 2}', "unknown option"),
                     ('{"eager_mode": 1}', "wrong type"), ('{"max_context": true}', "wrong type")):
        with pytest.raises(ConfigError, match=why):
            lb.options_from_env({lb.OPTIONS_ENV: bad})


def _req(**kw) -> GenerateRequest:
    base = dict(request_id="r0", input_ids=[10, 11, 12, 13, 14, 15], max_new_tokens=8, temperature=1.0, top_k=0,
                top_p=1.0, do_sample=True, stop_token_ids=[2], seed=None)
    base.update(kw)
    return GenerateRequest(**base)


def test_generation_kwargs_sampling_and_greedy():
    kw = lb.generation_kwargs(_req(temperature=0.7, top_k=50, top_p=0.9, seed=-5))
    assert set(kw) <= GENERATION_CONFIG_FIELDS
    assert kw["do_sample"] and kw["temperature"] == 0.7 and kw["top_k"] == 50 and kw["top_p"] == 0.9
    assert kw["stop_token_ids"] == [2] and kw["ignore_eos"] is False and kw["max_new_tokens"] == 8
    assert kw["random_seed"] == (-5) & ((1 << 64) - 1)
    assert lb.generation_kwargs(_req(top_k=-1))["top_k"] == 0  # ours: <= 0 is off; LMDeploy: 0 is off
    assert "random_seed" not in lb.generation_kwargs(_req())
    g = lb.generation_kwargs(_req(do_sample=False, temperature=0.5, top_k=50))
    assert g["top_k"] == 1 and g["temperature"] == 0.5 and not g["do_sample"]  # confidences at T = 0.5
    z = lb.generation_kwargs(_req(temperature=0.0))
    assert z["top_k"] == 1 and z["temperature"] == 1.0  # as the reference engine: T = 0 is greedy at T = 1
    assert lb.generation_kwargs(_req(stop_token_ids=[]))["stop_token_ids"] is None
    with pytest.raises(RequestError, match="temperature <= 2"):
        lb.generation_kwargs(_req(temperature=2.5))


def test_generation_kwargs_min_new_tokens_and_banned_ids():
    """DiRL's eval settings map onto LMDeploy's own GenerationConfig fields."""
    kw = lb.generation_kwargs(_req(max_new_tokens=256, min_new_tokens=128, banned_token_ids=[3, 7]))
    assert set(kw) <= GENERATION_CONFIG_FIELDS
    assert kw["min_new_tokens"] == 128 and kw["bad_token_ids"] == [3, 7] and kw["stop_token_ids"] == [2]
    plain = lb.generation_kwargs(_req())
    assert "min_new_tokens" not in plain and "bad_token_ids" not in plain


def _out(status: str, ids):
    return SimpleNamespace(status=SimpleNamespace(name=status), token_ids=list(ids))


def test_collect_outputs_folds_increments():
    outs = [_out("SUCCESS", [1, 2]), _out("SUCCESS", [3]), _out("FINISH", [4])]
    assert lb.collect_outputs(outs) == ("FINISH", [1, 2, 3, 4])
    assert lb.collect_outputs([_out("SUCCESS", [1]), _out("CANCEL", []), _out("FINISH", [9])]) == ("CANCEL", [1])
    assert lb.collect_outputs([_out("INPUT_LENGTH_ERROR", [])]) == ("INPUT_LENGTH_ERROR", [])
    assert lb.collect_outputs([]) == ("NONE", [])


def _record(prompt_len, tokens, steps, B=4):
    rec = lp.StepRecord()
    start = (prompt_len // B) * B
    for p, (t, s) in enumerate(zip(tokens, steps), start=prompt_len):
        rec.tokens[p], rec.steps[p], rec.logprobs[p] = t, s, -0.1 * s
    rec.counter = max(steps) if steps else 0
    assert (prompt_len + len(tokens)) % B == 0 and start <= prompt_len
    return rec


def test_build_trajectory_stop_in_last_block(tiny):
    _, tok = tiny
    ids = tok("1+1=2", add_special_tokens=False)["input_ids"]
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    req = _req(input_ids=[10, 11, 12, 13, 14, 15], stop_token_ids=[stop])
    tokens = ids + [stop, 9]  # 5 + 2 = 7 tokens: positions 6..12, then one post-stop token of the block... pad
    tokens = tokens + [0] * ((-(6 + len(tokens))) % 4)
    steps = list(range(1, len(tokens) + 1))
    rec = _record(6, tokens, steps)
    traj = lb.build_trajectory(req, rec, 4, engine_token_ids=ids + [stop], tokenizer=tok)
    assert traj["token_ids"] == tokens and traj["step_map"] == steps
    assert traj["response_length"] == len(ids) + 1 and traj["finish_reason"] == "stop"
    assert traj["text"] == "1+1=2" and traj["prompt_ids"] == req.input_ids
    assert (len(traj["prompt_ids"]) + len(traj["token_ids"])) % 4 == 0
    assert traj["logprobs"] == pytest.approx([-0.1 * s for s in steps])
    assert set(traj) == {"request_id", "prompt_ids", "token_ids", "step_map", "logprobs", "response_length",
                         "finish_reason", "text"}


def test_build_trajectory_length_and_mismatch():
    req = _req(input_ids=[10] * 4, max_new_tokens=6)
    rec = _record(4, [5, 6, 7, 8, 9, 10, 11, 12], [1, 1, 2, 2, 3, 4, 4, 5])
    traj = lb.build_trajectory(req, rec, 4, engine_token_ids=[5, 6, 7, 8, 9, 10])  # LMDeploy trims at 6
    assert traj["finish_reason"] == "length" and traj["response_length"] == 8 and len(traj["token_ids"]) == 8
    with pytest.raises(lp.PatchError, match="disagree"):
        lb.build_trajectory(req, rec, 4, engine_token_ids=[5, 6, 0])
    with pytest.raises(lp.PatchError, match="without a recorded token"):
        lb.build_trajectory(req, lp.StepRecord(), 4)


# ----------------------------------------------------------------------------------------------
# Weight buckets
# ----------------------------------------------------------------------------------------------


def _state_dict():
    g = torch.Generator().manual_seed(1)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).bfloat16()),
        ("model.layers.0.input_layernorm.weight", torch.randn(16, generator=g)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(32, 16, generator=g)),
        ("model.step", torch.tensor(3)),
        ("lm_head.weight", torch.randn(50, 16, generator=g)),
    ]


def test_plan_buckets_one_dtype_and_bounded_size():
    pairs = _state_dict()
    plan = lb.plan_buckets(pairs, segment_bytes=3300)
    assert sorted(i for b in plan for i in b) == list(range(len(pairs)))
    for b in plan:
        assert len({pairs[i][1].dtype for i in b}) == 1
        size = sum(pairs[i][1].numel() * pairs[i][1].element_size() for i in b)
        assert size <= 3300 or len(b) == 1  # an oversized tensor travels alone
        assert b == sorted(b)
    # casting to one dtype merges the float tensors
    cast = lb.plan_buckets(pairs, segment_bytes=1 << 30, dtype=torch.bfloat16)
    assert sorted(map(len, cast)) == [1, 5]
    with pytest.raises(ValueError):
        lb.plan_buckets(pairs, 0)


@pytest.mark.parametrize("segment", [64, 3300, 1 << 30])
def test_bucket_round_trip(segment):
    pairs = _state_dict()
    got = []
    for flat, entries in lb.iter_buckets(pairs, segment):
        assert flat.dim() == 1 and flat.is_contiguous()
        assert entries[-1].end_idx == flat.numel() and entries[0].start_idx == 0
        got += lb.rebuild_bucket(flat, entries)
    want = dict(pairs)
    assert sorted(n for n, _ in got) == sorted(want)
    for n, t in got:
        assert t.dtype == want[n].dtype and t.shape == want[n].shape and torch.equal(t, want[n])


def test_bucket_round_trip_with_cast_and_lmdeploy_wire_format():
    pairs = _state_dict()
    got = []
    for flat, entries in lb.iter_buckets(pairs, 2000, dtype=torch.bfloat16):
        s = lb.local_bucket_request(flat, entries)
        got += lb.decode_flattened_request(s, device=0)  # what LMDeploy 0.18.0 does with it
    assert not lb._LOCAL_TENSORS  # every bucket was taken
    want = dict(pairs)
    for n, t in got:
        w = want[n].bfloat16() if want[n].is_floating_point() else want[n]
        assert t.dtype == w.dtype and torch.equal(t, w)
    assert len(got) == len(pairs)


def test_flatten_bucket_refuses_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        lb.flatten_bucket([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.int64))])


def test_ipc_bucket_json_builds_torchs_rebuild_call_from_checked_fields():
    """The JSON handle becomes torch's own ``rebuild_cuda_tensor`` call without being opened; the
    function and classes come from this process, never from the request."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from dirl.rollout import weights as W

    handle = {"storage_handle": base64.b64encode(b"h" * 65).decode(), "storage_size_bytes": 20,
              "storage_offset_bytes": 0, "tensor_offset": 0, "ref_counter_handle": base64.b64encode(
                  b"/torch_12_34_0").decode(), "ref_counter_offset": 0, "event_handle": None,
              "event_sync_required": False}
    tensors = [{"name": "a", "shape": [2, 3], "dtype": "bfloat16", "start_idx": 0, "end_idx": 6, "numel": 6},
               {"name": "b", "shape": [4], "dtype": "bfloat16", "start_idx": 6, "end_idx": 10, "numel": 4}]
    (b,) = W.check_ipc_buckets([{"dtype": "bfloat16", "handle": handle, "tensors": tensors}])
    func, args = b.rebuild_call(3)
    assert func is rebuild_cuda_tensor and args[0] is torch.Tensor and args[4] is torch.storage.TypedStorage
    assert args[1] == torch.Size([10]) and args[5] is torch.bfloat16 and args[6] == 3 and args[7] == b"h" * 65
    assert [(m.name, tuple(m.shape), m.start_idx, m.end_idx, m.dtype) for m in b.entries] == [
        ("a", (2, 3), 0, 6, torch.bfloat16), ("b", (4,), 6, 10, torch.bfloat16)]
    with pytest.raises(W.PayloadError, match="pickled handles are not accepted"):
        W.check_ipc_buckets([{"dtype": "bfloat16", "handle": base64.b64encode(pickle.dumps((os.getcwd, ()))).decode(),
                              "tensors": tensors}])
    with pytest.raises(W.PayloadError, match="missing field 'shape'"):
        W.check_ipc_buckets([{"dtype": "bfloat16", "handle": handle, "tensors": [{"name": "a"}]}])


# ----------------------------------------------------------------------------------------------
# The backend over a stand-in engine (the glue: sessions, records, state machine)
# ----------------------------------------------------------------------------------------------


class FakeInstance:
    def __init__(self, engine):
        self.engine = engine

    async def async_stream_infer(self, session_id, input_ids, gen_config=None):
        seq = FakeSeq(session_id, list(input_ids), self.engine.B)
        self.engine.sim.max_new_tokens = gen_config.max_new_tokens
        self.engine.sim.stop_ids = set(gen_config.stop_token_ids or [])
        self.engine.pending.append(seq)
        sent = 0
        while True:
            await asyncio.sleep(0)
            if self.engine.pending:
                batch = [s for s in self.engine.pending if s.status == RUNNING]
                self.engine.sim.forward(batch)
                self.engine.pending = [s for s in self.engine.pending if s.status == RUNNING]
            if seq.status != RUNNING:
                yield _out("FINISH", seq.generated[sent:])
                return
            if len(seq.generated) > sent:
                yield _out("SUCCESS", seq.generated[sent:])
                sent = len(seq.generated)


class FakeLMDeployEngine:
    def __init__(self, B=4):
        self.B = B
        self.sim = FakeDLLMEngine(B=B)
        self.sim.update_running = lp.wrap_update_running(fake_update_running, RUNNING, lp.REGISTRY)
        self.pending: list[FakeSeq] = []
        self.calls: list = []
        self.loaded: list = []

    def create_instance(self):
        return FakeInstance(self)

    async def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wakeup(self, tags=None):
        self.calls.append(("wakeup", list(tags)))

    def update_params(self, request):
        assert request.load_format == "flattened_bucket"
        self.loaded += lb.decode_flattened_request(request.serialized_named_tensors, device=0)
        self.calls.append(("update_params", request.finished))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def fake_backend(monkeypatch):
    fake_messages = types.ModuleType("lmdeploy.messages")
    fake_messages.GenerationConfig = lambda **kw: SimpleNamespace(**kw)
    fake_pkg = types.ModuleType("lmdeploy")
    fake_pkg.messages = fake_messages
    monkeypatch.setitem(sys.modules, "lmdeploy", fake_pkg)
    monkeypatch.setitem(sys.modules, "lmdeploy.messages", fake_messages)
    b = object.__new__(lb.LMDeployBackend)
    b.engine = FakeLMDeployEngine()
    b.block_size = 4
    b.tokenizer = None
    b.dtype = "bfloat16"
    b.device = torch.device("cpu")
    b.segment_bytes = 1 << 20
    b._gate = lb._Gate()
    b._sessions = iter(range(1, 10_000))
    b.asleep = {"weights": False, "kv_cache": False}
    b._specs = {n: (tuple(t.shape), t.dtype) for n, t in _state_dict()}
    b._update_started = False
    b._weights_partial = False
    b._loop = lb._LoopThread()
    yield b
    b._loop.stop()


def test_backend_generate_over_a_stand_in_engine(fake_backend):
    reqs = [_req(request_id=f"r{i}", input_ids=list(range(10, 15 + i)), max_new_tokens=6, stop_token_ids=[2])
            for i in range(4)]
    trajs = fake_backend.generate(reqs)
    assert [t["request_id"] for t in trajs] == ["r0", "r1", "r2", "r3"]
    for r, t in zip(reqs, trajs):
        assert t["prompt_ids"] == r.input_ids
        assert (len(t["prompt_ids"]) + len(t["token_ids"])) % 4 == 0
        assert len(t["step_map"]) == len(t["token_ids"]) == len(t["logprobs"])
        assert min(t["step_map"]) == 1 and all(x <= 0 for x in t["logprobs"])
        assert t["finish_reason"] in ("stop", "length")
    assert len(lp.REGISTRY) == 0  # every session's record was taken


def test_backend_state_machine_and_weight_loading(fake_backend):
    b, eng = fake_backend, fake_backend.engine
    pairs = _state_dict()
    with pytest.raises(StateError, match="asleep"):
        b.update_weights(pairs, finished=True)
    b.sleep(1)
    assert b.asleep == {"weights": True, "kv_cache": True} and eng.calls == [("sleep", 1)]
    with pytest.raises(StateError, match="asleep"):
        b.generate([_req()])
    b.sleep(2)  # already asleep: nothing more
    b.update_weights(pairs[:3], finished=False)
    b.update_weights(pairs[3:], finished=True)
    assert eng.calls[1] == ("wakeup", ["weights"])  # LMDeploy loads into weights on the GPU
    finished = [c[1] for c in eng.calls if c[0] == "update_params"]
    assert finished[-1] is True and not any(finished[:-1])
    want = {n: (t.bfloat16() if t.is_floating_point() else t) for n, t in pairs}
    assert {n for n, _ in eng.loaded} == set(want)
    assert all(torch.equal(t, want[n]) for n, t in eng.loaded)
    assert b.asleep == {"weights": False, "kv_cache": True}
    b.wakeup()
    assert eng.calls[-1] == ("wakeup", ["kv_cache"]) and not any(b.asleep.values())
    b.wakeup(["kv_cache"])  # awake already: no call
    assert eng.calls[-1] == ("wakeup", ["kv_cache"]) and len([c for c in eng.calls if c[0] == "wakeup"]) == 2
    with pytest.raises(ValueError, match="unknown wakeup tag"):
        b.wakeup(["gpu"])
    with pytest.raises(ValueError, match="sleep level"):
        b.sleep(3)
    b.sleep(1)
    b.wakeup(["kv_cache"])  # the weights come first, or LMDeploy would warm up a model on the CPU
    assert eng.calls[-1] == ("wakeup", ["weights", "kv_cache"])
    assert b.generate([_req()])[0]["request_id"] == "r0"


def test_backend_generate_each_fails_a_request_alone(fake_backend):
    reqs = [_req(request_id="a", stop_token_ids=[2]), _req(request_id="hot", temperature=5.0),
            _req(request_id="b", stop_token_ids=[2])]
    out = fake_backend.generate_each(reqs)
    assert isinstance(out[1], RequestError) and "temperature" in str(out[1])
    assert [out[0]["request_id"], out[2]["request_id"]] == ["a", "b"]
    with pytest.raises(RequestError):
        fake_backend.generate(reqs)


def test_backend_checks_each_segment_and_refuses_to_serve_a_mix(fake_backend):
    from dirl.rollout.weights import PayloadError

    b, eng = fake_backend, fake_backend.engine
    pairs = _state_dict()
    nan = [(pairs[0][0], torch.full_like(pairs[0][1], float("nan")))]
    b.sleep(1)
    with pytest.raises(PayloadError, match="NaN"):
        b.update_weights(nan, finished=True)  # refused before LMDeploy saw any of it
    assert eng.loaded == []
    with pytest.raises(PayloadError, match="unknown parameter"):
        b.update_weights([("model.nope", torch.zeros(1))], finished=True)
    b.update_weights(pairs[:3], finished=False)
    with pytest.raises(PayloadError, match="shape"):
        b.update_weights([(pairs[3][0], torch.zeros(7, 7))], finished=True)
    b.wakeup()
    with pytest.raises(StateError, match="refused after part of it had loaded"):
        b.generate([_req()])
    b.sleep(1)
    b.update_weights(pairs, finished=True)  # a complete update clears it
    b.wakeup()
    assert b.generate([_req()])[0]["request_id"] == "r0"


def test_backend_empty_finishing_update(fake_backend):
    b, eng = fake_backend, fake_backend.engine
    b.sleep()
    b.update_weights([], finished=True)
    assert eng.calls[-1] == ("update_params", True) and eng.loaded == []


# ----------------------------------------------------------------------------------------------
# Clear errors without CUDA / lmdeploy
# ----------------------------------------------------------------------------------------------


def test_check_environment_messages():
    lb.check_environment("cuda", cuda_available=True, version=lp.TARGET_VERSION)
    with pytest.raises(ConfigError) as e:
        lb.check_environment("cuda", cuda_available=False, version=None)
    msg = str(e.value)
    assert "\n" not in msg and "CUDA" in msg and "lmdeploy is not installed" in msg and "reference" in msg
    with pytest.raises(ConfigError, match="device 'cpu'"):
        lb.check_environment("cpu", cuda_available=True, version=lp.TARGET_VERSION)
    lb.check_environment("cuda:1", cuda_available=True, version=lp.TARGET_VERSION)
    with pytest.raises(ConfigError, match="lmdeploy 0.17.0 is installed"):
        lb.check_environment("cuda", cuda_available=True, version="0.17.0")


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("lmdeploy") is not None,
                    reason="this machine has CUDA and lmdeploy")
def test_get_backend_lmdeploy_fails_with_one_line(tiny_dir):
    from dirl.rollout.backends import get_backend

    with pytest.raises(ConfigError) as e:
        get_backend("lmdeploy", str(tiny_dir), device="cuda")
    assert "\n" not in str(e.value) and str(e.value).startswith("backend 'lmdeploy' cannot start")
    assert "lmdeploy" not in sys.modules  # nothing of LMDeploy was imported


@pytest.mark.skipif(importlib.util.find_spec("dirl.rollout.server") is None, reason="dirl serve is not built yet")
@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("lmdeploy") is not None,
                    reason="this machine has CUDA and lmdeploy")
def test_dirl_serve_lmdeploy_exits_with_one_clear_line(tiny_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "dirl.cli", "serve", "--backend", "lmdeploy", "--model", str(tiny_dir),
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in lines if "lmdeploy" in ln and "cannot start" in ln]
    assert len(errors) == 1, p.stderr
    assert "CUDA" in errors[0] or "not installed" in errors[0]


# ----------------------------------------------------------------------------------------------
# GPU (run on a CUDA machine with lmdeploy 0.18.0; scripts/gpu_check_lmdeploy.py does the full check)
# ----------------------------------------------------------------------------------------------

_gpu_ready = torch.cuda.is_available() and importlib.util.find_spec("lmdeploy") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready, reason="needs a CUDA GPU and lmdeploy==0.18.0 (pip install 'dirl[gpu]')")
def test_gpu_lmdeploy_trajectories_and_first_block_parity(tmp_path):
    from dirl.model.tiny import build_tiny_model
    from dirl.rollout.backends import get_backend

    model, tok = build_tiny_model()
    with torch.no_grad():  # a sharper random model: fewer bf16 near-ties between the two engines
        model.hf.lm_head.weight.mul_(15.0)
    model.hf.to(torch.bfloat16)
    path = model.save_pretrained(tmp_path / "tiny", tokenizer=tok)
    dec = DecodingConfig(temperature=1.0, do_sample=False, max_new_tokens=16)
    ref = get_backend("reference", str(path), decoding=dec, device="cuda", dtype="bfloat16")
    lmd = get_backend("lmdeploy", str(path), decoding=dec, device="cuda", dtype="bfloat16",
                      cache_max_entry_count=0.2, eager_mode=True)
    try:
        reqs = ref.parser().parse_many([{"request_id": f"q{i}", "prompt": f"What is {i}+{i * 7}?"}
                                        for i in range(8)])
        a, b = ref.generate(reqs), lmd.generate(reqs)
        for r, t in zip(reqs, b):
            assert t["request_id"] == r.request_id and t["prompt_ids"] == r.input_ids
            assert (len(t["prompt_ids"]) + len(t["token_ids"])) % 4 == 0
            assert len(t["step_map"]) == len(t["token_ids"]) == len(t["logprobs"])
            assert min(t["step_map"]) == 1 and all(x <= 1e-6 for x in t["logprobs"])
        first = [x["token_ids"][:4 - len(x["prompt_ids"]) % 4] == y["token_ids"][:4 - len(y["prompt_ids"]) % 4]
                 for x, y in zip(a, b)]
        assert sum(first) >= 6, [(x["token_ids"], y["token_ids"]) for x, y in zip(a, b)]
    finally:
        lmd.close()


def test_backend_info_names_lmdeploy_and_its_settings(fake_backend):
    from dirl.config import DecodingConfig

    b = fake_backend
    b.decoding = DecodingConfig(denoising_steps=4, confidence_threshold=0.85)
    b.version, b.name, b.model_dir = "0.18.0", "lmdeploy", "/models/tiny"
    b.mask_token_id, b.vocab_size, b.max_context, b.max_batch_size = 3, 64, 1024, 32
    info = b.info()
    assert info["engine"] == lb.ENGINE_NAME and info["confidence"] == lb.CONFIDENCE_RULE
    assert (info["backend"], info["model"], info["block_size"], info["mask_token_id"]) == ("lmdeploy", "/models/tiny", 4, 3)
    assert (info["dtype"], info["max_context"], info["max_batch_size"]) == ("bfloat16", 1024, 32)
    assert info["confidence_threshold"] == 0.85 and info["asleep"] == {"weights": False, "kv_cache": False}
    assert set(info["defaults"]) == {"temperature", "top_k", "top_p", "do_sample", "max_new_tokens"}
