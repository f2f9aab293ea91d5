"""The algorithms: one :class:`Objective` per algorithm, each in its own file with the paper's
formulas it uses as named functions (MiniLLM's in ``minillm.py``); :data:`OBJECTIVES` by config name."""

from megatron_minillm.algorithms.kd import KD
from megatron_minillm.algorithms.minillm import MiniLLM
from megatron_minillm.algorithms.objective import BatchKind, Objective, token_normalize
from megatron_minillm.algorithms.rkl_offpolicy import ReverseKLOffPolicy
from megatron_minillm.algorithms.sft import SFT, SeqKD

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (MiniLLM, SFT, KD, SeqKD, ReverseKLOffPolicy)}

__all__ = [
    "KD",
    "OBJECTIVES",
    "SFT",
    "BatchKind",
    "MiniLLM",
    "Objective",
    "ReverseKLOffPolicy",
    "SeqKD",
    "token_normalize",
]
