"""`smooth_grid` against a brute-force normalised Gaussian average, and its use before calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.grid_smoothing import median_grid, smooth_grid


def brute_force(scores: np.ndarray, centers: np.ndarray, stride: int, sigma: float, truncate: float = 3.0) -> np.ndarray:
    radius = math.ceil(truncate * sigma / stride)  # per axis, in grid cells, like the separable kernel
    out = np.empty_like(scores, dtype=np.float64)
    for i, (r, c) in enumerate(centers):
        dr, dc = (centers[:, 0] - r) / stride, (centers[:, 1] - c) / stride
        inside = (np.abs(dr) <= radius) & (np.abs(dc) <= radius)
        w = np.exp(-0.5 * ((dr * stride) ** 2 + (dc * stride) ** 2) / sigma**2) * inside
        out[i] = (w * scores).sum() / w.sum()
    return out


@pytest.mark.parametrize("sigma", [4.0, 16.0, 40.0])
def test_smooth_grid_matches_brute_force_on_a_ragged_grid(sigma: float) -> None:
    rng = np.random.default_rng(0)
    stride = 16
    rows, cols = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
    keep = rng.random(rows.shape) < 0.7  # a breast-shaped hole pattern: absent nodes are not zeros
    centers = np.stack([rows[keep] * stride + 5, cols[keep] * stride + 11], axis=1)
    scores = rng.normal(size=len(centers))
    got = smooth_grid(torch.tensor(scores, dtype=torch.float32), torch.tensor(centers), stride, sigma)
    assert got.dtype == torch.float32 and got.shape == (len(centers),)
    np.testing.assert_allclose(got.numpy(), brute_force(scores, centers, stride, sigma), rtol=1e-5, atol=1e-6)


def test_smooth_grid_keeps_constants_and_is_off_at_zero() -> None:
    centers = torch.tensor([[0, 0], [0, 16], [16, 0], [32, 48]])
    const = torch.full((4,), 2.5)
    assert torch.allclose(smooth_grid(const, centers, 16, 20.0), const)  # normalised: no pull from absent nodes
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert smooth_grid(x, centers, 16, 0.0) is x
    with pytest.raises(ValueError, match="not on one grid of stride 16"):
        smooth_grid(x, centers + torch.tensor([[0, 0], [0, 1], [0, 0], [0, 0]]), 16, 8.0)
    with pytest.raises(ValueError, match="3 scores for 4 grid centres"):
        smooth_grid(x[:3], centers, 16, 8.0)


@pytest.mark.parametrize("radius", [1, 2])
def test_median_grid_matches_brute_force_lower_median_over_existing_neighbours(radius: int) -> None:
    rng = np.random.default_rng(1)
    stride = 16
    rows, cols = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    keep = rng.random(rows.shape) < 0.7
    centers = np.stack([rows[keep] * stride + 3, cols[keep] * stride + 7], axis=1)
    scores = rng.normal(size=len(centers))
    expected = np.empty(len(centers))
    for i, (r, c) in enumerate(centers):
        near = (np.abs(centers[:, 0] - r) <= radius * stride) & (np.abs(centers[:, 1] - c) <= radius * stride)
        values = np.sort(scores[near])
        expected[i] = values[(len(values) - 1) // 2]  # the lower median of an even count
    got = median_grid(torch.tensor(scores), torch.tensor(centers), stride, radius)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # a lone outlier vanishes, a 3 x 3 block of high patches keeps its centre
    block = torch.zeros(len(centers), dtype=torch.float64)
    block[0] = 100.0
    assert median_grid(block, torch.tensor(centers), stride, 1)[0] == 0.0
    x = torch.tensor([1.0, 2.0])
    assert median_grid(x, torch.tensor([[0, 0], [0, 16]]), 16, 0) is x
