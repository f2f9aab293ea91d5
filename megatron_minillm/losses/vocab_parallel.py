"""Chunked driver of the vocab-parallel losses and their autograd Function.

Logits are [tokens, V/TP] per rank. Tokens go through in chunks: per chunk, each rank computes its
slice's [C] statistics (max, sum of exp, partial sums of the divergence), and only those cross TP
ranks (all-reduce MAX / SUM over the caller's ``tp_group``, else megatron's global TP group; the
vocabulary split and its collectives are ``parallel/vocab.py``'s). When the student needs a gradient,
the same chunk loop writes it (of each loss_i, or of the weighted sum that a scalar reduction is)
straight into the gradient tensor while the chunk is in cache; the backward only scales it in place
(not at all when the upstream gradient of a scalar loss is 1). So no [tokens, V/TP] fp32 temporary
lives beyond one chunk, the only large allocation is the returned gradient, and the teacher never
gets one. The reverse KL of fp32 CPU logits at TP=1 skips the chunks: ``cpu_kernels`` does it row by
row.

Only the tokens selected by the loss mask are computed; the others get 0 and a zero gradient.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.losses import cpu_kernels
from megatron_minillm.losses.divergences import Terms, reverse_kl_terms
from megatron_minillm.losses.kernels import VocabParallelKernels as K
from megatron_minillm.losses.kernels import kernel
from megatron_minillm.losses.reductions import SCALAR_REDUCTIONS, Reduction, reduce_tokens, token_weights
from megatron_minillm.parallel.vocab import global_log_normalizer, local_columns, tp_all_reduce, tp_size, vocab_slice

# Elements per chunk of one logits tensor. Eager: ~2 MiB of fp32, so a chunk's temporaries stay in
# cache. Compiled: the fused kernels have few temporaries; bigger chunks amortize the per-call cost.
CHUNK_ELEMENTS = 1 << 19
COMPILED_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class KernelOptions:
    """How the kernels run; results do not depend on it (beyond fp rounding)."""

    chunk_tokens: int | None = None  # tokens per chunk; default: (COMPILED_)CHUNK_ELEMENTS // (V/TP)
    # torch.compile the chunk kernels: ~2x faster, at a one-time compile per process and kernel (seconds).
    compiled: bool = False
    # The hand-written reverse KL for fp32 CPU logits at TP=1 (cpu_kernels.py): ~10x the eager speed,
    # built once per machine (~2 s, then cached). If building or compiling fails, the process warns
    # once and runs the eager kernels.
    cpu_kernel: bool = True

    def __post_init__(self) -> None:
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class LossPlan:
    """One loss: a divergence (``terms``) to the teacher, or log q of target ids (``terms`` None)."""

    terms: Terms | None
    temperature: float
    num_valid: int  # columns of this rank's slice below the true vocabulary size
    coef: float = 0.0  # lambda / beta of the divergence
    needs_teacher: bool = True  # False: a property of q alone (entropy)
    options: KernelOptions = KernelOptions()
    tp_group: dist.ProcessGroup | None = None  # the group the vocabulary is split over; None: megatron's

    @property
    def tp_size(self) -> int:
        return tp_size(self.tp_group)

    @property
    def has_teacher(self) -> bool:
        return self.terms is not None and self.needs_teacher

    @property
    def uses_other(self) -> bool:
        return self.terms is None or self.needs_teacher

    def kernel(self, fn: Callable, terms: Terms | None = None) -> Callable:
        return kernel(fn, terms, self.options.compiled)


def _divergence_chunk(z: Tensor, o: Tensor | None, out: Tensor | None, weight: Tensor, plan: LossPlan) -> Tensor:
    """Any divergence or target log-probability of one chunk: values [C]; their gradients times
    ``weight`` [C] into ``out``."""
    T, nv = plan.temperature, plan.num_valid
    stats_fn = plan.kernel(K.local_stats)
    if plan.terms is None:
        partials_fn, grad_fn = plan.kernel(K.target_partials), plan.kernel(K.target_grad)
    else:
        partials_fn = plan.kernel(K.divergence_partials, plan.terms)
        grad_fn = plan.kernel(K.divergence_grad, plan.terms)
    stats = [stats_fn(z, T, nv)] + ([stats_fn(o, T, nv)] if plan.has_teacher else [])
    saved = torch.zeros(3, z.shape[0], dtype=stats[0].dtype, device=z.device)
    saved[: len(stats)] = global_log_normalizer(torch.stack(stats), plan.tp_group)
    partials = tp_all_reduce(partials_fn(z, o, saved, T, nv, plan.coef), tp_group=plan.tp_group)
    saved[2] = partials[1]
    if out is not None:
        grad_fn(out, z, o, saved, weight, T, nv, plan.coef)
    return partials[0]


def _reverse_kl_chunk(z: Tensor, t: Tensor, out: Tensor | None, weight: Tensor, plan: LossPlan) -> Tensor:
    """The reverse KL of one chunk (two exponentials per logit at TP = 1): values [C]; their gradients
    times ``weight`` [C] into ``out``. Only [2, C] maxima and [3, C] sums cross TP ranks."""
    T, nv = plan.temperature, plan.num_valid
    if plan.tp_size == 1:
        return K.reverse_kl_values(plan.kernel(K.reverse_kl_chunk)(out, z, t, weight, T, nv))
    maxima = tp_all_reduce(plan.kernel(K.reverse_kl_maxima)(z, t, T, nv), dist.ReduceOp.MAX, plan.tp_group)
    sums = tp_all_reduce(plan.kernel(K.reverse_kl_sums)(z, t, maxima, T, nv), tp_group=plan.tp_group)
    if out is not None:
        plan.kernel(K.reverse_kl_grad)(out, z, t, maxima, sums, weight, T, nv)
    return K.reverse_kl_values(sums)


class _Chunks:
    """The selected rows (flat token ids, ascending) in chunks; consecutive rows are taken as views."""

    def __init__(self, rows: Tensor, size: int) -> None:
        self.rows, self.size = rows, size
        first = torch.arange(0, len(rows), size, device=rows.device)
        last = (first + size - 1).clamp(max=len(rows) - 1)
        consecutive = rows[last] - rows[first] == last - first
        # One host sync for the whole call: the first row of each consecutive chunk, else -1.
        self.starts = torch.where(consecutive, rows[first], -1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for i, start in enumerate(self.starts):
            k0 = i * self.size
            yield k0, min(k0 + self.size, len(self.rows)), start

    def take(self, x: Tensor, k0: int, k1: int, start: int) -> Tensor:
        return x[start : start + k1 - k0] if start >= 0 else x.index_select(0, self.rows[k0:k1])


def vocab_parallel_forward(
    student: Tensor, other: Tensor, rows: Tensor, weights: Tensor, plan: LossPlan, grad: Tensor | None
) -> Tensor:
    """The loss of each selected row [n]; with ``grad`` [tokens, V/TP], also writes weights_i * d loss_i /
    d student_i into its selected rows (the others are left as they are)."""
    if _use_cpu_kernel(plan, student, other):
        sums = cpu_kernels.reverse_kl_rows(student, other, rows, weights, plan.num_valid, plan.temperature, grad)
        if sums is not None:
            return K.reverse_kl_values(sums)
    elements = COMPILED_CHUNK_ELEMENTS if plan.options.compiled else CHUNK_ELEMENTS
    chunks = _Chunks(rows, plan.options.chunk_tokens or max(1, elements // student.shape[-1]))
    gathered = None  # the gradient rows of a chunk of non-consecutive rows
    if grad is not None and min(chunks.starts, default=0) < 0:
        gathered = student.new_empty(min(chunks.size, len(rows)), student.shape[-1])
    chunk_fn = _reverse_kl_chunk if plan.terms is reverse_kl_terms else _divergence_chunk
    values = torch.empty(len(rows), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
    for k0, k1, start in chunks:
        z = chunks.take(student, k0, k1, start)
        o = chunks.take(other, k0, k1, start) if plan.uses_other else None
        if grad is None:
            out = None
        else:
            out = grad[start : start + k1 - k0] if start >= 0 else gathered[: k1 - k0]
        values[k0:k1] = chunk_fn(z, o, out, weights[k0:k1], plan)
        if out is not None and start < 0:
            grad.index_copy_(0, chunks.rows[k0:k1], out)
    return values


def _use_cpu_kernel(plan: LossPlan, student: Tensor, other: Tensor) -> bool:
    """The hand-written kernel serves reverse KLs of fp32 CPU logits when one rank holds the whole
    vocabulary (with TP > 1 the per-token statistics must cross ranks between its passes)."""
    return (
        plan.terms is reverse_kl_terms
        and plan.options.cpu_kernel
        and cpu_kernels.supports(student, other)
        and plan.tp_size == 1
    )


class _VocabParallelLossFunction(torch.autograd.Function):
    """Thin autograd wrapper. The forward computes, with the losses, the student's gradient per unit
    upstream gradient: of sum_i weights_i loss_i when ``reduce`` (a scalar reduction, the output),
    else of each loss_i (the output [n]). The backward scales the gradient in place: by the upstream
    scalar, or not at all when it is 1 (``loss.backward()``); row by row otherwise. A second backward
    of the same graph (retain_graph, gradcheck) finds the buffer used and recomputes it."""

    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        other: Tensor,
        rows: Tensor,
        weights: Tensor,
        plan: LossPlan,
        needs_grad: bool,
        reduce: bool,
    ) -> Tensor:
        grad = _gradient_buffer(student, rows) if needs_grad else None
        if needs_grad:
            ctx.save_for_backward(student, other, rows, weights)
            ctx.plan, ctx.grad, ctx.reduce = plan, grad, reduce
        values = vocab_parallel_forward(student, other, rows, weights, plan, grad)
        return (values * weights).sum() if reduce else values

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:
        student, other, rows, weights = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # dropped here, so that autograd may take it as the .grad
        if grad is None:
            grad = _gradient_buffer(student, rows)
            vocab_parallel_forward(student, other, rows, weights, ctx.plan, grad)
        if not ctx.reduce:
            if len(rows) < grad.shape[0]:  # unselected rows: zero gradient, scale 0
                grad_output = grad_output.new_zeros(grad.shape[0]).index_copy_(0, rows, grad_output)
            _scale_rows(grad, grad_output, ctx.plan.options.chunk_tokens)
        elif grad_output.item() != 1.0:
            grad.mul_(grad_output)
        return grad, None, None, None, None, None, None


def _scale_rows(grad: Tensor, scale: Tensor, chunk_tokens: int | None) -> None:
    """grad[i] *= scale[i] in place, for a gradient [tokens, V/TP] and per-token scales [tokens].

    The scales of bf16/fp16 logits are fp32 (the losses' dtype), and on CPU an in-place product with a
    tensor of another dtype promotes through temporaries (TensorIterator: an fp32 copy of the gradient
    and an fp32 result, written back after), two [tokens, V/TP] fp32 tensors, four bf16 logits' worth
    at the loss's backward; CUDA kernels cast on the fly. So mixed dtypes go by chunks of rows, each
    the same product as before.
    """
    if scale.dtype == grad.dtype:
        grad.mul_(scale[:, None])
        return
    step = chunk_tokens or max(1, CHUNK_ELEMENTS // grad.shape[-1])
    for k in range(0, grad.shape[0], step):
        grad[k : k + step].mul_(scale[k : k + step, None])


def _gradient_buffer(student: Tensor, rows: Tensor) -> Tensor:
    """The student's gradient [tokens, V/TP]: zeros where no row is selected, else left for the kernels."""
    return torch.empty_like(student) if len(rows) == student.shape[0] else torch.zeros_like(student)


def vocab_parallel_loss(
    student_logits: Tensor,
    other: Tensor,
    loss_mask: Tensor | None,
    *,
    terms: Terms | None,
    temperature: float,
    vocab_size: int | None,
    reduction: Reduction,
    coef: float = 0.0,
    needs_teacher: bool = True,
    options: KernelOptions = KernelOptions(),
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The ``reduction`` of the per-token loss (0 where masked) of vocab-parallel ``student_logits``
    [b, s, V/TP].

    ``other`` is the teacher's logits [b, s, V/TP] (never differentiated), or the target ids [b, s]
    when ``terms`` is None (token log-probabilities). Only [tokens] statistics cross the ranks of
    ``tp_group``, the group the vocabulary is split over (None: megatron's global TP group).
    """
    if student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise ValueError(
            f"student logits must be a float [b, s, V/TP] tensor, got {student_logits.dtype} "
            f"{tuple(student_logits.shape)}"
        )
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    batch, seq, vocab_shard = student_logits.shape
    if loss_mask is None:
        loss_mask = torch.ones(batch, seq, dtype=torch.bool, device=student_logits.device)
    if tuple(loss_mask.shape) != (batch, seq):
        raise ValueError(
            f"loss mask {tuple(loss_mask.shape)} must be [b, s] = {(batch, seq)} of the logits "
            f"{tuple(student_logits.shape)}"
        )
    tp = tp_size(tp_group)
    if vocab_size is not None and not 1 <= vocab_size <= vocab_shard * tp:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, {vocab_shard * tp}] (V/TP = {vocab_shard}, TP = {tp})"
        )
    _, num_valid = vocab_slice(vocab_shard, vocab_size, tp_group)
    rows = loss_mask.reshape(-1).nonzero()[:, 0]
    if terms is None:
        limit = vocab_shard * tp if vocab_size is None else vocab_size
        other = _local_targets(other, rows, vocab_shard, limit, tp_group)
    else:
        other = other.reshape(-1, vocab_shard)
    mask = (loss_mask != 0).to(torch.promote_types(student_logits.dtype, torch.float32))
    reduce = reduction in SCALAR_REDUCTIONS
    weights = token_weights(mask, reduction).reshape(-1)[rows] if reduce else mask.new_ones(len(rows))
    plan = LossPlan(terms, float(temperature), num_valid, coef, needs_teacher, options, tp_group)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    values = _VocabParallelLossFunction.apply(
        student_logits.reshape(-1, vocab_shard), other.detach(), rows, weights, plan, needs_grad, reduce
    )
    if reduce:
        return values
    per_token = values.new_zeros(batch * seq).index_copy(0, rows, values).view(batch, seq)
    return reduce_tokens(per_token, mask, reduction)


def _local_targets(
    ids: Tensor, rows: Tensor, vocab_shard: int, limit: int, tp_group: dist.ProcessGroup | None
) -> Tensor:
    """Target ids [b, s] (those of the selected ``rows`` below ``limit``) -> their column in this rank's
    slice [tokens], -1 where another rank has it."""
    ids = ids.reshape(-1)
    selected = ids[rows]
    if len(selected) and (selected.min() < 0 or selected.max() >= limit):
        raise ValueError(
            f"target ids at unmasked positions must be in [0, {limit}), got "
            f"[{selected.min().item()}, {selected.max().item()}]"
        )
    local, mine = local_columns(ids, vocab_shard, tp_group)
    return torch.where(mine, local, -1)
