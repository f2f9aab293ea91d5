"""The output layer only where logits are used.

Losses read the logits at the response positions only, and decoding at each sequence's newest
position only; the output layer at the other positions (prompt, padding) costs as many FLOPs as a
few transformer layers of a small model and produces the largest activation of any model ([b, s, V/TP]
logits, with their gradient). So the last pipeline stage runs the decoder, picks the positions, and
applies the output layer itself on this rank's vocabulary slice.

Under sequence parallelism the decoder's output is this TP rank's share of the sequence,
[s/TP, b, h]: :func:`logits_at` gathers the whole sequence before picking, and the decode path runs
the model with sequence parallelism switched off (:func:`sequence_parallel_off`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import unwrap_model
from torch import Tensor

# Module attributes megatron copies from ``config.sequence_parallel`` at construction and reads at run
# time: the linear layers' (and TE modules') ``sequence_parallel``, the embeddings' reduce-scatter.
_SEQUENCE_PARALLEL_ATTRIBUTES = ("sequence_parallel", "reduce_scatter_embeddings")


@contextmanager
def decoder_output_only(model: GPTModel) -> Iterator[None]:
    """Make the last stage return the decoder's hidden states [s, b, h] (after the final norm;
    [s/TP, b, h] under sequence parallelism) instead of its logits."""
    post_process = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = post_process


@contextmanager
def sequence_parallel_off(model: GPTModel) -> Iterator[None]:
    """Run ``model`` as if it were built without sequence parallelism; no-op for a model without it.

    For the decode path: a KV-cache step feeds one token per sequence, which cannot be split over TP
    ranks, and megatron-core 0.16.1's inference supports SP only for MoE layers (it switches SP off
    for the others the same way). megatron reads ``config.sequence_parallel`` at run time, and copies
    it into module attributes at construction: both are switched off here and restored on exit. Not
    megatron's ``set_model_to_sequence_parallel``: it keeps its module lists in a module-global cache
    keyed by ``id(model)``, never freed, which a later model at a reused address would hit.
    Parameters keep their ``sequence_parallel`` tag (it only matters to ``finalize_model_grads``).
    """
    config = model.config  # the one object all of the model's modules hold
    if not config.sequence_parallel:
        yield
        return
    saved = [(config, "sequence_parallel", True)]
    saved += [
        (module, name, getattr(module, name))
        for module in model.modules()
        for name in _SEQUENCE_PARALLEL_ATTRIBUTES
        if isinstance(getattr(module, name, None), bool)
    ]
    for owner, name, _ in saved:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def output_logits(model: GPTModel, hidden: Tensor) -> Tensor:
    """This rank's vocabulary slice of the logits of ``hidden`` [s, b, h]: [s, b, V/TP].

    ``hidden`` holds whole sequences (or positions picked from them), also under sequence
    parallelism: the output layer then runs as if built without it, for this call. With it, megatron's
    ColumnParallelLinear would all-gather its input along the sequence again and reduce-scatter the
    input's gradient; without it, the input passes as it is and its gradient (this rank's vocabulary
    share) is all-reduced over TP, as without SP. (megatron's GPTModel switches the same attribute
    for its dynamic-batching inference.)
    """
    layer = model.output_layer
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    sequence_parallel, layer.sequence_parallel = layer.sequence_parallel, False
    try:
        logits, _ = layer(hidden, weight=weight, runtime_gather_output=False)
    finally:
        layer.sequence_parallel = sequence_parallel
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
        hidden = model(tokens, position_ids, attention_mask)  # [s, b, h]; [s/TP, b, h] under SP
    if inner.config.sequence_parallel:
        # The whole sequence on every TP rank. Backward keeps this rank's chunk of the gradient
        # only, not a reduce-scatter: output_logits has already all-reduced it over TP, and
        # only at the n picked positions rather than at all s x b.
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=inner.pg_collection.tp
        )
    seq = hidden.shape[0]
    picked = hidden[positions % seq, positions // seq]  # [n, h]
    return output_logits(inner, picked.unsqueeze(1)).transpose(0, 1)  # [1, n, V/TP]
