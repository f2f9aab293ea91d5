"""`bash scripts/paper_table.sh --quick --tp 1 --seeds 1`: the paper's comparison on the real SmolLM2 teacher, end to end.

One training seed keeps the test short (the quick demo, six training launches, one evaluation); the
grouping of several seeds into mean ± std is tests/evaluation/test_metrics_report.py's. The GGUF ->
HF step is the session's (conftest.smollm2_hf), as in tests/test_demo.py."""

import json
import math
import os
import shutil
import subprocess
import time

from harness import ROOT, free_port

METHODS = [
    "teacher",
    "SFT",
    "KD",
    "SeqKD",
    "MiniLLM",
    "MiniLLM w/o length norm",
    "MiniLLM w/o teacher mix",
    "MiniLLM w/o single-step",
]
METRICS = {"rougeL", "rougeL_vs_teacher", "rkl@student", "fkl@student", "rkl@teacher", "fkl@teacher", "exacc_err"}


def test_quick_paper_table_runs_end_to_end(smollm2_hf, tmp_path):
    out = tmp_path / "paper"
    shutil.copytree(smollm2_hf, out / "demo" / "teacher_hf")  # the demo skips the GGUF's conversion
    env = os.environ | {"MASTER_PORT": str(free_port())}

    def paper_table() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/paper_table.sh", "--quick", "--tp", "1", "--seeds", "1", "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )

    run = paper_table()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    table = json.loads((out / "table.json").read_text())
    assert [m["name"] for m in table["models"]] == METHODS
    for method in table["models"]:
        expected = {"rougeL", "ece", "length"} | (METRICS if method["name"] != "teacher" else set())
        assert expected <= set(method["metrics"]), method["name"]
        assert all(m["mean"] is not None and math.isfinite(m["mean"]) for m in method["metrics"].values()), method
        runs = [method["name"]] if method["name"] in ("teacher", "SFT") else [method["name"] + "@1"]
        assert method["details"]["runs"] == runs
    assert (out / "table.md").read_text() in run.stdout  # the table is printed
    for name in (
        "kd",
        "seqkd",
        "minillm",
        "minillm_no_length_norm",
        "minillm_no_teacher_mix",
        "minillm_no_single_step",
    ):
        assert (out / "train" / "seed1" / name / "latest").read_text().strip() == "1", name

    start = time.monotonic()  # every step's output exists: a second run only prints the tables
    again = paper_table()
    assert again.returncode == 0 and "| MiniLLM w/o single-step |" in again.stdout, again.stderr[-3000:]
    assert "iteration " not in again.stdout and "generating" not in again.stderr  # no training, no evaluation
    assert time.monotonic() - start < 90
