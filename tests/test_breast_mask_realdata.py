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
