"""Metrics against references: sklearn AUC, brute-force Hausdorff, scipy Wilcoxon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from experiments import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, size=3000).astype(np.float32)  # many ties
    labels = rng.random(3000) < 0.3
    scores[labels] += rng.integers(0, 3, size=labels.sum())
    expected = roc_auc_score(labels, scores)
    assert metrics.auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-12)


def test_auc_raw_scores_never_squashed() -> None:
    # torchmetrics' sigmoid trap: raw scores of 50..80 must keep their ranking.
    scores = np.array([50.0, 60.0, 70.0, 80.0])
    labels = np.array([0, 0, 1, 1])
    assert metrics.auc(scores, labels) == 1.0
    assert metrics.auc(-scores, labels) == 0.0
    assert metrics.auc(np.ones(4), labels) == 0.5


def test_auc_one_class_is_nan_and_nan_scores_rejected() -> None:
    assert math.isnan(metrics.auc(np.arange(5.0), np.zeros(5)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        metrics.auc(np.arange(3.0), np.zeros(4))


def test_streaming_auc_equals_pooled_sklearn() -> None:
    rng = np.random.default_rng(3)
    acc = metrics.ExactAUC()
    all_s, all_y = [], []
    for _ in range(7):
        s = np.round(rng.normal(size=5000), 2).astype(np.float32)
        y = rng.random(5000) < 0.1
        s[y] += 0.5
        acc.update(s, y)
        all_s.append(s)
        all_y.append(y)
    pooled_s, pooled_y = np.concatenate(all_s), np.concatenate(all_y)
    assert acc.compute() == pytest.approx(roc_auc_score(pooled_y, pooled_s), abs=1e-12)
    # Frequent intermediate merges give the identical number.
    eager = metrics.ExactAUC()
    eager.compact_min = 100
    for s, y in zip(all_s, all_y):
        for part in range(0, len(s), 700):
            eager.update(s[part : part + 700], y[part : part + 700])
    assert eager.compute() == acc.compute()
    values, counts = eager.counts(False)
    assert np.all(np.diff(values) > 0) and counts.sum() == (~pooled_y).sum()
    assert acc.n_positive == pooled_y.sum()
    assert acc.n_negative == (~pooled_y).sum()
    # Tables merged from another accumulator give the same number (the distributed path).
    other = metrics.ExactAUC()
    other.update_counts(acc.counts(True), acc.counts(False))
    assert other.compute() == acc.compute()


def test_streaming_auc_mixed_dtypes_and_integer_scores() -> None:
    rng = np.random.default_rng(6)
    s32 = rng.normal(size=2000).astype(np.float32)
    s64 = rng.normal(size=2000)
    s_int = rng.integers(-3, 3, size=2000)
    y = [rng.random(2000) < 0.2 for _ in range(3)]
    acc = metrics.ExactAUC()
    for s, lab in zip((s32, s64, s_int), y):
        acc.update(s, lab)
    assert metrics.value_counts(s32)[0].dtype == np.float32
    ref = roc_auc_score(np.concatenate(y), np.concatenate([s32.astype(np.float64), s64, s_int.astype(np.float64)]))
    assert acc.compute() == pytest.approx(ref, abs=1e-12)


def test_pixel_and_image_auc_use_breast_pixels_only() -> None:
    rng = np.random.default_rng(4)
    maps, lesions, breasts = [], [], []
    for _ in range(3):
        m = rng.random((20, 30)).astype(np.float32)
        lesion = np.zeros((20, 30), bool)
        lesion[5:10, 5:10] = True
        m[lesion] += 0.3
        breast = np.zeros((20, 30), bool)
        breast[:, :25] = True
        m[~breast] = 100.0  # outside the breast: must not count
        maps.append(m)
        lesions.append(lesion)
        breasts.append(breast)
    pooled = np.concatenate([m[b] for m, b in zip(maps, breasts)])
    pooled_y = np.concatenate([x[b] for x, b in zip(lesions, breasts)])
    assert metrics.pixel_auc(maps, lesions, breasts) == pytest.approx(roc_auc_score(pooled_y, pooled))
    mean, std, per_image = metrics.image_auc(maps, lesions, breasts)
    refs = [roc_auc_score(x[b], m[b]) for m, x, b in zip(maps, lesions, breasts)]
    assert per_image == pytest.approx(refs)
    assert mean == pytest.approx(np.mean(refs))
    assert std == pytest.approx(np.std(refs))


def _brute_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(a), np.argwhere(b)
    d = cdist(pa, pb)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hausdorff_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random((40, 50)) < 0.02
    b = np.zeros((40, 50), bool)
    b[10:18, 30:41] = True
    a[0, 0] = True
    expected = _brute_hausdorff(a, b)
    assert metrics.hausdorff_distance(a, b) == pytest.approx(expected)
    assert metrics.hausdorff_distance(b, a) == pytest.approx(expected)
    assert metrics.hausdorff_distance(a, b, spacing_mm=0.2) == pytest.approx(0.2 * expected)


def test_hausdorff_interior_point_counts_and_empty_policy() -> None:
    # A ring B and a filled disc A: the farthest point of A from B is its centre (interior).
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r >= 15) & (r < 16)
    disc = r < 16
    assert metrics.hausdorff_distance(disc, ring) == pytest.approx(_brute_hausdorff(disc, ring))
    assert metrics.hausdorff_distance(disc, ring) >= 14.9
    empty = np.zeros_like(disc)
    assert math.isnan(metrics.hausdorff_distance(empty, ring))
    assert math.isnan(metrics.hausdorff_distance(ring, empty))
    assert "NaN" in metrics.HAUSDORFF_EMPTY_POLICY
    assert metrics.hausdorff_distance(ring, ring) == 0.0


def test_wilcoxon_equals_scipy_and_handles_degenerate_pairs() -> None:
    rng = np.random.default_rng(5)
    a = rng.random(30)
    b = a - 0.05 + 0.05 * rng.normal(size=30)
    res = metrics.wilcoxon_signed_rank(a, b)
    ref = stats.wilcoxon(a, b, alternative="two-sided")
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.pvalue == pytest.approx(ref.pvalue)
    assert res.n_pairs == 30
    assert res.median_difference == pytest.approx(np.median(a - b))
    a_nan = np.append(a, np.nan)
    b_nan = np.append(b, 0.3)
    assert metrics.wilcoxon_signed_rank(a_nan, b_nan).pvalue == pytest.approx(ref.pvalue)
    same = metrics.wilcoxon_signed_rank(a, a)
    assert same.pvalue == 1.0 and math.isnan(same.statistic)


def test_mean_std_skips_nan() -> None:
    mean, std, n = metrics.mean_std([1.0, 3.0, float("nan")])
    assert (mean, std, n) == (2.0, 1.0, 2)
    assert math.isnan(metrics.mean_std([])[0])
