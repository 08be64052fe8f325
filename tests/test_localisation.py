"""Localisation metrics (lesion hit, FROC counts / curves, interior pixel AUC) against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments import localisation


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
    labels, n = localisation.label_lesions(lesion)
    brute_lesions = _brute_components(lesion)
    assert n == len(brute_lesions) == 3
    thresholds = [-np.inf, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, np.inf]
    found, fp = localisation.froc_counts(score, labels, n, breast, thresholds)
    exp_found, exp_fp = _brute_froc(score, lesion, breast, thresholds)
    assert fp.tolist() == exp_fp
    # the brute force numbers lesions in raster order of their first pixel, as scipy's label does
    assert [set(np.flatnonzero(row).tolist()) for row in found] == exp_found
    assert fp[-1] == 0 and not found[-1].any()


def test_froc_curve_and_sensitivity_at_fp() -> None:
    # two images, three levels: lesions 2 + 1, false positives per level
    found = [np.array([[True, True], [True, False], [False, False]]), np.array([[True], [True], [False]])]
    fps = [np.array([5, 1, 0]), np.array([3, 0, 0])]
    fp_per_image, sens = localisation.froc_curve(found, fps)
    np.testing.assert_allclose(fp_per_image, [4.0, 0.5, 0.0])
    np.testing.assert_allclose(sens, [1.0, 2 / 3, 0.0])
    at = localisation.sensitivity_at_fp(fp_per_image, sens)
    # brute force: best sensitivity among points within each false-positive budget
    for rate, value in at.items():
        assert value == max(s for f, s in zip(fp_per_image, sens, strict=True) if f <= rate)
    assert at == {0.5: pytest.approx(2 / 3), 1.0: pytest.approx(2 / 3), 2.0: pytest.approx(2 / 3)}
    assert localisation.sensitivity_at_fp([3.0], [1.0], [0.5]) == {0.5: 0.0}
    assert math.isnan(localisation.sensitivity_at_fp([0.0], [math.nan], [1.0])[1.0])


@pytest.mark.parametrize("seed", range(4))
def test_lesion_hit_equals_brute_force(seed: int) -> None:
    score, lesion, breast = _small_case(seed)
    pixels = [(r, c) for r in range(14) for c in range(17) if breast[r, c]]
    best = max(score[p] for p in pixels)
    tops = [p for p in pixels if score[p] == best]
    expected = sum(lesion[p] for p in tops) / len(tops)
    assert localisation.lesion_hit(score, lesion, breast) == pytest.approx(expected)
    unique = score.copy()
    unique[10, 12] = 100.0  # one maximum, inside a lesion
    assert localisation.lesion_hit(unique, lesion, breast) == 1.0
    unique[0, 0] = 1000.0  # outside the breast: ignored
    assert localisation.lesion_hit(unique, lesion, breast) == 1.0
    unique[7, 14] = 200.0  # inside the breast, outside the lesions
    assert localisation.lesion_hit(unique, lesion, breast) == 0.0
    assert localisation.lesion_hit(np.ones((3, 3)), np.eye(3, dtype=bool), np.ones((3, 3), bool)) == pytest.approx(1 / 3)
    assert math.isnan(localisation.lesion_hit(score, lesion, np.zeros_like(breast)))


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
    assert localisation.interior_pixel_auc(maps, lesions, breasts, distance) == pytest.approx(expected, abs=1e-12)


def test_froc_global_equals_a_brute_force_sweep() -> None:
    rng = np.random.default_rng(3)
    maps, lesion_labels, breasts, levels, found, fps = [], [], [], [], [], []
    n_total = 0
    for seed in range(4):
        score, lesion, breast = _small_case(seed)
        score = score + rng.random(score.shape)  # distinct values
        labels, n = localisation.label_lesions(lesion)
        t = np.append(np.sort(rng.choice(score[breast], 6, replace=False)), np.inf)
        f, fp = localisation.froc_counts(score, labels, n, breast, t)
        maps.append(score), lesion_labels.append(labels), breasts.append(breast)
        levels.append(t), found.append(f.sum(axis=1)), fps.append(fp)
        n_total += n
    thresholds, fp_per_image, sens = localisation.froc_global(levels, found, fps, n_total)
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
    counts = [localisation.froc_counts(m, lab, int(lab.max()), b, shared[0])
              for m, lab, b in zip(maps, lesion_labels, breasts, strict=True)]
    _, fp_g, sens_g = localisation.froc_global(shared, [c[0].sum(axis=1) for c in counts], [c[1] for c in counts], n_total)
    fp_c, sens_c = localisation.froc_curve([c[0] for c in counts], [c[1] for c in counts])
    np.testing.assert_allclose(fp_g, fp_c)
    np.testing.assert_allclose(sens_g, sens_c)
