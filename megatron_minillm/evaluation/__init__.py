"""Evaluation metrics (Rouge-L, calibration, exposure bias, lengths) and result reports.

The evaluator that generates and scores at any layout is :mod:`.evaluate` (not imported here: it
pulls in megatron-core; the metrics and reports need none of it). See docs/evaluation.md.
"""

from megatron_minillm.evaluation.metrics import (
    ExposureBias,
    corpus_rouge_l,
    expected_calibration_error,
    exposure_bias,
    length_stats,
    mean_std,
    next_token_ece,
    rouge_l,
)
from megatron_minillm.evaluation.report import (
    ModelResults,
    markdown_table,
    merge_results,
    method_name,
    to_json,
    write_report,
)

__all__ = [
    "ExposureBias",
    "ModelResults",
    "corpus_rouge_l",
    "expected_calibration_error",
    "exposure_bias",
    "length_stats",
    "markdown_table",
    "mean_std",
    "merge_results",
    "method_name",
    "next_token_ece",
    "rouge_l",
    "to_json",
    "write_report",
]
