"""Process groups and parallel layouts (torchrun / SLURM -> megatron parallel_state), and the
vocabulary split over a TP group (``parallel.vocab``: ranges, padding, TP collectives)."""

from megatron_minillm.parallel.initialize import (
    LayoutError,
    ParallelLayout,
    destroy_distributed,
    init_distributed,
    new_model_groups,
    set_random_seed,
)

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "destroy_distributed",
    "init_distributed",
    "new_model_groups",
    "set_random_seed",
]
