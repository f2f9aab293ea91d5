"""MiniLLM (Gu et al. 2024, arXiv 2306.08543, Section 2.2 and Algorithm 1): each term of the paper
as one function of per-token tensors [b, T] over the response tokens (``mask`` 1 on tokens), and the
objective that combines them, :class:`MiniLLM`:

    L = L_long (PPO-clipped, importance-weighted: ``ppo_clipped_loss``, from ``token_rewards`` ->
        ``discounted_returns`` -> ``length_normalized`` -> ``whiten``)
      + L_Single (``single_step_loss``)
      + lm_coef * L_PT (``kd.word_level_kd_loss`` on pretraining text)

Defaults follow the reference code (microsoft/LMOps ``minillm/``; ../shared/docs/MINILLM_DEFAULTS.md):
reward from the teacher's raw log-probability, discount 0.95, length-normalised returns, batch
whitening across data-parallel ranks, PPO clipping of the importance-weighted ratio.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.algorithms.kd import word_level_kd_loss
from megatron_minillm.algorithms.objective import BatchKind, Metrics, Objective, summed
from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.losses import reverse_kl, token_log_probs


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


def single_step_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """L_Single per token: the full-vocabulary reverse KL KL(q_t || p_t) at every response position,
    whose gradient is (grad L)_Single of Eq. 3 (the exact expectation of the one-step reward under q:
    no sampling, no importance weight, as LMOps ``Loss._reg_loss``); both logits at ``temperature``."""
    return reverse_kl(
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        vocab_size=vocab_size,
        reduction="none",
        tp_group=tp_group,
    )


class MiniLLM(Objective):
    """Algorithm 1: teacher-mixed rollouts of the student, rewards log p/q from one teacher pass, then
    ``ppo_epochs`` passes of L_long + L_Single, each step's micro-batches paired with L_PT's."""

    name = "minillm"
    samples = "student"

    @property
    def epochs(self) -> int:
        return self.cfg.minillm.ppo_epochs

    def batch_kinds(self) -> list[BatchKind]:
        m = self.cfg.minillm
        kinds = [
            BatchKind(
                "minillm",
                "sampled",
                logit_losses=int(m.policy_gradient) + int(m.single_step),
                teacher_logits=m.single_step,
                teacher_log_p=True,
            )
        ]
        if self.pt_data and m.lm_coef:
            kinds.append(BatchKind("pt", "pretraining", logit_losses=2, teacher_logits=True))
        return kinds

    def loss(self, batch: MicroBatch, logits: Tensor) -> tuple[Tensor, Metrics]:
        if batch.kind == "pt":
            kd_ratio, group = self.cfg.kd.kd_ratio, self.tp_group
            loss, metrics = word_level_kd_loss(batch, logits, kd_ratio, self.vocab_size, "pt ", group)
            return loss * self.cfg.minillm.lm_coef, metrics
        m, temperature, pick = self.cfg.minillm, self.cfg.rollout.temperature, batch.pick
        mask, labels = pick(batch.loss_mask), pick(batch.labels)
        terms: Metrics = {}
        if m.policy_gradient:
            log_q = token_log_probs(
                logits, labels, mask, temperature=temperature, vocab_size=self.vocab_size, tp_group=self.tp_group
            )
            ppo = ppo_clipped_loss(
                log_q, pick(batch.log_q_old), pick(batch.importance_weight), pick(batch.advantages), mask, m.clip_eps
            )
            terms["pg loss"] = summed(ppo, batch)
        if m.single_step:
            teacher = batch.teacher_logits.to(logits.dtype)
            terms["single-step loss"] = summed(
                single_step_loss(logits, teacher, mask, temperature, self.vocab_size, self.tp_group), batch
            )
        return sum(terms.values()), {name: value.detach() for name, value in terms.items()}

    def prepare_samples(self, batches: list[MicroBatch]) -> None:
        m = self.cfg.minillm
        for b in batches:
            b.rewards = token_rewards(b.teacher_log_p, b.log_q_old, b.loss_mask, m.reward_scaling, m.reward_clip)

    def prepare_step(self, batches: list[MicroBatch], dp_group: dist.ProcessGroup | None) -> None:
        """A_t of one optimizer step: discounted returns, length-normalised, whitened over the step's
        tokens on all DP ranks."""
        m = self.cfg.minillm
        if not m.policy_gradient:
            return
        mask = torch.cat([b.loss_mask for b in batches])
        returns = discounted_returns(torch.cat([b.rewards for b in batches]), mask, m.gamma)
        if m.length_norm:
            returns = length_normalized(returns, mask)
        if m.whiten:
            returns = whiten(returns, mask, dp_group)
        for b, a in zip(batches, returns.split([b.loss_mask.shape[0] for b in batches])):
            b.advantages = a

    def sample_stats(self, batches: list[MicroBatch]) -> dict[str, Tensor]:
        """Reward and the reverse KL to the teacher on the samples (log q - log p)."""
        return {
            "reward": sum((b.rewards * b.loss_mask).sum() for b in batches),
            "rkl to teacher": sum(((b.log_q_old - b.teacher_log_p) * b.loss_mask).sum() for b in batches),
        }
