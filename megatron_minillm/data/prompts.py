"""Prompts to generate from: raw records ({"prompt": text} or {"input_ids": [...]}) or instruction
data in any supported format rendered with a template (the evaluation sets)."""

from dataclasses import dataclass
from pathlib import Path

from megatron_minillm.data.formats import DataFormatError, load_object, parse_row, read_rows, resolve_format
from megatron_minillm.data.templates import render_prompt
from megatron_minillm.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt as the model sees it ("" when given as ids only)
    ids: list[int]
    reference: str | None  # the data's response, if any
    source: str  # file:line


def _raw(obj: dict, source: str, tokenizer: Tokenizer) -> Prompt:
    if "input_ids" in obj:
        ids = _token_ids(obj["input_ids"], source, tokenizer)
        text = obj.get("prompt") if isinstance(obj.get("prompt"), str) else ""
        return Prompt(text, ids, obj.get("reference"), source)
    if not isinstance(obj.get("prompt"), str):
        raise DataFormatError(source, "a raw prompt record needs a 'prompt' string or 'input_ids'", "missing_field")
    if not obj["prompt"].strip():
        raise DataFormatError(source, "field 'prompt' is empty; give it text or drop the record", "empty_field")
    return Prompt(obj["prompt"], tokenizer.encode(obj["prompt"]), obj.get("reference"), source)


def _token_ids(ids: object, source: str, tokenizer: Tokenizer) -> list[int]:
    """Ids given as they are must be ids of this tokenizer: others index past the embedding or mean
    other tokens (ids written with another vocabulary)."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataFormatError(source, "'input_ids' must be a list of integers", "bad_type")
    if not ids:
        raise DataFormatError(source, "'input_ids' is empty; give at least one token id", "empty_field")
    for position, i in enumerate(ids):
        if not 0 <= i < tokenizer.vocab_size:
            raise DataFormatError(
                source,
                f"'input_ids' holds token id {i} (position {position}), outside the vocabulary of "
                f"{tokenizer.path} (ids 0 to {tokenizer.vocab_size - 1}); were they written with another tokenizer?",
                "bad_value",
            )
    return ids


def load_prompts(path: str | Path, tokenizer: Tokenizer, fmt: str = "raw", template: str = "alpaca") -> list[Prompt]:
    """All prompts of a jsonl/json file. ``fmt`` "raw" uses the text verbatim; any instruction
    format ("auto" detects it) renders the instruction with ``template``, the response is the reference."""
    if fmt != "raw":
        fmt = resolve_format([path], fmt)
    prompts = []
    for row in read_rows(path):
        if fmt == "raw":
            prompts.append(_raw(load_object(row), row.source, tokenizer))
            continue
        for example in parse_row(row, fmt):
            text = render_prompt(example, template, tokenizer)
            prompts.append(Prompt(text, tokenizer.encode(text), example.output, example.source))
    if not prompts:
        raise DataFormatError(str(path), "holds no prompt", "empty")
    return prompts
