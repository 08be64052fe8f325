"""Evaluation grids: centres, reflect-padded vectorised extraction, the test-set selection rule and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.grids import extract_patches, grid_centers, select_test_image, write_selection_report


def test_grid_centers_every_stride_inside_mask() -> None:
    mask = np.zeros((100, 80), bool)
    mask[20:70, 0:50] = True
    centers = grid_centers(mask, stride=16)
    assert centers.dtype == np.int64
    expected = [(r, c) for r in (32, 48, 64) for c in (0, 16, 32, 48)]
    assert [tuple(x) for x in centers] == expected
    assert len(grid_centers(np.zeros((50, 50), bool))) == 0


def test_extract_patches_matches_loop_reference_with_reflect_padding() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((90, 70)).astype(np.float32)
    centers = np.array([[0, 0], [45, 35], [89, 69], [10, 60]])
    patches = extract_patches(image, centers, size=64)
    padded = np.pad(image, 32, mode="reflect")
    for patch, (r, c) in zip(patches, centers):
        np.testing.assert_array_equal(patch, padded[r : r + 64, c : c + 64])
    # the centre pixel sits at (32, 32); the border is mirrored, never zero
    assert patches[1, 32, 32] == image[45, 35]
    assert patches[0, 31, 32] == image[1, 0] and patches[0, 0, 0] == image[32, 32]
    assert (patches[0] > 0).all()


def test_extract_patches_small_image_and_bad_centres() -> None:
    image = np.arange(20 * 20, dtype=np.float32).reshape(20, 20)
    patches = extract_patches(image, np.array([[10, 10]]), size=64)  # pad larger than the image
    assert patches.shape == (1, 64, 64) and patches[0, 32, 32] == image[10, 10]
    with pytest.raises(ValueError, match="inside"):
        extract_patches(image, np.array([[20, 0]]))


def test_selection_rule_masses_and_calcs(tmp_path) -> None:
    breast = np.zeros((400, 300), bool)
    breast[:, :200] = True
    small = np.zeros_like(breast)
    small[10:60, 10:60] = True  # 2500 px < 4 * 4096
    large = np.zeros_like(breast)
    large[:200, :100] = True  # 20000 px >= 16384
    edge = np.zeros_like(breast)
    edge[100:105, 195:205] = True  # calcs half outside the breast
    d = [
        select_test_image("a", "p1", small, breast, "mass"),
        select_test_image("b", "p2", large, breast, "mass"),
        select_test_image("c", "p3", edge, breast, "calcification"),
        select_test_image("d", "p4", edge, breast, "mass"),
        select_test_image("e", "p5", None, breast, "mass"),
        select_test_image("f", "p6", small, breast, "mass", has_pixel_annotation=False),
        select_test_image("g", "p7", small, breast, "mass", max_lesion_area_patches=0.5),
    ]
    assert [x.selected for x in d] == [True, False, False, True, False, False, False]
    assert [x.category for x in d] == ["selected", "too_large", "outside_breast", "selected", "no_mask",
                                      "no_annotation", "too_large"]
    assert d[0].lesion_area_px == 2500 and d[2].inside_breast_fraction == pytest.approx(0.5)
    summary = write_selection_report(d, tmp_path / "sel" / "selection.json")
    assert summary == {"candidates": 7, "selected": 2, "excluded": 5,
                       "excluded_by_reason": {"too_large": 2, "outside_breast": 1, "no_mask": 1, "no_annotation": 1},
                       "skipped_unreadable": 0, "skipped": []}
    saved = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert saved["images"][1]["reason"].startswith("mass area 20000 px >= 4")
    assert not list((tmp_path / "sel").glob(".*tmp*"))
