"""The DiPO objective: advantages, DAPO filter, clipping, k3 KL, aggregations, and the full loss and
gradient against a plain per-step computation (one forward per denoising state)."""

from __future__ import annotations

import math

import pytest
import torch

from dirl.model.attention import block_causal_meta
from dirl.train.dipo import (
    aggregate,
    dipo_token_loss,
    group_advantages,
    k3_kl,
    keep_group,
    keep_groups,
    token_weights,
)
from dirl.train.layouts import build_batch, score_batch
from test_layouts import _prompt, naive_decode


# -- advantages and the filter ------------------------------------------------------------------


def test_group_advantages_population_std():
    a = group_advantages([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], group_size=4)
    # group 1: mean 0.5, population std 0.5 -> +-1; group 2: std 0 -> 0
    assert a.tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    b = group_advantages([3.0, 1.0, 2.0], group_size=3)
    std = math.sqrt(2.0 / 3.0)
    assert torch.allclose(b, torch.tensor([1 / std, -1 / std, 0.0]))
    c = group_advantages([3.0, 1.0, 2.0], group_size=3, scale_by_std=False)
    assert c.tolist() == [1.0, -1.0, 0.0]


def test_zero_std_groups_get_zero_advantage_even_with_rounding():
    a = group_advantages([0.1] * 4 + [0.7] * 4 + [0.2] * 4 + [1 / 3] * 4, group_size=4)
    assert torch.all(a == 0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 2.0], group_size=3)


def test_dapo_keep_rule():
    assert not keep_group([0, 0, 0, 0])
    assert not keep_group([1, 1, 1])
    assert keep_group([1, 0, 0, 0])
    assert keep_group([True, False])
    assert keep_groups([1, 1, 0, 0, 0, 0, 1, 1, 1], group_size=3) == [True, False, False]


# -- the token loss by hand --------------------------------------------------------------------------


def test_clipping_by_hand():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9]))
    old = torch.zeros(6)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0])
    loss, st = dipo_token_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # ratio 1.5, A>0: min(1.5, 1.28) = 1.28 (clipped); A<0: min(-1.5, -1.28) = -1.5 (not clipped)
    # ratio 0.5, A>0: min(0.5, 0.8) = 0.5;        A<0: min(-0.5, -0.8) = -0.8 (clipped)
    # ratio 1.1 / 0.9 inside the range: rho * A
    expected = -torch.tensor([1.28, -1.5, 0.5, -0.8, 2.2, -1.8])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert st.clipped == 2 and st.tokens == 6
    assert st.ratio_max == pytest.approx(1.5) and st.ratio_min == pytest.approx(0.5)


def test_clipped_tokens_have_no_gradient():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1])).requires_grad_()
    loss, _ = dipo_token_loss(logp, torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]))
    loss.sum().backward()
    # d(-rho A)/dlogp = -rho A where unclipped, 0 where the clipped constant was chosen
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, -1.1]), atol=1e-6)


def test_ratio_one_gives_reinforce_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5]).requires_grad_()
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, st = dipo_token_loss(logp, logp.detach(), adv)
    assert torch.allclose(loss, -adv)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)
    assert st.clipped == 0


def test_k3_kl_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    ref = torch.tensor([-1.0, -1.5, -0.9])
    d = ref - logp
    expected = torch.exp(d) - d - 1
    assert torch.allclose(k3_kl(logp, ref), expected)
    assert k3_kl(logp, ref)[0] == 0 and torch.all(k3_kl(logp, ref) >= 0)
    loss, st = dipo_token_loss(logp, logp, torch.zeros(3), beta=0.1, ref_logp=ref)
    assert torch.allclose(loss, 0.1 * expected)
    assert st.kl == pytest.approx(float(expected.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        dipo_token_loss(logp, logp, torch.zeros(3), beta=0.1)


def test_aggregations_by_hand():
    # response 0: tokens with losses 1, 2, 3; response 1: one token with loss 10
    tl = torch.tensor([1.0, 2.0, 3.0, 10.0])
    idx = torch.tensor([0, 0, 0, 1])
    assert aggregate(tl, idx, "grpo").item() == pytest.approx((2.0 + 10.0) / 2)
    assert aggregate(tl, idx, "dapo").item() == pytest.approx(16.0 / 4)
    with pytest.raises(ValueError):
        aggregate(tl, idx, "mean")


def test_weights_split_over_micro_batches_add_up():
    """Normalisers of the whole mini-batch: the sum over two halves equals the one-batch aggregate."""
    tl = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 6.0])
    idx = torch.tensor([0, 0, 0, 1, 2, 2])
    counts = torch.bincount(idx)
    for agg in ("grpo", "dapo"):
        whole = aggregate(tl, idx, agg)
        w = token_weights(idx, counts, agg, total_responses=3, total_tokens=6)
        parts = (tl[:4] * w[:4]).sum() + (tl[4:] * w[4:]).sum()
        assert parts.item() == pytest.approx(whole.item())


# -- the full loss and gradient against one forward per denoising state ----------------------------


def _plain_per_step_loss(model, trajs, advs, olds, aggregation, eps_low=0.2, eps_high=0.28):
    """Loss of a batch, written as plainly as possible: for every response, block and step, one forward of
    [clean earlier blocks ; the block's state] under block-causal attention, then the clipped surrogate."""
    B, M = model.block_size, model.mask_token_id
    per_response = []
    for t, a, old in zip(trajs, advs, olds):
        P = len(t["prompt_ids"])
        x0 = t["prompt_ids"] + t["token_ids"]
        token_losses = []
        for k in range(len(t["token_ids"])):
            if k >= t["response_length"]:
                continue
            i = P + k
            j = i // B
            s = t["step_map"][k]
            state = [x0[q] if q < P or t["step_map"][q - P] < s else M for q in range(j * B, (j + 1) * B)]
            seq = torch.tensor([x0[:j * B] + state])
            logits = model(seq, block_causal_meta(seq.shape[1], B))[0, i].float()
            lp = torch.log_softmax(logits, -1)[x0[i]]
            ratio = torch.exp(lp - old[k])
            surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
            token_losses.append(-surr)
        per_response.append(torch.stack(token_losses))
    if aggregation == "grpo":
        return torch.stack([x.mean() for x in per_response]).mean()
    return torch.cat(per_response).sum() / sum(len(x) for x in per_response)


@pytest.fixture(scope="module")
def loss_trajs(tiny):
    model, _ = tiny
    out = []
    for i, plen in enumerate((5, 8, 7)):
        t = naive_decode(model, _prompt(plen, 10 + i), max_new_tokens=8, strategy="dynamic", tau=0.0125, seed=20 + i)
        out.append(t)
    out[1] = dict(out[1], response_length=5)  # tokens after it: context only
    return out


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
@pytest.mark.parametrize("layout", ["packed", "rounds"])
def test_loss_and_gradient_equal_the_plain_computation(tiny, loss_trajs, aggregation, layout):
    model, _ = tiny
    advs = [1.3, -0.4, 0.8]
    g = torch.Generator().manual_seed(7)
    # old log-probs away from the current ones so that some tokens are clipped
    olds = [[lp + float(torch.randn((), generator=g)) * 0.3 for lp in t["logprobs"]] for t in loss_trajs]

    model.zero_grad(set_to_none=True)
    ref = _plain_per_step_loss(model, loss_trajs, advs, olds, aggregation)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    batch = build_batch(loss_trajs, model.block_size, model.mask_token_id, layout=layout)
    lp, _ = score_batch(model, batch)
    old = torch.tensor([olds[i][k] for i, k in zip(batch.traj.tolist(), batch.tok.tolist())])
    adv = torch.tensor(advs)[batch.traj]
    tl, st = dipo_token_loss(lp, old, adv)
    counts = torch.bincount(batch.traj, minlength=len(loss_trajs))
    assert counts.tolist() == [len(loss_trajs[0]["token_ids"]), 5, len(loss_trajs[2]["token_ids"])]
    w = token_weights(batch.traj, counts, aggregation, total_responses=3, total_tokens=int(counts.sum()))
    loss = (tl * w).sum()
    loss.backward()
    assert st.clipped > 0
    assert abs(loss.item() - ref.item()) <= 1e-5
    worst = max((p.grad - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12)
                for n, p in model.named_parameters())
    assert worst <= 1e-4
    model.zero_grad(set_to_none=True)


def test_clamped_log_ratio_keeps_far_off_policy_batches_finite():
    """An off-policy batch with huge log-ratio gaps (both signs) gives a finite loss and gradient,
    and the clamped tokens are counted; without the clamp exp() overflows."""
    from dirl.train.dipo import LOG_RATIO_CLAMP

    assert LOG_RATIO_CLAMP == 10.0  # DiRL's bound
    logp = torch.tensor([-0.5, -1.0, -200.0, -0.1, -3.0], requires_grad=True)
    old = torch.tensor([-0.4, -150.0, -0.2, -0.1, -3.0])     # gaps +149, -199.8 and small ones
    ref = torch.tensor([-300.0, -1.0, -0.3, -0.1, -1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0])
    loss, st = dipo_token_loss(logp, old, adv, beta=0.1, ref_logp=ref)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert st.ratio_clamped == 2 and st.kl_clamped == 2
    assert st.ratio_max <= math.exp(LOG_RATIO_CLAMP) * (1 + 1e-6)
    # the k3 estimate stays >= 0 beyond the bound
    assert torch.all(k3_kl(logp.detach(), ref) >= 0)
    # clamped tokens take no gradient through the ratio; in-range tokens are untouched by the clamp
    free, _ = dipo_token_loss(logp.detach()[[0, 3, 4]].requires_grad_(), old[[0, 3, 4]], adv[[0, 3, 4]],
                              log_ratio_clamp=None)
    assert torch.allclose(free, loss.detach()[[0, 3, 4]] - 0.1 * k3_kl(logp.detach(), ref)[[0, 3, 4]])
    # without the clamp: exp() overflows into an infinite KL and a NaN gradient
    lp = logp.detach().clone().requires_grad_()
    unclamped, _ = dipo_token_loss(lp, old, adv, beta=0.1, ref_logp=ref, log_ratio_clamp=None)
    unclamped.sum().backward()
    assert not torch.isfinite(unclamped).all() and not torch.isfinite(lp.grad).all()
