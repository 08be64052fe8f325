"""Figures: the shared style helpers, Fig. 2 from the evaluation's map files, Fig. 3 from its score histograms."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from experiments import evaluation_results, figures


def _map_file(folder: Path, image_id: str, h: float, scale: float = 1.0) -> None:
    rng = np.random.default_rng(0)
    lesion = np.zeros((32, 32), dtype=bool)
    lesion[10:20, 10:20] = True
    amap = (rng.random((32, 32)) * scale).astype(np.float16)
    evaluation_results.write_npz(
        folder / f"{image_id}.npz", image=rng.random((32, 32)).astype(np.float32),
        breast_mask=np.ones((32, 32), bool), lesion_mask=lesion, anomaly_map=amap,
        segmentation=amap > 0.9 * scale, hausdorff_px=np.float64(h), hausdorff_mm=np.float64(h * 0.2),
    )


def test_save_figure_writes_vector_pdf_and_300_dpi_png(tmp_path: Path) -> None:
    plt = figures._pyplot()
    with figures.style():
        fig, ax = plt.subplots(figsize=(2, 1))
        image = ax.imshow(np.arange(6).reshape(2, 3))
        bar = figures.add_colorbar(fig, ax, image, "score (nats)")
    assert image.get_cmap().name == figures.CMAP and bar.ax.get_ylabel() == "score (nats)"
    png = figures.save_figure(fig, tmp_path / "sub" / "fig.png")
    assert png == tmp_path / "sub" / "fig.png"
    assert (tmp_path / "sub" / "fig.pdf").read_bytes().startswith(b"%PDF")
    assert cv2.imread(str(png)).shape[1] >= 2 * 300 * 0.8  # 2 in wide at 300 dpi (tight bbox trims a little)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.pdf", "fig.png"]  # no temporaries


def test_percentile_rank_is_a_shared_scale() -> None:
    amap = np.array([[1.0, 2.0], [3.0, np.nan]], np.float32)
    ranks = figures.percentile_rank(amap, np.array([[True, True], [True, False]]))
    np.testing.assert_allclose(ranks[:1, :], [[100 / 3, 200 / 3]], rtol=1e-6)
    assert ranks[1, 0] == pytest.approx(100.0) and np.isnan(ranks[1, 1])
    np.testing.assert_allclose(figures.percentile_rank(amap * 1000 - 5, np.isfinite(amap)), ranks, rtol=1e-6,
                               equal_nan=True)


def test_figure2_shares_one_colour_scale_draws_the_truth_contour_and_titles_h(tmp_path: Path) -> None:
    dirs = {}
    for k, model in enumerate(("CAE", "CAE-RATSPN", "Intensity")):
        dirs[model] = tmp_path / model / "maps"
        _map_file(dirs[model], "shared", 10.0 + k, scale=10.0 ** k)  # raw scores of very different units
        _map_file(dirs[model], f"only-{model}", 1.0)
    assert figures.common_image_ids(list(dirs.values())) == ["shared"]
    fig = figures.figure2_figure(dirs, ["shared"])
    axes = np.array(fig.axes[:8]).reshape(2, 4)
    heat = [ax.get_images()[-1] for ax in axes[0, 1:]]
    assert {im.get_cmap().name for im in heat} == {figures.CMAP}
    assert {im.get_clim() for im in heat} == {(0.0, 100.0)}  # one scale for the row, whatever the units
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "percentile" in colorbars[0].get_ylabel()
    # the ground truth is a contour on the scan and on every model's panels
    for ax in [axes[0, 0], *axes[0, 1:], *axes[1, 1:]]:
        assert any(type(c).__name__ in ("QuadContourSet", "ContourSet") for c in [*ax.collections, *ax.get_children()])
    assert [ax.get_title() for ax in axes[1, 1:]] == ["H = 10.0 px (2.0 mm)", "H = 11.0 px (2.2 mm)",
                                                       "H = 12.0 px (2.4 mm)"]
    figures._pyplot().close(fig)
    out = figures.figure2(dirs, tmp_path / "fig2_mass.png")
    assert out == tmp_path / "fig2_mass.png" and (tmp_path / "fig2_mass.pdf").is_file()
    picture = cv2.imread(str(out))
    assert picture.shape[1] > picture.shape[0]  # columns: scan / truth, then heatmap / mask per model
    assert figures.figure2({"A": tmp_path / "A"}, tmp_path / "none.png") is None


def test_figure3_from_the_evaluation_histograms_with_the_calibrated_threshold(tmp_path: Path) -> None:
    acc_hist = {"bin_edges": np.linspace(0, 1, 11), "healthy": np.arange(10), "lesion": np.arange(10)[::-1]}
    evaluation_results.write_npz(tmp_path / "mass.npz", **acc_hist)
    evaluation_results.write_npz(tmp_path / "calc.npz", **acc_hist, calibrated_threshold=np.float64(0.7))
    files = {"mass": tmp_path / "mass.npz", "calc": tmp_path / "calc.npz", "none": tmp_path / "missing.npz"}
    fig = figures.figure3_figure(files, thresholds={"mass": 0.4})
    mass, calc = fig.axes[:2]
    lines = {ax: [ln.get_xdata()[0] for ln in ax.get_lines()] for ax in (mass, calc)}
    assert lines[mass] == [0.4] and lines[calc] == [0.7]
    assert any("calibrated threshold 0.7" in t.get_text() for t in calc.get_legend().get_texts())
    figures._pyplot().close(fig)
    out = figures.figure3(files, tmp_path / "f3.png")
    assert out is not None and cv2.imread(str(out)).shape[0] > 100 and (tmp_path / "f3.pdf").is_file()
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
