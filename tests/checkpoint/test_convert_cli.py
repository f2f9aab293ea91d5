"""tools/checkpoint/convert.py end to end in one process: dtype conversion and its clear errors.

The first conversion is a process of its own; the other runs use the harness's warm ranks."""

import json

import torch
from harness import run_tool, run_tool_in_workers
from hf_zoo import hf_model
from safetensors.torch import load_file

_convert = lambda *args: run_tool_in_workers("tools/checkpoint/convert.py", *args, timeout=300)


def test_cli_bf16_round_trip_and_errors(tmp_path):
    hf_dir, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    hf_model("gpt2").save_pretrained(hf_dir)

    done = run_tool(
        "tools/checkpoint/convert.py", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(ckpt), "--dtype", "bf16"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((ckpt / "minillm_checkpoint.json").read_text())["dtype"] == "bf16"
    again = _convert("hf-to-mcore", "--hf", str(hf_dir), "--out", str(ckpt))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr

    done = _convert("mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    original = load_file(hf_dir / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in original.items())

    missing = _convert("hf-to-mcore", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and f"--hf {tmp_path / 'nowhere'} does not exist" in missing.stderr

    not_ckpt = _convert("mcore-to-hf", "--ckpt", str(hf_dir), "--out", str(tmp_path / "y"))
    assert not_ckpt.returncode == 2 and "is not a megatron_minillm checkpoint" in not_ckpt.stderr

    (tmp_path / "half.partial").mkdir()  # what an interrupted save leaves behind
    half = _convert("mcore-to-hf", "--ckpt", str(tmp_path / "half"), "--out", str(tmp_path / "z"))
    assert half.returncode == 2 and "a half-written save is at" in half.stderr
    half = _convert("mcore-to-hf", "--ckpt", str(tmp_path / "half.partial"), "--out", str(tmp_path / "z"))
    assert half.returncode == 2 and "is a half-written checkpoint" in half.stderr
