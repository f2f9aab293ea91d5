"""Language-modelling (cross-entropy) loss on vocab-parallel logits: SFT and the L_PT term."""

import torch

from megatron_minillm.losses.distillation import token_log_probs


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Token-mean CE of ``labels`` under vocab-parallel ``logits`` [b, s, V/TP], over ``loss_mask``.

    Only [b, s] statistics cross TP ranks; padded vocabulary entries are excluded from the softmax.
    """
    return -token_log_probs(logits, labels, loss_mask, vocab_size=vocab_size, reduction="token_mean")
