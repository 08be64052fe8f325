"""Helpers shared by the readers: reporting skipped files, filling geometries, binarising masks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from datamodules.records import DataError, Lesion

logger = logging.getLogger("datamodules.readers")

#: Optical density the DDSM display intensities are measured from (bright = dense = OD_REF - OD).
OD_REF = 4.0


class SkipReport:
    """Collects files a listing had to skip, logs each with its path, and warns once with the count."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.skipped: list[str] = []

    def skip(self, path: str | Path, why: str) -> None:
        """Record one skipped item and log its path and reason."""
        text = f"{path}: {why}"
        self.skipped.append(text)
        logger.warning("%s: skipped %s", self.source, text)

    def finish(self, listed: int) -> None:
        """Warn once with the count of skipped items (and the first few) if there were any."""
        if not self.skipped:
            return
        first = "; ".join(self.skipped[:3])
        more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
        warnings.warn(
            f"{self.source}: skipped {len(self.skipped)} item(s) with missing or unreadable files, "
            f"listed {listed}: {first}{more}",
            stacklevel=3,
        )


def binarise_mask(pixels: np.ndarray) -> np.ndarray:
    """Bool mask of a mask image whatever its coding (0/1, 0/255, 0/65535, JPEG noise): > half its max."""
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    top = float(pixels.max()) if pixels.size else 0.0
    if top <= 0:
        return np.zeros(pixels.shape, dtype=bool)
    return pixels > top / 2.0


def _outlines_closed(edge: np.ndarray) -> bool:
    """True when every outer contour of ``edge`` encloses a hole (the outline is a closed curve)."""
    contours, hierarchy = cv2.findContours(edge, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return True
    parents = hierarchy[0][:, 3]
    outer = int((parents < 0).sum())
    holes_of = {int(p) for p in parents if p >= 0}
    return len(holes_of) >= outer


def fill_outline_image(pixels: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Fill a lesion OUTLINE image (a closed 1-px contour): threshold, then fill every outer contour.

    An outline broken by JPEG noise (no enclosed hole) is first closed morphologically (3, 5, 9 px).
    """
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    edge = (pixels > threshold).astype(np.uint8)
    for size in (0, 3, 5, 9):
        curve = edge if size == 0 else cv2.morphologyEx(
            edge, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
        if _outlines_closed(curve):
            break
    contours, _ = cv2.findContours(curve, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(edge.shape, dtype=np.uint8)
    if contours:
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | edge.astype(bool)


def fill_polygon(points: Sequence[tuple[float, float]], shape: tuple[int, int],
                 scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Filled polygon ``((x, y), ...)`` (column, row) as a bool mask; ``scale`` = (row, col) factors."""
    mask = np.zeros(shape, dtype=np.uint8)
    if len(points) == 0:
        return mask.astype(bool)
    pts = np.asarray(points, dtype=np.float64)
    pts = np.stack([pts[:, 0] * scale[1], pts[:, 1] * scale[0]], axis=1)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], 1)
    return mask.astype(bool)


def fill_circle(circle: tuple[float, float, float], shape: tuple[int, int],
                scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Filled circle ``(column, row, radius)`` (top-left origin) as a bool mask, scaled per axis."""
    col, row, radius = circle
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    r_row = max(radius * scale[0], 0.5)
    r_col = max(radius * scale[1], 0.5)
    return ((rows - row * scale[0]) / r_row) ** 2 + ((cols - col * scale[1]) / r_col) ** 2 <= 1.0


def frame_scale(lesion: Lesion, shape: tuple[int, int]) -> tuple[float, float]:
    """(row, col) factors from the lesion's geometry frame (``meta['frame_shape']``) to ``shape``."""
    frame = lesion.meta.get("frame_shape")
    if not frame:
        return (1.0, 1.0)
    return (shape[0] / float(frame[0]), shape[1] / float(frame[1]))


def fit_mask(mask: np.ndarray, shape: tuple[int, int], path: Path, tolerance: float = 0.01) -> np.ndarray:
    """Return ``mask`` at ``shape``: resized (nearest) when off by at most ``tolerance`` per axis, else error."""
    if mask.shape == tuple(shape):
        return mask
    off = max(abs(mask.shape[0] - shape[0]) / shape[0], abs(mask.shape[1] - shape[1]) / shape[1])
    if off > tolerance:
        raise DataError(
            f"lesion mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{shape[0]}x{shape[1]}; the mask belongs to another image or the file is damaged"
        )
    logger.warning("mask %s is %s, resized to its image %s", path, mask.shape, tuple(shape))
    resized = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def grey(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Collapse a colour image to one grey channel (max over channels keeps a grey PNG saved as RGB exact)."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3:
        if pixels.shape[2] == 4:
            pixels = pixels[:, :, :3]
        if pixels.shape[2] == 1:
            return pixels[:, :, 0]
        if np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 1], pixels[:, :, 2]):
            return pixels[:, :, 0]
        converted = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGR2GRAY)
        return converted
    raise DataError(f"{path}: expected a 2-D grey image, got an array of shape {pixels.shape}")


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically (case2 before case10)."""
    import re

    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def sorted_paths(paths: Iterable[Path]) -> list[Path]:
    """Paths in a stable, natural order (listing order must not depend on the file system)."""
    return sorted(paths, key=lambda p: natural_key(str(p)))
