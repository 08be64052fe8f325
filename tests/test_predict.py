"""`lightning predict` for a reader: spacing never guessed, overlays, regions, predictions.csv, skips, DICOM out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from datamodules import MammographyDataModule
from datamodules.readers import list_source, read_image
from datamodules.readers.dicom import read_dicom
from datamodules.records import DataError
from experiments import anomaly_maps, overlays, predict
from lightning_modules.base import AnomalyDetector
from tests.test_datamodules import write_mammogram
from tests.test_readers_dicom import write_dicom

CBIS_SAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cbis-ddsm" / "samples"


class BrightIsAnomalous(AnomalyDetector):
    """Score = how much brighter the patch's central 8 x 8 px are than the whole patch: a bright disc."""

    def score_patches(self, x: Tensor) -> Tensor:
        return x[:, :, 28:36, 28:36].flatten(1).mean(1) - x.flatten(1).mean(1)


class Calibrated(BrightIsAnomalous):
    """The same scores with a calibrated threshold and healthy calibration scores in a buffer."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self._threshold = threshold
        self.register_buffer("calibration_scores", torch.linspace(0.0, 0.6, 99))

    @property
    def threshold(self) -> float:
        return self._threshold


def _item(h: int = 64, w: int = 80) -> dict:
    breast = np.zeros((h, w), dtype=bool)
    breast[:, :48] = True
    centers = np.array([(r, c) for r in range(0, h, 16) for c in range(0, w, 16) if breast[r, c]])
    return {
        "image_id": "P_1/LEFT CC",
        "scan": np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w),
        "breast_mask": breast,
        "centers": centers,
        "stride": 16,
        "spacing_mm": 0.2,
        "meta": {"native_spacing_mm": 0.05, "spacing_source": "PixelSpacing", "native_shape": [4 * h, 4 * w]},
    }


def _peaked_scores(item: dict) -> np.ndarray:
    r, c = item["centers"][:, 0], item["centers"][:, 1]
    return -((r - 32.0) ** 2) - (c - 16.0) ** 2 + 0.01 * c  # one interior peak at (32, 16)


# --- spacing ---------------------------------------------------------------------------------------


def test_dicom_spacing_comes_from_the_header_a_documented_default_or_a_clear_error(tmp_path: Path) -> None:
    pixels = (np.arange(400).reshape(20, 20) % 4096).astype(np.uint16)
    imager = read_dicom(write_dicom(tmp_path / "a.dcm", pixels, imager_spacing=(0.07, 0.07)))
    assert imager.spacing_mm == pytest.approx(0.07) and imager.meta["spacing_source"] == "ImagerPixelSpacing"
    both = read_dicom(write_dicom(tmp_path / "b.dcm", pixels, spacing=(0.1, 0.1), imager_spacing=(0.07, 0.07)))
    assert both.spacing_mm == pytest.approx(0.1) and both.meta["spacing_source"] == "PixelSpacing"
    cbis = write_dicom(tmp_path / "c.dcm", pixels)
    ds = pydicom.dcmread(cbis)
    ds.PatientID = "Mass-Test_P_00016_LEFT_CC"
    ds.save_as(cbis)
    image = read_dicom(cbis)
    assert image.spacing_mm == pytest.approx(0.05) and image.meta["spacing_source"] == "CBIS-DDSM documented default"
    assert read_dicom(cbis, 0.1).meta["spacing_source"] == "configured spacing_mm"
    with pytest.raises(DataError, match=r"d\.dcm.*spacing_mm") as err:
        read_dicom(write_dicom(tmp_path / "d.dcm", pixels))
    assert "\n" not in str(err.value)


def test_image_files_take_spacing_only_when_told_or_documented(tmp_path: Path) -> None:
    write_mammogram(tmp_path / "plain.png", seed=1)
    write_mammogram(tmp_path / "mdb001.png", seed=2)
    records = {r.image_id: r for r in list_source("images", tmp_path)}
    assert records["plain"].spacing_mm is None
    assert records["mdb001"].spacing_mm == pytest.approx(0.2)
    assert records["mdb001"].meta["spacing_source"] == "mini-MIAS documented default (file name)"
    with pytest.raises(DataError, match="plain.png.*spacing_mm"):
        read_image(records["plain"])
    told = list_source("images", tmp_path, spacing_mm=0.1)
    assert {r.spacing_mm for r in told} == {0.1}


# --- one image -------------------------------------------------------------------------------------


def test_overlay_is_grey_outside_the_breast_and_below_the_threshold(tmp_path: Path) -> None:
    item = _item()
    breast = item["breast_mask"]
    amap = anomaly_maps.anomaly_map(_peaked_scores(item), item["centers"], breast, 16)
    threshold = anomaly_maps.image_percentile_threshold(amap, breast, 99.0)
    rgb = overlays.overlay_rgb(item["scan"], amap, breast, threshold)
    grey = (item["scan"] * 255 + 0.5).astype(np.uint8)
    hot = anomaly_maps.segment(amap, breast, threshold)
    outline = np.all(rgb == overlays.OUTLINE_RGB, axis=2)
    # outside the breast: the scan itself at full contrast, untouched
    np.testing.assert_array_equal(rgb[~breast], np.repeat(grey[~breast][:, None], 3, axis=1))
    # inside, below the threshold and off the outline: grey as well
    calm = breast & ~hot & ~outline
    np.testing.assert_array_equal(rgb[calm], np.repeat(grey[calm][:, None], 3, axis=1))
    # above the threshold: coloured (channels differ), and the peak pixel is among them
    assert hot[32, 16] and (np.ptp(rgb[hot & ~outline].astype(int), axis=1) > 10).all()
    # the breast outline is drawn on breast pixels along its border, nowhere else
    assert outline.any() and not (outline & ~breast).any() and outline[:, 47].all()


def test_overlay_figure_has_colorbar_units_scale_bar_id_and_model() -> None:
    rgb = np.zeros((100, 80, 3), np.uint8)
    fig = overlays.overlay_figure(rgb, 0.2, "case7/scan", "RatSpnStage", "-log p(z) (nats)", 1.0, 3.0,
                                  "calibrated threshold", 2.5)
    texts = [t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text"))]
    assert any("case7/scan" in t and "RatSpnStage" in t for t in texts)
    assert any(t == "anomaly score: -log p(z) (nats)" for t in texts)  # the colorbar's label
    assert "2 mm" in texts  # scale bar: a fifth of 80 px x 0.2 mm = 3.2 mm, rounded down to 2 mm
    colorbar_axes = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbar_axes) == 1 and colorbar_axes[0].get_ylim() == pytest.approx((1.0, 3.0))
    assert overlays.scale_bar_mm(3000, 0.05) == 20.0


def test_write_prediction_regions_json_and_row_with_the_percentile(tmp_path: Path) -> None:
    item = _item()
    result = predict.write_prediction(item, _peaked_scores(item), tmp_path, "P_1/LEFT_CC", None, "CAE",
                                      predict.PredictionOptions(native_grid=True))
    assert result.paths["map"] == tmp_path / "P_1" / "LEFT_CC_map.npy"
    amap = np.load(result.paths["map"])
    np.testing.assert_array_equal(amap, anomaly_maps.anomaly_map(_peaked_scores(item), item["centers"],
                                                               item["breast_mask"], 16))
    native = np.load(result.paths["map_native"])
    assert native.shape == (256, 320) and np.isnan(native[:, 200:]).all() and np.isfinite(native[:, :180]).all()
    regions = json.loads(result.paths["regions"].read_text())
    assert regions["threshold_rule"] == "image 99th percentile" and regions["calibrated"] is False
    assert regions["spacing_mm"] == 0.2 and regions["native_spacing_mm"] == 0.05
    assert regions["spacing_source"] == "PixelSpacing"
    mask = cv2.imread(str(result.paths["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    [region] = regions["regions"]
    assert region["area_px"] == int(mask.sum()) and region["area_mm2"] == pytest.approx(mask.sum() * 0.04)
    assert region["peak_score"] == pytest.approx(float(np.nanmax(amap)))
    assert (region["peak_row_px"], region["peak_col_px"]) == (32, 16) and region["p_value"] is None
    assert region["centre_row_native_px"] == pytest.approx(4 * region["centre_row_px"], abs=0.1)
    assert result.row["image_score"] == pytest.approx(float(np.nanmax(amap)))
    assert result.row["n_regions"] == 1 and result.row["model"] == "CAE"


def test_a_calibrated_threshold_and_p_values_are_used_when_the_model_carries_them(tmp_path: Path) -> None:
    item = _item()
    scores = np.linspace(0.0, 1.0, len(item["centers"]))
    model = Calibrated(threshold=0.9)
    assert predict.calibrated_threshold(model) == pytest.approx(0.9)
    assert predict.calibrated_threshold(BrightIsAnomalous()) is None
    result = predict.write_prediction(item, scores, tmp_path, "x", model, "Calibrated")
    regions = json.loads(result.paths["regions"].read_text())
    amap = np.load(result.paths["map"])
    assert regions["calibrated"] is True and regions["threshold"] == pytest.approx(0.9)
    mask = cv2.imread(str(result.paths["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(mask, item["breast_mask"] & (np.nan_to_num(amap, nan=-1) > 0.9))
    # every peak is above all 99 healthy calibration scores: p = 1 / (99 + 1)
    assert [r["p_value"] for r in regions["regions"]] == [pytest.approx(0.01)] * len(regions["regions"])
    assert result.row["min_p_value"] == pytest.approx(0.01)


def test_conformally_calibrated_scores_are_minus_log_p() -> None:
    from types import SimpleNamespace

    model = SimpleNamespace(calibrator=SimpleNamespace(fitted=True), threshold=float(np.log(100.0)))
    p_value = predict.p_value_function(model)
    np.testing.assert_allclose(p_value(np.array([np.log(100.0), 0.0])), [0.01, 1.0])
    assert predict.calibrated_threshold(model) == pytest.approx(np.log(100.0))
    assert "calibrated" in predict.score_unit(model)
    assert predict.p_value_function(SimpleNamespace(calibrator=SimpleNamespace(fitted=False))) is None


def test_output_stems_keep_folders_apart_and_never_collide() -> None:
    used: set[str] = set()
    assert predict.output_stem("a/scan", "/in/a/scan.png", used) == "a/scan"
    assert predict.output_stem("b/scan", "/in/b/scan.png", used) == "b/scan"
    other = predict.output_stem("a/scan", "/in/a/scan.dcm", used)
    assert other.startswith("a/scan_") and other != "a/scan"
    assert predict.output_stem("../x y", "/in/x y.png", used) == "x_y"


# --- a folder, end to end --------------------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    write_mammogram(root / "left" / "scan.png", seed=1, lesion=(128, 64, 16))
    write_mammogram(root / "right" / "scan.png", seed=2)
    (root / "empty.png").write_bytes(b"")
    cv2.imwrite(str(root / "black.png"), np.zeros((80, 80), np.uint8))
    rng = np.random.default_rng(3)
    rr, cc = np.mgrid[:240, :160]
    breast = ((rr - 120) / 108.0) ** 2 + (cc / 120.0) ** 2 <= 1
    pixels = np.where(breast, 2600, 150) + rng.normal(0, 40, (240, 160))
    path = write_dicom(root / "dicom" / "mg.dcm", np.clip(pixels, 0, 4095).astype(np.uint16), bits_stored=12,
                       spacing=(0.1, 0.1))
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientID, ds.PatientName = "P1", "Doe^Jane"
    ds.save_as(path)
    nouid = write_dicom(root / "dicom" / "nouid.dcm", np.clip(pixels, 0, 4095).astype(np.uint16), bits_stored=12,
                        spacing=(0.1, 0.1))
    assert "StudyInstanceUID" not in pydicom.dcmread(nouid)
    return root


def _predict(tmp_path: Path, root: Path, options: dict) -> predict.PredictionWriter:
    writer = predict.PredictionWriter(tmp_path / "out", **options)
    dm = MammographyDataModule(source="manifest", root=str(tmp_path / "none.csv"), predict_path=str(root),
                               predict_options={"spacing_mm": 0.1}, cache_dir=str(tmp_path / "cache"),
                               progress=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.predict(BrightIsAnomalous(), datamodule=dm, return_predictions=False)
    return writer


def test_predict_on_a_folder_skips_bad_files_scores_the_rest_and_writes_dicoms(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _folder(tmp_path)
    writer = _predict(tmp_path, root, {})
    out = tmp_path / "out"
    captured = capsys.readouterr()
    assert "predict: scored 4, skipped 2 (1 empty image, 1 unreadable)" in captured.out
    assert f"skipped {root / 'empty.png'}: " in captured.err and f"skipped {root / 'black.png'}: " in captured.err
    # a DICOM without the UIDs to reference is still scored; only its DICOM outputs are left out, said why
    assert "nouid.dcm: no DICOM outputs (ValueError" in captured.err and "lacks StudyInstanceUID" in captured.err
    with open(out / "predictions.csv") as handle:
        rows = {r["image_id"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"left/scan", "right/scan", "dicom/mg", "dicom/nouid"}
    assert rows["dicom/nouid"]["segmentation_dcm"] == "" and (out / "dicom" / "nouid_overlay.png").is_file()
    assert (out / "left" / "scan_map.npy").is_file() and (out / "right" / "scan_map.npy").is_file()
    # the bright disc (row 128, col 64 at 0.1 mm) holds the left scan's highest-scoring region
    regions = json.loads((out / "left" / "scan_regions.json").read_text())
    peak = regions["regions"][0]
    assert abs(peak["peak_row_px"] * 2 - 128) <= 16 and abs(peak["peak_col_px"] * 2 - 64) <= 16
    assert rows["dicom/mg"]["spacing_source"] == "PixelSpacing" and rows["left/scan"]["spacing_source"] == \
        "configured spacing_mm"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 4 and {Path(s["path"]).name for s in summary["skipped"]} == {"empty.png", "black.png"}
    # DICOM in, DICOM out: a Segmentation and a Secondary Capture in the source's study
    source = pydicom.dcmread(root / "dicom" / "mg.dcm")
    seg = pydicom.dcmread(rows["dicom/mg"]["segmentation_dcm"])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    mask = cv2.imread(str(out / "dicom" / "mg_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    frame = seg.pixel_array.astype(bool)
    assert frame.shape == (240, 160)  # the source grid (the map is at 0.2 mm, the source at 0.1 mm)
    expected = cv2.resize(mask.astype(np.uint8), (160, 240), interpolation=cv2.INTER_NEAREST) > 0
    np.testing.assert_array_equal(frame, expected)
    sc = pydicom.dcmread(rows["dicom/mg"]["overlay_dcm"])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert writer.rows and len(writer.skipped) == 2


def test_predict_with_nothing_readable_is_a_one_line_error(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="no image could be scored.*empty.png"):
        _predict(tmp_path, root, {})


@pytest.mark.realdata
def test_dicom_outputs_on_the_cbis_ddsm_samples(tmp_path: Path) -> None:
    files = sorted(CBIS_SAMPLES.glob("**/*cropped*/*.dcm")) if CBIS_SAMPLES.is_dir() else []
    if not files:
        pytest.skip(f"CBIS-DDSM samples absent ({CBIS_SAMPLES})")
    from experiments.dicom_out import write_dicom_outputs

    source = pydicom.dcmread(files[0])
    image = read_dicom(files[0])
    assert image.spacing_mm == pytest.approx(0.05)  # CBIS-DDSM carries no spacing: the documented default
    seg = np.zeros((source.Rows // 4, source.Columns // 4), bool)
    seg[10:20, 10:30] = True
    paths = write_dicom_outputs(files[0], seg, np.full((50, 60, 3), 90, np.uint8), tmp_path / "cbis", "CAE", 1.0,
                                "image 99th percentile")
    back = pydicom.dcmread(paths["segmentation_dcm"])
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.pixel_array.shape == (source.Rows, source.Columns)
    assert back.pixel_array.sum() == pytest.approx(seg.sum() * 16, rel=0.1)
    sc = pydicom.dcmread(paths["overlay_dcm"])
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.pixel_array.shape == (50, 60, 3)
