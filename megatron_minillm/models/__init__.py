"""HF architectures rebuilt as megatron-core GPTModels at any TP x PP."""

from megatron_minillm.models.builder import build_model, check_layout, transformer_config
from megatron_minillm.models.hf_config import (
    Architecture,
    UnsupportedModelError,
    architecture_from_dict,
    load_architecture,
)
from megatron_minillm.parallel.vocab import mask_padded_vocab, padded_vocab_size

__all__ = [
    "Architecture",
    "UnsupportedModelError",
    "architecture_from_dict",
    "build_model",
    "check_layout",
    "load_architecture",
    "mask_padded_vocab",
    "padded_vocab_size",
    "transformer_config",
]
