"""Instruction data and pretraining text -> tokenized megatron-core indexed datasets (.bin/.idx).

Outputs, one indexed dataset per split (``<prefix>_train``, and ``<prefix>_valid`` when --split
holds rows out):

- instruction data: each example is one *document* of two sequences, its prompt then its response,
  so sequence 2i is prompt i and 2i+1 its response; they cannot drift apart and need no separator
  token (LMOps puts ``split_id`` between them). ``<prefix>_<split>.jsonl`` lists, per example, its
  source line, instruction, input, prompt text and reference response (what Rouge-L scores against).
- pretraining text: one document of one sequence per text (EOS-terminated by default), cut into
  fixed-length chunks at read time (:class:`megatron_minillm.data.PretrainDataset`).
- ``<prefix>_summary.json``: the configuration, the tokenizer (sizes, special ids, fingerprint), the
  length limits and the counts of :class:`Summary` (:mod:`.summary` reads and checks it).

Length policy, LMOps' (``minillm/tools/process_data_dolly.py`` drops an example whose prompt has
more than ``max_prompt_length`` tokens; its datasets cut prompt + response to ``max_length`` tokens
when they load it): a prompt over ``max_prompt_length`` drops the example (``prompt_too_long``); a
longer prompt + response keeps the first ``max_length - len(prompt)`` response tokens (counted as
truncated; the EOS goes with the cut, so a cut response never teaches the model to stop there).

The split holds out whole rows (a self-instruct row's instances stay together), chosen by a seeded
permutation: the same input, --split and --seed always give the same split, with any --workers.
Files are written under ``.partial`` names and renamed once complete, the summary last: a prefix
with a summary is complete. Files of the prefix an earlier run wrote and this one does not (a stale
``_valid`` split) are removed. A run that would write an empty split fails instead.
"""

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_minillm.data.formats import (
    FORMATS,
    DataFormatError,
    Row,
    parse_row,
    parse_text_row,
    read_rows,
    resolve_format,
)
from megatron_minillm.data.summary import split_files, tokenizer_record
from megatron_minillm.data.templates import TEMPLATES, TemplateError, render_prompt, require_chat_template
from megatron_minillm.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PreprocessConfig:
    """Options shared by instruction data and pretraining text (see tools/preprocess_data.py)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: str
    split: float = 0.0  # validation rows: a fraction if < 1, else a count
    seed: int = 1234
    workers: int = 1
    skip_bad_lines: bool = False
    append_eos: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no input file given")
        if self.split < 0 or (self.split >= 1 and self.split != int(self.split)):
            raise ValueError(f"split must be a fraction in [0, 1) or a whole number of rows, got {self.split}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class InstructionConfig(PreprocessConfig):
    format: str = "auto"
    template: str = "alpaca"
    max_prompt_length: int = 256
    max_length: int = 512  # prompt + response

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"unknown format {self.format!r}; one of auto, {', '.join(FORMATS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; one of {', '.join(TEMPLATES)}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length "
                f"({self.max_length}): a response needs room"
            )


@dataclass
class Summary:
    """What a run read, wrote, truncated and dropped (and why)."""

    rows_read: int = 0
    bad_rows: Counter = field(default_factory=Counter)  # reason -> rows skipped by --skip-bad-lines
    written: Counter = field(default_factory=Counter)  # split -> examples (or texts)
    tokens: Counter = field(default_factory=Counter)  # split -> tokens
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> examples
    removed: list[str] = field(default_factory=list)  # stale files of the prefix from an earlier run

    def report(self) -> str:
        def reasons(counts: Counter) -> str:
            return f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else ""

        splits = " + ".join(f"{self.written[s]} {s} ({self.tokens[s]} tokens)" for s in sorted(self.written))
        return "\n".join(
            [
                f"rows read: {self.rows_read}, bad rows skipped: {sum(self.bad_rows.values())}{reasons(self.bad_rows)}",
                f"written: {splits or 'nothing'}",
                f"truncated: {self.truncated}",
                f"dropped: {sum(self.dropped.values())}{reasons(self.dropped)}",
            ]
            + ([f"removed stale files of an earlier run: {', '.join(self.removed)}"] if self.removed else [])
        )

    def to_dict(self) -> dict:
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}


@dataclass(frozen=True)
class _Encoded:
    sequences: tuple[list[int], ...]  # (prompt, response) or (text,)
    truncated: bool = False
    reference: dict | None = None


@dataclass(frozen=True)
class _Rejected:
    reason: str
    bad_row: bool  # a malformed row (else an example dropped by the length policy)


@dataclass(frozen=True)
class _Job:
    config: PreprocessConfig
    format: str | None  # None: pretraining text


def tokenize_pair(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt and response ids as the model sees them together: the response is the tail of the
    joint encoding (as LMOps). When a merge across the boundary changes the prompt's own tokens,
    the response is encoded alone."""
    prompt_ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + response)
    if full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids) :]
    return prompt_ids, tokenizer.encode(response)


class _Encoder:
    """Row -> encoded examples; one per process (workers build theirs in the pool initializer)."""

    def __init__(self, job: _Job) -> None:
        self.job, self.config = job, job.config
        self.tokenizer = load_tokenizer(job.config.tokenizer)

    def __call__(self, row: Row) -> list[_Encoded | _Rejected]:
        try:
            return self._instruction(row) if self.job.format else self._text(row)
        except (DataFormatError, TemplateError) as err:
            if not self.config.skip_bad_lines:
                raise
            return [_Rejected(err.reason, bad_row=True)]

    def _instruction(self, row: Row) -> list[_Encoded | _Rejected]:
        config: InstructionConfig = self.config  # type: ignore[assignment]
        out: list[_Encoded | _Rejected] = []
        for example in parse_row(row, self.job.format):
            prompt = render_prompt(example, config.template, self.tokenizer)
            prompt_ids, response_ids = tokenize_pair(self.tokenizer, prompt, example.output)
            if config.append_eos:
                response_ids.append(self.tokenizer.eos_id)
            room = config.max_length - len(prompt_ids)
            if len(prompt_ids) > config.max_prompt_length:
                out.append(_Rejected("prompt_too_long", bad_row=False))
            elif not response_ids:
                out.append(_Rejected("empty_response", bad_row=False))
            else:
                reference = {
                    "source": row.source,
                    "instruction": example.instruction,
                    "input": example.input,
                    "prompt": prompt,
                    "output": example.output,
                }
                out.append(_Encoded((prompt_ids, response_ids[:room]), len(response_ids) > room, reference))
        return out

    def _text(self, row: Row) -> list[_Encoded | _Rejected]:
        ids = self.tokenizer.encode(parse_text_row(row))
        if not ids:
            return [_Rejected("empty_text", bad_row=False)]
        return [_Encoded((ids + [self.tokenizer.eos_id] if self.config.append_eos else ids,))]


_ENCODER: _Encoder | None = None


def _init_worker(job: _Job) -> None:
    global _ENCODER
    _ENCODER = _Encoder(job)


def _encode_row(row: Row) -> list[_Encoded | _Rejected]:
    assert _ENCODER is not None, "_init_worker was not called in this process"
    return _ENCODER(row)


def _encoded_rows(rows: Iterable[Row], job: _Job) -> Iterator[list[_Encoded | _Rejected]]:
    """Encoded rows in input order (imap keeps it), in this process or a pool of workers."""
    if job.config.workers == 1:
        _init_worker(job)
        yield from map(_encode_row, rows)
        return
    with multiprocessing.get_context().Pool(job.config.workers, _init_worker, (job,)) as pool:
        yield from pool.imap(_encode_row, rows, chunksize=16)


def validation_rows(num_rows: int, split: float, seed: int) -> set[int]:
    """Indices of the rows held out: a fraction (< 1) or a count (>= 1) of ``num_rows``, seeded."""
    count = int(split) if split >= 1 else round(split * num_rows)
    if count > num_rows:
        raise ValueError(f"split asks for {count} validation rows but the input has {num_rows}")
    return set(np.random.default_rng(seed).permutation(num_rows)[:count].tolist())


class _SplitWriter:
    """One split: the indexed dataset and (instruction data) the reference jsonl, under .partial names."""

    def __init__(self, prefix: str, dtype: type, references: bool) -> None:
        self.final = [f"{prefix}.bin", f"{prefix}.idx"] + ([f"{prefix}.jsonl"] if references else [])
        self.builder = IndexedDatasetBuilder(self.final[0] + ".partial", dtype=dtype)
        self.references = open(self.final[2] + ".partial", "w", encoding="utf-8") if references else None

    def add(self, encoded: _Encoded) -> None:
        for sequence in encoded.sequences:
            self.builder.add_item(torch.tensor(sequence, dtype=torch.int64, device="cpu"))  # host: written to disk
        self.builder.end_document()
        if self.references is not None:
            self.references.write(json.dumps(encoded.reference, ensure_ascii=False) + "\n")

    def close(self, keep: bool) -> None:
        """Complete the .partial files (renamed by :func:`_commit`), or remove them."""
        if keep:
            self.builder.finalize(self.final[1] + ".partial")
        else:
            self.builder.data_file.close()
        if self.references is not None:
            self.references.close()
        if not keep:
            for path in self.final:
                Path(path + ".partial").unlink(missing_ok=True)


def _require_examples(config: PreprocessConfig, summary: Summary, splits: Iterable[str]) -> None:
    """An empty split is an error, not a dataset: reading one fails later (``cannot mmap an empty file``)."""
    inputs = ", ".join(config.inputs)
    if not summary.rows_read:
        raise DataFormatError(inputs, "holds no record; nothing to write", "empty")
    for split in splits:
        if not summary.written[split]:
            dropped = ", ".join(f"{k}: {v}" for k, v in sorted((summary.dropped + summary.bad_rows).items()))
            hint = "; raise --max-prompt-length" if summary.dropped["prompt_too_long"] else ""
            raise DataFormatError(
                inputs,
                f"no example left for the {split} split of {config.output_prefix} "
                f"({summary.rows_read} rows read; dropped or skipped: {dropped or 'none'}){hint}",
                "empty",
            )


def _limits(config: PreprocessConfig) -> dict[str, int]:
    """The length limits the data obeys (pretraining text has none: it is cut into chunks when read)."""
    if isinstance(config, InstructionConfig):
        return {"max_prompt_length": config.max_prompt_length, "max_length": config.max_length}
    return {}


def _commit(prefix: str, written: list[str], stale: list[str], record: dict) -> None:
    """Put the new files in place of the old. The summary goes first and comes back last, so a prefix
    with a summary is complete; files of the prefix this run did not write (a stale split) are removed."""
    summary = Path(f"{prefix}_summary.json")
    Path(f"{summary}.partial").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    summary.unlink(missing_ok=True)
    for path in written:
        os.replace(path + ".partial", path)
    for path in stale:
        Path(path).unlink(missing_ok=True)
    os.replace(f"{summary}.partial", summary)


def _stale_files(prefix: str, written: list[str]) -> list[str]:
    keep = set(written) | {f"{path}.partial" for path in written}
    return [path for path in split_files(prefix) if path not in keep and Path(path).exists()]


def _run(job: _Job, tokenizer: Tokenizer, description: str) -> Summary:
    config = job.config
    tokenizer_info = tokenizer_record(tokenizer, config.tokenizer)
    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    num_rows = sum(1 for path in config.inputs for _ in read_rows(path))
    held_out = validation_rows(num_rows, config.split, config.seed)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    writers = {
        split: _SplitWriter(f"{config.output_prefix}_{split}", dtype, references=job.format is not None)
        for split in ("train", "valid")
        if split == "train" or held_out
    }
    summary = Summary()
    rows = (row for path in config.inputs for row in read_rows(path))
    complete = False
    try:
        for index, results in enumerate(
            tqdm(_encoded_rows(rows, job), total=num_rows, unit="row", desc=description, disable=None)
        ):
            split = "valid" if index in held_out else "train"
            summary.rows_read += 1
            for result in results:
                if isinstance(result, _Rejected):
                    (summary.bad_rows if result.bad_row else summary.dropped)[result.reason] += 1
                    continue
                writers[split].add(result)
                summary.written[split] += 1
                summary.tokens[split] += sum(len(s) for s in result.sequences)
                summary.truncated += result.truncated
        _require_examples(config, summary, writers)
        complete = True
    finally:
        for writer in writers.values():
            writer.close(keep=complete)
    written = [path for writer in writers.values() for path in writer.final]
    summary.removed = _stale_files(config.output_prefix, written)
    record = {
        "config": asdict(config),
        "format": job.format,
        "tokenizer": tokenizer_info,
        "limits": _limits(config),
        "summary": summary.to_dict(),
    }
    _commit(config.output_prefix, written, summary.removed, record)
    return summary


def preprocess_instructions(config: InstructionConfig) -> Summary:
    """Instruction data -> ``<prefix>_<split>`` prompt/response datasets (see the module docstring)."""
    tokenizer = load_tokenizer(config.tokenizer)
    if config.template == "chat":
        require_chat_template(tokenizer)  # fail before reading anything
    fmt = resolve_format(config.inputs, config.format)
    return _run(_Job(config, fmt), tokenizer, f"tokenizing ({fmt})")


def preprocess_pretrain(config: PreprocessConfig) -> Summary:
    """Raw text jsonl ({"text": ...}) -> ``<prefix>_<split>`` datasets of one document per text."""
    return _run(_Job(config, None), load_tokenizer(config.tokenizer), "tokenizing (text)")
