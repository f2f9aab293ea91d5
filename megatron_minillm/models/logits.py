"""The output layer only where logits are used.

Losses read the logits at the response positions only, and decoding at each sequence's newest
position only; the output layer at the other positions (prompt, padding) costs as many FLOPs as a
few transformer layers of a small model and produces the largest activation of any model ([b, s, V/TP]
logits, with their gradient). So the last pipeline stage runs the decoder, picks the positions, and
applies the output layer itself on this rank's vocabulary slice.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import unwrap_model
from torch import Tensor


@contextmanager
def decoder_output_only(model: GPTModel) -> Iterator[None]:
    """Make the last stage return the decoder's hidden states [s, b, h] (after the final norm)
    instead of its logits."""
    post_process = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = post_process


def output_logits(model: GPTModel, hidden: Tensor) -> Tensor:
    """This rank's vocabulary slice of the logits of ``hidden`` [s, b, h]: [s, b, V/TP] (no sequence
    parallelism: ``builder.transformer_config`` refuses it)."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=False)
    return logits


def logits_at(
    model: torch.nn.Module, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor | None, positions: Tensor
) -> Tensor:
    """The model's vocab-parallel logits at ``positions`` [n] (flat indices into [b, s], row-major),
    as [1, n, V/TP]: the same values as ``model(...)`` [b, s, V/TP] there, in that order.

    ``model`` may be wrapped (DDP); stages before the last return their output for the next stage.
    """
    inner = unwrap_model(model)
    if not inner.post_process:
        return model(tokens, position_ids, attention_mask)
    with decoder_output_only(inner):
        hidden = model(tokens, position_ids, attention_mask)  # [s, b, h]
    seq = hidden.shape[0]
    picked = hidden[positions % seq, positions // seq]  # [n, h]
    return output_logits(inner, picked.unsqueeze(1)).transpose(0, 1)  # [1, n, V/TP]
