"""Gaussian smoothing of one image's grid scores over its neighbouring grid patches (plain torch).

A patch's score alone is noisy: one healthy patch of unusual texture can outscore a lesion that makes a
whole neighbourhood of patches unlikely. `smooth_grid` replaces each grid score by the Gaussian-weighted
mean of the scores of the grid patches around it (weights ``exp(-d^2 / 2 sigma^2)`` over the centre
distance ``d`` in px, cut at 3 sigma), normalised over the patches that exist, so the breast border,
where the grid ends, is averaged over breast patches only (normalised convolution; nothing is padded in).
It is what a lesion's size predicts: a mass spans several patches at a stride of 16 px.

`RatSpnStage(score_smoothing_px=...)` applies it to the raw scores before the conformal calibration, so
the calibrator ranks smoothed scores against smoothed healthy scores and its p-values stay valid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel_1d(sigma_cells: float, truncate: float = 3.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unnormalised 1-D Gaussian weights ``exp(-k^2 / 2 sigma^2)`` for k = -r..r, r = ceil(truncate * sigma)."""
    radius = max(int(math.ceil(truncate * sigma_cells)), 0)
    k = torch.arange(-radius, radius + 1, dtype=dtype)
    return torch.exp(-0.5 * (k / sigma_cells) ** 2)


def grid_index(centers: Tensor, stride: int, n: int) -> tuple[Tensor, Tensor, int, int]:
    """Grid row / column (long N) of each of ``n`` patch centres (N x 2 row, col px) on one grid of spacing
    ``stride``, and the grid's size; ValueError when the count differs or a centre lies off the grid."""
    c = torch.as_tensor(centers).reshape(-1, 2).long()
    if c.shape[0] != n:
        raise ValueError(f"{n} scores for {c.shape[0]} grid centres")
    offset = c - c.min(dim=0).values
    if bool((offset % stride).any()):
        raise ValueError(f"grid centres are not on one grid of stride {stride}")
    gi, gj = (offset // stride).unbind(1)
    return gi, gj, int(gi.max()) + 1, int(gj.max()) + 1


def smooth_grid(scores: Tensor, centers: Tensor, stride: int, sigma_px: float, truncate: float = 3.0) -> Tensor:
    """Normalised Gaussian smoothing (sigma ``sigma_px`` px) of N scores at grid centres (N x 2 row, col px).

    Centres lie on one grid of spacing ``stride`` (as the evaluation grid's do); ``sigma_px <= 0`` returns the
    scores unchanged. The result has the input's dtype and device. Raises ValueError on centres off the grid.
    """
    if sigma_px <= 0 or scores.numel() == 0:
        return scores
    stride = int(stride)
    gi, gj, rows, cols = grid_index(torch.as_tensor(centers, device=scores.device), stride, scores.numel())
    values = torch.zeros(rows, cols, dtype=torch.float64, device=scores.device)
    present = torch.zeros_like(values)
    values[gi, gj] = scores.detach().to(torch.float64).reshape(-1)
    present[gi, gj] = 1.0
    kernel = gaussian_kernel_1d(float(sigma_px) / stride, truncate).to(scores.device)
    radius = (kernel.numel() - 1) // 2

    def blur(x: Tensor) -> Tensor:  # separable: rows then columns, zero outside the grid
        x = F.conv2d(x[None, None], kernel.view(1, 1, -1, 1), padding=(radius, 0))
        return F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))[0, 0]

    smoothed = blur(values) / blur(present).clamp_min(1e-12)
    return smoothed[gi, gj].to(scores.dtype)


def median_grid(scores: Tensor, centers: Tensor, stride: int, radius: int = 1) -> Tensor:
    """Each grid score replaced by the median of the grid patches within ``radius`` cells (a (2r+1)^2 window),
    over the patches that exist (the lower median of an even count; the breast border's windows are smaller, no
    padding). An order statistic: a lone outlying patch vanishes, a region of several high patches stays.
    ``radius <= 0``: unchanged."""
    if radius <= 0 or scores.numel() == 0:
        return scores
    gi, gj, rows, cols = grid_index(torch.as_tensor(centers, device=scores.device), int(stride), scores.numel())
    grid = torch.full((rows + 2 * radius, cols + 2 * radius), math.nan, dtype=torch.float64, device=scores.device)
    grid[gi + radius, gj + radius] = scores.detach().to(torch.float64).reshape(-1)
    window = [grid[gi + radius + di, gj + radius + dj]
              for di in range(-radius, radius + 1) for dj in range(-radius, radius + 1)]
    return torch.nanmedian(torch.stack(window, dim=1), dim=1).values.to(scores.dtype)


__all__ = ["gaussian_kernel_1d", "grid_index", "median_grid", "smooth_grid"]
