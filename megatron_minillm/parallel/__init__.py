"""Process groups and parallel layouts (torchrun / SLURM -> megatron parallel_state)."""

from megatron_minillm.parallel.initialize import (
    LayoutError,
    ParallelLayout,
    destroy_distributed,
    init_distributed,
    set_random_seed,
)

__all__ = ["LayoutError",
    "set_random_seed", "ParallelLayout", "destroy_distributed", "init_distributed"]
