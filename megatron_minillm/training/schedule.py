"""Run micro-batches through megatron's pipeline schedule (1F1B for PP > 1, plain loop otherwise)."""

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model

from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.models.logits import logits_at
from megatron_minillm.platform import device

# (micro-batch, vocab-parallel logits [b, s, V/TP] or [1, n, V/TP]) -> (scalar loss, metrics to report)
LossFunc = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (micro-batch, vocab-parallel logits) -> anything to keep (forward only, e.g. a teacher's logits)
OutputFunc = Callable[[MicroBatch, torch.Tensor], Any]


def _forward_step(func: Callable, collect: bool, data: Iterator[MicroBatch], model: torch.nn.Module):
    batch = next(data)
    args = (batch.tokens, batch.position_ids, None)
    positions = batch.logit_positions
    logits = model(*args) if positions is None else logits_at(model, *args, positions)
    if collect:  # megatron's non-loss path: the schedule stores func's result, no loss, no backward
        return logits, lambda output, non_loss_data: func(batch, output)
    return logits, partial(_loss, func, batch)


def _loss(loss_func: LossFunc, batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss, metrics = loss_func(batch, logits)
    # megatron scales the returned loss in place (/= num_microbatches): a metric that is the loss
    # itself (detached, same storage) must not see that.
    return loss.clone(), metrics


def _schedule(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    func: Callable,
    forward_only: bool,
    collect: bool,
    pg_collection: ProcessGroupCollection | None = None,
) -> list:
    batch_size, seq_length = micro_batches[0].tokens.shape
    groups = {}
    if pg_collection is not None:  # a model on its own layout: its pipeline, not megatron's global one
        config = unwrap_model(model).config
        groups = dict(p2p_communicator=P2PCommunicator(pg_collection.pp, config), pg_collection=pg_collection)
    return get_forward_backward_func(pp_size=pg_collection.pp.size() if pg_collection else None)(
        forward_step_func=partial(_forward_step, func, collect),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect,
        **groups,
    )


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_func: LossFunc,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) every micro-batch; return the metrics dicts (last stage only).

    Every micro-batch must have the same [b, s] shape: the pipeline sends fixed-size activations.
    """
    return _schedule(model, micro_batches, loss_func, forward_only, collect=False)


@torch.no_grad()
def forward_outputs(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    output_func: OutputFunc,
    pg_collection: ProcessGroupCollection | None = None,
) -> list:
    """Forward only; ``output_func(batch, logits)`` of every micro-batch, in order, on the last
    pipeline stage ([] elsewhere): megatron's ``collect_non_loss_data`` path, for outputs that are
    not a loss (a teacher's logits, evaluation statistics). ``pg_collection``: the groups of a model
    built on its own layout (None: megatron's global ones)."""
    return _schedule(model, micro_batches, output_func, forward_only=True, collect=True, pg_collection=pg_collection)


class NonFiniteLossError(FloatingPointError):
    """A loss that is NaN or infinite: training stops before the optimizer applies it."""


def check_finite(metrics: list[dict[str, torch.Tensor]], where: str) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank saw a non-finite metric
    (metrics live on the last pipeline stage; the flag is all-reduced so no rank is left waiting)."""
    bad = sorted({name for m in metrics for name, v in m.items() if not math.isfinite(float(v))})
    flag = torch.tensor([1.0 if bad else 0.0], device=device())
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
    micro_batches: Sequence[MicroBatch],
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
