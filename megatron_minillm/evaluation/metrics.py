"""Evaluation metrics of the MiniLLM paper as pure functions of texts, token statistics and arrays.

The evaluator (generation with the sampler) computes the inputs; per-token divergences come from
:mod:`megatron_minillm.losses` (e.g. ``forward_kl(..., reduction="none")``), not from here.
Formulas and sources are in docs/evaluation.md.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Rouge-L F-measure x 100 of one prediction, the best over its references.

    As LMOps ``minillm/rouge_metric.py`` (``rouge`` + ``metric_max_over_ground_truths``): Google's
    rouge-score, ``RougeScorer(['rougeL'], use_stemmer=True)``, which lower-cases, keeps [a-z0-9]
    tokens only (other scripts score 0) and Porter-stems words longer than 3 letters.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    return 100.0 * max(_ROUGE.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in refs)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean of :func:`rouge_l` over examples (LMOps ``compute_metrics``, which instead silently cuts
    the longer list; here unequal lengths are an error)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (>= 1), got {len(predictions)} and {len(references)}")
    return float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of a metric over seeds."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return values.reshape(-1) if mask is None else values[mask.bool()]


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor | None = None, n_bins: int = 10
) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over ``n_bins`` equal-width bins of confidence.

    As defined by Guo et al. 2017, "On Calibration of Modern Neural Networks": bin b holds the tokens with
    confidence in ((b-1)/M, b/M] (0 goes to the first bin); acc_b is their fraction of correct
    predictions and conf_b their mean confidence. Tokens where ``mask`` is 0 are ignored.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = _masked(confidence, mask).double()
    hit = _masked(correct, mask).double()
    if conf.numel() == 0:
        raise ValueError("expected_calibration_error: no unmasked token")
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    gap = (torch.bincount(bins, hit, n_bins) - torch.bincount(bins, conf, n_bins)).abs()  # n_b |acc_b - conf_b|
    return float(gap.sum() / count.sum())


def next_token_ece(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None, n_bins: int = 10
) -> float:
    """ECE of next-token predictions from full-vocabulary logits [..., V] (gather TP shards first):
    confidence = max_v softmax(logits)_v, correct = (argmax_v logits == target)."""
    probs = torch.softmax(logits.double(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return expected_calibration_error(confidence, predicted == targets, mask, n_bins)


@dataclass(frozen=True)
class ExposureBias:
    """Curves over generation length l = 1..L (index l-1), averaged over prompts."""

    regret: np.ndarray  # R(l): error accumulated over l free-running steps
    teacher_forced: np.ndarray  # l * eps(l): error accumulated over l steps on teacher prefixes
    exacc_err: np.ndarray  # ExAccErr(l) in %, NaN where l * eps(l) = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.arange(1, len(self.exacc_err) + 1)


def _accumulated(step_error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{t <= l} of the per-step error, averaged over samples per prompt where valid, then over
    prompts: [n, L] or [n, k samples, L] -> [L]."""
    if step_error.shape != mask.shape or step_error.dim() not in (2, 3):
        raise ValueError(
            f"step errors {tuple(step_error.shape)} and mask {tuple(mask.shape)} must both be "
            "[prompts, steps] or [prompts, samples, steps]"
        )
    err, m = step_error.double(), mask.double()
    if err.dim() == 3:
        err = (err * m).sum(1) / m.sum(1).clamp(min=1.0)
    else:
        err = err * m
    return err.cumsum(-1).mean(0)


def exposure_bias(
    free_run_error: torch.Tensor,
    free_run_mask: torch.Tensor,
    teacher_forced_error: torch.Tensor,
    teacher_forced_mask: torch.Tensor,
) -> ExposureBias:
    """ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100%: the share of the error accumulated in
    free-running generation that comes from exposure bias.

    MiniLLM's exposure-bias analysis (Gu et al., arXiv 2306.08543), after Arora et al. 2022 ("Why
    Exposure Bias Matters", arXiv 2204.01171), with the teacher p as the oracle and the student q_theta:

    - R(l) = sum_{t=1..l} E_{y<t ~ q_theta} [ KL(p(.|y<t) || q_theta(.|y<t)) ], the regret over l
      steps on prefixes the model generates itself (``free_run_*``);
    - l eps(l) = sum_{t=1..l} E_{y<t ~ p} [ KL(p(.|y<t) || q_theta(.|y<t)) ], the same on prefixes
      the teacher generates (``teacher_forced_*``), i.e. the per-step error eps(l) under
      teacher forcing times l.

    Inputs are per-step KL(p || q_theta) [prompts, steps] or [prompts, samples, steps] with 0/1
    masks (the evaluator computes them with ``losses.forward_kl(student_logits, teacher_logits,
    mask, reduction="none")``). As LMOps ``evaluate_exposure_bias.py``: samples of one prompt are
    averaged per step over those still generating, a finished sequence adds no more error, the
    cumulative sums are averaged over prompts and the ratio is taken of the averages.
    """
    regret = _accumulated(free_run_error, free_run_mask)
    teacher = _accumulated(teacher_forced_error, teacher_forced_mask)
    if regret.shape != teacher.shape:
        raise ValueError(
            f"free-running ({regret.numel()} steps) and teacher-forced ({teacher.numel()} steps) "
            "errors must cover the same number of steps"
        )
    ratio = torch.where(teacher > 0, (regret - teacher) / teacher, torch.full_like(teacher, float("nan")))
    return ExposureBias(regret.numpy(), teacher.numpy(), 100.0 * ratio.numpy())


def length_stats(lengths: Sequence[int], max_length: int | None = None) -> dict[str, float]:
    """Mean, std, min, median, max of response lengths (tokens); with ``max_length`` also the
    fraction of responses that reached it (cut off rather than ended with EOS)."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("length_stats needs at least one length")
    stats = {"mean": arr.mean(), "std": arr.std(), "min": arr.min(), "median": np.median(arr), "max": arr.max()}
    if max_length is not None:
        stats["at_max_length"] = float((arr >= max_length).mean())
    return {k: float(v) for k, v in stats.items()}
