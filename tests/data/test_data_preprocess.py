"""Preprocessing: text -> indexed datasets -> tokens, length policy, split, bad rows, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizer_zoo import DATA, ROOT, hf_tokenizer_dir, sentencepiece_model

from megatron_minillm.data import (
    DataFormatError,
    DatasetLayoutError,
    InstructionConfig,
    InstructionDataset,
    PreprocessConfig,
    PretrainDataset,
    load_tokenizer,
    preprocess_instructions,
    preprocess_pretrain,
)
from megatron_minillm.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT


@pytest.fixture(scope="module")
def hf_dir() -> str:
    return str(hf_tokenizer_dir())


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _references(prefix: Path) -> list[dict]:
    return [json.loads(line) for line in Path(f"{prefix}.jsonl").read_text(encoding="utf-8").splitlines()]


# Each format: one record and the instruction and input it gives (the prompt is their alpaca rendering).
FORMAT_CASES = {
    "dolly": (
        {"instruction": "Name a colour.", "context": "The sky.", "response": "Blue."},
        "Name a colour.",
        "The sky.",
        "Blue.",
    ),
    "alpaca": ({"instruction": "Add 2 and 3.", "output": "5"}, "Add 2 and 3.", "", "5"),
    "self_instruct": (
        {"instruction": "Translate.", "instances": [{"input": "cat", "output": "chat"}]},
        "Translate.",
        "cat",
        "chat",
    ),
    "prompt_completion": ({"prompt": "Is the sea wet?\n", "completion": " Yes"}, "Is the sea wet?\n", "", " Yes"),
    "chat": (
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        "Hi?",
        "",
        "Hello.",
    ),
}


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_round_trip_each_format(tmp_path, hf_dir, fmt):
    record, instruction, input_, response = FORMAT_CASES[fmt]
    prompt = (
        ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_)
        if input_
        else ALPACA_PROMPT.format(instruction=instruction)
    )
    path = tmp_path / "data.json"  # one JSON list: both file kinds go through the same reader
    path.write_text(json.dumps([record, record]), encoding="utf-8")
    summary = preprocess_instructions(InstructionConfig([str(path)], str(tmp_path / "out"), hf_dir))
    assert (summary.rows_read, summary.written["train"], summary.truncated) == (2, 2, 0)
    tok = load_tokenizer(hf_dir)
    data = InstructionDataset(tmp_path / "out_train")
    assert len(data) == 2
    prompt_ids, response_ids = data[1]
    assert prompt_ids.dtype == np.int64
    assert tok.decode(prompt_ids.tolist()) == prompt
    assert prompt_ids.tolist() + response_ids.tolist() == tok.encode(prompt + response) + [tok.eos_id]
    assert data.prompt_lengths.tolist() == [len(prompt_ids)] * 2
    assert _references(tmp_path / "out_train")[1] == {
        "source": f"{path}:1",
        "instruction": instruction,
        "input": input_,
        "prompt": prompt,
        "output": response,
    }


def test_chat_template_and_sentencepiece_tokenizer(tmp_path):
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ]
    path = _jsonl(tmp_path / "chat.jsonl", records)
    preprocess_instructions(InstructionConfig([path], str(tmp_path / "hf"), str(hf_tokenizer_dir()), template="chat"))
    assert _references(tmp_path / "hf_train")[0]["prompt"] == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"
    spm_path = sentencepiece_model()
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        preprocess_instructions(InstructionConfig([path], str(tmp_path / "sp"), str(spm_path), template="chat"))
    alpaca = _jsonl(tmp_path / "a.jsonl", [FORMAT_CASES["alpaca"][0]])
    preprocess_instructions(InstructionConfig([alpaca], str(tmp_path / "sp"), str(spm_path), append_eos=False))
    tok = load_tokenizer(spm_path)
    prompt_ids, response_ids = InstructionDataset(tmp_path / "sp_train")[0]
    assert prompt_ids.tolist() == tok.encode(ALPACA_PROMPT.format(instruction="Add 2 and 3."))
    assert tok.decode(response_ids.tolist()) == "5" and tok.eos_id not in response_ids


def test_pretrain_round_trip_and_chunks(tmp_path):
    texts = [json.loads(line)["text"] for line in (DATA / "t0_passages_300.jsonl").read_text().splitlines()[:5]]
    path = _jsonl(tmp_path / "pt.jsonl", [{"text": t} for t in texts] + [{"text": ""}])
    summary = preprocess_pretrain(PreprocessConfig([path], str(tmp_path / "pt"), str(sentencepiece_model())))
    assert (summary.written["train"], dict(summary.dropped)) == (5, {"empty_text": 1})
    tok = load_tokenizer(sentencepiece_model())
    stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in texts])
    data = PretrainDataset(tmp_path / "pt_train", seq_length=100)
    assert data.num_tokens == len(stream) and len(data) == len(stream) // 100
    for k in (0, 3, len(data) - 1):  # chunks cross text boundaries
        assert data[k].tolist() == stream[k * 100 : (k + 1) * 100].tolist()
    with pytest.raises(IndexError):
        data[len(data)]
    with pytest.raises(DatasetLayoutError, match="is not an instruction dataset"):
        InstructionDataset(tmp_path / "pt_train")
    with pytest.raises(DatasetLayoutError, match="no indexed dataset at"):
        PretrainDataset(tmp_path / "nothing", seq_length=100)


def test_truncation_and_drops_are_counted(tmp_path, hf_dir):
    tok = load_tokenizer(hf_dir)
    short = {"instruction": "Say hi.", "output": "Hi."}
    long_answer = {"instruction": "Tell a story.", "output": " ".join(["once upon a time"] * 40)}
    long_prompt = {"instruction": "Read this. " + "words " * 200, "output": "Done."}
    lengths = {
        k: len(tok.encode(ALPACA_PROMPT.format(instruction=r["instruction"])))
        for k, r in (("short", short), ("long_answer", long_answer), ("long_prompt", long_prompt))
    }
    max_prompt = max(lengths["short"], lengths["long_answer"])
    assert lengths["long_prompt"] > max_prompt
    max_length = max_prompt + 20
    path = _jsonl(tmp_path / "d.jsonl", [short, long_answer, long_prompt])
    config = InstructionConfig(
        [path], str(tmp_path / "o"), hf_dir, max_prompt_length=max_prompt, max_length=max_length, append_eos=False
    )
    summary = preprocess_instructions(config)
    assert (summary.written["train"], summary.truncated) == (2, 1)
    assert dict(summary.dropped) == {"prompt_too_long": 1}
    assert "dropped: 1 (prompt_too_long: 1)" in summary.report()
    data = InstructionDataset(tmp_path / "o_train")
    prompt, response = data[1]
    assert len(prompt) + len(response) == max_length
    assert response.tolist() == tok.encode(long_answer["output"])[: max_length - len(prompt)]
    config.append_eos = True  # the EOS goes with a cut; a complete response keeps it
    preprocess_instructions(config)
    assert [r[-1] == tok.eos_id for _, r in (InstructionDataset(tmp_path / "o_train")[i] for i in range(2))] == [
        True,
        False,
    ]


def test_split_is_deterministic(tmp_path, hf_dir):
    records = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(40)]
    path = _jsonl(tmp_path / "d.jsonl", records)

    def run(name: str, **kwargs) -> set:
        preprocess_instructions(InstructionConfig([path], str(tmp_path / name), hf_dir, **kwargs))
        return {r["output"] for r in _references(tmp_path / f"{name}_valid")}

    first = run("a", split=0.25, seed=7)
    assert len(first) == 10
    assert run("b", split=0.25, seed=7, workers=2) == first  # the same with a pool of workers
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a_valid{suffix}").read_bytes() == (tmp_path / f"b_valid{suffix}").read_bytes()
    assert run("c", split=0.25, seed=8) != first
    assert len(run("d", split=3)) == 3
    train = {r["output"] for r in _references(tmp_path / "a_train")}
    assert train.isdisjoint(first) and len(train | first) == 40
    with pytest.raises(ValueError, match="split asks for 50 validation rows but the input has 40"):
        run("e", split=50)


def test_bad_rows_raise_with_file_line_or_are_skipped(tmp_path, hf_dir):
    lines = [
        '{"instruction": "a", "output": "b"}',
        '{"instruction": "c", "output": ',
        '{"instruction": "e"}',
        '{"instruction": "f", "output": "g"}',
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "o"
    with pytest.raises(DataFormatError, match=f"^{path}:2: bad JSON"):
        preprocess_instructions(InstructionConfig([str(path)], str(prefix), hf_dir, format="alpaca"))
    assert list(tmp_path.glob("o*")) == []  # nothing half-written is left
    summary = preprocess_instructions(
        InstructionConfig([str(path)], str(prefix), hf_dir, skip_bad_lines=True, workers=2)
    )
    assert (summary.rows_read, summary.written["train"]) == (4, 2)
    assert dict(summary.bad_rows) == {"bad_json": 1, "missing_field": 1}
    assert "bad rows skipped: 2 (bad_json: 1, missing_field: 1)" in summary.report()
    assert [r["source"] for r in _references(tmp_path / "o_train")] == [f"{path}:1", f"{path}:4"]
    with pytest.raises(DataFormatError, match=f"^{path}:2: bad JSON"):  # raised in a worker, re-raised here
        preprocess_instructions(InstructionConfig([str(path)], str(prefix), hf_dir, format="alpaca", workers=2))


def test_cli_end_to_end_on_shipped_data(tmp_path, hf_dir):
    prefix = tmp_path / "t0"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "instructions",
            "--input",
            str(DATA / "t0_train_600.jsonl"),
            "--tokenizer",
            hf_dir,
            "--output-prefix",
            str(prefix),
            "--split",
            "0.1",
            "--workers",
            "2",
            "--max-prompt-length",
            "384",
            "--max-length",
            "448",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())["summary"]
    assert summary["rows_read"] == 600 and done.stdout.startswith("rows read: 600, bad rows skipped: 0\n")
    written = summary["written"]
    dropped = sum(summary["dropped"].values())
    assert written["train"] + written["valid"] + dropped == 600 and written["valid"] > 0
    assert f"written: {written['train']} train" in done.stdout
    for split in ("train", "valid"):
        data = InstructionDataset(f"{prefix}_{split}")
        assert len(data) == written[split] == len(_references(Path(f"{prefix}_{split}")))
        assert int((data.prompt_lengths + data.response_lengths).max()) <= 448
        assert int(data.prompt_lengths.max()) <= 384
