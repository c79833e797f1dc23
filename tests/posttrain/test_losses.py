"""The post-training losses against hand computations on small batches."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.chat import sequence_batch
from posttrain.losses import dpo_loss, group_advantages, grpo_loss, sequence_logprob, sft_loss, token_logprobs


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std 0.5; group 2: all equal -> 0;
    # group 3: mean 0.25, std sqrt(0.1875)
    s3 = math.sqrt(0.75 * 0.25)
    expected = [1, -1, -1, 1, 0, 0, 0, 0, 0.75 / s3, -0.25 / s3, -0.25 / s3, -0.25 / s3]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_grpo_loss_by_hand_with_clipping_and_kl():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0]])
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.2, -2.0, -9.0]])
    ref = torch.tensor([[-1.2, -0.7, -2.0], [-0.1, -2.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's last token is padding
    adv = torch.tensor([2.0, -1.0])
    eps, beta = 0.2, 0.1
    total, count = 0.0, 0
    for i in range(2):
        for t in range(3):
            if mask[i, t] == 0:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            q = float(ref[i, t] - logp[i, t])
            total += -surrogate + beta * (math.exp(q) - q - 1)
            count += 1
    loss, parts = grpo_loss(logp, old, adv, mask, eps, ref, beta)
    assert float(loss) == pytest.approx(total / count, rel=1e-6)
    # tokens with |ratio - 1| > eps: (0,0) ratio e^0.5, (1,1) e^-1, (1,2) e^8 -> 3 of 5
    assert parts["clip_fraction"] == pytest.approx(3 / 5)


def test_grpo_first_update_is_the_policy_gradient():
    """On-policy (ratio 1, no KL) the loss is −mean(A) over tokens and its gradient is −A·∇logp."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25])


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    rc, rr = torch.tensor([-3.5, -1.0]), torch.tensor([-3.0, -1.5])
    beta = 0.5
    margins = [beta * ((-3.0 + 3.5) - (-4.0 + 3.0)), beta * ((-1.0 + 1.0) - (-0.5 + 1.5))]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    loss, margin = dpo_loss(pc, pr, rc, rr, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert margin.tolist() == pytest.approx(margins)


def test_sft_loss_counts_only_response_tokens():
    prompts, responses = [[3, 10, 11, 5, 4], [3, 12, 5, 4]], [[20, 21, 5], [22, 5]]
    inputs, targets, mask = sequence_batch(prompts, responses, pad_id=1)
    # the mask marks exactly the positions whose target is a response token
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        picked = targets[i][mask[i].bool()].tolist()
        assert picked == r
        assert inputs[i, :len(p) + len(r) - 1].tolist() == (p + r)[:-1]
    torch.manual_seed(0)
    logits = torch.randn(*inputs.shape, 32)
    base = sft_loss(logits, targets, mask)
    changed = logits.clone()
    changed[mask == 0] = torch.randn_like(changed[mask == 0])  # prompt and padding positions
    assert float(sft_loss(changed, targets, mask)) == pytest.approx(float(base))
    lp = token_logprobs(logits, targets)
    assert float(base) == pytest.approx(float(-(lp * mask).sum() / mask.sum()))
    assert sequence_logprob(logits, targets, mask).tolist() == pytest.approx((lp * mask).sum(-1).tolist())
