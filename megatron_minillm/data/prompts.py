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
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise DataFormatError(source, "'input_ids' must be a list of integers", "bad_type")
        text = obj.get("prompt") if isinstance(obj.get("prompt"), str) else ""
        return Prompt(text, ids, obj.get("reference"), source)
    if not isinstance(obj.get("prompt"), str):
        raise DataFormatError(source, "a raw prompt record needs a 'prompt' string or 'input_ids'", "missing_field")
    return Prompt(obj["prompt"], tokenizer.encode(obj["prompt"]), obj.get("reference"), source)


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
