"""Parallel sampler: KV-cache generation at any TP x PP, vocab-parallel sampling with counter-based
noise (layout-invariant), and teacher-mixed sampling for MiniLLM rollouts."""

from megatron_minillm.sampling.generate import GenerationError, Rollout, Sample, generate, generate_all
from megatron_minillm.sampling.noise import sample_seeds
from megatron_minillm.sampling.params import SamplingParams

__all__ = [
    "GenerationError",
    "Rollout",
    "Sample",
    "SamplingParams",
    "generate",
    "generate_all",
    "sample_seeds",
]
