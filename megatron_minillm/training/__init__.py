"""Training plumbing: megatron DDP + optimizer, and the pipeline schedule over micro-batches."""

from megatron_minillm.training.optimizer import setup_model_and_optimizer
from megatron_minillm.training.schedule import NonFiniteLossError, forward_backward, train_step

__all__ = ["NonFiniteLossError", "forward_backward", "setup_model_and_optimizer", "train_step"]
