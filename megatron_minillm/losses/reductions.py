"""Reductions of per-token losses [b, s] over a 0/1 token mask.

All are local to this rank's micro-batch: normalising over data-parallel ranks or micro-batches
is the trainer's business (e.g. reduction="sum" divided by a global token count).
"""

from typing import Literal, get_args

from torch import Tensor

Reduction = Literal["none", "sum", "per_sequence_sum", "per_sequence_mean", "token_mean", "sequence_mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
SCALAR_REDUCTIONS = ("sum", "token_mean", "sequence_mean")  # a weighted sum of the per-token losses


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def token_weights(mask: Tensor, reduction: Reduction) -> Tensor:
    """Weights [b, s] of a scalar reduction (``SCALAR_REDUCTIONS``): the loss is sum(per_token * weights)."""
    if reduction == "sum":
        return mask
    if reduction == "token_mean":
        return mask / mask.sum().clamp(min=1.0)
    lengths = mask.sum(dim=-1, keepdim=True)  # sequence_mean
    return mask / lengths.clamp(min=1.0) / (lengths > 0).sum().clamp(min=1).to(mask.dtype)


def reduce_tokens(per_token: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """Reduce ``per_token`` [b, s] (0 at masked positions) with the 0/1 ``mask`` [b, s].

    - ``none``: [b, s] as is;  ``sum``: scalar sum over valid tokens;
    - ``per_sequence_sum`` / ``per_sequence_mean``: [b], the mean over each sequence's valid tokens;
    - ``token_mean``: scalar mean over all valid tokens (LMOps' default for every loss);
    - ``sequence_mean``: scalar mean over sequences (with >= 1 valid token) of ``per_sequence_mean``:
      length normalisation, every sequence weighs the same whatever its length.
    Empty selections give 0 (and a zero gradient), never NaN.
    """
    check_reduction(reduction)
    if reduction == "none":
        return per_token
    if reduction in SCALAR_REDUCTIONS:
        return (per_token * token_weights(mask, reduction)).sum()
    sums = per_token.sum(dim=-1)
    return sums if reduction == "per_sequence_sum" else sums / mask.sum(dim=-1).clamp(min=1.0)
