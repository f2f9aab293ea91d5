"""megatron_minillm: on-policy knowledge distillation (MiniLLM) on megatron-core."""

__version__ = "0.1.0"
