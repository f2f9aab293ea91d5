"""Vocabulary padding: megatron pads the vocabulary so that it splits evenly over TP ranks.

The padded rows exist only for the split. :func:`mask_padded_vocab` sets their logits to -inf, so
they never receive probability mass in sampling or in any loss.
"""

import torch
from megatron.core import parallel_state


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest multiple of ``divisible_by * tp`` that holds ``vocab_size`` (Megatron-LM's rule)."""
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(
            f"vocab size ({vocab_size}), TP ({tp}) and make_vocab_size_divisible_by ({divisible_by}) must all be >= 1"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return vocab-parallel ``logits`` [..., V/TP] with columns of ids >= ``vocab_size`` at -inf."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    num_valid = min(max(vocab_size - start, 0), shard)
    if num_valid == shard:
        return logits
    return torch.cat(
        (logits[..., :num_valid], logits.new_full((*logits.shape[:-1], shard - num_valid), float("-inf"))),
        dim=-1,
    )
