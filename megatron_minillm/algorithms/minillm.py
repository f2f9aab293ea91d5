"""MiniLLM's policy-gradient pieces (Gu et al. 2024, arXiv 2306.08543, Section 2.2 and Algorithm 1),
each as one function of per-token tensors [b, T] over the response tokens (``mask`` 1 on tokens).

Defaults follow the reference code (microsoft/LMOps ``minillm/``; ../shared/docs/MINILLM_DEFAULTS.md):
reward from the teacher's raw log-probability, discount 0.95, length-normalised returns, batch
whitening across data-parallel ranks, PPO clipping of the importance-weighted ratio.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def token_rewards(log_p: Tensor, log_q_old: Tensor, mask: Tensor, scaling: float = 0.5, clip: float = 100.0) -> Tensor:
    """r_t = clip((log p(y_t | y<t, x) - log q_old(y_t | y<t, x)) / scaling, -clip, clip).

    The single-step reward of the reverse-KL objective (the paper's r_t = log p/q); LMOps scales it
    by 1 / reward_scaling (0.5) and clips it to [-100, 100]. 0 where ``mask`` is 0.
    """
    reward = ((log_p - log_q_old) / scaling).clamp(-clip, clip)
    return torch.where(mask.bool(), reward, torch.zeros_like(reward))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.95) -> Tensor:
    """R_t = sum_{k >= t} gamma^(k - t) r_k over the response (the long-term reward of Eq. "R_{t+1}")."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def length_normalized(returns: Tensor, mask: Tensor) -> Tensor:
    """R_t / L_t with L_t the number of response tokens at positions >= t (the paper's R_Norm):
    without it the sum of per-token rewards, all negative-biased, favours short responses."""
    remaining = mask.flip(1).cumsum(1).flip(1)
    return torch.where(mask.bool(), returns / remaining.clamp(min=1), torch.zeros_like(returns))


def whiten(values: Tensor, mask: Tensor, group: dist.ProcessGroup | None = None, eps: float = 1e-8) -> Tensor:
    """(A - mean) / sqrt(var + eps) over the tokens of the whole batch, all data-parallel ranks included."""
    stats = torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()]).double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    mean = stats[0] / stats[2].clamp(min=1)
    var = stats[1] / stats[2].clamp(min=1) - mean * mean
    return ((values - mean) * torch.rsqrt(var + eps)).to(values.dtype) * mask


def ppo_clipped_loss(
    log_q: Tensor, log_q_old: Tensor, importance_weight: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """Per-token max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) with rho = w_t * q_theta / q_old
    (0 where ``mask`` is 0; the caller averages over the tokens of the optimizer step).

    The importance weight w_t = q_theta(y_t) / p~(y_t) of teacher-mixed sampling (fixed at rollout
    time, as LMOps) multiplies the PPO ratio, and the product is what gets clipped.
    """
    ratio = torch.exp(log_q - log_q_old) * importance_weight
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))
