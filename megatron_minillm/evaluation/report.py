"""Evaluation results -> JSON, a markdown comparison table and PNG plots (matplotlib, Agg backend).

One :class:`ModelResults` per model: each metric's values over seeds, optionally its ExAccErr
curve and free-form details (JSON only). Files written by :func:`write_report` into one directory:

- ``results.json``: every value, with mean and std (sample std, ddof=1) per metric, the details,
  and the run's ``info`` (settings, data counts); strict JSON: undefined values are null;
- ``results.md``: rows = models, columns = metrics, "mean ± std" over seeds;
- ``exacc_err.png``: ExAccErr vs generation length, one line per model (when any model has one);
- ``metric_<name>.png``: a bar chart of that metric per model, std as error bars.

:func:`merge_results` turns the rows of several ``results.json`` into one row per method (training
runs "KD@1", "KD@2" -> "KD"), for a table of mean ± std over training runs (tools/merge_results.py).
"""

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from megatron_minillm.evaluation.metrics import ExposureBias, mean_std  # noqa: E402


@dataclass
class ModelResults:
    name: str
    metrics: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per seed
    exposure_bias: ExposureBias | None = None
    details: dict = field(default_factory=dict)  # JSON-serialisable extras (e.g. full length statistics)


def _metric_names(results: Sequence[ModelResults]) -> list[str]:
    return list(dict.fromkeys(name for r in results for name in r.metrics))


def _finite(values: Sequence[float]) -> list[float | None]:
    """NaN/inf -> None: JSON has no NaN (ExAccErr is undefined where l eps(l) = 0)."""
    return [float(v) if math.isfinite(v) else None for v in values]


def to_json(results: Sequence[ModelResults], info: dict | None = None) -> dict:
    models = []
    for r in results:
        entry: dict = {"name": r.name, "metrics": {}}
        for name, values in r.metrics.items():
            mean, std = _finite(mean_std(values))
            entry["metrics"][name] = {"values": _finite(values), "mean": mean, "std": std}
        if r.exposure_bias is not None:
            eb = r.exposure_bias
            entry["exposure_bias"] = {
                "lengths": eb.lengths.tolist(),
                "exacc_err": _finite(eb.exacc_err),
                "regret": _finite(eb.regret),
                "teacher_forced": _finite(eb.teacher_forced),
            }
        if r.details:
            entry["details"] = r.details
        models.append(entry)
    return {"info": info, "models": models} if info is not None else {"models": models}


def markdown_table(results: Sequence[ModelResults], digits: int = 2) -> str:
    """Rows = models, columns = metrics; "mean ± std" over seeds (the mean alone for one seed)."""
    names = _metric_names(results)

    def cell(values: list[float] | None) -> str:
        if not values:
            return "–"
        mean, std = mean_std(values)
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"

    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {r.name} | " + " | ".join(cell(r.metrics.get(n)) for n in names) + " |" for r in results]
    return "\n".join(lines) + "\n"


def plot_exposure_bias(results: Sequence[ModelResults], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.exposure_bias is not None:
            ax.plot(r.exposure_bias.lengths, r.exposure_bias.exacc_err, label=r.name)
    ax.set(xlabel="generation length l", ylabel="ExAccErr(l) (%)", title="Excess accumulated error")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric(results: Sequence[ModelResults], metric: str, path: str | Path) -> None:
    shown = [r for r in results if r.metrics.get(metric)]
    stats = [mean_std(r.metrics[metric]) for r in shown]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(shown) + 2), 4))
    ax.bar([r.name for r in shown], [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
    ax.set(ylabel=metric, title=metric)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Sequence[ModelResults], out_dir: str | Path, info: dict | None = None) -> list[Path]:
    """Write every file of the module docstring into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(to_json(results, info), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(results), encoding="utf-8")
    if any(r.exposure_bias is not None for r in results):
        written.append(out / "exacc_err.png")
        plot_exposure_bias(results, written[-1])
    for metric in _metric_names(results):
        written.append(out / f"metric_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png")
        plot_metric(results, metric, written[-1])
    return written


RUN_SEPARATOR = "@"


def method_name(name: str) -> str:
    """The method of a row name: what comes before the first "@" ("KD@2": KD, the run with seed 2);
    a name without "@" is its own method."""
    return name.split(RUN_SEPARATOR, 1)[0]


def merge_results(results: Sequence[dict], method: Callable[[str], str] = method_name) -> list[ModelResults]:
    """The rows of several ``results.json`` (as :func:`to_json` writes them) -> one row per method.

    A row's value of a metric is its mean over the evaluation seeds (NaN where undefined); the rows
    of one method (its training runs, e.g. "KD@1" and "KD@2") become one :class:`ModelResults` whose
    values are those means, one per run, so that :func:`markdown_table` and :func:`to_json` give
    mean ± std over training runs. ``details``: ``runs`` (the merged row names, in order) and
    ``eval_std`` (per metric, each run's std over its evaluation seeds). Methods and metrics keep
    the order of first appearance. A row name may appear in several files only for the same
    checkpoint (``info.checkpoints``: e.g. the teacher of every evaluation); it counts once.
    """
    paths: dict[str, str | None] = {}
    methods: dict[str, ModelResults] = {}
    for data in results:
        checkpoints = (data.get("info") or {}).get("checkpoints") or {}
        for row in data["models"]:
            name, path = row["name"], checkpoints.get(row["name"])
            if name in paths:
                if path is None or paths[name] != path:
                    raise ValueError(
                        f"row {name!r} appears twice for different (or unnamed) checkpoints: {paths[name]}, {path}"
                    )
                continue
            paths[name] = path
            group = methods.setdefault(method(name), ModelResults(method(name), details={"runs": [], "eval_std": {}}))
            group.details["runs"].append(name)
            for metric, stats in row["metrics"].items():
                mean, std = (math.nan if v is None else float(v) for v in (stats["mean"], stats["std"]))
                group.metrics.setdefault(metric, []).append(mean)
                group.details["eval_std"].setdefault(metric, []).append(std if math.isfinite(std) else None)
    return list(methods.values())
