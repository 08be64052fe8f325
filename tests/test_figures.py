"""Figures: prediction files, Fig. 2 from the evaluation's map files, Fig. 3 from its score histograms."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from experiments import evaluation, figures


def _item(h: int = 64, w: int = 80) -> dict:
    breast = np.zeros((h, w), dtype=bool)
    breast[:, :48] = True
    centers = np.array([(r, c) for r in range(0, h, 16) for c in range(0, w, 16) if breast[r, c]])
    return {
        "image_id": "P_1/LEFT CC",
        "image": np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w),
        "breast_mask": breast,
        "lesion_mask": np.zeros((h, w), dtype=bool),
        "centers": centers,
        "stride": 16,
    }


def test_write_prediction_files_match_the_evaluation_map(tmp_path: Path) -> None:
    item = _item()
    r, c = item["centers"][:, 0], item["centers"][:, 1]
    scores = -((r - 32.0) ** 2) - (c - 16.0) ** 2 + 0.01 * c  # one interior peak at (32, 16)
    paths = figures.write_prediction(item, scores, tmp_path)
    assert [p.name for p in paths] == ["P_1_LEFT_CC_map.npy", "P_1_LEFT_CC_overlay.png", "P_1_LEFT_CC_mask.png"]
    amap = np.load(paths[0])
    expected = evaluation.anomaly_map(scores, item["centers"], item["breast_mask"], 16)
    np.testing.assert_array_equal(amap, expected)
    assert np.isnan(amap[:, 48:]).all()
    overlay = cv2.cvtColor(cv2.imread(str(paths[1])), cv2.COLOR_BGR2RGB)
    grey = (item["image"] * 255).astype(np.uint8)
    # outside the breast the overlay is the plain scan; inside it is tinted
    np.testing.assert_array_equal(overlay[:, 48:, 0], grey[:, 48:])
    assert np.abs(overlay[:, :48].astype(int) - grey[:, :48, None]).max() > 50
    mask = cv2.imread(str(paths[2]), cv2.IMREAD_GRAYSCALE) > 0
    level = np.percentile(amap[item["breast_mask"]], 99.0)
    np.testing.assert_array_equal(mask, item["breast_mask"] & (np.nan_to_num(amap, nan=-np.inf) > level))
    assert 0 < mask.sum() <= 0.01 * item["breast_mask"].sum() + 1 and mask[32, 16]


def test_normalise_map_and_overlay_are_uint8_in_range() -> None:
    amap = np.array([[np.nan, 0.0], [1.0, 100.0]], dtype=np.float32)
    norm = figures.normalise_map(amap)
    assert norm[0, 0] == 0.0 and norm[1, 1] == pytest.approx(1.0) and 0.0 <= norm[1, 0] <= 1.0
    overlay = figures.heatmap_overlay(np.full((2, 2), 0.5, np.float32), amap)
    assert overlay.dtype == np.uint8 and overlay.shape == (2, 2, 3)
    assert tuple(overlay[0, 0]) == (127, 127, 127)


def _map_file(folder: Path, image_id: str, h: float) -> None:
    rng = np.random.default_rng(0)
    lesion = np.zeros((32, 32), dtype=bool)
    lesion[10:20, 10:20] = True
    amap = rng.random((32, 32)).astype(np.float16)
    evaluation.write_npz(
        folder / f"{image_id}.npz", image=rng.random((32, 32)).astype(np.float32),
        breast_mask=np.ones((32, 32), bool), lesion_mask=lesion, anomaly_map=amap,
        segmentation=amap > 0.9, hausdorff_px=np.float64(h),
    )


def test_figure2_uses_an_image_every_model_has(tmp_path: Path) -> None:
    dirs = {}
    for k, model in enumerate(("CAE", "CAE-RATSPN", "Intensity")):
        dirs[model] = tmp_path / model / "maps"
        _map_file(dirs[model], "shared", 10.0 + k)
        _map_file(dirs[model], f"only-{model}", 1.0)
    assert figures.common_image_ids(list(dirs.values())) == ["shared"]
    out = figures.figure2(dirs, tmp_path / "fig2_mass.png")
    assert out is not None and out.is_file()
    picture = cv2.imread(str(out))
    assert picture.shape[1] > picture.shape[0]  # columns: scan / truth, then heatmap / mask per model
    assert figures.figure2({"A": tmp_path / "A"}, tmp_path / "none.png") is None


def test_figure3_from_the_evaluation_histograms(tmp_path: Path) -> None:
    acc_hist = {"bin_edges": np.linspace(0, 1, 11), "healthy": np.arange(10), "lesion": np.arange(10)[::-1]}
    evaluation.write_npz(tmp_path / "mass.npz", **acc_hist)
    out = figures.figure3({"mass": tmp_path / "mass.npz", "calc": tmp_path / "missing.npz"}, tmp_path / "f3.png")
    assert out is not None and cv2.imread(str(out)).shape[0] > 100
    assert figures.figure3({"calc": tmp_path / "missing.npz"}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_froc_figure_from_the_evaluation_metrics(tmp_path: Path) -> None:
    import json

    from experiments import figures

    good = tmp_path / "a" / "metrics.json"
    good.parent.mkdir()
    good.write_text(json.dumps({"froc": {"fp_per_image": [4.0, 1.0, 0.0], "sensitivity_all": [1.0, 0.5, 0.0]}}))
    empty = tmp_path / "b.json"
    empty.write_text(json.dumps({"pixel_auc": 0.5}))
    path = figures.froc_figure({"CAE": good, "bVAE": empty, "VQVAE": tmp_path / "missing.json"}, tmp_path / "f.png")
    assert path is not None and path.stat().st_size > 1000
    import cv2

    assert cv2.imread(str(path)).ndim == 3
    assert figures.froc_figure({"bVAE": empty}, tmp_path / "g.png") is None and not (tmp_path / "g.png").exists()
