"""Evaluation grids: patch centres every ``stride`` px inside the breast, vectorised patch extraction, and
the test-set selection rule (PROTOCOL "Test sets") with its report.

Patch geometry (shared with `datamodules.patches`): a patch of even ``size`` centred on (r, c) covers rows
``r - size//2 .. r + size//2 - 1`` and the same for columns. Past the image edge the image is mirrored
(reflect padding, never zeros: a zero border makes every border patch an outlier).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

CONTEXT_FEATURES = ("skin_distance_px", "chest_wall_distance_px")


def chest_wall(breast_mask: np.ndarray, tolerance_px: int = 4) -> tuple[int, int, np.ndarray]:
    """The straight chest-wall side of a breast, where the film was cut: (column, side, line mask).

    Side: -1 = left, +1 = right, 0 = none (empty mask). It is the side of the mask's bounding box that
    more rows reach (within ``tolerance_px``): the cut is a straight vertical edge that most rows end on,
    next to the image edge or to black padding (mini-MIAS), while the skin side reaches the bounding box
    only at the nipple. The line mask holds the breast pixels of those rows within the tolerance of it.
    """
    mask = np.asarray(breast_mask, dtype=bool)
    line = np.zeros_like(mask)
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return 0, 0, line
    cols = np.flatnonzero(mask.any(0))
    lo, hi = int(cols[0]), int(cols[-1])
    sub = mask[rows]
    first = sub.argmax(1)
    last = mask.shape[1] - 1 - sub[:, ::-1].argmax(1)
    left, right = first <= lo + tolerance_px, last >= hi - tolerance_px
    side, col, touching = (-1, lo, left) if left.sum() >= right.sum() else (1, hi, right)
    band = np.zeros(mask.shape[1], dtype=bool)
    band[max(col - tolerance_px, 0): col + tolerance_px + 1] = True
    line[rows[touching]] = mask[rows[touching]] & band
    return col, side, line


def patch_context(breast_mask: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Where each patch sits in the breast: float32 M x 2 (`CONTEXT_FEATURES`), px at evaluation spacing.

    Column 0: Euclidean distance of the centre to the skin line, the nearest background pixel that is not
    across the chest wall (image edges do not count either). Column 1: horizontal distance to the
    chest-wall line (`chest_wall`). The same function serves the training patches and the evaluation grid,
    so both see one definition.
    """
    mask = np.asarray(breast_mask, dtype=bool)
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 2)
    h, w = mask.shape
    col, side, line = chest_wall(mask)
    filled = mask.copy()
    touching = line.any(1)
    if side < 0:
        filled[touching, :col] = True
    elif side > 0:
        filled[touching, col + 1:] = True
    # edge-replicated padding: a breast pixel on the image edge has breast beyond it, not background
    padded = np.pad(filled.astype(np.uint8), 1, mode="edge")
    if (padded == 0).any():
        skin = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    else:  # no background at all: no skin line
        skin = np.full(mask.shape, float(np.hypot(h, w)), np.float32)
    r, c = centers[:, 0], centers[:, 1]
    chest = np.abs(c - col).astype(np.float32) if side else np.full(len(c), float(np.hypot(h, w)), np.float32)
    return np.stack([skin[r, c], chest], axis=1).astype(np.float32)


def grid_centers(breast_mask: np.ndarray, stride: int = 16, offset: int = 0) -> np.ndarray:
    """Centres (row, col), int64 M x 2, of every ``stride``-th row and column whose pixel lies in the breast.

    Rows and columns ``offset, offset + stride, ...``; ordered row-major.
    """
    mask = np.asarray(breast_mask, dtype=bool)
    rows = np.arange(offset, mask.shape[0], stride)
    cols = np.arange(offset, mask.shape[1], stride)
    sub = mask[np.ix_(rows, cols)]
    r, c = np.nonzero(sub)
    return np.stack([rows[r], cols[c]], axis=1).astype(np.int64)


def pad_reflect(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Mirrors ``size // 2`` pixels past every edge (numpy ``reflect``; repeated for tiny images)."""
    half = size // 2
    return np.pad(image, ((half, half), (half, half)), mode="reflect")


def extract_patches(image: np.ndarray, centers: np.ndarray, size: int = 64) -> np.ndarray:
    """Patches of ``size`` x ``size`` centred on ``centers`` (M x 2 row, col), reflect-padded; M x size x size.

    One fancy-indexing gather over a sliding-window view: no per-patch Python loop.
    """
    image = np.asarray(image)
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 2)
    if centers.size and (
        centers.min() < 0 or centers[:, 0].max() >= image.shape[0] or centers[:, 1].max() >= image.shape[1]
    ):
        raise ValueError(f"patch centres must lie inside the {image.shape[0]}x{image.shape[1]} image")
    padded = pad_reflect(image, size)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    # padded row r + size//2 - size//2 = r is the window whose centre is image row r
    return np.ascontiguousarray(windows[centers[:, 0], centers[:, 1]])


@dataclass
class SelectionDecision:
    """Whether one test image enters the test set, and why."""

    image_id: str
    patient_id: str
    selected: bool
    category: str  # "selected" | "no_annotation" | "no_mask" | "too_large" | "outside_breast"
    reason: str
    lesion_area_px: int
    inside_breast_fraction: float


def select_test_image(
    image_id: str,
    patient_id: str,
    lesion_mask: np.ndarray | None,
    breast_mask: np.ndarray,
    kind: str,
    has_pixel_annotation: bool = True,
    max_lesion_area_patches: float = 4,
    patch_size: int = 64,
) -> SelectionDecision:
    """The paper's rule at evaluation spacing: lesion area < ``max_lesion_area_patches`` x patch area;
    for calcifications also the whole union of calcification masks inside the breast mask.
    """
    bound = max_lesion_area_patches * patch_size * patch_size
    if not has_pixel_annotation:
        return SelectionDecision(image_id, patient_id, False, "no_annotation", "no pixel annotation for some lesion", 0, 0.0)
    if lesion_mask is None or not lesion_mask.any():
        return SelectionDecision(image_id, patient_id, False, "no_mask", f"no {kind} mask", 0, 0.0)
    area = int(lesion_mask.sum())
    inside = float((lesion_mask & breast_mask).sum()) / area
    if area >= bound:
        reason = f"{kind} area {area} px >= {max_lesion_area_patches:g} x {patch_size}^2 = {bound:g} px"
        return SelectionDecision(image_id, patient_id, False, "too_large", reason, area, inside)
    if kind == "calcification" and inside < 1.0:
        reason = f"calcifications not wholly inside the breast mask ({100 * inside:.1f} % inside)"
        return SelectionDecision(image_id, patient_id, False, "outside_breast", reason, area, inside)
    return SelectionDecision(image_id, patient_id, True, "selected", f"{kind} area {area} px < {bound:g} px", area, inside)


def write_selection_report(decisions: list[SelectionDecision], path: str | Path) -> dict:
    """Writes the selection decisions and their summary as JSON (temp name, then rename); returns the summary."""
    path = Path(path)
    reasons: dict[str, int] = {}
    for d in decisions:
        if not d.selected:
            reasons[d.category] = reasons.get(d.category, 0) + 1
    summary = {
        "candidates": len(decisions),
        "selected": sum(d.selected for d in decisions),
        "excluded": sum(not d.selected for d in decisions),
        "excluded_by_reason": reasons,
    }
    payload = {"summary": summary, "images": [asdict(d) for d in decisions]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    log.debug("test-set selection: %d of %d images selected; excluded: %s",
             summary["selected"], summary["candidates"], reasons or "none")
    return summary
