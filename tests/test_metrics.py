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


# --- localisation metrics against brute-force references -------------------------------------------


def _brute_components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a small binary mask by flood fill, each a list of (row, col)."""
    seen = np.zeros(mask.shape, dtype=bool)
    components = []
    for r0 in range(mask.shape[0]):
        for c0 in range(mask.shape[1]):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            stack, comp = [(r0, c0)], []
            seen[r0, c0] = True
            while stack:
                r, c = stack.pop()
                comp.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack.append((rr, cc))
            components.append(comp)
    return components


def _brute_froc(score: np.ndarray, lesion: np.ndarray, breast: np.ndarray, thresholds) -> tuple[list, list]:
    lesions = _brute_components(lesion)
    found_all, fp_all = [], []
    for t in thresholds:
        found, fp = set(), 0
        for comp in _brute_components(breast & (score > t)):
            # the peak: highest value, ties by raster order (the smallest (row, col))
            peak = max(comp, key=lambda p: (score[p], -p[0], -p[1]))
            owner = [j for j, les in enumerate(lesions) if peak in les]
            if owner:
                found.add(owner[0])
            else:
                fp += 1
        found_all.append(found)
        fp_all.append(fp)
    return found_all, fp_all


def _small_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 6, size=(14, 17)).astype(np.float64)  # ties and plateaus on purpose
    breast = np.zeros((14, 17), dtype=bool)
    breast[1:13, 2:16] = True
    breast[1:4, 2:5] = False
    lesion = np.zeros_like(breast)
    lesion[3:6, 6:9] = True
    lesion[9:12, 11:14] = True
    lesion[8, 3] = True
    return score, lesion & breast, breast


@pytest.mark.parametrize("seed", range(6))
def test_froc_counts_equal_brute_force(seed: int) -> None:
    score, lesion, breast = _small_case(seed)
    labels, n = metrics.label_lesions(lesion)
    brute_lesions = _brute_components(lesion)
    assert n == len(brute_lesions) == 3
    thresholds = [-np.inf, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, np.inf]
    found, fp = metrics.froc_counts(score, labels, n, breast, thresholds)
    exp_found, exp_fp = _brute_froc(score, lesion, breast, thresholds)
    assert fp.tolist() == exp_fp
    # the brute force numbers lesions in raster order of their first pixel, as scipy's label does
    assert [set(np.flatnonzero(row).tolist()) for row in found] == exp_found
    assert fp[-1] == 0 and not found[-1].any()


def test_froc_curve_and_sensitivity_at_fp() -> None:
    # two images, three levels: lesions 2 + 1, false positives per level
    found = [np.array([[True, True], [True, False], [False, False]]), np.array([[True], [True], [False]])]
    fps = [np.array([5, 1, 0]), np.array([3, 0, 0])]
    fp_per_image, sens = metrics.froc_curve(found, fps)
    np.testing.assert_allclose(fp_per_image, [4.0, 0.5, 0.0])
    np.testing.assert_allclose(sens, [1.0, 2 / 3, 0.0])
    at = metrics.sensitivity_at_fp(fp_per_image, sens)
    # brute force: best sensitivity among points within each false-positive budget
    for rate, value in at.items():
        assert value == max(s for f, s in zip(fp_per_image, sens, strict=True) if f <= rate)
    assert at == {0.5: pytest.approx(2 / 3), 1.0: pytest.approx(2 / 3), 2.0: pytest.approx(2 / 3)}
    assert metrics.sensitivity_at_fp([3.0], [1.0], [0.5]) == {0.5: 0.0}
    assert math.isnan(metrics.sensitivity_at_fp([0.0], [math.nan], [1.0])[1.0])


@pytest.mark.parametrize("seed", range(4))
def test_lesion_hit_equals_brute_force(seed: int) -> None:
    score, lesion, breast = _small_case(seed)
    pixels = [(r, c) for r in range(14) for c in range(17) if breast[r, c]]
    best = max(score[p] for p in pixels)
    tops = [p for p in pixels if score[p] == best]
    expected = sum(lesion[p] for p in tops) / len(tops)
    assert metrics.lesion_hit(score, lesion, breast) == pytest.approx(expected)
    unique = score.copy()
    unique[10, 12] = 100.0  # one maximum, inside a lesion
    assert metrics.lesion_hit(unique, lesion, breast) == 1.0
    unique[0, 0] = 1000.0  # outside the breast: ignored
    assert metrics.lesion_hit(unique, lesion, breast) == 1.0
    unique[7, 14] = 200.0  # inside the breast, outside the lesions
    assert metrics.lesion_hit(unique, lesion, breast) == 0.0
    assert metrics.lesion_hit(np.ones((3, 3)), np.eye(3, dtype=bool), np.ones((3, 3), bool)) == pytest.approx(1 / 3)
    assert math.isnan(metrics.lesion_hit(score, lesion, np.zeros_like(breast)))


@pytest.mark.parametrize("seed", range(3))
def test_interior_pixel_auc_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    maps, lesions, breasts = [], [], []
    for _ in range(3):
        breast = np.zeros((20, 24), dtype=bool)
        breast[2:19, rng.integers(0, 3):22] = True
        lesion = np.zeros_like(breast)
        r, c = rng.integers(4, 14), rng.integers(4, 18)
        lesion[r:r + 4, c:c + 4] = True
        maps.append(rng.random((20, 24)) + 0.5 * lesion)
        lesions.append(lesion & breast)
        breasts.append(breast)
    distance = 3.0
    ys, ts = [], []
    for score, lesion, breast in zip(maps, lesions, breasts, strict=True):
        outside = [(r, c) for r in range(-1, 21) for c in range(-1, 25)
                   if not (0 <= r < 20 and 0 <= c < 24) or not breast[r, c]]
        for r in range(20):
            for c in range(24):
                if breast[r, c] and min(math.hypot(r - a, c - b) for a, b in outside) > distance:
                    ys.append(lesion[r, c])
                    ts.append(score[r, c])
    expected = roc_auc_score(ys, ts)
    assert metrics.interior_pixel_auc(maps, lesions, breasts, distance) == pytest.approx(expected, abs=1e-12)


def test_froc_global_equals_a_brute_force_sweep() -> None:
    rng = np.random.default_rng(3)
    maps, lesion_labels, breasts, levels, found, fps = [], [], [], [], [], []
    n_total = 0
    for seed in range(4):
        score, lesion, breast = _small_case(seed)
        score = score + rng.random(score.shape)  # distinct values
        labels, n = metrics.label_lesions(lesion)
        t = np.append(np.sort(rng.choice(score[breast], 6, replace=False)), np.inf)
        f, fp = metrics.froc_counts(score, labels, n, breast, t)
        maps.append(score), lesion_labels.append(labels), breasts.append(breast)
        levels.append(t), found.append(f.sum(axis=1)), fps.append(fp)
        n_total += n
    thresholds, fp_per_image, sens = metrics.froc_global(levels, found, fps, n_total)
    assert np.all(np.diff(thresholds) > 0) and thresholds[-1] == np.inf
    for k, big_t in enumerate(thresholds):
        hits = false = 0
        for t, f, fp in zip(levels, found, fps, strict=True):
            j = next((j for j, level in enumerate(t) if level >= big_t), None)  # the first level >= T
            if j is not None:
                hits += f[j]
                false += fp[j]
        assert fp_per_image[k] == pytest.approx(false / 4) and sens[k] == pytest.approx(hits / n_total)
    # one shared threshold list: the global FROC is the pooled per-threshold curve
    shared = [np.array([0.5, 2.5, 4.5, np.inf])] * 4
    counts = [metrics.froc_counts(m, lab, int(lab.max()), b, shared[0])
              for m, lab, b in zip(maps, lesion_labels, breasts, strict=True)]
    _, fp_g, sens_g = metrics.froc_global(shared, [c[0].sum(axis=1) for c in counts], [c[1] for c in counts], n_total)
    fp_c, sens_c = metrics.froc_curve([c[0] for c in counts], [c[1] for c in counts])
    np.testing.assert_allclose(fp_g, fp_c)
    np.testing.assert_allclose(sens_g, sens_c)
