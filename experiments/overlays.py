"""The overlay `lightning predict` writes per image, drawn for a reader.

`overlay_rgb`: the grey scan at full contrast, heat (`figures.CMAP`) only on breast pixels above the
threshold, the breast outline in `OUTLINE_RGB`; `overlay_figure`: that image with a colorbar in the
model's score unit, a scale bar in mm (`scale_bar_mm`), the image ID and the model (`figures.figure_rgb`
renders it as uint8 RGB for the DICOM Secondary Capture). Nothing here writes a file.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from experiments import anomaly_maps, figures

#: Colour of the breast outline on overlays (not in `figures.CMAP`, so never mistaken for heat).
OUTLINE_RGB = (255, 0, 255)
#: Opacity of the heat over the scan where the score is above the threshold.
HEAT_ALPHA = 0.7


def overlay_rgb(image: np.ndarray, amap: np.ndarray, breast: np.ndarray, threshold: float,
                vmax: float | None = None) -> np.ndarray:
    """uint8 H x W x 3: the grey scan at full contrast, heat (`figures.CMAP`) only on breast pixels above
    ``threshold`` (``threshold`` .. ``vmax`` = the colour map's ends), the breast outline in `OUTLINE_RGB`."""
    import matplotlib

    grey = (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    hot = anomaly_maps.segment(amap, breast, threshold) if math.isfinite(threshold) else np.zeros(breast.shape, bool)
    if hot.any():
        top = float(np.nanmax(amap[hot])) if vmax is None else float(vmax)
        span = top - threshold if top > threshold else 1.0
        level = np.clip((amap[hot] - threshold) / span, 0.0, 1.0)
        heat = (matplotlib.colormaps[figures.CMAP](level)[:, :3] * 255.0).astype(np.float32)
        rgb[hot] = (HEAT_ALPHA * heat + (1.0 - HEAT_ALPHA) * rgb[hot].astype(np.float32) + 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(breast.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = np.zeros(breast.shape, np.uint8)
    cv2.drawContours(outline, contours, -1, 1, thickness=1)
    rgb[(outline > 0) & breast] = OUTLINE_RGB
    return rgb


def scale_bar_mm(width_px: int, spacing_mm: float) -> float:
    """A round scale-bar length (mm) near a fifth of the image width."""
    target = 0.2 * width_px * spacing_mm
    for length in (100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5):
        if length <= target:
            return length
    return 0.5


def overlay_figure(rgb: np.ndarray, spacing_mm: float, image_id: str, model_name: str, unit: str,
                   threshold: float, vmax: float, threshold_rule: str, image_score: float) -> Any:
    """The readable overlay: `overlay_rgb` with a colorbar (score unit), a scale bar in mm, ID and model."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    plt = figures._pyplot()
    height, width = rgb.shape[:2]
    with figures.style():
        fig_w = 5.0
        fig, ax = plt.subplots(figsize=(fig_w + 1.2, fig_w * height / max(width, 1) + 0.8), layout="constrained")
        ax.imshow(rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{image_id}  |  model: {model_name}\nimage score (peak) {image_score:.4g}; heat above "
                     f"{threshold_rule} = {threshold:.4g}; breast outline magenta")
        top = vmax if vmax > threshold else threshold + 1.0
        mappable = ScalarMappable(norm=Normalize(vmin=threshold, vmax=top), cmap=figures.CMAP)
        figures.add_colorbar(fig, ax, mappable, f"anomaly score: {unit}")
        length_mm = scale_bar_mm(width, spacing_mm)
        length_px = length_mm / spacing_mm
        x0, y0 = 0.05 * width, 0.95 * height
        ax.add_patch(Rectangle((x0, y0 - 0.012 * height), length_px, max(0.012 * height, 2.0),
                               color="white", label="scale bar"))
        ax.text(x0 + length_px / 2, y0 - 0.03 * height, f"{length_mm:g} mm", color="white", ha="center",
                va="bottom")
    return fig
