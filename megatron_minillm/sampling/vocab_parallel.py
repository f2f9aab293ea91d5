"""Vocab-parallel primitives for sampling: each TP rank holds logits [b, V/TP] of its vocabulary
slice, and only [b]-sized (or [b, k]-sized) values cross ranks. No rank gathers the vocabulary.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

NEG_INF = float("-inf")


def tp_all_reduce(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over megatron's TP group (a no-op at TP=1); returns ``tensor``."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def vocab_start(shard_size: int) -> int:
    """The first vocabulary id of this rank's slice."""
    return parallel_state.get_tensor_model_parallel_rank() * shard_size


def log_softmax(logits: Tensor) -> Tensor:
    """Full-vocabulary log-softmax of a [b, V/TP] slice (float64 math for the normalizer)."""
    row_max = tp_all_reduce(logits.amax(-1), dist.ReduceOp.MAX)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = logits - row_max[:, None]
    sum_exp = tp_all_reduce(shifted.exp().sum(-1, dtype=torch.float64))
    sum_exp = torch.where(sum_exp > 0, sum_exp, torch.ones_like(sum_exp))  # an all -inf row stays -inf
    return shifted - sum_exp.log().to(logits.dtype)[:, None]


def argmax(values: Tensor) -> Tensor:
    """Global argmax ids [b] of a [b, V/TP] slice; ties go to the smallest id at any TP."""
    best, local = values.max(-1)
    top = tp_all_reduce(best.clone(), dist.ReduceOp.MAX)
    ids = local + vocab_start(values.shape[-1])
    # max() returns the first maximum within the slice; MIN over ranks keeps the smallest id overall.
    ids = torch.where(best == top, ids, torch.full_like(ids, torch.iinfo(ids.dtype).max))
    return tp_all_reduce(ids, dist.ReduceOp.MIN)


def gather_ids(values: Tensor, ids: Tensor) -> Tensor:
    """values[i, ids[i]] [b] from the rank that holds each id (others add 0)."""
    local = ids - vocab_start(values.shape[-1])
    mine = (local >= 0) & (local < values.shape[-1])
    picked = values.gather(-1, local.clamp(0, values.shape[-1] - 1)[:, None])[:, 0]
    return tp_all_reduce(torch.where(mine, picked, torch.zeros_like(picked)))


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """-inf outside the k largest logits of each row (ties with the k-th are kept, as in HF)."""
    k_local = min(k, logits.shape[-1])
    candidates = logits.topk(k_local, dim=-1).values
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        gathered = [torch.empty_like(candidates) for _ in range(tp)]
        dist.all_gather(gathered, candidates.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        candidates = torch.cat(gathered, dim=-1)
    kth = candidates.topk(min(k, candidates.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(logits: Tensor, top_p: float, rounds: int = 8, points: int = 64) -> Tensor:
    """-inf outside the nucleus: keep token v iff the mass of tokens with logits <= z_v exceeds
    1 - top_p (HF's TopPLogitsWarper, with ties kept together).

    The cut is a logit value found by a ``points``-ary search: each round evaluates the mass below
    ``points`` candidate cuts per row from this rank's sorted slice and all-reduces a [b, points]
    tensor; ``rounds`` x log2(points) = 48 bits of resolution on the logit range.
    """
    z = logits.double()
    finite = torch.isfinite(z)
    probs = log_softmax(z).exp()
    sorted_z, order = torch.where(finite, z, torch.full_like(z, torch.inf)).sort(dim=-1)
    cum = probs.gather(-1, order).cumsum(-1)
    lo = tp_all_reduce(torch.where(finite, z, torch.full_like(z, torch.inf)).amin(-1), dist.ReduceOp.MIN) - 1
    hi = tp_all_reduce(z.amax(-1), dist.ReduceOp.MAX)
    steps = torch.linspace(0, 1, points + 1, dtype=z.dtype)[1:]
    for _ in range(rounds):
        cuts = lo[:, None] + (hi - lo)[:, None] * steps  # [b, points], the last equals hi
        idx = torch.searchsorted(sorted_z, cuts, right=True)
        below = torch.where(idx > 0, cum.gather(-1, (idx - 1).clamp(min=0)), torch.zeros_like(cuts))
        below = tp_all_reduce(below)
        ok = below <= 1 - top_p  # monotone in the cut: True for a prefix of the points
        n_ok = ok.sum(-1)
        new_lo = torch.where(n_ok > 0, cuts.gather(-1, (n_ok - 1).clamp(min=0)[:, None])[:, 0], lo)
        hi = cuts.gather(-1, n_ok.clamp(max=points - 1)[:, None])[:, 0]
        lo = new_lo
    return logits.masked_fill(z <= lo[:, None], NEG_INF)
