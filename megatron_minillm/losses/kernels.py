"""Per-chunk math of the vocab-parallel losses, as pure functions of tensors.

A chunk is [C, V/TP] rows of this rank's logits (any float dtype; math in fp32, or fp64 for fp64
inputs). Nothing here communicates: the driver (``vocab_parallel.py``) all-reduces the [C]
statistics between calls. Being pure, each function runs eagerly or through ``torch.compile``,
which fuses a chunk's elementwise work into one pass over it.
"""

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_minillm.losses.divergences import Terms, fast_exp


class VocabParallelKernels:
    """Static per-chunk kernels, in the manner of megatron's ``VocabParallelCrossEntropy``."""

    @staticmethod
    def scaled_logits(logits: Tensor, temperature: float, num_valid: int) -> Tensor:
        """logits / T in the compute dtype; columns >= ``num_valid`` (padded vocabulary) at -inf."""
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1.0:
            x = x / temperature
        if num_valid < x.shape[-1]:
            x = F.pad(x[:, :num_valid], (0, x.shape[-1] - num_valid), value=float("-inf"))
        return x

    @staticmethod
    def local_stats(logits: Tensor, temperature: float, num_valid: int) -> Tensor:
        """[2, C]: this slice's max of z/T and sum of exp(z/T - max); an all -inf row gives (-inf, 0)."""
        x = VocabParallelKernels.scaled_logits(logits, temperature, num_valid)
        row_max = x.amax(dim=-1)
        shift = torch.where(row_max > float("-inf"), row_max, 0.0)
        return torch.stack((row_max, fast_exp(x - shift[:, None]).sum(dim=-1)))

    @staticmethod
    def log_probs(logits: Tensor, log_normalizer: Tensor, temperature: float, num_valid: int) -> Tensor:
        """log softmax(z / T) of this slice given the full-vocabulary log-normalizer [C], clamped to the
        lowest finite value: log 0 is finite, so 0 * log 0 = 0 without any NaN test."""
        log_p = VocabParallelKernels.scaled_logits(logits, temperature, num_valid) - log_normalizer[:, None]
        return log_p.clamp(min=torch.finfo(log_p.dtype).min)

    @staticmethod
    def divergence_partials(
        student: Tensor, teacher: Optional[Tensor], lse: Tensor, temperature: float, num_valid: int,
        coef: float, *, terms: Terms,
    ) -> Tensor:  # fmt: skip
        """[2, C]: this slice's sum_v phi_v (the divergence) and sum_v b_v (for the backward).

        ``lse`` rows: the student's and the teacher's full-vocabulary log-normalizers.
        """
        log_q = VocabParallelKernels.log_probs(student, lse[0], temperature, num_valid)
        log_p = None if teacher is None else VocabParallelKernels.log_probs(teacher, lse[1], temperature, num_valid)
        phi, b = terms(log_q, fast_exp(log_q), log_p, coef)
        return torch.stack((phi.sum(dim=-1), b.sum(dim=-1)))

    @staticmethod
    def divergence_grad(
        out: Tensor, student: Tensor, teacher: Optional[Tensor], saved: Tensor, grad_scale: Tensor,
        temperature: float, num_valid: int, coef: float, *, terms: Terms,
    ) -> None:  # fmt: skip
        """out = dD/dz = (b - q * sum_v b_v) * grad_scale / T, b recomputed from the logits.

        ``saved`` rows: the two log-normalizers and sum_v b_v from the forward.
        """
        log_q = VocabParallelKernels.log_probs(student, saved[0], temperature, num_valid)
        log_p = None if teacher is None else VocabParallelKernels.log_probs(teacher, saved[1], temperature, num_valid)
        q = fast_exp(log_q)
        _, b = terms(log_q, q, log_p, coef)
        torch.mul(torch.addcmul(b, q, saved[2][:, None], value=-1.0), (grad_scale / temperature)[:, None], out=out)

    @staticmethod
    def target_partials(
        student: Tensor, target: Tensor, lse: Tensor, temperature: float, num_valid: int, coef: float
    ) -> Tensor:
        """[2, C]: log q_y = z_y / T - lse of the target y on the rank holding it (``target`` >= 0), else 0."""
        x = VocabParallelKernels.scaled_logits(student, temperature, num_valid)
        picked = x.gather(1, target.clamp(min=0)[:, None])[:, 0] - lse[0]
        return torch.stack((torch.where(target >= 0, picked, 0.0), torch.zeros_like(picked)))

    @staticmethod
    def target_grad(
        out: Tensor, student: Tensor, target: Tensor, saved: Tensor, grad_scale: Tensor,
        temperature: float, num_valid: int, coef: float,
    ) -> None:  # fmt: skip
        """out = d log q_y / dz = (onehot(y) - q) * grad_scale / T."""
        scale = grad_scale / temperature
        q = fast_exp(VocabParallelKernels.log_probs(student, saved[0], temperature, num_valid))
        hit = torch.where(target >= 0, scale, 0.0)[:, None]
        out.copy_((q * -scale[:, None]).scatter_add(1, target.clamp(min=0)[:, None], hit))


@functools.lru_cache(maxsize=None)
def compiled(kernel: Callable, terms: Optional[Terms] = None) -> Callable:
    """``torch.compile`` of a kernel (with its divergence bound), built once per process.

    Dynamic shapes: the last chunk of a call and other batch shapes reuse the same code.
    """
    fn = kernel if terms is None else functools.partial(kernel, terms=terms)
    return torch.compile(fn, dynamic=True)
