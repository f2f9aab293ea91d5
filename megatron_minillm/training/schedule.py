"""Run micro-batches through megatron's pipeline schedule (1F1B for PP > 1, plain loop otherwise)."""

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_minillm.models.logits import logits_at

# A micro-batch: "tokens", "position_ids" [b, s], optional "attention_mask", and for the loss whatever
# it reads. With "logit_positions" [n] (flat indices into [b, s], see :func:`logit_positions`) the
# last stage computes the logits at those positions only, as [1, n, V/TP]: pick per-token tensors
# the same way with :func:`at_logit_positions`.
Batch = dict[str, torch.Tensor]
# (micro-batch, vocab-parallel logits [b, s, V/TP] or [1, n, V/TP]) -> (scalar loss, metrics to report)
LossFunc = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def logit_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """The flat [b, s] indices where ``loss_mask`` is non-zero, row-major."""
    return loss_mask.reshape(-1).nonzero().squeeze(1)


def at_logit_positions(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    """Per-token ``values`` [b, s, ...] in the layout of the batch's logits: [1, n, ...] at its
    "logit_positions", unchanged without them."""
    positions = batch.get("logit_positions")
    return values if positions is None else values.flatten(0, 1)[positions].unsqueeze(0)


def scatter_logit_positions(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`at_logit_positions` for [1, n] values: [b, s], 0 elsewhere."""
    positions = batch.get("logit_positions")
    if positions is None:
        return values
    out = values.new_zeros(batch["tokens"].numel())
    out[positions] = values[0]
    return out.view_as(batch["tokens"])


def _forward_step(loss_func: LossFunc, data: Iterator[Batch], model: torch.nn.Module):
    batch = next(data)
    args = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    positions = batch.get("logit_positions")
    logits = model(*args) if positions is None else logits_at(model, *args, positions)
    return logits, partial(loss_func, batch)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    loss_func: LossFunc,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) every micro-batch; return the metrics dicts (last stage only).

    Every micro-batch must have the same [b, s] shape: the pipeline sends fixed-size activations.
    """
    batch_size, seq_length = micro_batches[0]["tokens"].shape
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )


class NonFiniteLossError(FloatingPointError):
    """A loss that is NaN or infinite: training stops before the optimizer applies it."""


def check_finite(metrics: list[dict[str, torch.Tensor]], where: str) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank saw a non-finite metric
    (metrics live on the last pipeline stage; the flag is all-reduced so no rank is left waiting)."""
    bad = sorted({name for m in metrics for name, v in m.items() if not math.isfinite(float(v))})
    flag = torch.tensor([1.0 if bad else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        names = ", ".join(bad) if bad else "a loss term on another rank"
        raise NonFiniteLossError(
            f"{where}: non-finite {names}; stopping before the optimizer step "
            "(lower the learning rate, check the data, or resume from the last checkpoint)"
        )


def train_step(
    model: torch.nn.Module,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    micro_batches: Sequence[Batch],
    loss_func: LossFunc,
    where: str = "train step",
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns metrics, grad norm."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model, micro_batches, loss_func)
    check_finite(metrics, where)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return metrics, grad_norm
