"""`bash scripts/demo.sh --quick --tp 1` into DIR/demo, then `bash scripts/paper_table.sh --quick --tp 1
--seeds 1` on DIR: the demo and the paper's comparison on the real SmolLM2 teacher, end to end (the
paper table reuses the demo's teacher, data and SFT student, so one quick demo serves both scripts).

At TP=1: the demo's own TP=3 layout of that teacher is tested by tests/checkpoint/test_checkpoint_smollm2.py
(generation at TP 1/3 x PP 1/3) and costs three ranks on two cores per launch here. One training seed
keeps the test short; the grouping of several seeds into mean ± std is
tests/evaluation/test_metrics_report.py's. The GGUF -> HF step is the session's (conftest.smollm2_hf,
by the same CLI); every later step runs here."""

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


def _check_demo(demo) -> None:
    """The demo's evaluation: every model's metrics finite, the plots written."""
    results = json.loads((demo / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "SFT", "MiniLLM", "KD"]
    assert results["info"]["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    for model in results["models"]:
        expected = {"rougeL", "ece", "length"} | (
            {"rkl@student", "rkl@teacher"} if model["name"] != "teacher" else set()
        )
        assert expected <= set(model["metrics"]), model["name"]
        assert all(math.isfinite(m["mean"]) for m in model["metrics"].values()), model
    assert (demo / "eval" / "metric_rougeL.png").stat().st_size > 0


def test_quick_demo_and_paper_table_run_end_to_end(smollm2_hf, tmp_path):
    out = tmp_path / "paper"
    shutil.copytree(smollm2_hf, out / "demo" / "teacher_hf")  # the demo skips the GGUF's conversion
    env = os.environ | {"MASTER_PORT": str(free_port())}

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)

    def paper_table() -> subprocess.CompletedProcess:
        return script("scripts/paper_table.sh", "--quick", "--tp", "1", "--seeds", "1", "--out", str(out))

    demo = script("scripts/demo.sh", "--quick", "--tp", "1", "--out", str(out / "demo"))
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-5000:]
    _check_demo(out / "demo")
    assert "| MiniLLM |" in demo.stdout  # the demo's table is printed
    run = paper_table()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "done (--sft-only)" in run.stdout and "iteration " not in run.stdout.split("2. seed 1")[0]
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
