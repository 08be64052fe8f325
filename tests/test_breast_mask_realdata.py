"""Breast masks on 66 real DDSM normals against their manual label maps (foreground = label != 64)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datamodules.preprocessing import breast_mask, provisional_scale

pytestmark = pytest.mark.realdata


def test_breast_masks_match_ddsm_label_maps(shared_data) -> None:
    images = sorted((shared_data / "ddsm-normals").glob("**/fgt_seg/*.png"))
    if not images:
        pytest.skip(f"no ddsm-normals images under {shared_data / 'ddsm-normals'}")
    ious = {}
    for path in images:
        label_path = path.parent.parent / "fgt_seg_labels" / f"{path.stem}_LI.png"
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        labels = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert pixels is not None and labels is not None, path
        truth = labels != 64
        mask = breast_mask(provisional_scale(pixels.astype(np.float32)), name=str(path))
        ious[path.name] = float((mask & truth).sum() / (mask | truth).sum())
    values = np.array(list(ious.values()))
    worst = min(ious, key=ious.get)
    assert len(values) == 66
    assert values.mean() > 0.95, f"mean IoU {values.mean():.4f}"
    assert values.min() >= 0.85, f"worst {worst}: IoU {ious[worst]:.4f}"


def test_pectoral_muscle_on_ddsm_mlo_views(shared_data) -> None:
    """The optional pectoral cut against label 255 (measured: mean IoU 0.78, median 0.87 over 66 views)."""
    images = sorted((shared_data / "ddsm-normals").glob("**/fgt_seg/*.png"))
    if not images:
        pytest.skip(f"no ddsm-normals images under {shared_data / 'ddsm-normals'}")
    ious = []
    for path in images:
        labels = cv2.imread(str(path.parent.parent / "fgt_seg_labels" / f"{path.stem}_LI.png"), cv2.IMREAD_UNCHANGED)
        scaled = provisional_scale(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32))
        with_muscle = breast_mask(scaled, view="MLO")
        without = breast_mask(scaled, remove_pectoral=True, view="MLO")
        muscle = with_muscle & ~without
        truth = labels == 255
        ious.append((muscle & truth).sum() / max(1, (muscle | truth).sum()))
    ious = np.array(ious)
    assert np.median(ious) > 0.85 and ious.mean() > 0.75, (np.median(ious), ious.mean())
