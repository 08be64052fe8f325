"""mini-MIAS, MINI-DDSM and manifest readers on small data written by the tests."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.readers import lesion_masks, list_source, read_image
from datamodules.readers.mias import parse_info
from datamodules.records import DataError

INFO = """Mammographic Image Analysis Society
Some free text describing the columns: reference, tissue, class, severity, x, y, radius.
1st column: MIAS database reference number.

mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM
mdb004 D NORM
mdb005 F CALC B
mdb006 F CIRC M 100 100 10
mdb006 F CALC M 200 900 20
"""


def _write_pgm(path: Path, value: int) -> None:
    pixels = np.full((1024, 1024), value, dtype=np.uint8)
    path.write_bytes(b"P5\n# mini-MIAS\n1024 1024\n# comment\n255\n" + pixels.tobytes())


def test_mias_info_circles_pairs_and_missing_coordinates(tmp_path):
    (tmp_path / "Info.txt").write_text(INFO)
    for ref in ("mdb001", "mdb002", "mdb003", "mdb005", "mdb006"):
        _write_pgm(tmp_path / f"{ref}.pgm", 100)
    table = parse_info(tmp_path / "Info.txt")
    assert len(table) == 6 and len(table["mdb006"]) == 2 and table["mdb003"][0]["class"] == "NORM"
    assert table["mdb005"][0]["severity"] == "B" and table["mdb005"][0]["x"] is None
    with pytest.warns(UserWarning) as caught:
        records = list_source("mias", tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("skipped 1 item" in m and "mdb004.pgm" in m for m in messages)
    assert any("1 abnormal image(s) have no lesion coordinates" in m and "mdb005" in m for m in messages)
    by_id = {r.image_id: r for r in records}
    assert list(by_id) == ["mdb001", "mdb002", "mdb003", "mdb005", "mdb006"]
    assert [by_id[k].patient_id for k in by_id] == ["mias_001", "mias_001", "mias_002", "mias_003", "mias_003"]
    assert [by_id[k].label for k in by_id] == [1, 1, 0, 1, 1]
    assert by_id["mdb005"].has_pixel_annotation is False and by_id["mdb001"].has_pixel_annotation is True
    assert lesion_masks(by_id["mdb005"], (1024, 1024)) == {}
    image = read_image(by_id["mdb001"])
    assert image.shape == (1024, 1024) and image.spacing_mm == pytest.approx(0.2) and image.pixels[0, 0] == 100
    mask = lesion_masks(by_id["mdb001"], image.shape)["mass"]
    row = 1024 - 425  # bottom-left origin
    assert mask[row, 535] and mask[row - 190, 535] and not mask[row - 200, 535] and not mask[425 - 150, 535]
    assert mask.sum() == pytest.approx(math.pi * 197**2, rel=0.01)
    both = lesion_masks(by_id["mdb006"], (1024, 1024))
    assert set(both) == {"mass", "calcification"}
    assert both["calcification"][1024 - 900, 200] and both["mass"][924, 100]
    assert by_id["mdb006"].meta["pathology"] == "MALIGNANT" and by_id["mdb001"].meta["tissue"] == "fatty-glandular"
    half = lesion_masks(by_id["mdb002"], (512, 512))["mass"]  # circles scale with the image
    assert half.sum() == pytest.approx(math.pi * 34.5**2, rel=0.03) and half[(1024 - 280) // 2, 261]


def _outline_jpeg(path: Path, shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    outline = np.zeros(shape, dtype=np.uint8)
    cv2.circle(outline, center, radius, 255, thickness=1)
    cv2.imwrite(str(path), outline, [cv2.IMWRITE_JPEG_QUALITY, 90])
    filled = np.zeros(shape, dtype=np.uint8)
    cv2.circle(filled, center, radius, 1, thickness=-1)
    return filled.astype(bool)


ICS = """ics_version 1.0
filename C-0001-1
DENSITY 3
DIGITIZER LUMISYS LASER
LEFT_CC LINES 240 PIXELS_PER_LINE 160 BITS_PER_PIXEL 12 RESOLUTION 50 OVERLAY
LEFT_MLO LINES 240 PIXELS_PER_LINE 160 BITS_PER_PIXEL 12 RESOLUTION 50 NON_OVERLAY
"""
OVERLAY = """TOTAL_ABNORMALITIES 1
ABNORMALITY 1
LESION_TYPE CALCIFICATION TYPE PUNCTATE DISTRIBUTION CLUSTERED
ASSESSMENT 3
SUBTLETY 2
PATHOLOGY BENIGN
TOTAL_OUTLINES 1
BOUNDARY
80 80 2 2 2 2 2 2 2 2 4 4 4 4 4 4 4 4 6 6 6 6 6 6 6 6 0 0 0 0 0 0 0 0 #
"""
INDEX = """fullPath,fileName,View,Side,Status,Tumour_Contour,Tumour_Contour2,Age,Density
Benign\\0001\\C_0001_1.LEFT_CC.jpg,C_0001_1.LEFT_CC.jpg,CC,LEFT,Benign,Benign\\0001\\C_0001_1.LEFT_CC_Mask.jpg,-,61.0,3.0
Benign\\0001\\C_0001_1.LEFT_MLO.jpg,C_0001_1.LEFT_MLO.jpg,MLO,LEFT,Benign,Benign\\0001\\C_0001_1.LEFT_MLO_Mask.jpg,-,61.0,3.0
Cancer\\0999\\B_0999_1.LEFT_CC.jpg,B_0999_1.LEFT_CC.jpg,CC,LEFT,Cancer,-,-,70.0,2.0
"""


def _mini_tree(root: Path) -> np.ndarray:
    case = root / "Benign" / "0001"
    case.mkdir(parents=True)
    (case / "C-0001-1.ics").write_text(ICS)
    (case / "C_0001_1.LEFT_CC.OVERLAY").write_text(OVERLAY)
    cv2.imwrite(str(case / "C_0001_1.LEFT_CC.jpg"), np.full((120, 80), 90, np.uint8))
    cv2.imwrite(str(case / "C_0001_1.LEFT_MLO.jpg"), np.full((120, 80), 90, np.uint8))  # its mask is missing
    truth = _outline_jpeg(case / "C_0001_1.LEFT_CC_Mask.jpg", (120, 80), (44, 44), 6)
    normal = root / "Normal" / "0002"
    normal.mkdir(parents=True)
    cv2.imwrite(str(normal / "A_0002_1.RIGHT_MLO.jpg"), np.full((100, 60), 30, np.uint8))
    return truth


def test_mini_ddsm_layout_index_outline_masks_and_spacing(tmp_path):
    truth = _mini_tree(tmp_path)
    (tmp_path / "DataWMask.csv").write_text(INDEX)
    with pytest.warns(UserWarning, match=r"skipped 1 item.*C_0001_1\.LEFT_MLO_Mask\.jpg"):
        records = list_source("mini_ddsm", tmp_path)
    by_id = {r.image_id: r for r in records}
    assert list(by_id) == ["C_0001_1.LEFT_CC", "A_0002_1.RIGHT_MLO"]
    cc, normal = by_id["C_0001_1.LEFT_CC"], by_id["A_0002_1.RIGHT_MLO"]
    assert (cc.patient_id, cc.label, cc.meta["age"], cc.meta["density"], cc.meta["status"]) == (
        "C_0001", 1, 61, 3, "Benign")
    assert (normal.label, normal.patient_id, normal.lesions) == (0, "A_0002", [])
    lesion = cc.lesions[0]
    assert lesion.kind == "calcification" and lesion.mask_is_outline and lesion.pathology == "BENIGN"
    image = read_image(cc)
    assert image.shape == (120, 80) and image.spacing_mm == pytest.approx(0.1)  # 50 um * 240 / 120
    assert read_image(normal).spacing_mm == pytest.approx(0.1)  # no .ics: the default
    mask = lesion_masks(cc, image.shape)["calcification"]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9 and mask[44, 44]
    with pytest.warns(UserWarning, match="LEFT_MLO_Mask"):  # no .OVERLAY for MLO: its listed mask still counts
        overlay = list_source("mini_ddsm", tmp_path, geometry="overlay", classes="benign")
    assert [r.image_id for r in overlay] == ["C_0001_1.LEFT_CC"]
    assert overlay[0].lesions[0].outline is not None
    square = lesion_masks(overlay[0], (120, 80))["calcification"]
    assert square[40:45, 40:45].all() and 20 <= square.sum() <= 30  # the 9x9 chain-code square, halved


def test_mini_ddsm_xlsx_index_and_walk_without_index(tmp_path):
    import openpyxl

    _mini_tree(tmp_path)
    book = openpyxl.Workbook()
    sheet = book.active
    for line in INDEX.strip().splitlines():
        sheet.append(line.split(","))
    book.save(tmp_path / "DataWMask.xlsx")
    with pytest.warns(UserWarning, match="LEFT_MLO_Mask"):
        assert len(list_source("mini_ddsm", tmp_path)) == 2
    (tmp_path / "DataWMask.xlsx").unlink()
    records = list_source("mini_ddsm", tmp_path)  # masks found beside each image; MLO simply has none
    assert [(r.image_id, r.label) for r in records] == [
        ("C_0001_1.LEFT_CC", 1), ("C_0001_1.LEFT_MLO", 0), ("A_0002_1.RIGHT_MLO", 0)]
    with pytest.raises(DataError, match="no Normal/Benign/Cancer folder"):
        list_source("mini_ddsm", tmp_path / "Benign")


def test_manifest_relative_paths_extra_columns_and_errors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), np.full((50, 40), 200, np.uint16))
    cv2.imwrite(str(data / "b.png"), np.full((50, 40), 10, np.uint8))
    one = np.zeros((50, 40), np.uint8)
    one[10:20, 10:20] = 1  # a 0/1 mask
    two = np.zeros((50, 40), np.uint8)
    two[30:35, 5:10] = 255
    cv2.imwrite(str(data / "a_m1.png"), one)
    cv2.imwrite(str(data / "a_m2.png"), two)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "image_path,patient_id,label,mask_path,spacing_mm,lesion_kind,site,density\n"
        "data/a.png,p1,1,data/a_m1.png;data/a_m2.png,0.1,mass,north,3\n"
        "data/b.png,p2,0,,,,south,\n"
        "data/c.png,p3,0,,,,south,\n"
        "data/b.png,p4,1,data/gone.png,,,west,\n"
    )
    with pytest.warns(UserWarning, match=r"skipped 2 item.*c\.png: image of line 4 missing.*gone\.png: mask of line 5"):
        records = list_source("manifest", manifest, spacing_mm=0.2)
    a, b = records
    assert (a.image_id, a.patient_id, a.label, a.spacing_mm, a.reader) == ("data/a", "p1", 1, 0.1, "image")
    assert a.meta["site"] == "north" and a.meta["density"] == 3 and b.spacing_mm == 0.2
    image = read_image(a)
    assert image.pixels.dtype == np.uint16 and image.meta["value_range"] == (0.0, 65535.0)
    mask = lesion_masks(a, image.shape)["mass"]
    assert mask.sum() == 100 + 25
    assert lesion_masks(b, (50, 40)) == {}
    with pytest.raises(DataError, match="lesion mask .*a_m1.png is 50x40 but its image is 80x40"):
        lesion_masks(a, (80, 40))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,patient\nx,y\n")
    with pytest.raises(DataError, match=r"bad.csv lacks the column\(s\) image_path, patient_id, label"):
        list_source("manifest", bad)
    wrong_kind = tmp_path / "kind.csv"
    wrong_kind.write_text("image_path,patient_id,label,lesion_kind\ndata/a.png,p,1,tumour\n")
    with pytest.raises(DataError, match="kind.csv line 2: lesion kind 'tumour'"):
        list_source("manifest", wrong_kind)
    with pytest.raises(DataError, match="CSV file not found"):
        list_source("manifest", tmp_path / "none.csv")


def test_manifest_lesion_type_column_and_calc_alias(tmp_path):
    cv2.imwrite(str(tmp_path / "i.png"), np.full((20, 20), 50, np.uint8))
    mask = np.zeros((20, 20), np.uint8)
    mask[2:4, 2:5] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    (tmp_path / "m.csv").write_text("image_path,patient_id,label,mask_path,lesion_type\n"
                                    f"{tmp_path / 'i.png'},p,1,m.png,calc\n")
    (record,) = list_source("manifest", tmp_path / "m.csv", spacing_mm=0.2)
    assert record.lesions[0].kind == "calcification" and record.meta["lesion_type"] == "calcification"
    assert lesion_masks(record, (20, 20))["calcification"].sum() == 6


def test_outline_with_a_gap_is_closed_before_filling():
    from datamodules.readers._common import fill_outline_image

    outline = np.zeros((60, 60), np.uint8)
    cv2.circle(outline, (30, 30), 20, 255, thickness=1)
    truth = np.zeros((60, 60), np.uint8)
    cv2.circle(truth, (30, 30), 20, 1, thickness=-1)
    assert fill_outline_image(outline).sum() == truth.sum()  # a closed outline fills exactly
    outline[29:31, 49:52] = 0  # a 2-px gap on the right
    filled = fill_outline_image(outline)
    iou = (filled & truth.astype(bool)).sum() / (filled | truth.astype(bool)).sum()
    assert iou > 0.97
    assert not fill_outline_image(np.zeros((10, 10), np.uint8)).any()
