"""The vocabulary split over a tensor-parallel group: one home for its arithmetic and its collectives.

megatron pads the vocabulary to a multiple of the TP size and gives rank r of the TP group the ids
[r * V/TP, (r + 1) * V/TP) (``VocabUtility``); the embedding rows, the output layer's rows and the
last dimension of the logits [..., V/TP] are split that way. Losses, the sampler, the evaluator and
the checkpoint converters all need the same few things of that split: this rank's id range, how
many of its columns are real ids rather than padding, which rank holds a given id, the TP
all-reduce that combines per-rank statistics, and the slice of a full tensor that a rank holds.

Every function takes the TP group it works over (``tp_group``), megatron-core style: a model built
on its own TP layout (e.g. a teacher beside the student on the same ranks) passes its group; None
falls back to megatron's global TP group of ``parallel_state``. Ranks and sizes are read from the
group itself, never from ``parallel_state``'s getters, so an explicit group is used throughout.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor


def resolve_tp_group(tp_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """``tp_group``, or megatron's global TP group when it is None (megatron-core's fallback for an
    optional ``tp_group``, without its deprecation warning: None is the normal single-layout case)."""
    return parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


def tp_size(tp_group: dist.ProcessGroup | None = None) -> int:
    """The number of ranks the vocabulary is split over."""
    return dist.get_world_size(resolve_tp_group(tp_group))


def vocab_slice(
    shard_size: int, vocab_size: int | None = None, tp_group: dist.ProcessGroup | None = None
) -> tuple[int, int]:
    """This rank's first vocabulary id and the number of its ``shard_size`` columns that hold real ids
    (ids below ``vocab_size``; all of them when it is None). The rest is megatron's vocabulary padding."""
    group = resolve_tp_group(tp_group)
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        shard_size, dist.get_rank(group), dist.get_world_size(group)
    )
    if vocab_size is None:
        return start, shard_size
    return start, min(max(vocab_size - start, 0), shard_size)


def local_columns(ids: Tensor, shard_size: int, tp_group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Each of ``ids``' column in this rank's slice of ``shard_size`` columns, and whether this rank
    holds it (the column is out of range where it does not)."""
    local = ids - vocab_slice(shard_size, tp_group=tp_group)[0]
    return local, (local >= 0) & (local < shard_size)


def tp_all_reduce(
    tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, tp_group: dist.ProcessGroup | None = None
) -> Tensor:
    """In-place all-reduce over the TP group (nothing to do on a group of one rank); returns ``tensor``."""
    group = resolve_tp_group(tp_group)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def log_normalizer(global_max: Tensor, total: Tensor) -> Tensor:
    """log-sum-exp from the global max and the sum of exp(x - max): 0 for a row with nothing (total 0),
    whose probabilities are then exactly 0."""
    return torch.where(total > 0, global_max + torch.log(total), 0.0)


def global_log_normalizer(stats: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Full-vocabulary log-sum-exp [k, C] from per-rank (max, sum of exp) stats [k, 2, C].

    One pass over the logits, for callers that must not revisit them (the losses' chunks): each rank's
    sum is rescaled to the global max before the SUM (as an online softmax does). A row that is -inf
    everywhere gets 0, so its log-probabilities are -inf and its probabilities exactly 0.
    """
    local_max, local_sum = stats[:, 0], stats[:, 1]
    global_max = tp_all_reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
    total = torch.where(local_max > float("-inf"), local_sum * torch.exp(local_max - global_max), 0.0)
    tp_all_reduce(total, dist.ReduceOp.SUM, tp_group)
    return log_normalizer(global_max, total)


def log_softmax(logits: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Full-vocabulary log-softmax of a [b, V/TP] slice (float64 math for the normalizer).

    Two passes over a slice held whole (sampling, evaluation): the global max first, then one SUM of
    exp(z - max); an all -inf row stays -inf.
    """
    row_max = tp_all_reduce(logits.amax(-1), dist.ReduceOp.MAX, tp_group)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = logits - row_max[:, None]  # [b, V/TP]
    sum_exp = tp_all_reduce(shifted.exp().sum(-1, dtype=torch.float64), tp_group=tp_group)
    sum_exp = torch.where(sum_exp > 0, sum_exp, torch.ones_like(sum_exp))
    return shifted - sum_exp.log().to(logits.dtype)[:, None]


def gather_ids(values: Tensor, ids: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """values[i, ids[i]] [b] of a [b, V/TP] slice, from the rank that holds each id (the others add 0)."""
    local, mine = local_columns(ids, values.shape[-1], tp_group)
    picked = values.gather(-1, local.clamp(0, values.shape[-1] - 1)[:, None])[:, 0]
    return tp_all_reduce(torch.where(mine, picked, torch.zeros_like(picked)), tp_group=tp_group)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest multiple of ``divisible_by * tp`` that holds ``vocab_size`` (Megatron-LM's rule)."""
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(
            f"vocab size ({vocab_size}), TP ({tp}) and make_vocab_size_divisible_by ({divisible_by}) must all be >= 1"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def mask_padded_vocab(logits: Tensor, vocab_size: int, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """``logits`` [..., V/TP] with the columns of ids >= ``vocab_size`` (padding) at -inf, so they never
    receive probability mass; the same tensor when this slice has no padding."""
    shard = logits.shape[-1]
    _, num_valid = vocab_slice(shard, vocab_size, tp_group)
    if num_valid == shard:
        return logits
    return torch.cat(
        (logits[..., :num_valid], logits.new_full((*logits.shape[:-1], shard - num_valid), float("-inf"))),
        dim=-1,
    )


def tp_shard(full: Tensor, dim: int, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's part of a full tensor split evenly along ``dim`` over the TP group (a view)."""
    group = resolve_tp_group(tp_group)
    return full.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
