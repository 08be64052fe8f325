"""The difficulty yardstick of the synthetic set, measured at the project's evaluation spacing (0.2 mm).

`baseline_arrays` gives the smoothed-intensity anomaly score and lesion labels over the breast of one
image, `pixel_auc` their exact ROC AUC (the figure stored in DONE.json), and `area_eval_px` the lesion
area that the paper's 4-patch test-set rule (`MAX_LESION_AREA_PX`) is applied to.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

from datamodules.synthetic_formats import NATIVE_SPACING_MM

#: Spacing at which the difficulty figure is measured (the project's evaluation spacing).
EVALUATION_SPACING_MM = 0.2
#: Gaussian sigma (px at 0.2 mm) of the smoothed-intensity baseline: a quarter patch (64 px) wide.
BASELINE_SIGMA_PX = 16.0
#: The patch-area rule of the paper's test sets: lesion area < 4 patches of 64 x 64 px at 0.2 mm.
MAX_LESION_AREA_PX = 4 * 64 * 64


def to_eval_spacing(array: np.ndarray, nearest: bool = False) -> np.ndarray:
    """A native-spacing image (area-averaged) or mask (``nearest``, boolean) resized to `EVALUATION_SPACING_MM`."""
    factor = NATIVE_SPACING_MM / EVALUATION_SPACING_MM
    h, w = array.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if nearest:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(array.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def pixel_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with tie ranks) of ``scores`` for boolean ``labels``."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def baseline_arrays(pixels: np.ndarray, breast: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed-intensity scores and lesion labels over the breast pixels of one native-spacing image.

    The image is brought to 0.2 mm, scaled to [0, 1] by its own min and max, and Gaussian-smoothed
    (sigma `BASELINE_SIGMA_PX`); this is the "intensity as anomaly score" difficulty yardstick.
    """
    image = to_eval_spacing(pixels.astype(np.float32))
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    smooth = gaussian_filter(image, BASELINE_SIGMA_PX)
    breast_e = to_eval_spacing(breast, nearest=True)
    lesion_e = to_eval_spacing(lesion.astype(np.float32)) >= 0.5
    return smooth[breast_e], lesion_e[breast_e]


def area_eval_px(mask: np.ndarray) -> float:
    """Area of a native-spacing mask in pixels at the evaluation spacing."""
    return float(mask.sum()) * (NATIVE_SPACING_MM / EVALUATION_SPACING_MM) ** 2
