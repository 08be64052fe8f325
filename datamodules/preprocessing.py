"""From a `Mammogram` at native spacing to the evaluation-spacing image, its breast mask and lesion masks.

One documented way for every source (see `normalize_intensity` and `breast_mask`):
1. resample to ``pixel_spacing_mm`` (default 0.2 mm; ``cv2.INTER_AREA`` when shrinking, linear when growing);
2. provisional scaling by the image's 0.5 / 99.5 percentiles, breast mask on that (Otsu threshold on the
   smoothed image, opening, largest connected component, holes filled), so labels and film markers drop out;
3. final scaling to [0, 1]: 0 = median of the background (outside the breast), 1 = 99.5th percentile of the
   breast pixels, clipped. Bright labels outside the breast saturate at 1 and never stretch the tissue range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from datamodules.records import DataError, ImageRecord, Mammogram

DEFAULT_SPACING_MM = 0.2


@dataclass
class PreprocessedImage:
    """A mammogram at evaluation spacing: ``image`` float32 in [0, 1], boolean masks of the same shape."""

    image_id: str
    patient_id: str
    image: np.ndarray
    breast_mask: np.ndarray
    lesion_masks: dict[str, np.ndarray]
    spacing_mm: float
    meta: dict[str, Any] = field(default_factory=dict)


def resample(pixels: np.ndarray, native_spacing_mm: float, spacing_mm: float = DEFAULT_SPACING_MM) -> np.ndarray:
    """Resamples an image to ``spacing_mm`` per pixel (area averaging when shrinking), as float32."""
    if native_spacing_mm <= 0 or spacing_mm <= 0:
        raise DataError(f"pixel spacing must be positive (native {native_spacing_mm}, target {spacing_mm})")
    image = np.asarray(pixels, dtype=np.float32)
    shape = target_shape(image.shape[:2], native_spacing_mm, spacing_mm)
    if shape == image.shape[:2]:
        return image.copy()
    shrink = shape[0] < image.shape[0]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


def target_shape(shape: tuple[int, int], native_spacing_mm: float, spacing_mm: float) -> tuple[int, int]:
    """Rows, columns of an image of ``shape`` at ``native_spacing_mm`` once brought to ``spacing_mm``."""
    factor = native_spacing_mm / spacing_mm
    return max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor)))


def resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Brings a boolean mask to ``shape``: area fraction >= 0.5 when shrinking, nearest when growing.

    A non-empty mask never vanishes: when every target pixel covers less than half a lesion pixel
    (a calcification speck), the pixels it touches at all are kept.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask.copy()
    if shape[0] >= mask.shape[0] and shape[1] >= mask.shape[1]:
        return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    fraction = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    out = fraction >= 0.5
    if not out.any() and mask.any():
        out = fraction > 0
    return out


def _percentile_scale(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def provisional_scale(image: np.ndarray) -> np.ndarray:
    """Scales by the image's 0.5 / 99.5 percentiles to [0, 1]; the input of `breast_mask`."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    return _percentile_scale(image, float(lo), float(hi))


def normalize_intensity(image: np.ndarray, breast: np.ndarray, upper_percentile: float = 99.5) -> np.ndarray:
    """Final [0, 1] scaling: background median -> 0, ``upper_percentile`` of the breast pixels -> 1, clipped."""
    image = np.asarray(image, dtype=np.float32)
    inside = image[breast]
    if inside.size == 0:
        raise DataError("cannot normalise an image with an empty breast mask")
    outside = image[~breast]
    lo = float(np.median(outside)) if outside.size else float(inside.min())
    hi = float(np.percentile(inside, upper_percentile))
    if hi <= lo:
        hi = float(inside.max())
    return _percentile_scale(image, lo, hi)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fills holes of a binary uint8 mask: background not reachable from the border becomes foreground."""
    padded = np.pad(mask, 1, constant_values=0)
    flood = padded.copy()
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (mask.astype(bool) | holes).astype(np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)


def breast_mask(
    image: np.ndarray,
    threshold: float | None = None,
    skin_fraction: float = 0.22,
    open_radius_px: int = 3,
    remove_pectoral: bool = False,
    view: str | None = None,
    name: str = "image",
) -> np.ndarray:
    """Boolean breast mask of an image scaled to [0, 1] (bright = dense), found with OpenCV.

    A threshold between the background peak and Otsu's (``skin_fraction``; or a fixed ``threshold`` in
    [0, 1]) on the lightly smoothed image, an opening of
    ``open_radius_px`` that cuts thin bridges to labels and markers, the largest 8-connected component,
    holes filled. ``remove_pectoral`` (MLO views only) cuts the pectoral muscle, see `pectoral_mask`.
    Raises `DataError` naming ``name`` when nothing is found.
    """
    image = np.asarray(image, dtype=np.float32)
    u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    smooth = cv2.GaussianBlur(u8, (5, 5), 0)
    if threshold is None:
        otsu, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # Otsu splits background from the *mean* tissue; the skin line is much fainter. Cut at
        # `skin_fraction` of the way from the background's histogram peak up to Otsu's threshold
        # (0.22 tuned on the 66 labelled DDSM normals: mean IoU 0.955, minimum 0.867).
        hist = np.bincount(smooth.ravel(), minlength=256)
        background = int(np.argmax(hist[: max(1, int(otsu))]))
        cut = background + skin_fraction * (float(otsu) - background)
    else:
        cut = float(threshold) * 255.0
    mask = (smooth > cut).astype(np.uint8)
    if open_radius_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_radius_px + 1, 2 * open_radius_px + 1))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = _largest_component(mask)
    mask = _fill_holes(mask)
    if not mask.any():
        raise DataError(f"{name}: the breast mask is empty (image blank or threshold too high); check the file")
    result = mask.astype(bool)
    if remove_pectoral and view is not None and "MLO" in str(view).upper():
        result &= ~pectoral_mask(image, result)
        if not result.any():
            raise DataError(f"{name}: the breast mask is empty after removing the pectoral muscle")
    return result


def breast_side_is_left(breast: np.ndarray) -> bool:
    """True when the chest wall is on the left image edge (more breast pixels in the left half)."""
    half = breast.shape[1] // 2
    return int(breast[:, :half].sum()) >= int(breast[:, half:].sum())


def pectoral_mask(image: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """The pectoral muscle of an MLO view: the bright triangle in the chest-wall top corner.

    Works in the chest-wall-left orientation: the upper half of the image, Otsu threshold of the breast
    pixels there, the bright connected component that fills most of the corner where the breast's
    chest-wall edge begins, cut to a triangle-like shape (`_triangle_prior`). On the 66 labelled DDSM MLO
    views: IoU with the muscle label mean 0.78, median 0.87 (fails where dense tissue is as bright).
    """
    flip = not breast_side_is_left(breast)
    img = image[:, ::-1] if flip else image
    brs = breast[:, ::-1] if flip else breast
    rows = max(1, brs.shape[0] // 2)
    region = np.where(brs[:rows], img[:rows], 0.0)
    u8 = np.clip(region * 255 + 0.5, 0, 255).astype(np.uint8)
    values = u8[brs[:rows]]
    out = np.zeros_like(breast)
    if values.size < 16:
        return out
    otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = (cv2.GaussianBlur(u8, (9, 9), 0) > otsu).astype(np.uint8)
    count, labels = cv2.connectedComponents(bright, connectivity=8)
    edge_rows = np.flatnonzero(brs[:rows, 0])
    top = int(edge_rows[0]) if edge_rows.size else 0
    corner = labels[top : top + max(1, rows // 4), : max(1, brs.shape[1] // 8)]
    ids = [i for i in np.unique(corner) if i != 0]
    if not ids:
        return out
    best = max(ids, key=lambda i: int((corner == i).sum()))
    out[:rows] = _triangle_prior(labels == best, brs[:rows])
    return out[:, ::-1] if flip else out


def _triangle_prior(muscle: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """Keeps the muscle's shape prior (chest wall on the left): per row, the run of muscle pixels from the
    breast's first column, and run widths that never grow downwards; drops bright tissue leaking in."""
    widths = np.zeros(muscle.shape[0], dtype=np.int64)
    starts = np.zeros(muscle.shape[0], dtype=np.int64)
    for r in range(muscle.shape[0]):
        columns = np.flatnonzero(breast[r])
        if columns.size == 0 or not muscle[r, columns[0]]:
            continue
        run = muscle[r, columns[0]:]
        gaps = np.flatnonzero(~run)
        starts[r], widths[r] = columns[0], gaps[0] if gaps.size else run.size
    first = np.flatnonzero(widths)
    if first.size == 0:
        return np.zeros_like(muscle)
    widths[first[0]:] = np.minimum.accumulate(widths[first[0]:])
    columns = np.arange(muscle.shape[1])
    return (columns[None, :] >= starts[:, None]) & (columns[None, :] < (starts + widths)[:, None]) & breast


def preprocess_mammogram(
    mammogram: Mammogram,
    spacing_mm: float = DEFAULT_SPACING_MM,
    remove_pectoral: bool = False,
    name: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Resampled, [0, 1]-normalised image and its breast mask (the module docstring's steps 1-3)."""
    finite = np.isfinite(mammogram.pixels)
    if not finite.all():
        raise DataError(f"{name}: contains NaN or infinite pixel values ({int((~finite).sum())} px); check the file")
    resampled = resample(mammogram.pixels, mammogram.spacing_mm, spacing_mm)
    provisional = provisional_scale(resampled)
    mask = breast_mask(
        provisional, remove_pectoral=remove_pectoral, view=mammogram.meta.get("view"), name=name
    )
    return normalize_intensity(resampled, mask), mask


def preprocess_record(
    record: ImageRecord,
    spacing_mm: float = DEFAULT_SPACING_MM,
    remove_pectoral: bool = False,
    with_lesions: bool = True,
) -> PreprocessedImage:
    """Reads one record and returns it at evaluation spacing with its breast and lesion masks.

    Raises `DataError` naming the file when a lesion mask's size differs from its image.
    """
    from datamodules import readers

    mammogram = readers.read_image(record)
    image, mask = preprocess_mammogram(mammogram, spacing_mm, remove_pectoral, name=str(record.path))
    lesions: dict[str, np.ndarray] = {}
    if with_lesions and record.lesions:
        native = readers.lesion_masks(record, mammogram.shape)
        for kind, lesion in native.items():
            if lesion.shape != mammogram.shape:
                raise DataError(
                    f"{record.path}: the {kind} mask is {lesion.shape[0]}x{lesion.shape[1]} but the image is "
                    f"{mammogram.shape[0]}x{mammogram.shape[1]}; check the mask file of this image"
                )
            lesions[kind] = resample_mask(lesion, image.shape)
    meta = {**record.meta, **mammogram.meta, "native_spacing_mm": float(mammogram.spacing_mm),
            "native_shape": [int(n) for n in mammogram.shape[:2]]}
    return PreprocessedImage(
        image_id=record.image_id,
        patient_id=record.patient_id,
        image=image,
        breast_mask=mask,
        lesion_masks=lesions,
        spacing_mm=float(spacing_mm),
        meta=meta,
    )
