"""Language-modelling (cross-entropy) loss on vocab-parallel logits: SFT and the L_PT term."""

import torch
import torch.distributed as dist

from megatron_minillm.losses.distillation import token_log_probs


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Token-mean CE of ``labels`` under vocab-parallel ``logits`` [b, s, V/TP], over ``loss_mask``.

    Only [b, s] statistics cross the ranks of ``tp_group`` (None: megatron's global TP group); padded
    vocabulary entries are excluded from the softmax.
    """
    return -token_log_probs(logits, labels, loss_mask, vocab_size=vocab_size, reduction="token_mean", tp_group=tp_group)
