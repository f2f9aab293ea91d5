"""Bad inputs end cleanly (issue 19): one line naming the path, key or value and what to do, exit
status 2 (1 for the unexpected, with MINILLM_DEBUG=1 for its traceback), no traceback, the user's
files untouched; outputs checked before any model loads; lone tools on free ports. The SIGTERM exit
status under the launcher: tests/training/test_trainer.py."""

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from harness import run_distributed, run_tool_in_workers
from tokenizer_zoo import copy_with_extra_token

from megatron_minillm.cli import run_cli
from megatron_minillm.config import ConfigError
from megatron_minillm.data import InstructionConfig, preprocess_instructions
from megatron_minillm.paths import OutputPathError, check_output_path


def assert_one_error(done: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> None:
    """Exit ``status``, no traceback, the last stderr line ``error: ...`` holding every fragment."""
    assert done.returncode == status, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last


def test_output_paths_are_checked_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("the user's")
    existing = tmp_path / "existing"
    existing.mkdir()
    refused = {
        a_file / "ckpt": f"--out {a_file / 'ckpt'}: {a_file} is a file, not a directory",
        a_file: f"--out {a_file} is a file; give a directory path",
        existing: f"--out {existing} exists; pass --overwrite to replace it",
        Path("/proc/minillm-ckpt"): "--out /proc/minillm-ckpt: cannot write in /proc",
    }
    for path, message in refused.items():
        with pytest.raises(OutputPathError, match=re.escape(message)):
            check_output_path(path, "--out")
    with pytest.raises(OutputPathError, match=r"--out .*new: needs about .* GB, only .* GB free under"):
        check_output_path(tmp_path / "new", "--out", expected_bytes=2**62)
    with pytest.raises(OutputPathError, match=f"--output {existing} is a directory; give a file path"):
        check_output_path(existing, "--output", is_dir=False, exist_ok=True)
    assert check_output_path(existing, "--out", exist_ok=True) == existing
    assert check_output_path(tmp_path / "a" / "b", "--out", expected_bytes=1) == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "file"]  # nothing created, no probe left


def test_one_line_errors_and_the_debug_switch(capsys, monkeypatch):
    torn_down = []

    def bad_input() -> None:
        raise ConfigError("optimizer.lr must be a finite number > 0, got nan")

    def bug() -> None:
        raise RuntimeError("boom")

    monkeypatch.delenv("MINILLM_DEBUG", raising=False)
    assert run_cli(bad_input, teardown=lambda: torn_down.append(1)) == 2
    assert capsys.readouterr().err == "error: optimizer.lr must be a finite number > 0, got nan\n"
    assert run_cli(bug, teardown=lambda: torn_down.append(1)) == 1
    assert capsys.readouterr().err == "error: RuntimeError: boom (unexpected; MINILLM_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    assert run_cli(bug) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: RuntimeError: boom\n")
    assert torn_down == [1, 1]


def _train(tiny_pair: dict[str, Path], *overrides: str) -> subprocess.CompletedProcess:
    return run_tool_in_workers(
        "-m",
        "megatron_minillm.train",
        f"student={tiny_pair['student']}",
        f"teacher={tiny_pair['teacher']}",
        f"data={tiny_pair['data']}",
        "training.max_prompt_length=64",
        "training.max_length=96",
        *overrides,
    )


def test_training_refuses_what_cannot_train_before_loading_a_model(tiny_pair, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("the user's")
    assert_one_error(_train(tiny_pair, "optimizer.lr=nan"), "optimizer.lr must be a finite number > 0, got nan")
    assert_one_error(_train(tiny_pair, "rollout.temperature=0"), "rollout.temperature must be a finite number > 0")
    assert_one_error(
        _train(tiny_pair, "training.max_length=200"),
        "training.max_length=200 exceeds the student's context of 128 positions",
        f"{tiny_pair['student']}/config.json",
    )
    assert_one_error(
        _train(tiny_pair, f"checkpoint.save={a_file / 'run'}"), f"checkpoint.save {a_file / 'run'}", "is a file"
    )
    assert_one_error(_train(tiny_pair, "checkpoint.save=/proc/minillm-run"), "cannot write in /proc")
    assert a_file.read_text() == "the user's"
    # Data that does not match the run: prompts the config would cut, another tokenizer's dataset.
    assert_one_error(
        _train(tiny_pair, "training.max_prompt_length=16", "training.max_length=96"),
        f"{tiny_pair['data']} holds prompts of up to 64 tokens",
        "over max_prompt_length=16",
    )
    other_tokenizer = copy_with_extra_token(tiny_pair["student"], tmp_path / "other_tokenizer")
    config = InstructionConfig(
        inputs=[str(tiny_pair["valid"])],
        output_prefix=str(tmp_path / "other"),
        tokenizer=str(other_tokenizer),
        max_prompt_length=64,
        max_length=96,
        template="none",
    )
    preprocess_instructions(config)
    assert_one_error(_train(tiny_pair, f"data={tmp_path / 'other_train'}"), "other_summary.json", "tokenizer")


def test_tools_name_the_bad_path_or_value(tiny_pair, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("{}\n{}\n")  # a JSON parser's 'Extra data: line 2' if read as config.json
    user_dir = tmp_path / "user_dir"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("the user's")
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    convert = "tools/checkpoint/convert.py"
    assert_one_error(
        run_tool_in_workers(convert, "hf-to-mcore", "--hf", str(a_file), "--out", str(tmp_path / "c")),
        f"--hf {a_file} is a file; give the directory holding config.json",
    )
    assert_one_error(
        run_tool_in_workers("tools/checkpoint/make_student.py", "--hf", str(a_file), "--out", "x", "--num-layers", "1"),
        f"--hf {a_file} is a file",
    )
    # gguf-to-hf refuses an existing --out (it used to delete it) and keeps the user's files
    assert_one_error(
        run_tool_in_workers(convert, "gguf-to-hf", "--gguf", str(fake_gguf), "--out", str(user_dir)),
        f"--out {user_dir} exists; pass --overwrite",
    )
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]

    generate = ["tools/generate.py", "--load", str(tiny_pair["student"]), "--prompts", str(tiny_pair["valid"])]
    out = ["--output", str(tmp_path / "out.jsonl")]
    assert_one_error(
        run_tool_in_workers(*generate, *out, "--max-new-tokens", "4", "--temperature", "0"),
        "temperature must be a finite number > 0, got 0.0; --greedy decodes without sampling",
    )
    assert_one_error(
        run_tool_in_workers(*generate, *out, "--max-new-tokens", "500"),
        "--max-new-tokens 500 leaves no room for a prompt",
        "(128 positions",
    )
    assert_one_error(
        run_tool_in_workers(*generate, "--output", str(a_file / "out.jsonl"), "--max-new-tokens", "4"),
        f"--output {a_file / 'out.jsonl'}: {a_file} is a file",
    )
    evaluate = ["tools/evaluate.py", "--load", str(tiny_pair["student"]), "--data", str(tiny_pair["valid"])]
    assert_one_error(
        run_tool_in_workers(*evaluate, "--output-dir", str(a_file / "eval")), f"{a_file} is a file, not a directory"
    )
    assert_one_error(
        run_tool_in_workers("tools/check_layout.py", "--model", str(a_file), "--world-size", "1"),
        f"{a_file} is not a JSON object",
    )
    # A poisoned checkpoint index would run `touch` when unpickled: refused before anything reads it.
    poisoned = shutil.copytree(tiny_pair["student"], tmp_path / "poisoned")
    marker = tmp_path / "PWNED"
    index = poisoned / "model" / ".metadata"
    index.write_bytes(b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR0" + index.read_bytes())
    (poisoned / "manifest.json").unlink()
    assert_one_error(
        run_tool_in_workers("tools/generate.py", "--load", str(poisoned), *generate[3:], *out, "--max-new-tokens", "4"),
        f"{index} refused: it asks for posix.system",
    )
    assert not marker.exists()
    assert not (tmp_path / "out.jsonl").exists() and a_file.read_text() == "{}\n{}\n"


def _init_without_master_port() -> str:
    from megatron_minillm.parallel import init_distributed

    del os.environ["MASTER_PORT"]
    init_distributed()
    return os.environ["MASTER_PORT"]


def test_a_lone_process_picks_a_free_port():
    """Two tools at once used to collide on 29500 (EADDRINUSE): here 29500 is taken while a lone
    process without MASTER_PORT forms its process group."""
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # taken by someone else already: the same situation
        [port] = run_distributed(_init_without_master_port, 1)
    assert port != "29500"
