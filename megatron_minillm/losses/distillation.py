"""Token log-probabilities, entropy and distillation divergences on vocab-parallel logits.

Common arguments: logits are this rank's slice [b, s, V/TP] (a TP group splits the vocabulary); the
teacher's logits have the same shape and split and never get a gradient; ``loss_mask`` [b, s] (0/1
or bool, None = all tokens) selects the tokens computed, others give 0; ``temperature`` T divides
both logits; ``vocab_size`` (optional) excludes padded vocabulary columns (ids >= vocab_size);
``reduction`` is one of ``reductions.REDUCTIONS``; ``options`` picks the chunk size and the optional
compiled kernels; ``tp_group`` is the group the vocabulary is split over (None: megatron's global TP
group; a model built on its own layout passes its ``model.pg_collection.tp``). Values are fp32 (fp64
for fp64 logits). The formulas are in ``divergences.py``; the chunked vocab-parallel computation in
``vocab_parallel.py``, the vocabulary split and its collectives in ``parallel/vocab.py``.
"""

import torch.distributed as dist
from torch import Tensor

from megatron_minillm.losses.divergences import (
    Terms,
    entropy_terms,
    forward_kl_terms,
    generalized_jsd_terms,
    reverse_kl_terms,
    skew_forward_kl_terms,
    skew_reverse_kl_terms,
    total_variation_terms,
)
from megatron_minillm.losses.reductions import Reduction, check_reduction
from megatron_minillm.losses.vocab_parallel import KernelOptions, vocab_parallel_loss

_DEFAULT = KernelOptions()


def token_log_probs(
    logits: Tensor,
    ids: Tensor,
    loss_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "none",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """log q(ids) = z_id / T - logsumexp(z / T): the vocab-parallel gather of megatron's
    ``vocab_parallel_cross_entropy`` (its negative), for policy-gradient ratios and the LM loss."""
    check_reduction(reduction)
    if tuple(ids.shape) != tuple(logits.shape[:2]) or ids.is_floating_point():
        raise ValueError(
            f"ids must be integer [b, s] = {tuple(logits.shape[:2])} of the logits "
            f"{tuple(logits.shape)}, got {ids.dtype} {tuple(ids.shape)}"
        )
    return vocab_parallel_loss(
        logits,
        ids,
        loss_mask,
        terms=None,
        temperature=temperature,
        vocab_size=vocab_size,
        reduction=reduction,
        options=options,
        tp_group=tp_group,
    )


def entropy(
    logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "none",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """H(q) = -sum_v q_v log q_v per token (``divergences.entropy_terms``)."""
    check_reduction(reduction)
    return vocab_parallel_loss(
        logits,
        logits,
        loss_mask,
        terms=entropy_terms,
        temperature=temperature,
        vocab_size=vocab_size,
        reduction=reduction,
        needs_teacher=False,
        options=options,
        tp_group=tp_group,
    )


def _divergence(
    terms: Terms,
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None,
    temperature: float,
    vocab_size: int | None,
    reduction: Reduction,
    options: KernelOptions,
    tp_group: dist.ProcessGroup | None,
    coef: float = 0.0,
) -> Tensor:
    check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [b, s, V/TP]"
        )
    if not teacher_logits.is_floating_point():
        raise ValueError(f"teacher logits must be floating point, got {teacher_logits.dtype}")
    return vocab_parallel_loss(
        student_logits,
        teacher_logits,
        loss_mask,
        terms=terms,
        temperature=temperature,
        vocab_size=vocab_size,
        reduction=reduction,
        coef=coef,
        options=options,
        tp_group=tp_group,
    )


def _check_unit_interval(name: str, value: float, closed_low: bool) -> None:
    low_ok = value >= 0.0 if closed_low else value > 0.0
    if not (low_ok and value < 1.0):
        raise ValueError(f"{name} must be in {'[' if closed_low else '('}0, 1), got {value!r}")


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """KL(q || p), exact over the full vocabulary (``divergences.reverse_kl_terms``)."""
    return _divergence(
        reverse_kl_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
    )


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """KL(p || q), word-level KD (``divergences.forward_kl_terms``)."""
    return _divergence(
        forward_kl_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
    )


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """KL(p || lam p + (1 - lam) q), lam in [0, 1) (``divergences.skew_forward_kl_terms``)."""
    _check_unit_interval("skew lambda", lam, closed_low=True)
    return _divergence(
        skew_forward_kl_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
        coef=float(lam),
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """KL(q || lam q + (1 - lam) p), lam in [0, 1) (``divergences.skew_reverse_kl_terms``)."""
    _check_unit_interval("skew lambda", lam, closed_low=True)
    return _divergence(
        skew_reverse_kl_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
        coef=float(lam),
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, beta in (0, 1)
    (``divergences.generalized_jsd_terms``; at beta = 0 or 1 it vanishes: use forward_kl / reverse_kl)."""
    _check_unit_interval("JSD beta", beta, closed_low=False)
    return _divergence(
        generalized_jsd_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
        coef=float(beta),
    )


def total_variation_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: Reduction = "token_mean",
    options: KernelOptions = _DEFAULT,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """1/2 sum_v |q_v - p_v| (``divergences.total_variation_terms``)."""
    return _divergence(
        total_variation_terms,
        student_logits,
        teacher_logits,
        loss_mask,
        temperature,
        vocab_size,
        reduction,
        options,
        tp_group,
    )
