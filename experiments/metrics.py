"""Metrics of the paper's Table 1: exact rank-based AUC, Hausdorff distance, Wilcoxon signed-rank (the
localisation metrics beyond it are in `experiments.localisation`).

Every metric is a pure function on numpy arrays (torch tensors are accepted), plus, for the pooled
pixel AUC, a stateful accumulator (torchmetrics-style ``update`` / ``compute``) that stays exact.
AUCs are computed on raw scores: nothing is squashed through a sigmoid (PROTOCOL "Known traps").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

#: How the Hausdorff distance treats empty masks; written into every output that reports it.
HAUSDORFF_EMPTY_POLICY = (
    "empty segmentation or empty ground truth -> Hausdorff undefined (NaN), excluded from the mean "
    "and counted (n_hausdorff_empty)"
)

__all__ = [
    "HAUSDORFF_EMPTY_POLICY",
    "ExactAUC",
    "WilcoxonResult",
    "auc",
    "auc_from_counts",
    "hausdorff_distance",
    "image_auc",
    "mean_std",
    "pixel_auc",
    "value_counts",
    "wilcoxon_signed_rank",
]


def as_numpy(x: object) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array (detached, on the CPU): what every metric and map takes."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x)


def as_float(x: object) -> float:
    """The first element of a tensor, array or number as a Python float (a batch's 0-d or 1-element fields)."""
    return float(as_numpy(x).reshape(-1)[0])


def value_counts(values: object) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and how often each occurs (int64 counts).

    This is the exact, compact summary the AUC needs: ties stay ties, and memory is bounded by the
    number of distinct values rather than the number of samples. float32 scores stay float32 (every
    comparison is exact either way, and the table is a third smaller); other types become float64.
    """
    arr = as_numpy(values).ravel()
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values; AUC is defined on finite scores only")
    uniq, counts = np.unique(arr, return_counts=True)
    return uniq, counts.astype(np.int64, copy=False)


def _merge_counts(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merges several (values, counts) tables into one sorted distinct table."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    values = np.concatenate([p[0] for p in parts])
    order = np.argsort(values, kind="stable")
    values = values[order]
    counts = np.concatenate([p[1] for p in parts])[order]
    del order
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    # Integer sums per run of equal values: exact, and no float weights or inverse index.
    return values[starts], np.add.reduceat(counts, starts)


def auc_from_counts(
    pos_values: np.ndarray, pos_counts: np.ndarray, neg_values: np.ndarray, neg_counts: np.ndarray
) -> float:
    """Exact AUC = P(s+ > s-) + 0.5 P(s+ = s-) from sorted distinct value tables of both classes.

    Equal to the Mann-Whitney U statistic with average ranks divided by n+ n-. Returns NaN when a
    class is empty (AUC undefined).
    """
    n_pos = int(pos_counts.sum())
    n_neg = int(neg_counts.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_cum = np.concatenate([[0], np.cumsum(neg_counts, dtype=np.int64)])
    left = np.searchsorted(neg_values, pos_values, side="left")
    right = np.searchsorted(neg_values, pos_values, side="right")
    n_less = neg_cum[left]
    n_equal = neg_cum[right] - neg_cum[left]
    # 2U as an exact integer (int64 holds it for up to ~2e9 samples per class), divided once.
    twice_u = int(np.dot(pos_counts, 2 * n_less + n_equal))
    return twice_u / (2.0 * n_pos * n_neg)


def auc(scores: object, labels: object) -> float:
    """Exact ROC AUC of raw ``scores`` (higher = positive) against binary ``labels``, ties averaged.

    Equal to ``sklearn.metrics.roc_auc_score``; NaN when only one class is present.
    """
    s = as_numpy(scores).ravel()
    y = as_numpy(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape}) and labels ({y.shape}) differ in size")
    return auc_from_counts(*value_counts(s[y]), *value_counts(s[~y]))


class ExactAUC:
    """Streaming exact AUC: ``update(scores, labels)`` any number of times, then ``compute()``.

    Keeps per class a table of distinct score values with counts, merged as it grows, so memory is
    12 bytes per *distinct* float32 score (16 for float64) held, and about three times that for a
    moment while tables merge (measured: ~40 bytes per pooled pixel at the peak when every value is
    distinct, as in interpolated maps). The paper-sized test set (~80 CBIS-DDSM images, ~50 M breast
    pixels) thus holds ~0.6 GB and peaks near 2 GB.
    The result is identical to sorting all pooled scores at once.
    """

    #: pending table entries below which no merge happens (merges then run whenever the pending
    #: entries have doubled since the last merge: amortised O(n log n) in all)
    compact_min: int = 1 << 20

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets everything seen so far."""
        self._parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {True: [], False: []}
        self._sizes = {True: 0, False: 0}
        self._compacted = {True: 0, False: 0}

    def update(self, scores: object, labels: object) -> None:
        """Adds samples: ``scores`` (any shape) with boolean ``labels`` of the same size."""
        s = as_numpy(scores).ravel()
        y = as_numpy(labels).ravel().astype(bool)
        if s.shape != y.shape:
            raise ValueError(f"scores ({s.shape}) and labels ({y.shape}) differ in size")
        for cls, part in ((True, s[y]), (False, s[~y])):
            if part.size:
                self._add(cls, value_counts(part))

    def update_counts(self, positive: tuple[np.ndarray, np.ndarray], negative: tuple[np.ndarray, np.ndarray]) -> None:
        """Adds already summarised (values, counts) tables, e.g. gathered from another process."""
        for cls, table in ((True, positive), (False, negative)):
            if table[0].size:
                self._add(cls, (np.asarray(table[0]), np.asarray(table[1], np.int64)))

    def _add(self, cls: bool, table: tuple[np.ndarray, np.ndarray]) -> None:
        self._parts[cls].append(table)
        self._sizes[cls] += table[0].size
        if self._sizes[cls] > max(2 * self._compacted[cls], self.compact_min):
            self._compact(cls)

    def _compact(self, cls: bool) -> None:
        merged = _merge_counts(self._parts[cls])
        self._parts[cls] = [merged]
        self._sizes[cls] = self._compacted[cls] = merged[0].size

    def counts(self, positive: bool) -> tuple[np.ndarray, np.ndarray]:
        """The merged (sorted distinct values, counts) table of one class."""
        self._compact(positive)
        return self._parts[positive][0] if self._parts[positive] else _merge_counts([])

    @property
    def n_positive(self) -> int:
        return int(sum(int(c.sum()) for _, c in self._parts[True]))

    @property
    def n_negative(self) -> int:
        return int(sum(int(c.sum()) for _, c in self._parts[False]))

    def compute(self) -> float:
        """The exact AUC of everything added; NaN while a class is still empty."""
        return auc_from_counts(*self.counts(True), *self.counts(False))


def pixel_auc(
    maps: Iterable[object], lesion_masks: Iterable[object], breast_masks: Iterable[object]
) -> float:
    """Pixel-wise AUC: the breast pixels of all images pooled, lesion pixels positive (exact)."""
    acc = ExactAUC()
    for score_map, lesion, breast in zip(maps, lesion_masks, breast_masks, strict=True):
        breast = as_numpy(breast).astype(bool)
        acc.update(as_numpy(score_map)[breast], as_numpy(lesion).astype(bool)[breast])
    return acc.compute()


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and population standard deviation (ddof 0) of the finite values, and how many there were."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def image_auc(
    maps: Iterable[object], lesion_masks: Iterable[object], breast_masks: Iterable[object]
) -> tuple[float, float, list[float]]:
    """Image-wise AUC: per image over its breast pixels, then mean and std over images.

    Images where the AUC is undefined (no lesion or no healthy breast pixel) give NaN in the list and
    are left out of the mean.
    """
    per_image = []
    for score_map, lesion, breast in zip(maps, lesion_masks, breast_masks, strict=True):
        breast = as_numpy(breast).astype(bool)
        per_image.append(auc(as_numpy(score_map)[breast], as_numpy(lesion).astype(bool)[breast]))
    mean, std, _ = mean_std(per_image)
    return mean, std, per_image


def hausdorff_distance(
    mask_a: object, mask_b: object, spacing_mm: float | None = None
) -> float:
    """Symmetric Hausdorff distance between the foreground pixel sets of two binary masks.

    max(max_a d(a, B), max_b d(b, A)) with Euclidean distances between pixel centres, in pixels, or in
    mm when ``spacing_mm`` (isotropic pixel size) is given. Empty-mask policy: if either mask is empty
    the distance is undefined and NaN is returned (see ``HAUSDORFF_EMPTY_POLICY``; callers count it).
    """
    a = as_numpy(mask_a).astype(bool)
    b = as_numpy(mask_b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return math.nan
    # Only the bounding box of both masks matters: the EDT there is exact for points inside it.
    rows = np.flatnonzero(a.any(axis=1) | b.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0) | b.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a, b = a[window], b[window]
    dist_to_b = ndimage.distance_transform_edt(~b)
    dist_to_a = ndimage.distance_transform_edt(~a)
    distance = float(max(dist_to_b[a].max(), dist_to_a[b].max()))
    return distance * float(spacing_mm) if spacing_mm is not None else distance


@dataclass(frozen=True)
class WilcoxonResult:
    """Paired two-sided Wilcoxon signed-rank test: statistic, p-value, pairs used, median difference."""

    statistic: float
    pvalue: float
    n_pairs: int
    median_difference: float


def wilcoxon_signed_rank(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> WilcoxonResult:
    """Paired two-sided Wilcoxon signed-rank test of ``a`` against ``b`` (scipy.stats.wilcoxon).

    Pairs where either value is NaN are dropped. With no pair left, or all differences zero, the test
    has no evidence either way: statistic NaN and p-value 1.0.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n == 0 or np.all(x == y):
        return WilcoxonResult(math.nan, 1.0, n, 0.0 if n else math.nan)
    res = stats.wilcoxon(x, y, alternative="two-sided")
    return WilcoxonResult(float(res.statistic), float(res.pvalue), n, float(np.median(x - y)))
