"""Chunked driver of the vocab-parallel losses and their autograd Function.

Logits are [tokens, V/TP] per rank. Tokens go through in chunks: per chunk, each rank computes its
slice's [C] statistics (max, sum of exp, partial sums of the divergence), and only those cross TP
ranks (all-reduce MAX / SUM over megatron's TP group). The forward keeps per token the two
log-normalizers and sum_v b_v ([3, tokens]); the backward recomputes each chunk from the logits and
writes the closed-form gradient straight into the gradient tensor. So no [tokens, V/TP] fp32
temporary lives beyond one chunk, and the teacher never gets a gradient.

Only the tokens selected by the loss mask are computed; the others get 0 and a zero gradient.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor

from megatron_minillm.losses.divergences import Terms
from megatron_minillm.losses.kernels import VocabParallelKernels, compiled

# Elements per chunk of one logits tensor. Eager: ~2 MiB of fp32, so a chunk's temporaries stay in
# cache. Compiled: the fused kernels have no temporaries; bigger chunks amortize the per-call cost.
CHUNK_ELEMENTS = 1 << 19
COMPILED_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class KernelOptions:
    """How the chunk kernels run; results do not depend on it (beyond fp rounding)."""

    chunk_tokens: Optional[int] = None  # tokens per chunk; default: (COMPILED_)CHUNK_ELEMENTS // (V/TP)
    compiled: bool = False  # torch.compile the per-chunk kernels (one-time compile cost)

    def __post_init__(self) -> None:
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class LossPlan:
    """One loss: a divergence (``terms``) to the teacher, or log q of target ids (``terms`` None)."""

    terms: Optional[Terms]
    temperature: float
    num_valid: int  # columns of this rank's slice below the true vocabulary size
    coef: float = 0.0  # lambda / beta of the divergence
    needs_teacher: bool = True  # False: a property of q alone (entropy)
    options: KernelOptions = KernelOptions()

    @property
    def has_teacher(self) -> bool:
        return self.terms is not None and self.needs_teacher

    @property
    def uses_other(self) -> bool:
        return self.terms is None or self.needs_teacher


@functools.lru_cache(maxsize=None)
def _kernel(fn: Callable, terms: Optional[Terms], use_compile: bool) -> Callable:
    if use_compile:
        return compiled(fn, terms)
    return fn if terms is None else functools.partial(fn, terms=terms)


def _tp_all_reduce(tensor: Tensor, op: dist.ReduceOp) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())


def log_normalizer(stats: Tensor) -> Tensor:
    """Full-vocabulary log-sum-exp [k, C] from per-rank (max, sum of exp) stats [k, 2, C].

    Sums are rescaled to the global max before the SUM (as an online softmax does); a row that is
    -inf everywhere gets 0, so its log-probabilities are -inf and its probabilities exactly 0.
    """
    local_max, local_sum = stats[:, 0], stats[:, 1]
    global_max = local_max.clone()
    _tp_all_reduce(global_max, dist.ReduceOp.MAX)
    total = torch.where(local_max > float("-inf"), local_sum * torch.exp(local_max - global_max), 0.0)
    _tp_all_reduce(total, dist.ReduceOp.SUM)
    return torch.where(total > 0, global_max + torch.log(total), 0.0)


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


class VocabParallelLoss:
    """Forward and backward loops over chunks (the math lives in ``VocabParallelKernels``)."""

    @staticmethod
    def kernels(plan: LossPlan) -> tuple[Callable, Callable]:
        K, compile_ = VocabParallelKernels, plan.options.compiled
        if plan.terms is None:
            return _kernel(K.target_partials, None, compile_), _kernel(K.target_grad, None, compile_)
        return (_kernel(K.divergence_partials, plan.terms, compile_),
                _kernel(K.divergence_grad, plan.terms, compile_))  # fmt: skip

    @staticmethod
    def chunks(rows: Tensor, plan: LossPlan, vocab_shard: int) -> "_Chunks":
        elements = COMPILED_CHUNK_ELEMENTS if plan.options.compiled else CHUNK_ELEMENTS
        return _Chunks(rows, plan.options.chunk_tokens or max(1, elements // vocab_shard))

    @staticmethod
    def forward(student: Tensor, other: Tensor, rows: Tensor, plan: LossPlan) -> tuple[Tensor, Tensor]:
        """Per selected row: the loss [n], and what the backward needs [3, n].

        Saved rows: the student's and the teacher's log-normalizers, and sum_v b_v.
        """
        T, nv = plan.temperature, plan.num_valid
        stats_fn = _kernel(VocabParallelKernels.local_stats, None, plan.options.compiled)
        partials_fn, _ = VocabParallelLoss.kernels(plan)
        dtype = torch.promote_types(student.dtype, torch.float32)
        values = torch.empty(len(rows), dtype=dtype, device=student.device)
        saved = torch.zeros(3, len(rows), dtype=dtype, device=student.device)
        chunks = VocabParallelLoss.chunks(rows, plan, student.shape[-1])
        for k0, k1, start in chunks:
            z = chunks.take(student, k0, k1, start)
            o = chunks.take(other, k0, k1, start) if plan.uses_other else None
            stats = [stats_fn(z, T, nv)] + ([stats_fn(o, T, nv)] if plan.has_teacher else [])
            saved[: len(stats), k0:k1] = log_normalizer(torch.stack(stats))
            partials = partials_fn(z, o, saved[:, k0:k1], T, nv, plan.coef)
            _tp_all_reduce(partials, dist.ReduceOp.SUM)
            values[k0:k1], saved[2, k0:k1] = partials[0], partials[1]
        return values, saved

    @staticmethod
    def backward(
        student: Tensor, other: Tensor, rows: Tensor, saved: Tensor, grad_values: Tensor, plan: LossPlan
    ) -> Tensor:
        """dLoss/dstudent [tokens, V/TP] in the student's dtype; rows not selected get zeros."""
        _, grad_fn = VocabParallelLoss.kernels(plan)
        grad_values = grad_values.to(saved.dtype)
        everything = len(rows) == student.shape[0]
        grad = torch.empty_like(student) if everything else torch.zeros_like(student)
        chunks = VocabParallelLoss.chunks(rows, plan, student.shape[-1])
        buffer = None if everything else student.new_empty(min(chunks.size, len(rows)), student.shape[-1])
        for k0, k1, start in chunks:
            z = chunks.take(student, k0, k1, start)
            o = chunks.take(other, k0, k1, start) if plan.uses_other else None
            out = grad[start : start + k1 - k0] if start >= 0 else buffer[: k1 - k0]
            grad_fn(out, z, o, saved[:, k0:k1], grad_values[k0:k1], plan.temperature, plan.num_valid, plan.coef)
            if start < 0:
                grad.index_copy_(0, chunks.rows[k0:k1], out)
        return grad


class _VocabParallelLossFunction(torch.autograd.Function):
    """Thin autograd wrapper: the student gets the closed-form gradient, nothing else gets one."""

    @staticmethod
    def forward(ctx, student: Tensor, other: Tensor, rows: Tensor, plan: LossPlan) -> Tensor:
        values, saved = VocabParallelLoss.forward(student, other, rows, plan)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, other, rows, saved)
            ctx.plan = plan
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        student, other, rows, saved = ctx.saved_tensors
        return VocabParallelLoss.backward(student, other, rows, saved, grad_values, ctx.plan), None, None, None


def _vocab_slice(vocab_shard: int, vocab_size: Optional[int]) -> tuple[int, int]:
    """This rank's first vocabulary id and its number of columns below ``vocab_size``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        vocab_shard, parallel_state.get_tensor_model_parallel_rank(), tp
    )
    if vocab_size is None:
        return start, vocab_shard
    if not 1 <= vocab_size <= vocab_shard * tp:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {vocab_shard * tp}] "
                         f"(V/TP = {vocab_shard}, TP = {tp})")  # fmt: skip
    return start, min(max(vocab_size - start, 0), vocab_shard)


def vocab_parallel_loss(
    student_logits: Tensor, other: Tensor, loss_mask: Optional[Tensor], *, terms: Optional[Terms],
    temperature: float, vocab_size: Optional[int], coef: float = 0.0, needs_teacher: bool = True,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token loss [b, s] (0 where masked) of vocab-parallel ``student_logits`` [b, s, V/TP], and
    the 0/1 mask [b, s] in the loss dtype.

    ``other`` is the teacher's logits [b, s, V/TP] (never differentiated), or the target ids [b, s]
    when ``terms`` is None (token log-probabilities). Only [tokens] statistics cross TP ranks.
    """
    if student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise ValueError(f"student logits must be a float [b, s, V/TP] tensor, got {student_logits.dtype} "
                         f"{tuple(student_logits.shape)}")  # fmt: skip
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    batch, seq, vocab_shard = student_logits.shape
    if loss_mask is None:
        loss_mask = torch.ones(batch, seq, dtype=torch.bool, device=student_logits.device)
    if tuple(loss_mask.shape) != (batch, seq):
        raise ValueError(f"loss mask {tuple(loss_mask.shape)} must be [b, s] = {(batch, seq)} of the logits "
                         f"{tuple(student_logits.shape)}")  # fmt: skip
    start, num_valid = _vocab_slice(vocab_shard, vocab_size)
    rows = loss_mask.reshape(-1).nonzero()[:, 0]
    if terms is None:
        other = _local_targets(other, rows, start, vocab_shard, vocab_size)
    else:
        other = other.reshape(-1, vocab_shard)
    plan = LossPlan(terms, float(temperature), num_valid, coef, needs_teacher, options)
    values = _VocabParallelLossFunction.apply(student_logits.reshape(-1, vocab_shard), other.detach(), rows, plan)
    per_token = values.new_zeros(batch * seq).index_copy(0, rows, values).view(batch, seq)
    return per_token, (loss_mask != 0).to(values.dtype)


def _local_targets(ids: Tensor, rows: Tensor, start: int, vocab_shard: int, vocab_size: Optional[int]) -> Tensor:
    """Target ids [b, s] -> their column in this rank's slice [tokens], -1 where another rank has it."""
    ids = ids.reshape(-1)
    selected = ids[rows]
    limit = vocab_shard * parallel_state.get_tensor_model_parallel_world_size() if vocab_size is None else vocab_size
    if len(selected) and (selected.min() < 0 or selected.max() >= limit):
        raise ValueError(f"target ids at unmasked positions must be in [0, {limit}), got "
                         f"[{selected.min().item()}, {selected.max().item()}]")  # fmt: skip
    local = ids - start
    return torch.where((local >= 0) & (local < vocab_shard), local, -1)
