"""Datasets that match the run: the summary's tokenizer and limits, empty inputs, stale splits, prompt ids."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from harness import run_tool_in_workers
from tokenizer_zoo import copy_with_extra_token, hf_tokenizer_dir, sentencepiece_model

from megatron_minillm.data import (
    DataFormatError,
    DatasetLayoutError,
    InstructionConfig,
    InstructionDataset,
    PreprocessConfig,
    PretrainDataset,
    TokenizerMismatchError,
    check_dataset_matches,
    load_tokenizer,
    preprocess_instructions,
    preprocess_pretrain,
    read_dataset_summary,
)
from megatron_minillm.data.prompts import load_prompts

RECORDS = [{"instruction": f"Repeat the number {i}.", "output": str(i)} for i in range(12)]


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("o_"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """An instruction dataset (train split) of RECORDS, tokenized with the zoo's HF tokenizer."""
    root = tmp_path_factory.mktemp("checked")
    path = _jsonl(root / "d.jsonl", RECORDS)
    preprocess_instructions(InstructionConfig([path], str(root / "o"), str(hf_tokenizer_dir()), max_prompt_length=128))
    return root / "o_train"


def test_summary_records_the_tokenizer_and_the_same_one_passes(dataset, tmp_path):
    source = hf_tokenizer_dir()
    record = read_dataset_summary(dataset)
    tok = load_tokenizer(shutil.copytree(source, tmp_path / "again"))  # the same vocabulary, loaded elsewhere
    assert record["tokenizer"] == {
        "path": str(source),
        "vocab_size": 600,
        "model_vocab_size": None,
        "eos_id": 0,
        "bos_id": 0,
        "pad_id": 1,
        "fingerprint": tok.fingerprint(),
    }
    assert record["limits"] == {"max_prompt_length": 128, "max_length": 512}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching dataset passes without a word
        check_dataset_matches(dataset, tok, max_prompt_length=128, max_length=512)
        check_dataset_matches(dataset, tok)


def _swapped_ids(out: Path) -> Path:
    """The zoo's tokenizer with two ordinary tokens' ids swapped: same size and EOS, another vocabulary."""
    shutil.copytree(hf_tokenizer_dir(), out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (token for token, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def _other_eos(out: Path) -> Path:
    shutil.copytree(hf_tokenizer_dir(), out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|pad|>"}))
    return out


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda out: copy_with_extra_token(hf_tokenizer_dir(), out),
            r"vocabulary size 600\), .*\(vocabulary size 601\)",
        ),
        (lambda out: sentencepiece_model(), r"vocabulary size 600\), .*\(vocabulary size 400\)"),
        (_other_eos, r"EOS id 0\), .*\(EOS id 1\)"),
        (_swapped_ids, r"vocabulary fingerprint [0-9a-f]{12}\), .*\(vocabulary fingerprint [0-9a-f]{12}\)"),
    ],
    ids=["extra_token", "sentencepiece", "other_eos", "same_size_other_tokens"],
)
def test_another_tokenizer_is_refused_naming_both(dataset, tmp_path, make, message):
    other = load_tokenizer(make(tmp_path / "other"))
    with pytest.raises(TokenizerMismatchError, match=message) as err:
        check_dataset_matches(dataset, other)
    text = str(err.value)
    assert text.startswith(f"{dataset.parent / 'o_summary.json'}: ")
    assert str(hf_tokenizer_dir()) in text and f"--tokenizer {other.path}" in text


def test_length_limits_refuse_cut_prompts_and_warn_where_harmless(dataset, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir())
    data = InstructionDataset(dataset)
    longest = int(data.prompt_lengths.max())
    longest_total = int((data.prompt_lengths + data.response_lengths).max())
    with pytest.raises(DatasetLayoutError, match=f"up to {longest} tokens .*over max_prompt_length={longest - 1}"):
        check_dataset_matches(dataset, tok, max_prompt_length=longest - 1, max_length=512)
    with pytest.warns(UserWarning, match=f"longer than max_length={longest_total - 1} \\(up to {longest_total}"):
        check_dataset_matches(dataset, tok, max_prompt_length=longest, max_length=longest_total - 1)
    with pytest.warns(UserWarning, match="dropped prompts over 128 tokens .* max_prompt_length=256 would take them"):
        check_dataset_matches(dataset, tok, max_prompt_length=256, max_length=512)
    # A dataset without a summary (an older one) is read with a warning; its lengths are still checked.
    for name in ("o_train.bin", "o_train.idx"):
        shutil.copy(dataset.parent / name, tmp_path / name)
    with pytest.warns(UserWarning, match="o_summary.json not found"):
        check_dataset_matches(tmp_path / "o_train", tok, max_prompt_length=128, max_length=512)
    with pytest.warns(UserWarning), pytest.raises(DatasetLayoutError, match="over max_prompt_length"):
        check_dataset_matches(tmp_path / "o_train", tok, max_prompt_length=longest - 1, max_length=512)
    (tmp_path / "o_summary.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=f"^{tmp_path / 'o_summary.json'} is not a dataset summary"):
        check_dataset_matches(tmp_path / "o_train", tok)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "Name a colour.", "response": ""}, "field 'response' is empty"),
        ({"instruction": "  \n", "output": "Blue."}, "field 'instruction' is empty"),
        (
            {"instruction": "Translate.", "instances": [{"input": "cat", "output": " "}]},
            r"\(instance 0\): field 'output'",
        ),
        ({"prompt": "Sky?", "completion": ""}, "field 'completion' is empty"),
        (
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]},
            r"the last message \(the response\) is empty",
        ),
    ],
    ids=["dolly", "alpaca", "self_instruct", "prompt_completion", "chat"],
)
def test_empty_instruction_or_response_is_an_error_or_a_counted_skip(tmp_path, record, message):
    path = _jsonl(tmp_path / "d.jsonl", [record] * 2)
    config = InstructionConfig([path], str(tmp_path / "o"), str(hf_tokenizer_dir()))
    with pytest.raises(DataFormatError, match=f"^{path}:1.*{message}"):
        preprocess_instructions(config)
    assert _names(tmp_path) == []  # nothing half-written
    config.skip_bad_lines = True  # every row skipped: no example left is an error too
    with pytest.raises(DataFormatError, match=r"no example left for the train split .*empty_field: 2"):
        preprocess_instructions(config)
    assert _names(tmp_path) == []


def test_empty_pretraining_input_is_an_error_through_the_cli(tmp_path):
    empty, blank = tmp_path / "empty.jsonl", _jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 3)
    empty.write_text("")
    args = ["pretrain", "--tokenizer", str(sentencepiece_model()), "--output-prefix", str(tmp_path / "o")]
    done = run_tool_in_workers("tools/preprocess_data.py", *args, "--input", str(empty))
    assert (done.returncode, done.stderr) == (2, f"error: {empty}: holds no record; nothing to write\n")
    with pytest.raises(DataFormatError, match=r"no example left for the train split .*empty_text: 3"):
        preprocess_pretrain(PreprocessConfig([blank], str(tmp_path / "o"), str(sentencepiece_model())))
    assert _names(tmp_path) == []


def test_all_prompts_dropped_is_an_error_naming_the_limit(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", RECORDS)
    config = InstructionConfig([path], str(tmp_path / "o"), str(hf_tokenizer_dir()), max_prompt_length=4)
    with pytest.raises(DataFormatError, match=r"prompt_too_long: 12\); raise --max-prompt-length"):
        preprocess_instructions(config)
    assert _names(tmp_path) == []


def test_rerun_removes_stale_splits_and_a_failed_run_keeps_the_old_dataset(tmp_path):
    path, tokenizer = _jsonl(tmp_path / "d.jsonl", RECORDS), str(hf_tokenizer_dir())
    preprocess_instructions(InstructionConfig([path], str(tmp_path / "o"), tokenizer, split=3))
    splits = ["o_summary.json"] + [f"o_{s}{x}" for s in ("train", "valid") for x in (".bin", ".idx", ".jsonl")]
    assert _names(tmp_path) == sorted(splits)
    (tmp_path / "o_valid.bin.partial").write_text("left by a killed run")
    summary = preprocess_instructions(InstructionConfig([path], str(tmp_path / "o"), tokenizer))
    stale = [str(tmp_path / f"o_valid{x}") for x in (".bin", ".idx", ".jsonl", ".bin.partial")]
    assert sorted(summary.removed) == sorted(stale) and "removed stale files of an earlier run" in summary.report()
    assert _names(tmp_path) == ["o_summary.json", "o_train.bin", "o_train.idx", "o_train.jsonl"]
    assert read_dataset_summary(tmp_path / "o_train")["summary"]["removed"] == summary.removed
    before = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataFormatError, match=f"^{bad}:2: bad JSON"):
        preprocess_pretrain(PreprocessConfig([str(bad)], str(tmp_path / "o"), tokenizer))
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == before
    preprocess_pretrain(
        PreprocessConfig([_jsonl(tmp_path / "t.jsonl", [{"text": "Some text."}])], str(tmp_path / "o"), tokenizer)
    )
    assert _names(tmp_path) == ["o_summary.json", "o_train.bin", "o_train.idx"]  # no stale references


@pytest.mark.parametrize(
    "ids, message",
    [
        ([5, 600], "token id 600 (position 1), outside the vocabulary of {tok} (ids 0 to 599)"),
        ([-1], "token id -1 (position 0), outside the vocabulary"),
        ([], "'input_ids' is empty"),
        ([1, True], "'input_ids' must be a list of integers"),
    ],
    ids=["past_the_end", "negative", "empty", "boolean"],
)
def test_prompt_ids_outside_the_vocabulary_are_refused(tmp_path, ids, message):
    tok = load_tokenizer(hf_tokenizer_dir())
    path = _jsonl(tmp_path / "p.jsonl", [{"input_ids": [1, 2, 599]}, {"input_ids": ids}])
    with pytest.raises(DataFormatError) as err:
        load_prompts(path, tok)
    assert str(err.value).startswith(f"{path}:2: ") and message.format(tok=tok.path) in str(err.value)
    assert load_prompts(_jsonl(tmp_path / "ok.jsonl", [{"input_ids": [1, 2, 599]}]), tok)[0].ids == [1, 2, 599]


def test_empty_damaged_or_too_short_datasets_are_named(dataset, tmp_path):
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{dataset}{suffix}", tmp_path / f"damaged{suffix}")
        (tmp_path / f"empty{suffix}").write_bytes(b"")
    (tmp_path / "damaged.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(range(64)))
    with pytest.raises(DatasetLayoutError, match="empty.bin is empty: the dataset holds no tokens"):
        InstructionDataset(tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match=r"damaged.idx is damaged \(.* bytes, its header needs"):
        InstructionDataset(tmp_path / "damaged")
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "a short text"}])
    preprocess_pretrain(PreprocessConfig([text], str(tmp_path / "pt"), str(hf_tokenizer_dir())))
    with pytest.raises(DatasetLayoutError, match=r"pt_train holds \d+ tokens, fewer than one chunk of 4097"):
        PretrainDataset(tmp_path / "pt_train", 4097)
