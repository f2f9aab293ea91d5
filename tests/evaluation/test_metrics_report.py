"""Report files: JSON, the markdown comparison table and the PNG plots."""

import json

import numpy as np
import pytest
import torch

from megatron_minillm.evaluation import ModelResults, exposure_bias, markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results() -> list[ModelResults]:
    ones = torch.ones(1, 3)
    curve = exposure_bias(torch.tensor([[1.0, 2.0, 3.0]]), ones, ones, ones)  # ExAccErr = 0, 50, 100 %
    return [
        ModelResults("teacher", {"rougeL": [27.0, 28.0, 29.0], "ece": [0.05, 0.07, 0.06]}),
        ModelResults("minillm", {"rougeL": [25.5, 24.5], "ece": [0.1, 0.2]}, curve),
        ModelResults("kd", {"rougeL": [22.25]}, exposure_bias(ones * 2, ones, ones, ones)),
    ]


def test_markdown_table():
    assert markdown_table(_results()) == (
        "| model | rougeL | ece |\n"
        "|---|---|---|\n"
        "| teacher | 28.00 ± 1.00 | 0.06 ± 0.01 |\n"
        "| minillm | 25.00 ± 0.71 | 0.15 ± 0.07 |\n"
        "| kd | 22.25 | – |\n"
    )


def test_write_report(tmp_path):
    paths = write_report(_results(), tmp_path / "report")
    assert [p.name for p in paths] == [
        "results.json",
        "results.md",
        "exacc_err.png",
        "metric_rougeL.png",
        "metric_ece.png",
    ]
    data = json.loads(paths[0].read_text())
    assert [m["name"] for m in data["models"]] == ["teacher", "minillm", "kd"]
    rouge = data["models"][0]["metrics"]["rougeL"]
    assert rouge["values"] == [27.0, 28.0, 29.0] and rouge["mean"] == pytest.approx(28.0) and rouge["std"] == 1.0
    curve = data["models"][1]["exposure_bias"]
    assert curve["lengths"] == [1, 2, 3] and np.allclose(curve["exacc_err"], [0.0, 50.0, 100.0])
    assert "exposure_bias" not in data["models"][0]
    for png in paths[2:]:
        content = png.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 5000
    only_metrics = write_report(_results()[:1], tmp_path / "no_curves")
    assert [p.name for p in only_metrics] == ["results.json", "results.md", "metric_rougeL.png", "metric_ece.png"]
