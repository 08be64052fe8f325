"""Preprocessing: resampling, [0, 1] normalisation, breast mask (labels dropped, holes filled), lesion masks."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.preprocessing import (
    breast_mask,
    normalize_intensity,
    pectoral_mask,
    preprocess_mammogram,
    provisional_scale,
    resample,
    resample_mask,
    target_shape,
)
from datamodules.records import DataError, Mammogram


def phantom(h: int = 400, w: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A breast-like half ellipse on the left edge (uint16), a bright label in the top right; true mask."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:h, :w]
    truth = ((rr - h / 2) / (0.42 * h)) ** 2 + (cc / (0.7 * w)) ** 2 <= 1
    img = np.full((h, w), 300.0)
    img[truth] = 1500 + 600 * np.exp(-cc[truth] / (0.3 * w))
    img += rng.normal(0, 30, img.shape)
    img[10:30, w - 40 : w - 10] = 4000  # film label, disconnected from the breast
    return np.clip(img, 0, 4095).astype(np.uint16), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_resample_area_halves_shape_and_keeps_mean() -> None:
    img = np.arange(100 * 60, dtype=np.float32).reshape(100, 60)
    out = resample(img, 0.1, 0.2)
    assert out.shape == (50, 30) == target_shape((100, 60), 0.1, 0.2)
    assert out.dtype == np.float32
    assert out[0, 0] == pytest.approx(img[:2, :2].mean())
    assert out.mean() == pytest.approx(img.mean(), rel=1e-5)


def test_resample_rejects_bad_spacing() -> None:
    with pytest.raises(DataError, match="spacing"):
        resample(np.zeros((4, 4)), 0.0, 0.2)


def test_breast_mask_finds_phantom_and_drops_label() -> None:
    img, truth = phantom()
    mask = breast_mask(provisional_scale(img.astype(np.float32)))
    assert iou(mask, truth) > 0.97
    assert not mask[10:30, -40:-10].any()  # the label is not breast


def test_breast_mask_fills_holes() -> None:
    img, truth = phantom()
    img[180:220, 40:80] = 300  # a dark hole inside the breast
    mask = breast_mask(provisional_scale(img.astype(np.float32)))
    assert mask[180:220, 40:80].all()
    assert iou(mask, truth) > 0.97


def test_breast_mask_empty_image_names_file() -> None:
    with pytest.raises(DataError, match="scan_42.png"):
        breast_mask(np.zeros((64, 64), np.float32), name="scan_42.png")


def test_normalize_maps_background_to_zero_and_breast_top_to_one() -> None:
    img, truth = phantom()
    out = normalize_intensity(img.astype(np.float32), truth)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.median(out[~truth]) == pytest.approx(0.0, abs=1e-6)
    assert np.mean(out[truth] >= 1.0) == pytest.approx(0.005, abs=0.003)  # top 0.5 % clipped
    assert out[15, -20] == 1.0  # the bright label saturates instead of stretching the range


def test_preprocess_mammogram_resamples_and_masks() -> None:
    img, truth = phantom()
    image, mask = preprocess_mammogram(Mammogram(img, spacing_mm=0.1), spacing_mm=0.2)
    assert image.shape == mask.shape == (200, 120)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert iou(mask, resample_mask(truth, (200, 120))) > 0.95


def test_resample_mask_area_rule_and_tiny_specks_survive() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:30, 10:30] = True
    out = resample_mask(mask, (50, 50))
    assert out.sum() == 100 and out[5:15, 5:15].all()
    speck = np.zeros((100, 100), bool)
    speck[51, 51] = True  # a quarter of a target pixel: kept rather than lost
    assert resample_mask(speck, (50, 50)).sum() == 1
    assert resample_mask(mask, (200, 200)).sum() == 1600  # nearest when growing


def test_pectoral_removed_only_when_asked_on_mlo() -> None:
    h, w = 300, 200
    rr, cc = np.mgrid[:h, :w]
    truth = ((rr - 0.4 * h) / (0.55 * h)) ** 2 + (cc / (0.7 * w)) ** 2 <= 1  # MLO: breast reaches the top
    img = np.where(truth, 1500 + 600 * np.exp(-cc / 60.0), 300) + np.random.default_rng(0).normal(0, 30, (h, w))
    muscle = truth & (cc < 90 - rr * 0.6)  # bright triangle, top-left (chest wall) corner
    img[muscle] = 3500
    scaled = provisional_scale(img.astype(np.float32))
    keep = breast_mask(scaled, view="MLO")
    cut = breast_mask(scaled, remove_pectoral=True, view="MLO")
    cc_view = breast_mask(scaled, remove_pectoral=True, view="CC")
    assert keep[muscle].mean() > 0.95 and cc_view[muscle].mean() > 0.95
    assert cut[muscle].mean() < 0.1
    assert iou(pectoral_mask(scaled, keep), muscle) > 0.85
    assert (cut & ~muscle).sum() > 0.95 * (keep & ~muscle).sum()
    # mirrored view (chest wall on the right): the same muscle, mirrored
    mirrored = pectoral_mask(scaled[:, ::-1], keep[:, ::-1])
    assert iou(mirrored[:, ::-1], muscle) > 0.85


@pytest.mark.parametrize("side,view", [("LEFT", "CC"), ("RIGHT", "MLO")])
def test_breast_mask_matches_synthetic_anatomy(side: str, view: str) -> None:
    anatomy = pytest.importorskip("datamodules.synthetic_anatomy")
    drawn = anatomy.breast_view((800, 480), side, view, 3, 0.1, np.random.default_rng(7))
    image, mask = preprocess_mammogram(Mammogram((drawn.brightness * 4095).astype(np.uint16), 0.1), 0.2)
    truth = resample_mask(drawn.breast_mask, image.shape)
    assert iou(mask, truth) > 0.98  # measured 0.993-0.998 over 8 views of all densities
