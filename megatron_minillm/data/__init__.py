"""Instruction and pretraining data: file formats, prompt templates, tokenizers, indexed datasets.

``tools/preprocess_data.py`` writes the datasets (:mod:`.preprocess`); the trainer and the
evaluator read them with :class:`InstructionDataset` and :class:`PretrainDataset`, after
:func:`check_dataset_matches` has checked them against the model's tokenizer and the run's limits.
"""

from megatron_minillm.data.datasets import DatasetLayoutError, InstructionDataset, PretrainDataset
from megatron_minillm.data.formats import FORMATS, DataFormatError, Example, parse_row, read_rows
from megatron_minillm.data.preprocess import (
    InstructionConfig,
    PreprocessConfig,
    Summary,
    preprocess_instructions,
    preprocess_pretrain,
)
from megatron_minillm.data.summary import check_dataset_matches, read_dataset_summary
from megatron_minillm.data.templates import TEMPLATES, TemplateError, render_prompt
from megatron_minillm.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenizerMismatchError,
    check_tokenizers_compatible,
    load_tokenizer,
)

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "DataFormatError",
    "DatasetLayoutError",
    "Example",
    "InstructionConfig",
    "InstructionDataset",
    "PreprocessConfig",
    "PretrainDataset",
    "Summary",
    "TemplateError",
    "Tokenizer",
    "TokenizerError",
    "TokenizerMismatchError",
    "check_dataset_matches",
    "check_tokenizers_compatible",
    "load_tokenizer",
    "parse_row",
    "preprocess_instructions",
    "preprocess_pretrain",
    "read_dataset_summary",
    "read_rows",
    "render_prompt",
]
