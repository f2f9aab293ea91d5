"""Per-chunk math of the vocab-parallel losses, as pure functions of tensors.

A chunk is [C, V/TP] rows of this rank's logits (any float dtype; math in fp32, or fp64 for fp64
inputs). Nothing here communicates: the driver (``vocab_parallel.py``) all-reduces the [C]
statistics between calls. Being pure, each function runs eagerly or through ``torch.compile``,
which fuses a chunk's elementwise work into a few passes over it.

Every loss computes, next to its value, its gradient per unit upstream gradient (``out``) while the
chunk is still in cache; the backward only scales those rows. The reverse KL, the workhorse of
MiniLLM, has its own kernels (``reverse_kl_*``): two exponentials per logit in all, against three
to five for the generic ``divergence_*`` kernels, which serve every formula of ``divergences.py``.
"""

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_minillm.losses.divergences import Terms, fast_exp

_LOG2_E = 1.4426950408889634


def _lowest(x: Tensor) -> float:
    return torch.finfo(x.dtype).min


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
        return log_p.clamp(min=_lowest(log_p))

    @staticmethod
    def divergence_partials(
        student: Tensor,
        teacher: Tensor | None,
        lse: Tensor,
        temperature: float,
        num_valid: int,
        coef: float,
        *,
        terms: Terms,
    ) -> Tensor:
        """[2, C]: this slice's sum_v phi_v (the divergence) and sum_v b_v (for the gradient).

        ``lse`` rows: the student's and the teacher's full-vocabulary log-normalizers.
        """
        log_q = VocabParallelKernels.log_probs(student, lse[0], temperature, num_valid)
        log_p = None if teacher is None else VocabParallelKernels.log_probs(teacher, lse[1], temperature, num_valid)
        phi, b = terms(log_q, fast_exp(log_q), log_p, coef)
        return torch.stack((phi.sum(dim=-1), b.sum(dim=-1)))

    @staticmethod
    def divergence_grad(
        out: Tensor,
        student: Tensor,
        teacher: Tensor | None,
        saved: Tensor,
        weight: Tensor,
        temperature: float,
        num_valid: int,
        coef: float,
        *,
        terms: Terms,
    ) -> None:
        """out = weight * dD/dz = weight (b - q * sum_v b_v) / T, ``weight`` [C] per token.

        ``saved`` rows: the two log-normalizers and sum_v b_v (over the full vocabulary).
        """
        log_q = VocabParallelKernels.log_probs(student, saved[0], temperature, num_valid)
        log_p = None if teacher is None else VocabParallelKernels.log_probs(teacher, saved[1], temperature, num_valid)
        q = fast_exp(log_q)
        _, b = terms(log_q, q, log_p, coef)
        torch.mul(torch.addcmul(b, q, saved[2][:, None], value=-1.0), (weight / temperature)[:, None], out=out)

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
        out: Tensor,
        student: Tensor,
        target: Tensor,
        saved: Tensor,
        weight: Tensor,
        temperature: float,
        num_valid: int,
        coef: float,
    ) -> None:
        """out = weight * d log q_y / dz = weight (onehot(y) - q) / T."""
        scale = (weight / temperature).to(saved.dtype)
        q = fast_exp(VocabParallelKernels.log_probs(student, saved[0], temperature, num_valid))
        hit = torch.where(target >= 0, scale, 0.0)[:, None]
        out.copy_((q * -scale[:, None]).scatter_add(1, target.clamp(min=0)[:, None], hit))

    # Reverse KL. With x = z/T and y = t/T shifted by their row maxima over the full vocabulary
    # (u = x - max x, w = y - max y; a shift of 0 for a row with nothing), e = exp(u), d = u - w,
    # S_q = sum e, S_p = sum exp(w) and A = sum e d:
    #     KL = A / S_q - log S_q + log S_p,   dKL/dz = e / S_q (d - A / S_q) / T
    # (times the token's weight, as every gradient here).
    # Two exponentials per logit; differences are taken against the shifts before anything is
    # summed, so logits of 1e4 lose no precision. Logits are clamped to the lowest finite value first:
    # -inf and padded entries get e = 0 and a finite d, hence exact zeros without a NaN test.

    @staticmethod
    def finite_logits(student: Tensor, teacher: Tensor, temperature: float, num_valid: int) -> tuple[Tensor, Tensor]:
        """x = z/T and y = t/T in the compute dtype, -inf and padded columns (>= ``num_valid``) at the
        lowest finite value."""

        def finite(logits: Tensor) -> Tensor:
            x = logits.to(torch.promote_types(logits.dtype, torch.float32))
            x = (x / temperature if temperature != 1.0 else x).clamp(min=_lowest(x))
            if num_valid < x.shape[-1]:
                x[:, num_valid:] = _lowest(x)
            return x

        return finite(student), finite(teacher)

    @staticmethod
    def _maxima(x: Tensor, y: Tensor) -> Tensor:
        return torch.stack((x.amax(dim=-1), y.amax(dim=-1)))

    @staticmethod
    def _terms(x: Tensor, y: Tensor, maxima: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """e, d [C, V/TP] and this slice's sums [3, C] (S_q, S_p, A) for the full-vocabulary ``maxima``."""
        shift = torch.where(maxima > _lowest(maxima), maxima, 0.0)
        u, w = x - shift[0, :, None], y - shift[1, :, None]
        e, d = fast_exp(u), u - w
        return e, d, torch.stack((e.sum(dim=-1), fast_exp(w).sum(dim=-1), (e * d).sum(dim=-1)))

    @staticmethod
    def _grad(out: Tensor, e: Tensor, d: Tensor, sums: Tensor, weight: Tensor, temperature: float) -> None:
        """out = weight e / S_q (d - A / S_q) / T; 0 for a row with no student mass (S_q = 0, so e = 0).
        The factors go with e: d is near the lowest float at masked entries, where one > 1 would overflow."""
        inv = torch.where(sums[0] > 0, 1.0 / sums[0], 0.0)
        torch.mul(e * (inv * weight / temperature)[:, None], d - (sums[2] * inv)[:, None], out=out)

    @staticmethod
    def reverse_kl_maxima(student: Tensor, teacher: Tensor, temperature: float, num_valid: int) -> Tensor:
        """[2, C]: this slice's row maxima of z/T and t/T (the lowest finite value for a row with nothing)."""
        K = VocabParallelKernels
        return K._maxima(*K.finite_logits(student, teacher, temperature, num_valid))

    @staticmethod
    def reverse_kl_sums(student: Tensor, teacher: Tensor, maxima: Tensor, temperature: float, num_valid: int) -> Tensor:
        """[3, C]: this slice's S_q, S_p and A given the full-vocabulary ``maxima`` [2, C]."""
        x, y = VocabParallelKernels.finite_logits(student, teacher, temperature, num_valid)
        return VocabParallelKernels._terms(x, y, maxima)[2]

    @staticmethod
    def reverse_kl_grad(
        out: Tensor,
        student: Tensor,
        teacher: Tensor,
        maxima: Tensor,
        sums: Tensor,
        weight: Tensor,
        temperature: float,
        num_valid: int,
    ) -> None:
        """out = weight * dKL/dz given the full-vocabulary ``maxima`` [2, C] and ``sums`` [3, C]."""
        x, y = VocabParallelKernels.finite_logits(student, teacher, temperature, num_valid)
        e, d, _ = VocabParallelKernels._terms(x, y, maxima)
        VocabParallelKernels._grad(out, e, d, sums, weight, temperature)

    @staticmethod
    def reverse_kl_chunk(
        out: Tensor | None,
        student: Tensor,
        teacher: Tensor,
        weight: Tensor,
        temperature: float,
        num_valid: int,
    ) -> Tensor:
        """All of a chunk when this rank holds the whole vocabulary (TP = 1), in one call (one graph,
        compiled): the sums [3, C], and weight * dKL/dz into ``out`` unless it is None."""
        K = VocabParallelKernels
        x, y = K.finite_logits(student, teacher, temperature, num_valid)
        e, d, sums = K._terms(x, y, K._maxima(x, y))
        if out is not None:
            K._grad(out, e, d, sums, weight, temperature)
        return sums

    @staticmethod
    def reverse_kl_values(sums: Tensor) -> Tensor:
        """KL [n] from the full-vocabulary sums [3, n]: 0 for a row with no student mass (S_q = 0);
        huge or inf, not NaN, where the teacher has no mass but the student has."""
        s_q, s_p, a = sums
        has_q = s_q > 0
        log_s_p = torch.where(s_p > 0, torch.log(s_p), 0.0)
        return torch.where(has_q, a / s_q - torch.log(s_q) + log_s_p, 0.0)


class _Compilation:
    """Whether this process can compile kernels: after the first failure (e.g. no C++ compiler on a CPU
    machine) it warns once and every loss runs its eager kernels."""

    failed = False

    def give_up(self, error: Exception) -> None:
        if not self.failed:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(f"compiling the loss kernels failed, using eager kernels: {first_line}", stacklevel=3)
        self.failed = True


compilation = _Compilation()


class _CompiledOrEager:
    """``torch.compile`` of a kernel, or the kernel itself once compiling has failed."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)  # dynamic: chunk lengths and shapes vary

    def __call__(self, *args):  # noqa: ANN204 (the kernel's own signature)
        if not compilation.failed:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as error:  # raised before the kernel runs
                compilation.give_up(error)
        return self.fn(*args)


@functools.cache
def kernel(fn: Callable, terms: Terms | None, use_compile: bool) -> Callable:
    """A kernel with its divergence bound, compiled (built once per process) or eager."""
    bound = fn if terms is None else functools.partial(fn, terms=terms)
    return _CompiledOrEager(bound) if use_compile else bound
