"""tools/generate.py end to end: checkpoints with a real (test-trained) tokenizer, torchrun at
TP=2 x PP=2, greedy tokens equal transformers' generate, teacher-mixed output equal at TP=1, and
the CLI's clear errors. Launched by torchrun once; the other runs use the harness's warm ranks."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from harness import run_tool, run_tool_in_workers
from hf_zoo import llama_with_tokenizer
from tokenizer_zoo import copy_with_extra_token, hf_tokenizer_dir

TEXTS = ["The river flows", "Write a short poem about the sea.", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        hf_dir = llama_with_tokenizer(root / f"hf{seed}", seed, hf_tokenizer_dir())
        done = run_tool_in_workers(
            "tools/checkpoint/convert.py", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(root / name)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out[name], out[f"{name}_hf"] = root / name, hf_dir
    prompts = root / "prompts.jsonl"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out["student_hf"])
    lines = [{"prompt": t} for t in TEXTS] + [{"input_ids": tokenizer.encode("The sea")}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out["prompts"] = prompts
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_equals_transformers_and_mixed_is_layout_invariant(checkpoints, tmp_path):
    c = checkpoints
    greedy = run_tool(
        "tools/generate.py",
        "--load",
        str(c["student"]),
        "--tp",
        "2",
        "--pp",
        "2",
        "--prompts",
        str(c["prompts"]),
        "--max-new-tokens",
        "12",
        "--greedy",
        "--batch-size",
        "3",
        "--output",
        str(tmp_path / "greedy.jsonl"),
        nproc=4,
    )
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(c["student_hf"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(c["student_hf"])
    records = _read(tmp_path / "greedy.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for record, text in zip(records, TEXTS + ["The sea"]):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        assert record["token_ids"] == ref, record["prompt"]
        assert record["text"] == tokenizer.decode(ref, skip_special_tokens=True)
        assert len(record["log_q"]) == len(ref) and all(v <= 0 for v in record["log_q"])

    outputs = {}
    for nproc, tp, pp in ((4, 2, 2), (1, 1, 1)):
        out = tmp_path / f"mixed{tp}{pp}.jsonl"
        done = run_tool_in_workers(
            "tools/generate.py",
            "--load",
            str(c["student"]),
            "--teacher",
            str(c["teacher"]),
            "--mix-alpha",
            "0.5",
            "--tp",
            str(tp),
            "--pp",
            str(pp),
            "--prompts",
            str(c["prompts"]),
            "--max-new-tokens",
            "10",
            "--top-k",
            "20",
            "--seed",
            "3",
            "--output",
            str(out),
            nproc=nproc,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[tp] = _read(out)
    for a, b in zip(outputs[2], outputs[1]):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(a["log_mix"]), torch.tensor(b["log_mix"]), atol=1e-5, rtol=1e-5)
        mix = torch.logaddexp(
            torch.tensor(a["log_p"]) + torch.tensor(0.5).log(), torch.tensor(a["log_q"]) + torch.tensor(0.5).log()
        )
        torch.testing.assert_close(torch.tensor(a["log_mix"]), mix, atol=1e-5, rtol=1e-5)


def test_cli_errors_are_clear(checkpoints, tmp_path):
    c = checkpoints
    common = [
        "tools/generate.py",
        "--load",
        str(c["student"]),
        "--prompts",
        str(c["prompts"]),
        "--output",
        str(tmp_path / "x.jsonl"),
    ]
    bad_alpha = run_tool_in_workers(
        *common, "--max-new-tokens", "4", "--teacher", str(c["teacher"]), "--mix-alpha", "1.5"
    )
    assert bad_alpha.returncode == 2 and "mix_alpha must be in [0, 1], got 1.5" in bad_alpha.stderr
    bad_p = run_tool_in_workers(*common, "--max-new-tokens", "4", "--top-p", "0")
    assert bad_p.returncode == 2 and "top_p must be in (0, 1], got 0.0" in bad_p.stderr
    too_long = run_tool_in_workers(*common, "--max-new-tokens", "60")
    assert too_long.returncode == 2 and "> the student's context of 64 positions" in too_long.stderr

    # A teacher whose tokenizer has one more token: the first mismatch is named.
    other = copy_with_extra_token(c["teacher"], tmp_path / "teacher_other_tok")
    mismatch = run_tool_in_workers(*common, "--max-new-tokens", "4", "--teacher", str(other), "--mix-alpha", "0.2")
    assert mismatch.returncode == 2, mismatch.stderr[-2000:]
    assert "vocabulary sizes differ" in mismatch.stderr and "'<|extra|>'" in mismatch.stderr
