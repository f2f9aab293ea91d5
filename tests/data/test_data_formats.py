"""Data formats, format detection, malformed-row errors (file:line) and prompt templates."""

import json
import pickle

import pytest
from tokenizer_zoo import hf_tokenizer_dir

from megatron_minillm.data import DataFormatError, Example, TemplateError, load_tokenizer, parse_row, read_rows
from megatron_minillm.data.formats import detect_format, resolve_format
from megatron_minillm.data.templates import render_prompt

RECORDS = {
    "dolly": {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "self_instruct": {
        "id": "t1",
        "instruction": "Translate to French.",
        "instances": [{"input": "cat", "output": "chat"}, {"input": "dog", "output": "chien"}],
    },
    "prompt_completion": {"template": "t", "prompt": "Question: sky colour?\n", "completion": "blue"},
    "chat": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_each_format_is_detected_and_parsed(tmp_path):
    path = _write_lines(tmp_path / "all.jsonl", [json.dumps(r) for r in RECORDS.values()])
    rows = list(read_rows(path))
    assert [r.source for r in rows] == [f"{path}:{i}" for i in range(1, 6)]
    parsed = {}
    for fmt, row in zip(RECORDS, rows):
        assert detect_format(json.loads(row.text), row.source) == fmt
        parsed[fmt] = parse_row(row, fmt)
    assert parsed["dolly"] == [Example("Name a colour.", "", "Blue.", f"{path}:1")]
    assert parsed["alpaca"] == [Example("Add the numbers.", "2 and 3", "5", f"{path}:2")]
    assert parsed["self_instruct"] == [
        Example("Translate to French.", "cat", "chat", f"{path}:3"),
        Example("Translate to French.", "dog", "chien", f"{path}:3"),
    ]
    assert parsed["prompt_completion"] == [Example("Question: sky colour?\n", "", "blue", f"{path}:4")]
    chat = parsed["chat"][0]
    assert (chat.instruction, chat.output, [m["role"] for m in chat.messages]) == ("Hi?", "Hello.", ["system", "user"])


def test_json_list_rows_carry_their_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"}\n]\n')
    rows = list(read_rows(path))
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:4"]
    assert [parse_row(r, "alpaca")[0].output for r in rows] == ["b", "d"]
    assert resolve_format([path], "auto") == "alpaca"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataFormatError, match=rf"^{broken}:3: bad JSON in the list: Expecting ','"):
        list(read_rows(broken))


@pytest.mark.parametrize(
    "line, fmt, message, reason",
    [
        ('{"instruction": "a", "output": ', "alpaca", r"bad JSON: Expecting value \(column 32\)", "bad_json"),
        (
            '{"instruction": "a", "context": "c"}',
            "dolly",
            "missing field 'response' \\(dolly records need instruction, response and optionally context\\)",
            "missing_field",
        ),
        (
            '{"instruction": 7, "output": "b"}',
            "alpaca",
            "field 'instruction' must be a string, got a number",
            "wrong_type",
        ),
        ('["a", "b"]', "alpaca", "expected a JSON object, got a list", "wrong_type"),
        (
            '{"instruction": "a", "instances": [{"input": "x"}]}',
            "self_instruct",
            r"\(instance 0\): missing field 'output'",
            "missing_field",
        ),
        ('{"messages": ["hi", "hello"]}', "chat", r"\(message 0\): expected a JSON object, got a string", "wrong_type"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "chat",
            "at least one message before a last message whose role is 'assistant'",
            "missing_field",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_problem(tmp_path, line, fmt, message, reason):
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(RECORDS[fmt]), line])
    row = list(read_rows(path))[1]
    with pytest.raises(DataFormatError, match=f"^{path}:2.*{message}") as err:
        parse_row(row, fmt)
    assert err.value.reason == reason
    again = pickle.loads(pickle.dumps(err.value))  # workers raise it, the main process re-raises it
    assert (str(again), again.reason) == (str(err.value), reason)


def test_unknown_format_and_pretraining_text_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r"^x:1: cannot tell the format from the fields \['question'\]"):
        detect_format({"question": "q"}, "x:1")
    path = _write_lines(tmp_path / "pt.jsonl", ['{"text": "a document"}'])
    with pytest.raises(DataFormatError, match="a 'text' record is pretraining data: use the pretrain command"):
        resolve_format([path], "auto")
    with pytest.raises(FileNotFoundError, match="no data file at"):
        list(read_rows(tmp_path / "missing.jsonl"))


def test_alpaca_template_is_lmops_exact():
    with_input = Example("Add the numbers.", "2 and 3", "5", "f:1")
    assert render_prompt(with_input, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n"
    )
    no_input = Example("Name a {colour}.", "", "Blue.", "f:2")  # braces in the data are not format fields
    assert render_prompt(no_input, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a {colour}.\n\n### Response:\n"
    )
    assert render_prompt(with_input, "none") == "Add the numbers.\n\n2 and 3"
    assert render_prompt(no_input, "none") == "Name a {colour}."


def test_chat_template_option():
    tokenizer = load_tokenizer(hf_tokenizer_dir())
    conversation = Example(
        "Hi?", "", "Hello.", "f:3", ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"})
    )
    assert render_prompt(conversation, "chat", tokenizer) == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"
    plain = Example("Add the numbers.", "2 and 3", "5", "f:1")
    assert render_prompt(plain, "chat", tokenizer) == "<|user|>\nAdd the numbers.\n\n2 and 3\n<|assistant|>\n"
    with pytest.raises(TemplateError, match=r"^f:3: the 'alpaca' template takes one user message .*\[system, user\]"):
        render_prompt(conversation, "alpaca")
    no_chat = load_tokenizer(hf_tokenizer_dir(chat=False))
    with pytest.raises(TemplateError, match="needs a tokenizer with a chat template"):
        render_prompt(plain, "chat", no_chat)
