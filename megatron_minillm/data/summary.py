"""``<prefix>_summary.json``: what a preprocessing run wrote, with which tokenizer and length limits,
and the checks that a dataset fits the run that reads it.

A dataset tokenized with another vocabulary trains without a word of complaint (its ids are merely
other tokens), and a ``max_prompt_length`` below the dataset's cuts the end of its prompts (their
``### Response:``): :func:`check_dataset_matches` refuses both, naming the two values. The summary is
written last, so a prefix with a summary is complete; a dataset without one (written before the
summary recorded its tokenizer) is read with a warning.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from megatron_minillm.data.datasets import DatasetLayoutError, InstructionDataset
from megatron_minillm.data.tokenizer import Tokenizer, TokenizerMismatchError

SPLITS = ("train", "valid")
SPLIT_SUFFIXES = (".bin", ".idx", ".jsonl")  # every file of a split (.jsonl: instruction data only)


def summary_path(path_prefix: str | Path) -> Path:
    """``<prefix>_summary.json`` for a split's prefix (``<prefix>_train``, ``<prefix>_valid``) or ``<prefix>``."""
    prefix = str(path_prefix)
    for split in SPLITS:
        if prefix.endswith(f"_{split}"):
            return Path(f"{prefix.removesuffix(f'_{split}')}_summary.json")
    return Path(f"{prefix}_summary.json")


def split_files(prefix: str) -> list[str]:
    """Every file a run into ``prefix`` may write, with the ``.partial`` names it writes them under."""
    return [
        f"{prefix}_{split}{suffix}{partial}"
        for split in SPLITS
        for suffix in SPLIT_SUFFIXES
        for partial in ("", ".partial")
    ]


def tokenizer_record(tokenizer: Tokenizer, source: str | Path) -> dict[str, Any]:
    """What the summary keeps of the tokenizer: enough to tell another vocabulary from this one."""
    return {
        "path": str(source),
        "vocab_size": tokenizer.vocab_size,
        "model_vocab_size": _model_vocab_size(Path(source)),
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "pad_id": tokenizer.pad_id,
        "fingerprint": tokenizer.fingerprint(),
    }


def _model_vocab_size(source: Path) -> int | None:
    """The model's vocabulary when the tokenizer came from a model or checkpoint directory (config.json)."""
    try:
        size = json.loads((source / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def read_dataset_summary(path_prefix: str | Path) -> dict[str, Any] | None:
    """The summary of a dataset (a split's prefix or the run's); None, with a warning, when it has none."""
    path = summary_path(path_prefix)
    if not path.is_file():
        warnings.warn(
            f"{path} not found: cannot check that {path_prefix} fits this run (tokenizer, length limits); "
            "re-run tools/preprocess_data.py to record them",
            stacklevel=2,
        )
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        record = err
    if not isinstance(record, dict):
        raise DatasetLayoutError(
            f"{path} is not a dataset summary ({record}); re-run tools/preprocess_data.py for this prefix"
        )
    return record


def check_dataset_matches(
    path_prefix: str | Path,
    tokenizer: Tokenizer,
    *,
    max_prompt_length: int | None = None,
    max_length: int | None = None,
) -> None:
    """Refuse a dataset this run would misread: tokenized with another vocabulary than ``tokenizer``'s
    (:class:`TokenizerMismatchError`) or, given the run's limits (instruction data), holding prompts
    longer than ``max_prompt_length`` (:class:`DatasetLayoutError`). Warn where it is harmless:
    examples longer than ``max_length`` (their responses lose their ends, as LMOps cuts them), limits
    below the run's, or no summary to check against."""
    record = read_dataset_summary(path_prefix)
    if record is not None:
        _check_tokenizer(record, summary_path(path_prefix), tokenizer)
    if max_prompt_length is not None and max_length is not None:
        limits = (record or {}).get("limits") or {}
        _check_lengths(path_prefix, limits, max_prompt_length, max_length)


def _check_tokenizer(record: dict[str, Any], path: Path, tokenizer: Tokenizer) -> None:
    recorded = record.get("tokenizer")
    if not isinstance(recorded, dict):
        warnings.warn(f"{path} records no tokenizer: cannot check the dataset's vocabulary", stacklevel=3)
        return
    checks = (  # cheapest first; the fingerprint tells vocabularies of one size apart
        ("vocabulary size", "vocab_size", lambda: tokenizer.vocab_size),
        ("EOS id", "eos_id", lambda: tokenizer.eos_id),
        ("vocabulary fingerprint", "fingerprint", tokenizer.fingerprint),
    )
    for what, key, ours in checks:
        theirs, value = recorded.get(key), ours()
        if theirs != value:
            raise TokenizerMismatchError(
                f"{path}: the dataset was tokenized with {recorded.get('path')} ({what} {str(theirs)[:12]}), "
                f"this run uses {tokenizer.path} ({what} {str(value)[:12]}); re-run tools/preprocess_data.py "
                f"with --tokenizer {tokenizer.path}"
            )


def _check_lengths(path_prefix: str | Path, limits: dict[str, Any], max_prompt_length: int, max_length: int) -> None:
    data = InstructionDataset(path_prefix)
    prompts, totals = data.prompt_lengths, data.prompt_lengths + data.response_lengths
    made = (
        f" (preprocessed with --max-prompt-length {limits['max_prompt_length']})"
        if "max_prompt_length" in limits
        else ""
    )
    longest = int(prompts.max(initial=0))
    if longest > max_prompt_length:
        raise DatasetLayoutError(
            f"{path_prefix} holds prompts of up to {longest} tokens{made}, over max_prompt_length="
            f"{max_prompt_length}: they would lose their ends; set max_prompt_length to {longest} or re-run "
            f"tools/preprocess_data.py with --max-prompt-length {max_prompt_length}"
        )
    over = int(np.count_nonzero(totals > max_length))
    if over:
        warnings.warn(
            f"{over} of {len(data)} examples of {path_prefix} are longer than max_length={max_length} "
            f"(up to {int(totals.max())} tokens): their responses lose their ends",
            stacklevel=3,
        )
    if limits and limits.get("max_prompt_length", max_prompt_length) < max_prompt_length:
        warnings.warn(
            f"{path_prefix} dropped prompts over {limits['max_prompt_length']} tokens at preprocessing; "
            f"this run's max_prompt_length={max_prompt_length} would take them",
            stacklevel=3,
        )
