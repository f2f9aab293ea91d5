"""Wrap a model in megatron-core DDP and build its (optionally distributed) optimizer.

This is the wiring Megatron-LM's ``training.py`` does, in one place: the DDP and optimizer configs
must agree on ``use_distributed_optimizer``, and the model config must know how to skip gradient
sync between micro-batches and how to finalize gradients after the last one.
"""

from dataclasses import replace

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def setup_model_and_optimizer(
    model: GPTModel,
    optimizer_config: OptimizerConfig,
    ddp_config: DistributedDataParallelConfig | None = None,
    train_iters: int = 1,
    lr_warmup_iters: int = 0,
    lr_decay_style: str = "constant",
) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Return ``(ddp_model, optimizer, scheduler)`` for a student (the teacher is never wrapped).

    The scheduler is not optional: it is what applies megatron's per-group weight-decay multipliers
    (no decay on biases and norms); without it every group decays with ``weight_decay``.
    The schedule counts optimizer steps (iterations).
    """
    ddp_config = replace(
        ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        model.config.grad_sync_func = ddp_model.start_grad_sync
    # min_lr=None reaches the parameter groups and breaks cosine/linear decay (None arithmetic).
    optimizer_config = replace(optimizer_config, min_lr=optimizer_config.min_lr or 0.0)
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if lr_warmup_iters else optimizer_config.lr,
        max_lr=optimizer_config.lr,
        min_lr=optimizer_config.min_lr or 0.0,
        lr_warmup_steps=lr_warmup_iters,
        lr_decay_steps=max(train_iters, lr_warmup_iters + 1),
        lr_decay_style=lr_decay_style,
        start_wd=optimizer_config.weight_decay,
        end_wd=optimizer_config.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return ddp_model, optimizer, scheduler
