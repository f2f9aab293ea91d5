"""`bash scripts/demo.sh --quick --tp 1`: the whole pipeline on the real SmolLM2 teacher, end to end.

At TP=1: the demo's own TP=3 layout of that teacher is tested by tests/checkpoint/test_checkpoint_smollm2.py
(generation at TP 1/3 x PP 1/3) and costs three ranks on two cores per launch here. The GGUF -> HF step
is the session's (conftest.smollm2_hf, by the same CLI); every later step runs here."""

import json
import math
import os
import shutil
import subprocess
import time

from harness import ROOT, free_port


def test_quick_demo_runs_end_to_end(smollm2_hf, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(smollm2_hf, out / "teacher_hf")  # the GGUF's conversion (conftest): the demo skips it
    env = os.environ | {"MASTER_PORT": str(free_port())}

    def demo() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/demo.sh", "--quick", "--tp", "1", "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    run = demo()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "SFT", "MiniLLM", "KD"]
    assert results["info"]["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    for model in results["models"]:
        expected = {"rougeL", "ece", "length"} | (
            {"rkl@student", "rkl@teacher"} if model["name"] != "teacher" else set()
        )
        assert expected <= set(model["metrics"]), model["name"]
        assert all(math.isfinite(m["mean"]) for m in model["metrics"].values()), model
    assert (out / "eval" / "metric_rougeL.png").stat().st_size > 0
    assert "| MiniLLM |" in run.stdout  # the table is printed

    start = time.monotonic()  # every step's output exists: a second run only prints the table
    again = demo()
    assert again.returncode == 0 and "| MiniLLM |" in again.stdout, again.stderr[-3000:]
    assert "iteration " not in again.stdout and "generating" not in again.stderr  # no training, no evaluation
    assert time.monotonic() - start < 60
