"""The formulas of the distillation algorithms (MiniLLM's policy gradient) as per-token functions;
the trainer (``training/trainer.py``) wires them to rollouts and micro-batches."""
