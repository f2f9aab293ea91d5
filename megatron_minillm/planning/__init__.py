"""Planning a run before launching it: per-GPU memory of a teacher/student layout (docs/memory.md)."""

from megatron_minillm.planning.memory import (
    KNOWN_MODELS,
    Layout,
    MemoryBreakdown,
    PlanConfig,
    PlanError,
    format_breakdown,
    plan_memory,
    resolve_model,
    search_layouts,
    stage_parameters,
    suggest_layouts,
)

__all__ = [
    "KNOWN_MODELS",
    "Layout",
    "MemoryBreakdown",
    "PlanConfig",
    "PlanError",
    "format_breakdown",
    "plan_memory",
    "resolve_model",
    "search_layouts",
    "stage_parameters",
    "suggest_layouts",
]
