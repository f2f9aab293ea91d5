"""Losses on vocab-parallel logits."""

from megatron_minillm.losses.lm import masked_lm_loss

__all__ = ["masked_lm_loss"]
