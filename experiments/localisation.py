"""Localisation metrics beyond the paper's Table 1: lesion hit rate, FROC sensitivity at fixed false
positives per image, AUC over interior pixels.

Like `experiments.metrics`, pure functions on numpy arrays (torch tensors are accepted); lesions and
candidate regions are connected with `CONNECTIVITY` (8-neighbourhood).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from experiments.metrics import ExactAUC, as_numpy

__all__ = [
    "CONNECTIVITY",
    "FROC_FP_RATES",
    "froc_counts",
    "froc_curve",
    "froc_global",
    "interior_mask",
    "interior_pixel_auc",
    "label_lesions",
    "lesion_hit",
    "sensitivity_at_fp",
]

#: false-positive regions per image at which the FROC sensitivity is reported
FROC_FP_RATES = (0.5, 1.0, 2.0)
#: connectivity of lesions and candidate regions: 8-neighbourhood (a diagonal touch joins two regions)
CONNECTIVITY = np.ones((3, 3), dtype=bool)


def lesion_hit(score_map: object, lesion_mask: object, breast_mask: object) -> float:
    """Whether the image's highest-scoring breast pixel lies inside a lesion: 1.0 or 0.0.

    When several breast pixels share the maximum (a plateau), the credit is the share of them inside a
    lesion (the expected hit of a random tie-break), so a constant map never scores a sure hit. NaN when
    the breast is empty.
    """
    breast = as_numpy(breast_mask).astype(bool)
    if not breast.any():
        return math.nan
    values = as_numpy(score_map).astype(np.float64)
    top = breast & (values == values[breast].max())
    return float(as_numpy(lesion_mask).astype(bool)[top].mean())


def label_lesions(lesion_mask: object) -> tuple[np.ndarray, int]:
    """Connected lesions of a binary mask (8-connectivity): int32 label image (0 = background) and their number."""
    labels, n = ndimage.label(as_numpy(lesion_mask).astype(bool), structure=CONNECTIVITY)
    return labels.astype(np.int32, copy=False), int(n)


def froc_counts(
    score_map: object, lesion_labels: object, n_lesions: int, breast_mask: object, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of one image at each threshold: (found bool[T, n_lesions], false positives int[T]).

    At threshold t the candidates are the connected regions (8-connectivity) of the breast pixels scoring
    strictly above t; a candidate's peak is its highest pixel (ties: the first in raster order). Lesion j
    (label j + 1 in ``lesion_labels``) is found when some candidate's peak lies inside it; a candidate
    whose peak lies outside every lesion is a false positive. scipy.ndimage labels and finds the peaks.
    """
    values = as_numpy(score_map).astype(np.float64)
    breast = as_numpy(breast_mask).astype(bool)
    labels = as_numpy(lesion_labels)
    if values.shape != breast.shape or labels.shape != breast.shape:
        raise ValueError(f"score map {values.shape}, lesion labels {labels.shape} and breast mask "
                         f"{breast.shape} differ in shape")
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    found = np.zeros((thresholds.size, int(n_lesions)), dtype=bool)
    false_positives = np.zeros(thresholds.size, dtype=np.int64)
    inside = np.where(breast, values, -np.inf)
    # A unique rank per pixel (value, then raster order for ties) makes every region's peak one pixel.
    flat = inside.ravel()
    order = np.lexsort((-np.arange(flat.size), flat))
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    rank = rank.reshape(inside.shape)
    flat_labels = labels.ravel()
    for k, t in enumerate(thresholds):
        if not math.isfinite(t) and t > 0:
            continue  # above everything: no candidate
        regions, n = ndimage.label(inside > t, structure=CONNECTIVITY)
        if n == 0:
            continue
        # each region's peak = its pixel of highest rank (np.maximum.at: one O(pixels) pass, no sort)
        candidates = regions.ravel() > 0
        peak_ranks = np.full(n + 1, -1, dtype=np.int64)
        np.maximum.at(peak_ranks, regions.ravel()[candidates], rank.ravel()[candidates])
        hit = flat_labels[order[peak_ranks[1:]]]
        found[k, hit[hit > 0] - 1] = True
        false_positives[k] = int((hit == 0).sum())
    return found, false_positives


def froc_curve(
    found: Sequence[np.ndarray], false_positives: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled FROC over images: (false positives per image, lesion sensitivity), one point per threshold.

    ``found[i]`` (T x n_lesions_i) and ``false_positives[i]`` (T) are `froc_counts` of image i at the same
    T thresholds (or levels). Sensitivity = lesions found / all lesions; NaN where there is no lesion.
    """
    if not found:
        return np.zeros(0), np.zeros(0)
    n_levels = len(false_positives[0])
    n_lesions = sum(int(f.shape[1]) for f in found)
    hits = np.zeros(n_levels, dtype=np.int64)
    fps = np.zeros(n_levels, dtype=np.int64)
    for f, fp in zip(found, false_positives, strict=True):
        hits += f.sum(axis=1)
        fps += np.asarray(fp, dtype=np.int64)
    sensitivity = hits / n_lesions if n_lesions else np.full(n_levels, math.nan)
    return fps / len(found), sensitivity


def froc_global(
    levels: Sequence[np.ndarray], found: Sequence[np.ndarray], false_positives: Sequence[np.ndarray],
    n_lesions: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled FROC over one global threshold T: (thresholds, false positives per image, sensitivity).

    Image i was measured (`froc_counts`) at its own ascending thresholds ``levels[i]`` (e.g. percentiles of
    its scores, the last +inf), with ``found[i]`` lesions found and ``false_positives[i]`` at each. At a
    global T it counts as at its first level >= T: exact where T is one of its levels, else the next
    stricter candidate set (never more candidates than at T). T runs over every image's levels.
    """
    if not levels:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    thresholds = np.unique(np.concatenate([np.asarray(t, np.float64) for t in levels]))
    hits = np.zeros(thresholds.size, np.int64)
    fps = np.zeros(thresholds.size, np.int64)
    for t, f, fp in zip(levels, found, false_positives, strict=True):
        t = np.asarray(t, np.float64)
        k = np.searchsorted(t, thresholds, side="left")
        inside = k < t.size  # T above the image's last level: no candidate
        hits[inside] += np.asarray(f, np.int64)[k[inside]]
        fps[inside] += np.asarray(fp, np.int64)[k[inside]]
    sensitivity = hits / n_lesions if n_lesions else np.full(thresholds.size, math.nan)
    return thresholds, fps / len(levels), sensitivity


def sensitivity_at_fp(
    fp_per_image: object, sensitivity: object, rates: Sequence[float] = FROC_FP_RATES
) -> dict[float, float]:
    """The highest sensitivity among the FROC points with at most ``rate`` false positives per image.

    0.0 when no point is that strict (the empty candidate set, 0 FP and 0 found, is always attainable);
    NaN when the sensitivity is undefined (no lesion).
    """
    fp = as_numpy(fp_per_image).astype(np.float64).reshape(-1)
    sens = as_numpy(sensitivity).astype(np.float64).reshape(-1)
    if sens.size and np.all(np.isnan(sens)):
        return {float(r): math.nan for r in rates}
    out = {}
    for rate in rates:
        ok = (fp <= rate) & np.isfinite(sens)
        out[float(rate)] = float(sens[ok].max()) if ok.any() else 0.0
    return out


def interior_mask(breast_mask: object, distance_px: float, border_dist: object | None = None) -> np.ndarray:
    """Breast pixels more than ``distance_px`` from every non-breast pixel (the image edge counts as outside).

    ``border_dist`` may pass a precomputed distance map (e.g. the evaluation's OpenCV transform); otherwise
    scipy's exact Euclidean distance transform of the zero-padded mask is used.
    """
    breast = as_numpy(breast_mask).astype(bool)
    if border_dist is None:
        border_dist = ndimage.distance_transform_edt(np.pad(breast, 1))[1:-1, 1:-1]
    return breast & (as_numpy(border_dist) > distance_px)


def interior_pixel_auc(
    maps: Iterable[object], lesion_masks: Iterable[object], breast_masks: Iterable[object], distance_px: float
) -> float:
    """Pixel AUC over interior breast pixels only (more than ``distance_px`` from the border), pooled, exact.

    A diagnostic beside the pixel AUC: a model that ranks lesions well only because border pixels score
    high (or low) shows it here.
    """
    acc = ExactAUC()
    for score_map, lesion, breast in zip(maps, lesion_masks, breast_masks, strict=True):
        inner = interior_mask(breast, distance_px)
        acc.update(as_numpy(score_map)[inner], as_numpy(lesion).astype(bool)[inner])
    return acc.compute()
