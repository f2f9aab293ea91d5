"""Metrics on hand-checked inputs: Rouge-L, ECE, ExAccErr, lengths, spread over seeds."""

import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from megatron_minillm.evaluation import (
    corpus_rouge_l,
    expected_calibration_error,
    exposure_bias,
    length_stats,
    mean_std,
    next_token_ece,
    rouge_l,
)


def test_rouge_l_hand_checked_and_equal_to_rouge_score():
    assert rouge_l("The cat sat.", "the cat sat") == pytest.approx(100.0)
    assert rouge_l("blue sky", "green grass") == 0.0
    # LCS of [the cat sat on the mat] and [the cat is on the mat] = [the cat on the mat]: P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # LCS([a b c d], [a c]) = 2: P = 1/2, R = 1, F = 2PR / (P + R) = 2/3.
    assert rouge_l("a b c d", "a c") == pytest.approx(200 / 3)
    assert rouge_l("running dogs", "runs dog") == pytest.approx(100.0)  # Porter stemming
    assert rouge_l("a b c d", ["x y", "a c", "a b"]) == pytest.approx(200 / 3)  # best reference
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("The quick brown fox jumps.", "A quick brown dog jumps over it."),
        ("Paris is the capital of France", "The capital of France is Paris."),
        ("I don't know", "No idea, sorry"),
    ]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(100 * scorer.score(ref, pred)["rougeL"].fmeasure)
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    assert corpus_rouge_l(preds, refs) == pytest.approx(np.mean([rouge_l(p, r) for p, r in pairs]))
    with pytest.raises(ValueError, match="need as many predictions as references"):
        corpus_rouge_l(preds, refs[:2])


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt(((-1)^2 + 0 + 1^2) / 2)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_ece_hand_built():
    # bin (0.9, 1]: confidences 0.95, 0.95, one correct -> |0.5 - 0.95| = 0.45 over half the tokens;
    # bin (0.2, 0.3]: 0.25, 0.25, one correct -> |0.5 - 0.25| = 0.25 over the other half.
    conf = torch.tensor([0.95, 0.95, 0.25, 0.25, 0.05])
    correct = torch.tensor([1, 0, 0, 1, 1])
    mask = torch.tensor([1, 1, 1, 1, 0])  # the last token is padding
    assert expected_calibration_error(conf, correct, mask) == pytest.approx(0.5 * 0.45 + 0.5 * 0.25, abs=1e-6)
    # Unmasked it counts: bin (0, 0.1] adds |1 - 0.05| with weight 1/5.
    assert expected_calibration_error(conf, correct) == pytest.approx((0.45 * 2 + 0.25 * 2 + 0.95) / 5, abs=1e-6)
    # Calibrated: 7 of 10 tokens right at confidence 0.7.
    assert expected_calibration_error(torch.full((10,), 0.7), torch.arange(10) < 7) == pytest.approx(0, abs=1e-6)
    # Bins are right-closed: 0.5 falls in (0.4, 0.5], 0.55 in (0.5, 0.6].
    edge = expected_calibration_error(torch.tensor([0.5, 0.55]), torch.tensor([1, 0]))
    assert edge == pytest.approx(0.5 * 0.5 + 0.5 * 0.55, abs=1e-6)
    # One bin: |mean accuracy - mean confidence|.
    assert expected_calibration_error(conf, correct, mask, n_bins=1) == pytest.approx(abs(0.5 - 0.6), abs=1e-6)


def test_next_token_ece_from_logits():
    probs = torch.tensor(
        [[[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]], [[0.1, 0.15, 0.75], [0.5, 0.3, 0.2]]], dtype=torch.float64
    )
    targets = torch.tensor([[0, 2], [2, 1]])  # argmax right, wrong, right, wrong
    mask = torch.tensor([[1, 1], [1, 0]])
    # bins: 0.8 -> (0.7, 0.8] right; 0.6 -> (0.5, 0.6] wrong; 0.75 -> (0.7, 0.8] right.
    expected = (2 * abs(1 - (0.8 + 0.75) / 2) + abs(0 - 0.6)) / 3
    assert next_token_ece(probs.log(), targets, mask) == pytest.approx(expected, abs=1e-9)
    assert next_token_ece(probs.log() + 3.0, targets, mask) == pytest.approx(expected, abs=1e-9)  # shift-invariant


def test_exacc_err_hand_built():
    # Teacher p and student q at one step: KL(p || q) by hand.
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # Two prompts, three steps. Free-running errors (the second prompt drifts) and teacher-forced errors.
    free = torch.tensor([[kl, kl, kl], [kl, 3 * kl, 5 * kl]])
    forced = torch.full((2, 3), kl)
    ones = torch.ones(2, 3)
    eb = exposure_bias(free, ones, forced, ones)
    # R(l) = mean over prompts of cumulative sums: [kl, 3kl, 6kl]; l eps(l) = [kl, 2kl, 3kl].
    np.testing.assert_allclose(eb.regret, [kl, 3 * kl, 6 * kl])
    np.testing.assert_allclose(eb.teacher_forced, [kl, 2 * kl, 3 * kl])
    np.testing.assert_allclose(eb.exacc_err, [0.0, 50.0, 100.0])
    assert eb.lengths.tolist() == [1, 2, 3]
    # A finished sequence adds no more error: masked steps are ignored whatever they hold.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    eb = exposure_bias(torch.where(mask.bool(), free, torch.tensor(99.0)), mask, forced, ones)
    np.testing.assert_allclose(eb.regret, [kl, 3 * kl, 5.5 * kl])
    # Several samples per prompt [n, k, L]: a per-step mean over the samples still generating.
    samples = torch.tensor([[[1.0, 3.0], [3.0, 99.0]]])
    sample_mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    eb = exposure_bias(samples, sample_mask, torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    np.testing.assert_allclose(eb.regret, [2.0, 5.0])  # step 1: (1 + 3) / 2, step 2: 3 / 1
    np.testing.assert_allclose(eb.exacc_err, [100.0, 150.0])  # (2 - 1) / 1, (5 - 2) / 2
    # The ratio is of the means over prompts (LMOps), not a mean of per-prompt ratios.
    uneven = exposure_bias(free, ones, torch.tensor([[kl] * 3, [3 * kl] * 3]), ones)
    # R = [1, 3, 6] kl, l eps = [2, 4, 6] kl
    np.testing.assert_allclose(uneven.exacc_err, [-50.0, -25.0, 0.0], atol=1e-5)
    zero = exposure_bias(free, ones, torch.zeros(2, 3), ones)
    assert np.isnan(zero.exacc_err).all()
    with pytest.raises(ValueError, match="must cover the same number of steps"):
        exposure_bias(free, ones, forced[:, :2], ones[:, :2])
    with pytest.raises(ValueError, match=r"step errors \(2, 3\) and mask \(2, 2\)"):
        exposure_bias(free, ones[:, :2], forced, ones)


def test_length_stats():
    stats = length_stats([2, 4, 6, 8], max_length=8)
    assert stats == pytest.approx(
        {"mean": 5.0, "std": math.sqrt(5.0), "min": 2.0, "median": 5.0, "max": 8.0, "at_max_length": 0.25}
    )
    assert "at_max_length" not in length_stats([3])
