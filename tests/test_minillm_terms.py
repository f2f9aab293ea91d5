"""MiniLLM's policy-gradient terms and the trainer config, against hand-computed numbers."""

import math

import pytest
import torch
from harness import run_distributed

from megatron_minillm.algorithms import minillm
from megatron_minillm.training.config import ConfigError, load_config


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


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: kd\nstudent: s\nteacher: t\ndata: d\nlr: 1e-5\n")
    cfg = load_config(str(path), ["tp=2", "lr=2e-5", "length_norm=false", "pt_data=null"])
    assert (cfg.algorithm, cfg.tp, cfg.lr, cfg.length_norm, cfg.pt_data) == ("kd", 2, 2e-5, False, None)
    with pytest.raises(ConfigError, match=r"unknown config keys \['learning_rate'\]"):
        load_config(str(path), ["learning_rate=1"])
    with pytest.raises(ConfigError, match="tp: expected int, got 'two'"):
        load_config(str(path), ["tp=two"])
    with pytest.raises(ConfigError, match="algorithm kd needs a teacher"):
        load_config(str(path), ["teacher=null"])
    with pytest.raises(ConfigError, match="algorithm 'ppo' is not one of"):
        load_config(str(path), ["algorithm=ppo"])
    with pytest.raises(ConfigError, match="policy_gradient=false and single_step=false"):
        load_config(str(path), ["algorithm=minillm", "policy_gradient=false", "single_step=false"])


def _minillm_loss_with_and_without_policy_gradient():
    """The trainer's MiniLLM loss on one micro-batch with policy_gradient on and off, and the
    single-step reverse KL alone (token mean), with their gradients on the student logits."""
    from types import SimpleNamespace

    from megatron_minillm.losses import reverse_kl
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training.config import TrainConfig
    from megatron_minillm.training.trainer import Trainer

    init_distributed()
    gen = torch.Generator().manual_seed(0)
    b, s, v = 2, 5, 11
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    batch = {
        "kind": "minillm",
        "loss_mask": mask,
        "scale": 1.0 / mask.sum().item(),
        "labels": torch.randint(v, (b, s), generator=gen),
        "teacher_logits": torch.randn(b, s, v, generator=gen),
        "log_q_old": -1 - torch.rand(b, s, generator=gen),
        "weight": torch.ones(b, s),
        "advantages": torch.randn(b, s, generator=gen),
    }
    student = torch.randn(b, s, v, generator=gen)
    out = {}
    for pg in (True, False):
        trainer = Trainer.__new__(Trainer)  # only _loss is exercised: it reads cfg and arch.vocab_size
        trainer.cfg = TrainConfig(student="s", teacher="t", data="d", policy_gradient=pg)
        trainer.arch = SimpleNamespace(vocab_size=v)
        logits = student.clone().requires_grad_()
        loss, metrics = trainer._loss(dict(batch), logits)
        loss.backward()
        out[pg] = (loss.detach(), sorted(metrics), logits.grad)
    logits = student.clone().requires_grad_()
    rkl = (reverse_kl(logits, batch["teacher_logits"], mask, vocab_size=v) * mask).sum() / mask.sum()
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
