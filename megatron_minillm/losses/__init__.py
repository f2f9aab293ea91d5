"""Losses on vocab-parallel logits: LM cross-entropy, token log-probabilities, distillation divergences.

Only [tokens] statistics cross TP ranks; see ``vocab_parallel.py`` for the chunked computation and
``divergences.py`` for the formulas.
"""

from megatron_minillm.losses.distillation import (
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_log_probs,
    total_variation_distance,
)
from megatron_minillm.losses.lm import masked_lm_loss
from megatron_minillm.losses.reductions import REDUCTIONS, Reduction, reduce_tokens
from megatron_minillm.losses.vocab_parallel import KernelOptions

__all__ = [
    "KernelOptions",
    "REDUCTIONS",
    "Reduction",
    "entropy",
    "forward_kl",
    "generalized_jsd",
    "masked_lm_loss",
    "reduce_tokens",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_log_probs",
    "total_variation_distance",
]
