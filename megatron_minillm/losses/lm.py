"""Language-modelling (cross-entropy) loss on vocab-parallel logits: SFT and the L_PT term."""

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_minillm.models.vocab import mask_padded_vocab


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Token-mean CE of ``labels`` under vocab-parallel ``logits`` [b, s, V/TP], over ``loss_mask``.

    Only [b, s] statistics cross TP ranks (megatron's ``vocab_parallel_cross_entropy``); padded
    vocabulary entries are excluded from the softmax.
    """
    masked = mask_padded_vocab(logits.float(), vocab_size)
    if masked is logits:
        masked = masked.clone()  # megatron's CE subtracts the max in place: keep the caller's logits
    per_token = vocab_parallel_cross_entropy(masked, labels)
    mask = loss_mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
