"""The sampler's searches over a vocab-parallel slice: argmax with its tie rule, top-k and top-p.

Each TP rank holds logits [b, V/TP] of its vocabulary slice, and only [b]-sized (or [b, k]-, [b,
points]-sized) values cross ranks: no rank gathers the vocabulary. The split itself (slice ranges,
the TP all-reduce, the log-softmax and the id gather) is ``parallel/vocab.py``'s. Every function
takes the ``tp_group`` the vocabulary is split over (None: megatron's global TP group).
"""

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.parallel.vocab import log_softmax, resolve_tp_group, tp_all_reduce, vocab_slice

NEG_INF = float("-inf")


def argmax(values: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Global argmax ids [b] of a [b, V/TP] slice; ties go to the smallest id at any TP, so the
    result does not depend on how the vocabulary is split."""
    best, local = values.max(-1)
    top = tp_all_reduce(best.clone(), dist.ReduceOp.MAX, tp_group)
    ids = local + vocab_slice(values.shape[-1], tp_group=tp_group)[0]
    # max() returns the first maximum within the slice; MIN over ranks keeps the smallest id overall.
    ids = torch.where(best == top, ids, torch.full_like(ids, torch.iinfo(ids.dtype).max))
    return tp_all_reduce(ids, dist.ReduceOp.MIN, tp_group)


def top_k_mask(logits: Tensor, k: int, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """-inf outside the k largest logits of each row (ties with the k-th are kept, as in HF)."""
    k_local = min(k, logits.shape[-1])
    candidates = logits.topk(k_local, dim=-1).values  # [b, k]
    group = resolve_tp_group(tp_group)
    tp = dist.get_world_size(group)
    if tp > 1:
        gathered = [torch.empty_like(candidates) for _ in range(tp)]
        dist.all_gather(gathered, candidates.contiguous(), group=group)
        candidates = torch.cat(gathered, dim=-1)  # [b, TP * k]
    kth = candidates.topk(min(k, candidates.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(
    logits: Tensor, top_p: float, rounds: int = 8, points: int = 64, tp_group: dist.ProcessGroup | None = None
) -> Tensor:
    """-inf outside the nucleus: keep token v iff the mass of tokens with logits <= z_v exceeds
    1 - top_p (HF's TopPLogitsWarper, with ties kept together).

    The cut is a logit value found by a ``points``-ary search: each round evaluates the mass below
    ``points`` candidate cuts per row from this rank's sorted slice and all-reduces a [b, points]
    tensor; ``rounds`` x log2(points) = 48 bits of resolution on the logit range.
    """
    z = logits.double()
    finite = torch.isfinite(z)
    probs = log_softmax(z, tp_group).exp()
    sorted_z, order = torch.where(finite, z, torch.full_like(z, torch.inf)).sort(dim=-1)
    cum = probs.gather(-1, order).cumsum(-1)
    lowest = torch.where(finite, z, torch.full_like(z, torch.inf)).amin(-1)
    lo = tp_all_reduce(lowest, dist.ReduceOp.MIN, tp_group) - 1
    hi = tp_all_reduce(z.amax(-1), dist.ReduceOp.MAX, tp_group)
    steps = torch.linspace(0, 1, points + 1, dtype=z.dtype, device=z.device)[1:]
    for _ in range(rounds):
        cuts = lo[:, None] + (hi - lo)[:, None] * steps  # [b, points], the last equals hi
        idx = torch.searchsorted(sorted_z, cuts, right=True)
        below = torch.where(idx > 0, cum.gather(-1, (idx - 1).clamp(min=0)), torch.zeros_like(cuts))
        below = tp_all_reduce(below, tp_group=tp_group)
        ok = below <= 1 - top_p  # monotone in the cut: True for a prefix of the points
        n_ok = ok.sum(-1)
        new_lo = torch.where(n_ok > 0, cuts.gather(-1, (n_ok - 1).clamp(min=0)[:, None])[:, 0], lo)
        hi = cuts.gather(-1, n_ok.clamp(max=points - 1)[:, None])[:, 0]
        lo = new_lo
    return logits.masked_fill(z <= lo[:, None], NEG_INF)
