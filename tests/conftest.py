import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Tests import the harness and the HF zoo as top-level modules (spawned ranks re-import them too).
sys.path.insert(0, str(Path(__file__).parent))

# torchrun, inductor and dist_checkpointing write under the temp dir: keep it inside the test run.
_tmp = Path(tempfile.gettempdir()) / f"minillm-tests-{os.getpid()}"
_tmp.mkdir(parents=True, exist_ok=True)
os.environ["TMPDIR"] = str(_tmp)
tempfile.tempdir = str(_tmp)
atexit.register(shutil.rmtree, _tmp, ignore_errors=True)

# After the temp dir is registered: atexit runs in reverse, so the harness stops its workers first.
from harness import ROOT, run_tool_in_workers  # noqa: E402
from hf_zoo import llama_with_tokenizer  # noqa: E402
from tokenizer_zoo import hf_tokenizer_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """Teacher (4 layers) and student (2 layers) checkpoints, instruction and pretraining datasets;
    shared by the trainer and device-placement tests."""
    root = tmp_path_factory.mktemp("trainer")
    out = {}
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 0)):
        hf_dir = llama_with_tokenizer(
            root / f"{name}_hf", seed, hf_tokenizer_dir(), layers=layers, context=128, sharpen=4.0
        )
        # Converted by 2 processes at TP=2 (the converter's TP path; the vocabulary is padded for TP=2).
        done = run_tool_in_workers(
            "tools/checkpoint/convert.py",
            "hf-to-mcore",
            "--hf",
            str(hf_dir),
            "--out",
            str(root / name),
            "--tp",
            "2",
            nproc=2,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        out[name] = root / name
    short = [
        line
        for line in (ROOT / "examples" / "data" / "t0_train_600.jsonl").read_text().splitlines()
        if len(json.loads(line)["prompt"]) < 160
    ][:80]
    (root / "inst.jsonl").write_text("\n".join(short) + "\n")
    (root / "pt.jsonl").write_text(
        "\n".join((ROOT / "examples" / "data" / "t0_passages_300.jsonl").read_text().splitlines()[:20]) + "\n"
    )
    for args in (
        [
            "instructions",
            "--input",
            str(root / "inst.jsonl"),
            "--output-prefix",
            str(root / "inst"),
            "--max-prompt-length",
            "64",
            "--max-length",
            "96",
            "--split",
            "8",
            "--template",
            "none",
        ],
        ["pretrain", "--input", str(root / "pt.jsonl"), "--output-prefix", str(root / "pt")],
    ):
        done = run_tool_in_workers("tools/preprocess_data.py", *args, "--tokenizer", str(out["student"]))
        assert done.returncode == 0, done.stderr[-2000:]
    out.update(data=root / "inst_train", pt=root / "pt_train", valid=root / "inst_valid.jsonl")
    return out


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, from the packaged GGUF by the converter's CLI; shared by
    the converter and demo tests (the GGUF's dequantisation is most of a conversion's time)."""
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    done = run_tool_in_workers("tools/checkpoint/convert.py", "gguf-to-hf", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out
