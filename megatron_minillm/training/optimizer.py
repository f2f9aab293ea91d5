"""Wrap a model in megatron-core DDP and build its (optionally distributed) optimizer.

This is the wiring Megatron-LM's ``training.py`` does, in one place: the DDP and optimizer configs
must agree on ``use_distributed_optimizer``, and the model config must know how to skip gradient
sync between micro-batches and how to finalize gradients after the last one.
"""

from dataclasses import replace
from typing import Optional

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer


def setup_model_and_optimizer(
    model: GPTModel,
    optimizer_config: OptimizerConfig,
    ddp_config: Optional[DistributedDataParallelConfig] = None,
) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """Return ``(ddp_model, optimizer)`` for a student model (the teacher is never wrapped)."""
    ddp_config = replace(
        ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        model.config.grad_sync_func = ddp_model.start_grad_sync
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    return ddp_model, optimizer
