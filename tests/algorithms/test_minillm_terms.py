"""MiniLLM's terms against hand-computed numbers, and its objective's loss with and without the PPO term."""

import math

import torch
from harness import run_distributed

from megatron_minillm.algorithms import minillm


def test_rewards_returns_length_normalisation_and_whitening_by_hand():
    log_p = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    log_q = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    r = minillm.token_rewards(log_p, log_q, mask, scaling=0.5, clip=1.5)
    assert r.tolist() == [[1.0, -1.5, 0.0, 0.0]]  # (0.5 / 0.5, -1 / 0.5 clipped to -1.5, 0, masked)

    returns = minillm.discounted_returns(r, mask, gamma=0.5)
    # R_2 = 0, R_1 = -1.5 + 0.5 * 0, R_0 = 1 + 0.5 * -1.5
    assert torch.allclose(returns, torch.tensor([[0.25, -1.5, 0.0, 0.0]]))
    normed = minillm.length_normalized(returns, mask)
    assert torch.allclose(normed, torch.tensor([[0.25 / 3, -1.5 / 2, 0.0, 0.0]]))

    w = minillm.whiten(normed, mask)
    vals = torch.tensor([0.25 / 3, -0.75, 0.0])
    expected = (vals - vals.mean()) / math.sqrt(vals.var(unbiased=False).item() + 1e-8)
    assert torch.allclose(w[0, :3], expected, atol=1e-6) and w[0, 3] == 0


def test_ppo_clipped_loss_by_hand():
    log_q = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    log_q_old = torch.log(torch.tensor([[0.25, 0.2, 0.6]]))  # ratios 2, 1, 0.5
    weight = torch.tensor([[1.0, 2.0, 1.0]])  # rho = 2, 2, 0.5
    adv = torch.tensor([[1.0, -1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss = minillm.ppo_clipped_loss(log_q, log_q_old, weight, adv, mask, clip_eps=0.2)
    # token 0: max(-1*2, -1*1.2) = -1.2; token 1: max(2, 1.2) = 2; token 2: max(1, 2*0.8) = 1.6
    assert torch.allclose(loss, torch.tensor([[-1.2, 2.0, 1.6]]))
    assert minillm.ppo_clipped_loss(log_q, log_q_old, weight, adv, torch.zeros(1, 3)).abs().sum() == 0


def _minillm_loss_with_and_without_policy_gradient():
    """The MiniLLM objective's loss on one micro-batch with policy_gradient on and off, and the
    single-step reverse KL alone (token mean), with their gradients on the student logits."""
    from megatron_minillm.algorithms import MiniLLM
    from megatron_minillm.config import MiniLLMConfig, TrainConfig
    from megatron_minillm.data.micro_batch import MicroBatch
    from megatron_minillm.losses import reverse_kl
    from megatron_minillm.parallel import init_distributed

    init_distributed()
    gen = torch.Generator().manual_seed(0)
    b, s, v = 2, 5, 11
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    labels = torch.randint(v, (b, s), generator=gen)
    batch = MicroBatch(
        tokens=labels,
        labels=labels,
        loss_mask=mask,
        position_ids=torch.arange(s).expand(b, s),
        kind="minillm",
        loss_scale=1.0 / mask.sum().item(),
        teacher_logits=torch.randn(b, s, v, generator=gen),
        log_q_old=-1 - torch.rand(b, s, generator=gen),
        importance_weight=torch.ones(b, s),
        advantages=torch.randn(b, s, generator=gen),
    )
    student = torch.randn(b, s, v, generator=gen)
    out = {}
    for pg in (True, False):
        objective = MiniLLM(TrainConfig(teacher="t", minillm=MiniLLMConfig(policy_gradient=pg)), vocab_size=v)
        logits = student.clone().requires_grad_()
        loss, metrics = objective.loss(batch, logits)
        loss.backward()
        out[pg] = (loss.detach(), sorted(metrics), logits.grad)
    logits = student.clone().requires_grad_()
    rkl = (reverse_kl(logits, batch.teacher_logits, mask, vocab_size=v) * mask).sum() / mask.sum()
    rkl.backward()
    return out, (rkl.detach(), logits.grad)


def test_policy_gradient_switch_leaves_only_the_single_step_term():
    [(out, (rkl, rkl_grad))] = run_distributed(_minillm_loss_with_and_without_policy_gradient, 1)
    loss, names, grad = out[False]
    assert names == ["single-step loss"]
    torch.testing.assert_close(loss, rkl)
    torch.testing.assert_close(grad, rkl_grad)
    loss_pg, names_pg, grad_pg = out[True]
    assert names_pg == ["pg loss", "single-step loss"]
    assert not torch.allclose(loss_pg, rkl) and not torch.allclose(grad_pg, rkl_grad)
