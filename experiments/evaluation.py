"""One scan's evaluation: its grid scores -> anomaly map -> segmentation -> the per-image row and what pools.

PROTOCOL "Metrics": `evaluate_scan` turns one evaluation item (breast and lesion masks, grid centres,
spacing, stride, meta) and its patch scores into an `ImageEvaluation`: the `ImageResult` row of
``per_image.csv`` (AUC, Hausdorff, lesion hit, FROC counts at the threshold, border shares), the map and
segmentation (`anomaly_maps`), and the pixel tables and FROC counts `evaluation_results.EvaluationAccumulator`
pools over the test set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from experiments import localisation, metrics
from experiments.anomaly_maps import (
    PATCH_SIZE,
    THRESHOLD_RULES,
    anomaly_map,
    border_distance,
    image_percentile_threshold,
    segment,
    threshold_rule_name,
)
from experiments.metrics import as_float, as_numpy

#: reasons an image is left out of the pixel metrics (AUCs, Hausdorff); each is counted in the output.
EXCLUSION_REASONS = ("no_scores", "no_pixel_annotation", "no_lesion_in_breast", "no_healthy_breast_pixels")

#: FROC levels: each image's candidates are counted at these percentiles of its own breast-pixel scores (dense
#: at the top, where few candidates remain); 100 = no candidate (0 found, 0 false positives). The pooled FROC
#: sweeps one global threshold over every image's levels (`localisation.froc_global`); the per-image percentile
#: curve (each image at its own percentile) is kept beside it.
FROC_PERCENTILES = (50.0, 70.0, 80.0, 85.0, 90.0, 92.0, 94.0, 95.0, 96.0, 97.0, 97.5, 98.0, 98.5, 99.0, 99.25,
                    99.5, 99.6, 99.7, 99.8, 99.85, 99.9, 99.93, 99.95, 99.97, 99.98, 99.99, 99.995, 99.999, 100.0)

#: image groups of the per-group AUCs: breast density, and whether the (largest) lesion's centre lies
#: within one patch of the breast border
GROUP_KINDS = ("density", "border")


def density_group(value: object) -> str:
    """The breast-density group of an image: MIAS background tissue ``F`` / ``G`` / ``D``, BI-RADS ``1-2`` / ``3-4``.

    MIAS letters or their words (fatty, fatty-glandular, dense-glandular) and BI-RADS 1-4 (int or text)
    are recognised; anything else (unknown, missing) gives "".
    """
    if value is None:
        return ""
    text = str(value.item() if hasattr(value, "item") else value).strip().lower()
    words = {"f": "F", "fatty": "F", "g": "G", "fatty-glandular": "G", "d": "D", "dense-glandular": "D"}
    if text in words:
        return words[text]
    try:
        number = float(text)
    except ValueError:
        return ""
    if number in (1.0, 2.0):
        return "1-2"
    if number in (3.0, 4.0):
        return "3-4"
    return ""


@dataclass
class ImageResult:
    """Everything measured on one evaluation image (one row of ``per_image.csv``).

    Localisation columns: ``lesion_hit`` (1 when the highest breast pixel lies in a lesion, tie credit
    shared), ``interior_auc`` (AUC over breast pixels more than one patch from the border), the lesion
    counts and the FROC candidates at this row's threshold (strictly above it), and ``border_group``
    ("near_border" when the largest lesion's centre lies within one patch of the border, else "interior").
    """

    image_id: str
    patient_id: str
    density: str
    lesion_type: str
    pathology: str
    side: str
    view: str
    source_path: str
    spacing_mm: float
    n_patches: int
    breast_area_px: int
    lesion_area_px: int
    segmentation_area_px: int
    threshold_rule: str
    threshold: float
    auc: float
    hausdorff_px: float
    hausdorff_mm: float
    top1_near_border_fraction: float
    border_area_fraction: float
    score_mean: float
    score_max: float
    excluded: str
    density_group: str = ""
    border_group: str = ""
    stride: int = 0
    hausdorff_cells: float = math.nan
    lesion_hit: float = math.nan
    interior_auc: float = math.nan
    n_lesions: int = 0
    n_lesions_near_border: int = 0
    candidates_at_threshold: int = 0
    lesions_found_at_threshold: int = 0
    false_positives_at_threshold: int = 0

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _meta_str(meta: Mapping, key: str) -> str:
    value = meta.get(key)
    if value is None:
        return ""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return str(value)


_Table = tuple[np.ndarray, np.ndarray]


@dataclass
class ImageEvaluation:
    """What `evaluate_scan` measures on one image: the row, the map, the segmentation, and what pools.

    ``tables`` / ``interior_tables``: (lesion, healthy) distinct-value tables of the breast / interior
    pixels; ``froc``: per `FROC_PERCENTILES` level, its threshold, lesions found (all, near the border) and
    false-positive candidates. All None when the image is excluded.
    """

    result: ImageResult
    anomaly_map: np.ndarray
    segmentation: np.ndarray
    tables: tuple[_Table, _Table] | None = None
    interior_tables: tuple[_Table, _Table] | None = None
    froc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def _patch_size(item: Mapping) -> int:
    """The item's patch side (from its ``patches``), else the default `PATCH_SIZE`: "one patch" of the border."""
    patches = item.get("patches")
    shape = getattr(patches, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) >= 2 else PATCH_SIZE


def _pair_tables(amap: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> tuple[_Table, _Table]:
    return metrics.value_counts(amap[region & lesion]), metrics.value_counts(amap[region & ~lesion])


def evaluate_scan(
    item: Mapping,
    scores: object,
    threshold_rule: str = "image_percentile",
    percentile: float = 99.0,
    threshold_value: float | None = None,
) -> ImageEvaluation:
    """Scores of one evaluation item -> its `ImageEvaluation` (per-image row, anomaly map, segmentation, tables).

    ``item`` is an evaluation item (``image_id``, ``patient_id``, ``breast_mask``, ``lesion_mask``,
    ``centers``, ``spacing_mm``, ``stride``, ``meta``). Images without pixel annotation, without scores,
    or without lesion pixels inside the breast get NaN metrics and an ``excluded`` reason. The ground
    truth is the lesion mask inside the breast (pixels outside the breast have no score).
    """
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {threshold_rule!r} unknown; choose one of {THRESHOLD_RULES}")
    if threshold_rule != "image_percentile" and threshold_value is None:
        raise ValueError(f"threshold rule {threshold_rule!r} needs a threshold value")
    breast = as_numpy(item["breast_mask"]).astype(bool)
    lesion = as_numpy(item["lesion_mask"]).astype(bool)
    if breast.ndim != 2 or lesion.shape != breast.shape:
        raise ValueError(
            f"image {item.get('image_id')!r}: breast_mask {breast.shape} and lesion_mask {lesion.shape} "
            "must be two masks of the same H x W"
        )
    lesion &= breast
    s = as_numpy(scores).astype(np.float64).reshape(-1)
    spacing = as_float(item["spacing_mm"])
    stride = int(as_float(item["stride"]))
    patch = _patch_size(item)
    amap = anomaly_map(s, item["centers"], breast, stride)
    meta = item.get("meta") or {}
    threshold = (
        image_percentile_threshold(amap, breast, percentile)
        if threshold_rule == "image_percentile"
        else float(threshold_value)  # type: ignore[arg-type]
    )
    if s.size == 0:
        threshold = math.nan
    seg = segment(amap, breast, threshold)
    has_annotation = meta.get("has_pixel_annotation", True)
    has_annotation = bool(has_annotation.item() if hasattr(has_annotation, "item") else has_annotation)
    n_lesion = int(lesion.sum())
    n_breast = int(breast.sum())
    if s.size == 0:
        excluded = "no_scores"
    elif not has_annotation:
        excluded = "no_pixel_annotation"
    elif n_lesion == 0:
        excluded = "no_lesion_in_breast"
    elif n_lesion == n_breast:
        excluded = "no_healthy_breast_pixels"
    else:
        excluded = ""
    border_dist = border_distance(breast)
    border_near = border_dist <= patch
    interior = breast & ~border_near
    tables = interior_tables = froc = None
    auc_value = h_px = hit = interior_auc = math.nan
    n_lesions = n_near = n_candidates = n_found = n_fp = 0
    border_group = ""
    if not excluded:
        tables = _pair_tables(amap, lesion, breast)
        auc_value = metrics.auc_from_counts(*tables[0], *tables[1])
        interior_tables = _pair_tables(amap, lesion, interior)
        interior_auc = metrics.auc_from_counts(*interior_tables[0], *interior_tables[1])
        h_px = metrics.hausdorff_distance(seg, lesion)
        hit = localisation.lesion_hit(amap, lesion, breast)
        labels, n_lesions = localisation.label_lesions(lesion)
        centres = ndimage.center_of_mass(lesion, labels, np.arange(1, n_lesions + 1))
        rows = np.clip(np.rint([c[0] for c in centres]).astype(np.int64), 0, breast.shape[0] - 1)
        cols = np.clip(np.rint([c[1] for c in centres]).astype(np.int64), 0, breast.shape[1] - 1)
        near = border_near[rows, cols] | ~breast[rows, cols]
        n_near = int(near.sum())
        sizes = ndimage.sum_labels(lesion, labels, np.arange(1, n_lesions + 1))
        border_group = "near_border" if near[int(np.argmax(sizes))] else "interior"
        levels = np.percentile(amap[breast], np.minimum(FROC_PERCENTILES, 100.0))
        levels[np.asarray(FROC_PERCENTILES) >= 100.0] = np.inf
        found, fp = localisation.froc_counts(amap, labels, n_lesions, breast, [*levels, threshold])
        froc = (levels, found[:-1].sum(axis=1), found[:-1][:, near].sum(axis=1), fp[:-1])
        n_found, n_fp = int(found[-1].sum()), int(fp[-1])
        # several candidates may peak in one lesion: the candidates are counted apart from the lesions found
        n_candidates = int(ndimage.label(breast & (amap > threshold), structure=localisation.CONNECTIVITY)[1])
    # The top 1 % is the segmentation itself under the default rule: reuse it instead of a second percentile.
    if threshold_rule == "image_percentile" and percentile == 99.0:
        top = seg
    else:
        top = segment(amap, breast, image_percentile_threshold(amap, breast, 99.0) if s.size else math.nan)
    top1_near_border = float(border_near[top].mean()) if top.any() else math.nan
    result = ImageResult(
        image_id=str(item["image_id"]),
        patient_id=str(item.get("patient_id", "")),
        density=_meta_str(meta, "density"),
        lesion_type=_meta_str(meta, "lesion_type"),
        pathology=_meta_str(meta, "pathology"),
        side=_meta_str(meta, "side"),
        view=_meta_str(meta, "view"),
        source_path=_meta_str(meta, "source_path"),
        spacing_mm=spacing,
        n_patches=int(s.size),
        breast_area_px=n_breast,
        lesion_area_px=n_lesion,
        segmentation_area_px=int(seg.sum()),
        threshold_rule=threshold_rule_name(threshold_rule, percentile, threshold_value),
        threshold=threshold,
        auc=auc_value,
        hausdorff_px=h_px,
        hausdorff_mm=h_px * spacing,
        top1_near_border_fraction=top1_near_border,
        border_area_fraction=float(border_near[breast].mean()) if n_breast else math.nan,
        score_mean=float(s.mean()) if s.size else math.nan,
        score_max=float(s.max()) if s.size else math.nan,
        excluded=excluded,
        density_group=density_group(meta.get("density")),
        border_group=border_group,
        stride=stride,
        hausdorff_cells=h_px / stride if stride > 0 else math.nan,
        lesion_hit=hit,
        interior_auc=interior_auc,
        n_lesions=n_lesions,
        n_lesions_near_border=n_near,
        candidates_at_threshold=n_candidates,
        lesions_found_at_threshold=n_found,
        false_positives_at_threshold=n_fp,
    )
    return ImageEvaluation(result, amap, seg, tables, interior_tables, froc)

