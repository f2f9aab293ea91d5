"""`bash scripts/demo.sh --quick`: the whole pipeline on the real SmolLM2 teacher, end to end at TP=3."""

import json
import math
import os
import subprocess
import time

from harness import ROOT, free_port


def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = os.environ | {"MASTER_PORT": str(free_port())}

    def demo() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/demo.sh", "--quick", "--out", str(out)],
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
    assert results["info"]["layout"] == {"tp": 3, "pp": 1, "dp": 1}
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
