"""Instruction data files: rows of jsonl or of a JSON list, parsed into examples of one format.

Formats (``FORMATS``), each record a JSON object:

- ``dolly``: instruction, context (optional), response (databricks-dolly-15k, LMOps' raw.jsonl);
- ``alpaca``: instruction, input (optional), output;
- ``self_instruct``: instruction, instances [{input, output}], one example per instance;
- ``prompt_completion``: prompt, completion (the prompt is the instruction, with no input);
- ``chat``: messages [{role, content}]; the last message is the assistant's response.

Rows are read in the main process and parsed where they are tokenized (possibly a worker), so a
row carries its raw text and its ``file:line``; every problem is a :class:`DataFormatError` that
names that place, and a skip-bad-lines reader counts it by its ``reason``.
"""

import bisect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("dolly", "alpaca", "self_instruct", "prompt_completion", "chat")


class DataFormatError(ValueError):
    """A row that cannot be read; ``reason`` is a short key for the skip-bad-lines summary."""

    def __init__(self, source: str, problem: str, reason: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem, self.reason = source, problem, reason

    def __reduce__(self) -> tuple:  # raised in a worker process, re-raised in the main one
        return type(self), (self.source, self.problem, self.reason)


@dataclass(frozen=True)
class Row:
    """One record as text: a jsonl line (bytes, decoded when parsed) or a JSON list element."""

    source: str  # "path:line"
    text: str | bytes


@dataclass(frozen=True)
class Example:
    """One prompt/response pair before templating; ``messages`` is a chat's context (chat format)."""

    instruction: str
    input: str
    output: str
    source: str
    messages: tuple[dict[str, str], ...] = ()


def read_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a jsonl file or of a file holding one JSON list (told apart by the first character)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _list_rows(path)
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield Row(f"{path}:{number}", line.rstrip(b"\r\n"))


def _list_rows(path: Path) -> Iterator[Row]:
    """Elements of a top-level JSON list with the line each starts on. A syntax error ends the file:
    past it nothing tells where the next element starts, so it is never skipped."""
    text = path.read_text(encoding="utf-8")
    line_starts = [m.end() for m in re.finditer("\n", text)]
    decoder = json.JSONDecoder()

    def where(i: int) -> str:
        return f"{path}:{bisect.bisect_right(line_starts, i) + 1}"

    def next_char(i: int) -> tuple[int, str]:
        while i < len(text) and text[i].isspace():
            i += 1
        return i, text[i : i + 1]

    pos, char = next_char(text.index("[") + 1)
    while char != "]":
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                where(err.pos),
                f"bad JSON in the list: {err.msg} (column {err.colno}); a JSON list is not read past a syntax error",
                "bad_json",
            ) from None
        yield Row(where(pos), text[pos:end])
        pos, char = next_char(end)
        if char == ",":
            pos, char = next_char(pos + 1)
        elif char != "]":
            raise DataFormatError(where(pos), "bad JSON in the list: expected ',' or ']' after an element", "bad_json")


def load_object(row: Row) -> dict[str, Any]:
    """The row's JSON object; bad JSON, bad UTF-8 or a non-object raise with the row's place."""
    try:
        value = json.loads(row.text)
    except json.JSONDecodeError as err:
        raise DataFormatError(row.source, f"bad JSON: {err.msg} (column {err.colno})", "bad_json") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(row.source, f"not UTF-8 text ({err.reason} at byte {err.start})", "bad_json") from None
    if not isinstance(value, dict):
        raise DataFormatError(row.source, f"expected a JSON object, got {_type_name(value)}", "wrong_type")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({value!r})"
    )


def _get(obj: dict[str, Any], key: str, kind: type, source: str, fmt: str, default: Any = None) -> Any:
    if key not in obj:
        if default is not None:
            return default
        raise DataFormatError(source, f"missing field {key!r} ({fmt} records need {_NEEDS[fmt]})", "missing_field")
    value = obj[key]
    if not isinstance(value, kind):
        kind_name = {str: "a string", list: "a list", dict: "an object"}[kind]
        raise DataFormatError(source, f"field {key!r} must be {kind_name}, got {_type_name(value)}", "wrong_type")
    return value


def _text(obj: dict[str, Any], key: str, source: str, fmt: str) -> str:
    """A required string field that holds some text: an empty instruction or response teaches nothing."""
    value = _get(obj, key, str, source, fmt)
    if not value.strip():
        raise DataFormatError(source, f"field {key!r} is empty; give it text or drop the record", "empty_field")
    return value


def _objects(items: list, source: str, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The elements of a list field with their place (``file:line (instance 2)``); each must be an object."""
    for i, item in enumerate(items):
        where = f"{source} ({what} {i})"
        if not isinstance(item, dict):
            raise DataFormatError(where, f"expected a JSON object, got {_type_name(item)}", "wrong_type")
        yield where, item


def _dolly(obj: dict[str, Any], source: str) -> list[Example]:
    return [
        Example(
            _text(obj, "instruction", source, "dolly"),
            _get(obj, "context", str, source, "dolly", ""),
            _text(obj, "response", source, "dolly"),
            source,
        )
    ]


def _alpaca(obj: dict[str, Any], source: str) -> list[Example]:
    return [
        Example(
            _text(obj, "instruction", source, "alpaca"),
            _get(obj, "input", str, source, "alpaca", ""),
            _text(obj, "output", source, "alpaca"),
            source,
        )
    ]


def _self_instruct(obj: dict[str, Any], source: str) -> list[Example]:
    instruction = _text(obj, "instruction", source, "self_instruct")
    instances = _get(obj, "instances", list, source, "self_instruct")
    if not instances:
        raise DataFormatError(source, "field 'instances' is empty", "missing_field")
    return [
        Example(
            instruction,
            _get(instance, "input", str, where, "self_instruct", ""),
            _text(instance, "output", where, "self_instruct"),
            source,
        )
        for where, instance in _objects(instances, source, "instance")
    ]


def _prompt_completion(obj: dict[str, Any], source: str) -> list[Example]:
    return [
        Example(
            _text(obj, "prompt", source, "prompt_completion"),
            "",
            _text(obj, "completion", source, "prompt_completion"),
            source,
        )
    ]


def _chat(obj: dict[str, Any], source: str) -> list[Example]:
    messages = _get(obj, "messages", list, source, "chat")
    for where, message in _objects(messages, source, "message"):
        _get(message, "role", str, where, "chat")
        _get(message, "content", str, where, "chat")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataFormatError(
            source,
            "a conversation needs at least one message before a last message whose role is 'assistant' (the response)",
            "missing_field",
        )
    if not messages[-1]["content"].strip():
        raise DataFormatError(source, "the last message (the response) is empty", "empty_field")
    if not any(m["content"].strip() for m in messages[:-1]):
        raise DataFormatError(source, "every message before the response is empty", "empty_field")
    context = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    users = [m["content"] for m in context if m["role"] == "user"]
    return [Example(users[-1] if users else "", "", messages[-1]["content"], source, context)]


_PARSERS: dict[str, Callable[[dict[str, Any], str], list[Example]]] = {
    "dolly": _dolly,
    "alpaca": _alpaca,
    "self_instruct": _self_instruct,
    "prompt_completion": _prompt_completion,
    "chat": _chat,
}
_NEEDS = {
    "dolly": "instruction, response and optionally context",
    "alpaca": "instruction, output and optionally input",
    "self_instruct": "instruction and instances [{input, output}]",
    "prompt_completion": "prompt and completion",
    "chat": "messages [{role, content}]",
    "pretrain": "text",
}


def detect_format(obj: dict[str, Any], source: str) -> str:
    """The format a record's fields say; raises when they fit none (pretraining text included)."""
    keys = set(obj)
    for fmt, wanted in (
        ("chat", {"messages"}),
        ("self_instruct", {"instruction", "instances"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("dolly", {"instruction", "response"}),
        ("alpaca", {"instruction", "output"}),
    ):
        if wanted <= keys:
            return fmt
    hint = " (a 'text' record is pretraining data: use the pretrain command)" if "text" in keys else ""
    raise DataFormatError(
        source,
        f"cannot tell the format from the fields {sorted(keys)}{hint}; pass the format, one of {', '.join(FORMATS)}",
        "unknown_format",
    )


def parse_row(row: Row, fmt: str) -> list[Example]:
    """The examples of one row in format ``fmt`` (self-instruct rows give one per instance)."""
    return _PARSERS[fmt](load_object(row), row.source)


def parse_text_row(row: Row) -> str:
    """The ``text`` field of a pretraining row ({"text": ...})."""
    return _get(load_object(row), "text", str, row.source, "pretrain")


def resolve_format(paths: list[str | Path], fmt: str) -> str:
    """``fmt``, or for "auto" the format of the first row that holds a JSON object."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
        return fmt
    for path in paths:
        for row in read_rows(path):
            try:
                return detect_format(load_object(row), row.source)
            except DataFormatError as err:
                if err.reason == "unknown_format":
                    raise
    raise DataFormatError(str(paths[0]) if paths else "(no input)", "no record to detect the format from", "empty")
