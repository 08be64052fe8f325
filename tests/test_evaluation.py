"""Anomaly maps, segmentation and per-image results on small hand-made images."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from datamodules.fileio import json_safe
from experiments import anomaly_maps, evaluation, evaluation_results, localisation, metrics


def _grid(breast: np.ndarray, stride: int, origin: tuple[int, int] = (8, 8)) -> np.ndarray:
    rows = np.arange(origin[0], breast.shape[0], stride)
    cols = np.arange(origin[1], breast.shape[1], stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    centers = np.stack([rr.ravel(), cc.ravel()], axis=1)
    return centers[breast[centers[:, 0], centers[:, 1]]]


def test_linear_field_interpolated_exactly_and_masked_outside_breast() -> None:
    h, w, stride = 100, 130, 16
    breast = np.zeros((h, w), bool)
    breast[:, :90] = True
    centers = _grid(np.ones((h, w), bool), stride)
    field = lambda r, c: 0.5 + 0.01 * r - 0.02 * c  # noqa: E731
    scores = field(centers[:, 0], centers[:, 1])
    amap = anomaly_maps.anomaly_map(scores, centers, breast, stride)
    assert amap.dtype == np.float32 and amap.shape == (h, w)
    rr, cc = np.mgrid[:h, :w]
    inside = (rr >= 8) & (rr <= centers[:, 0].max()) & (cc >= 8) & (cc <= centers[:, 1].max()) & breast
    np.testing.assert_allclose(amap[inside], field(rr, cc)[inside], atol=1e-5)
    assert np.isnan(amap[~breast]).all()
    # Outside the grid's hull (first 8 rows) the value is clamped to the nearest node row.
    np.testing.assert_allclose(amap[0, 8:90], field(8, cc[0, 8:90]), atol=1e-5)


def test_missing_grid_cells_take_nearest_score() -> None:
    h, w, stride = 64, 64, 16
    breast = np.zeros((h, w), bool)
    breast[:, :30] = True  # grid columns 8 and 24 scored; 40 and 56 not
    centers = _grid(breast, stride)
    scores = np.where(centers[:, 1] == 8, 1.0, 3.0)
    full_breast = np.ones((h, w), bool)
    amap = anomaly_maps.anomaly_map(scores, centers, full_breast, stride)
    np.testing.assert_allclose(amap[:, 24:], 3.0, atol=1e-6)  # filled from the column-24 nodes
    np.testing.assert_allclose(amap[:, 16], 2.0, atol=1e-6)  # halfway between 8 and 24


def test_anomaly_map_errors_and_empty() -> None:
    breast = np.ones((32, 32), bool)
    assert np.isnan(anomaly_maps.anomaly_map(np.zeros(0), np.zeros((0, 2)), breast, 16)).all()
    with pytest.raises(ValueError, match="scores for"):
        anomaly_maps.anomaly_map(np.zeros(3), np.zeros((2, 2)), breast, 16)
    with pytest.raises(ValueError, match="one grid"):
        anomaly_maps.anomaly_map(np.zeros(2), np.array([[8, 8], [9, 24]]), breast, 16)


def _item(image_id: str, lesion_center: tuple[int, int] | None, has_annotation: bool = True) -> dict:
    h, w, stride = 96, 128, 16
    rr, cc = np.mgrid[:h, :w]
    breast = np.hypot(rr - h / 2, cc) < 110
    lesion = np.zeros((h, w), bool)
    if lesion_center is not None:
        lesion = np.hypot(rr - lesion_center[0], cc - lesion_center[1]) < 10
    centers = _grid(breast, stride)
    return {
        "image_id": image_id,
        "patient_id": f"P_{image_id}",
        "scan": np.where(lesion, 0.9, 0.3).astype(np.float32),
        "breast_mask": breast,
        "lesion_mask": lesion,
        "centers": centers,
        "spacing_mm": 0.2,
        "stride": stride,
        "meta": {"density": 2, "lesion_type": "mass", "has_pixel_annotation": has_annotation},
    }


def _scores(item: dict) -> np.ndarray:
    c = item["centers"]
    lesion = item["lesion_mask"]
    ys, xs = np.nonzero(lesion) if lesion.any() else (np.array([0]), np.array([0]))
    d = np.hypot(c[:, 0] - ys.mean(), c[:, 1] - xs.mean())
    return 1.0 / (1.0 + d / 16.0)


def test_evaluate_scan_metrics_and_exclusions() -> None:
    item = _item("a", (40, 60))
    ev = evaluation.evaluate_scan(item, _scores(item))
    result, amap, seg = ev.result, ev.anomaly_map, ev.segmentation
    breast, lesion = item["breast_mask"], item["lesion_mask"]
    assert result.auc == pytest.approx(roc_auc_score(lesion[breast], amap[breast]))
    assert result.auc > 0.95
    assert result.threshold == pytest.approx(np.percentile(amap[breast], 99))
    assert result.segmentation_area_px == int(seg.sum()) > 0
    assert seg.sum() <= 0.011 * breast.sum() + 1
    assert result.hausdorff_px == pytest.approx(metrics.hausdorff_distance(seg, lesion))
    assert result.hausdorff_mm == pytest.approx(0.2 * result.hausdorff_px)
    assert result.excluded == "" and result.density == "2" and result.n_patches == len(item["centers"])
    assert result.top1_near_border_fraction == pytest.approx(anomaly_maps.top_fraction_near_border(amap, breast))
    assert 0.0 <= result.top1_near_border_fraction <= 1.0

    healthy = _item("h", None)
    res_h = evaluation.evaluate_scan(healthy, _scores(healthy)).result
    assert res_h.excluded == "no_lesion_in_breast" and math.isnan(res_h.auc)
    unannotated = _item("u", (40, 60), has_annotation=False)
    assert evaluation.evaluate_scan(unannotated, _scores(unannotated)).result.excluded == "no_pixel_annotation"
    ev_fixed = evaluation.evaluate_scan(item, _scores(item), "fixed", threshold_value=0.5)
    fixed, seg_fixed = ev_fixed.result, ev_fixed.segmentation
    assert fixed.threshold == 0.5 and seg_fixed.sum() == int((amap[breast] > 0.5).sum())
    assert fixed.top1_near_border_fraction == pytest.approx(result.top1_near_border_fraction)
    with pytest.raises(ValueError, match="unknown"):
        evaluation.evaluate_scan(item, _scores(item), "otsu")


def test_top_fraction_near_border_counts_border_hotspots() -> None:
    breast = np.zeros((200, 200), bool)
    breast[20:180, 20:180] = True
    amap = np.zeros((200, 200), np.float32)
    amap[100:105, 100:105] = 1.0  # 25 hottest pixels in the centre, far (75+ px) from the border
    assert anomaly_maps.top_fraction_near_border(amap, breast, top_percent=0.1) == 0.0
    amap2 = np.zeros((200, 200), np.float32)
    amap2[20:25, 20:25] = 1.0  # hottest at the corner
    assert anomaly_maps.top_fraction_near_border(amap2, breast, top_percent=0.1) == 1.0
    # The image edge counts as border too.
    assert anomaly_maps.border_distance(np.ones((5, 5), bool))[0, 2] == 1.0


def test_accumulator_summary_histogram_and_files(tmp_path) -> None:
    acc = evaluation_results.EvaluationAccumulator()
    items = [_item("a", (40, 60)), _item("b", (60, 30)), _item("h", None)]
    maps = []
    for it in items:
        amap = acc.add(it, _scores(it)).anomaly_map
        maps.append(amap)
    s = acc.summary()
    lesion_items = items[:2]
    expected_pixel = metrics.pixel_auc(maps[:2], [i["lesion_mask"] for i in lesion_items],
                                       [i["breast_mask"] for i in lesion_items])
    assert s["pixel_auc"] == pytest.approx(expected_pixel)
    assert s["n_images"] == 3 and s["n_evaluated"] == 2 and s["n_excluded"] == 1
    assert s["excluded_reasons"]["no_lesion_in_breast"] == 1
    assert s["threshold_rule"] == "image_percentile_99"
    assert s["n_hausdorff"] == 2 and s["n_hausdorff_empty"] == 0
    aucs = [r.auc for r in acc.results[:2]]
    assert s["image_auc_mean"] == pytest.approx(np.mean(aucs))
    hist = acc.score_histogram(bins=10)
    assert hist["bin_edges"].shape == (11,)
    assert hist["lesion"].sum() == s["n_lesion_pixels"] == sum(int(i["lesion_mask"].sum()) for i in lesion_items)
    assert hist["healthy"].sum() == s["n_healthy_pixels"]

    # The same image twice is evaluated once and counted.
    acc.add(items[0], _scores(items[0]))
    assert acc.summary()["n_images"] == 3 and acc.summary()["n_duplicates"] == 1
    assert acc.summary()["pixel_auc"] == s["pixel_auc"]
    # A summed state merges whole into an empty accumulator.
    other = evaluation_results.EvaluationAccumulator()
    other.merge_state(acc.state())
    assert other.summary()["pixel_auc"] == s["pixel_auc"] and other.summary()["n_images"] == 3

    evaluation_results.write_metrics_json(tmp_path / "metrics.json", s)
    evaluation_results.write_per_image_csv(tmp_path / "per_image.csv", acc.results)
    loaded = json.loads((tmp_path / "metrics.json").read_text())
    assert loaded["pixel_auc"] == pytest.approx(s["pixel_auc"])
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [r["image_id"] for r in rows] == ["a", "b", "h"]
    assert rows[2]["auc"] == "" and rows[2]["excluded"] == "no_lesion_in_breast"
    assert float(rows[0]["auc"]) == pytest.approx(acc.results[0].auc)
    assert not list(tmp_path.glob("*.tmp"))


def test_map_matches_the_data_pipelines_grid() -> None:
    """The evaluation grid of `datamodules.grids` (rows/cols 0, 16, ...) maps a linear field exactly."""
    grids = pytest.importorskip("datamodules.grids")
    h, w = 90, 70
    rr, cc = np.mgrid[:h, :w]
    breast = np.hypot(rr - h / 2, cc) < 60
    centers = grids.grid_centers(breast, 16)
    assert centers[:, 0].min() % 16 == 0
    scores = 2.0 + 0.03 * centers[:, 0] + 0.01 * centers[:, 1]
    amap = anomaly_maps.anomaly_map(scores, centers, breast, 16)
    # inside the hull of scored nodes (all four neighbours scored) the map is the linear field
    scored = np.zeros((h, w), bool)
    scored[centers[:, 0], centers[:, 1]] = True
    r0, c0 = 16, 0
    cell_ok = scored[r0, c0] and scored[r0 + 16, c0] and scored[r0, c0 + 16] and scored[r0 + 16, c0 + 16]
    assert cell_ok
    block = (slice(r0, r0 + 17), slice(c0, c0 + 17))
    np.testing.assert_allclose(amap[block], (2.0 + 0.03 * rr + 0.01 * cc)[block], atol=1e-5)


def test_empty_accumulator_writes_nulls(tmp_path) -> None:
    acc = evaluation_results.EvaluationAccumulator("fixed", threshold_value=0.5)
    s = acc.summary()
    assert s["n_images"] == 0 and math.isnan(s["pixel_auc"]) and s["threshold_rule"] == "fixed_0.5"
    hist = acc.score_histogram(bins=4)
    assert hist["healthy"].sum() == 0 and hist["bin_edges"].shape == (5,)
    evaluation_results.write_metrics_json(tmp_path / "m.json", s)
    evaluation_results.write_per_image_csv(tmp_path / "p.csv", acc.results)
    assert json.loads((tmp_path / "m.json").read_text())["pixel_auc"] is None
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("image_id,patient_id")


def test_segment_takes_the_top_plateau_when_nothing_is_strictly_above() -> None:
    from experiments.anomaly_maps import image_percentile_threshold, segment

    amap = np.zeros((20, 20), dtype=np.float32)
    amap[:, 15:] = 1.0  # a plateau of 25 % of the breast at the maximum
    breast = np.ones_like(amap, dtype=bool)
    threshold = image_percentile_threshold(amap, breast, 99.0)
    assert threshold == 1.0
    seg = segment(amap, breast, threshold)
    assert seg.sum() == 100 and seg[:, 15:].all()
    amap[0, 0] = 2.0  # one pixel strictly above: the strict rule applies
    assert segment(amap, breast, 1.5).sum() == 1


def _border_item(image_id: str, centre: tuple[int, int], density: object) -> dict:
    """A 160 x 200 breast (a rectangle, so "near the border" is easy to reason about) with one round lesion."""
    h, w, stride = 160, 200, 16
    rr, cc = np.mgrid[:h, :w]
    breast = np.zeros((h, w), bool)
    breast[4:156, :190] = True
    lesion = np.hypot(rr - centre[0], cc - centre[1]) < 9
    return {
        "image_id": image_id, "patient_id": f"P_{image_id}",
        "scan": np.where(lesion, 0.9, 0.3).astype(np.float32),
        "breast_mask": breast, "lesion_mask": lesion, "centers": _grid(breast, stride),
        "spacing_mm": 0.2, "stride": stride,
        "meta": {"density": density, "lesion_type": "mass", "has_pixel_annotation": True},
    }


def test_localisation_columns_equal_the_metric_functions() -> None:
    item = _border_item("c", (80, 100), "G")  # the lesion centre is 76+ px from every border: interior
    ev = evaluation.evaluate_scan(item, _scores(item))
    result, amap = ev.result, ev.anomaly_map
    breast, lesion = item["breast_mask"], item["lesion_mask"]
    assert result.lesion_hit == localisation.lesion_hit(amap, lesion, breast) == 1.0
    assert result.interior_auc == pytest.approx(localisation.interior_pixel_auc([amap], [lesion], [breast], 64))
    assert result.hausdorff_cells == pytest.approx(result.hausdorff_px / 16)
    assert result.density_group == "G" and result.border_group == "interior"
    assert result.n_lesions == 1 and result.n_lesions_near_border == 0
    labels, n = localisation.label_lesions(lesion)
    found, fp = localisation.froc_counts(amap, labels, n, breast, [result.threshold])
    assert result.lesions_found_at_threshold == int(found.sum()) == 1
    assert result.false_positives_at_threshold == int(fp[0])
    near = _border_item("n", (20, 100), 3)  # 16 px from the top border
    res_near = evaluation.evaluate_scan(near, _scores(near)).result
    assert res_near.border_group == "near_border" and res_near.n_lesions_near_border == 1
    assert res_near.density_group == "3-4"


def test_density_groups_of_mias_and_birads() -> None:
    groups = [evaluation.density_group(v) for v in ("F", "fatty-glandular", "D", 1, "2", 3, 4.0, None, "x", 0)]
    assert groups == ["F", "G", "D", "1-2", "1-2", "3-4", "3-4", "", "", ""]


def test_accumulator_froc_and_group_aucs_equal_pooled_references() -> None:
    items = [_border_item("a", (80, 100), 1), _border_item("b", (20, 60), 4), _border_item("c", (85, 70), 2)]
    rng = np.random.default_rng(0)
    acc = evaluation_results.EvaluationAccumulator()
    maps, found, fps, all_levels = [], [], [], []
    for it in items:
        scores = _scores(it) + 0.3 * rng.random(len(it["centers"]))  # noise: false positives appear
        amap = acc.add(it, scores).anomaly_map
        maps.append(amap)
        labels, n = localisation.label_lesions(it["lesion_mask"] & it["breast_mask"])
        levels = np.percentile(amap[it["breast_mask"]], evaluation.FROC_PERCENTILES)
        levels[-1] = np.inf
        f, fp = localisation.froc_counts(amap, labels, n, it["breast_mask"], levels)
        found.append(f)
        fps.append(fp)
        all_levels.append(levels)
    s = acc.summary()
    fp_image, sens_image = localisation.froc_curve(found, fps)
    np.testing.assert_allclose(s["froc_image_percentile"]["fp_per_image"], fp_image)
    np.testing.assert_allclose(s["froc_image_percentile"]["sensitivity_all"], sens_image)
    thresholds, fp_per_image, sens = localisation.froc_global(all_levels, [f.sum(axis=1) for f in found], fps, 3)
    np.testing.assert_allclose(s["froc"]["thresholds"], thresholds)
    np.testing.assert_allclose(s["froc"]["fp_per_image"], fp_per_image)
    np.testing.assert_allclose(s["froc"]["sensitivity_all"], sens)
    expected = localisation.sensitivity_at_fp(fp_per_image, sens)
    assert [s["sensitivity_at_0.5_fp"], s["sensitivity_at_1_fp"], s["sensitivity_at_2_fp"]] == [
        expected[0.5], expected[1.0], expected[2.0]]
    assert s["n_lesions"] == 3 and s["n_lesions_near_border"] == 1
    assert s["lesion_hit_rate"] == pytest.approx(np.mean([r.lesion_hit for r in acc.results]))
    masks = [(it["lesion_mask"], it["breast_mask"]) for it in items]
    assert s["interior_pixel_auc"] == pytest.approx(
        localisation.interior_pixel_auc(maps, [m[0] for m in masks], [m[1] for m in masks], 64))
    low = [0, 2]  # BI-RADS 1 and 2
    assert s["pixel_auc_density_1-2"] == pytest.approx(
        metrics.pixel_auc([maps[i] for i in low], [masks[i][0] for i in low], [masks[i][1] for i in low]))
    assert s["density_groups"]["3-4"]["n_images"] == 1
    assert s["border_groups"]["near_border"]["n_images"] == 1 and s["n_images_interior_lesions"] == 2
    assert s["pixel_auc_near_border_lesions"] == pytest.approx(metrics.pixel_auc([maps[1]], [masks[1][0]], [masks[1][1]]))
    assert s["hausdorff_cells_mean"] == pytest.approx(s["hausdorff_px_mean"] / 16) and s["grid_stride"] == 16
    # a state with per-image tables (DDP) and a summed state give the same summary as the accumulator itself
    for keep in (True, False):
        source = evaluation_results.EvaluationAccumulator(keep_image_tables=keep)
        for it in items:
            source.add(it, _scores(it) + 0.3 * np.random.default_rng(0).random(len(it["centers"])))
        merged = evaluation_results.EvaluationAccumulator()
        merged.merge_state(source.state())
        assert json.dumps(json_safe(merged.summary()), sort_keys=True) == json.dumps(
            json_safe(source.summary()), sort_keys=True)


def test_calibrated_rule_reads_the_models_threshold() -> None:
    import torch

    item = _border_item("c", (80, 100), "G")
    model = torch.nn.Module()
    with pytest.raises(ValueError, match="no `threshold` buffer"):
        anomaly_maps.model_threshold(model)
    model.register_buffer("threshold", torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="not fitted"):
        anomaly_maps.model_threshold(model)
    model.threshold.fill_(0.6)
    value = anomaly_maps.model_threshold(model)
    ev = evaluation.evaluate_scan(item, _scores(item), "calibrated", threshold_value=value)
    result, amap, seg = ev.result, ev.anomaly_map, ev.segmentation
    assert result.threshold_rule == "calibrated_0.6" and result.threshold == pytest.approx(0.6)
    assert seg.sum() == int((amap[item["breast_mask"]] > 0.6).sum())
    regions = localisation.froc_counts(amap, *localisation.label_lesions(item["lesion_mask"]), item["breast_mask"], [0.6])
    assert result.false_positives_at_threshold == int(regions[1][0])
