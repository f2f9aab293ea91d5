"""Report files: JSON, the markdown comparison table and the PNG plots."""

import json

import numpy as np
import pytest
import torch

from megatron_minillm.evaluation import (
    ModelResults,
    exposure_bias,
    markdown_table,
    merge_results,
    method_name,
    to_json,
    write_report,
)

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


def _evaluation(rows: dict[str, dict[str, list[float]]], checkpoints: dict[str, str]) -> dict:
    """A results.json of tools/evaluate.py: rows of per-seed metric values."""
    data = to_json([ModelResults(name, metrics) for name, metrics in rows.items()], {"checkpoints": checkpoints})
    return json.loads(json.dumps(data))  # as read back from the file


def test_merge_results_groups_runs_by_method():
    first = _evaluation(
        {
            "teacher": {"rougeL": [30.0, 32.0]},
            "SFT": {"rougeL": [10.0, 12.0], "rkl@teacher": [5.0, 5.0]},
            "KD@1": {"rougeL": [20.0, 22.0], "rkl@teacher": [4.0, 4.0]},
            "MiniLLM@1": {"rougeL": [24.0, 26.0], "rkl@teacher": [3.0, 3.5]},
            "KD@2": {"rougeL": [18.0, 18.0], "rkl@teacher": [4.5, 4.5]},
        },
        {"teacher": "/t", "SFT": "/s", "KD@1": "/kd1", "MiniLLM@1": "/m1", "KD@2": "/kd2"},
    )
    # a second evaluation with the same teacher checkpoint: its row counts once
    second = _evaluation(
        {"teacher": {"rougeL": [30.0, 32.0]}, "MiniLLM@2": {"rougeL": [28.0, 28.0]}}, {"teacher": "/t"}
    )
    methods = merge_results([first, second])
    assert [m.name for m in methods] == ["teacher", "SFT", "KD", "MiniLLM"]
    by_name = {m.name: m for m in methods}
    assert by_name["KD"].details["runs"] == ["KD@1", "KD@2"]
    assert by_name["KD"].metrics == {"rougeL": [21.0, 18.0], "rkl@teacher": [4.0, 4.5]}  # each run's seed mean
    assert by_name["MiniLLM"].metrics["rougeL"] == [25.0, 28.0]
    assert by_name["teacher"].metrics == {"rougeL": [31.0]}
    assert by_name["SFT"].details["eval_std"]["rougeL"] == [pytest.approx(2**0.5)]
    assert markdown_table(methods) == (
        "| model | rougeL | rkl@teacher |\n"
        "|---|---|---|\n"
        "| teacher | 31.00 | – |\n"
        "| SFT | 11.00 | 5.00 |\n"
        "| KD | 19.50 ± 2.12 | 4.25 ± 0.35 |\n"
        "| MiniLLM | 26.50 ± 2.12 | 3.25 |\n"
    )
    kd = json.loads(json.dumps(to_json(methods)))["models"][2]
    assert kd["metrics"]["rougeL"] == {"values": [21.0, 18.0], "mean": 19.5, "std": pytest.approx(4.5**0.5)}
    assert method_name("MiniLLM w/o length norm@2") == "MiniLLM w/o length norm" and method_name("SFT") == "SFT"


def test_merge_results_refuses_one_name_for_two_checkpoints():
    a = _evaluation({"KD@1": {"rougeL": [1.0]}}, {"KD@1": "/a"})
    b = _evaluation({"KD@1": {"rougeL": [2.0]}}, {"KD@1": "/b"})
    with pytest.raises(ValueError, match="KD@1"):
        merge_results([a, b])
    undefined = _evaluation({"KD@1": {"exacc_err": [float("nan")]}}, {})
    [kd] = merge_results([undefined])  # null in the file: NaN, and null again in to_json
    assert to_json([kd])["models"][0]["metrics"]["exacc_err"] == {"values": [None], "mean": None, "std": 0.0}
