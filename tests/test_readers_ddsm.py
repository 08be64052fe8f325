"""DDSM reader: .ics and .OVERLAY parsing, chain codes, OD calibration, LJPEG decoding, the cases/ layout."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest

from datamodules.readers import lesion_masks, list_source, read_image
from datamodules.readers.ddsm import display_from_od, optical_density, scanner_of
from datamodules.readers.ddsm_ics_overlay import chain_code_points, parse_ics, parse_overlay
from datamodules.readers.ljpeg import decode_ljpeg, unswap_words
from datamodules.records import DataError

ICS = """ics_version 1.0
filename {name}
DATE_OF_STUDY 2 4 1995
PATIENT_AGE 57
DENSITY {density}
DIGITIZER {digitizer}
SEQUENCE
LEFT_CC LINES {rows} PIXELS_PER_LINE {cols} BITS_PER_PIXEL 12 RESOLUTION 50 {ov_lcc}
LEFT_MLO LINES {rows} PIXELS_PER_LINE {cols} BITS_PER_PIXEL 12 RESOLUTION 50 NON_OVERLAY
"""

OVERLAY = """TOTAL_ABNORMALITIES 2
ABNORMALITY 1
LESION_TYPE MASS SHAPE OVAL MARGINS CIRCUMSCRIBED
ASSESSMENT 4
SUBTLETY 3
PATHOLOGY MALIGNANT
TOTAL_OUTLINES 2
BOUNDARY
10 12 2 2 2 2 2 2 2 2 4 4 4 4
4 4 4 4 6 6 6 6 6 6 6 6 0 0 0 0 0 0 0 0 #
CORE
12 14 2 2 4 4 6 6 0 0 #
ABNORMALITY 2
LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED
ASSESSMENT 3
SUBTLETY 2
PATHOLOGY BENIGN
TOTAL_OUTLINES 1
BOUNDARY
30 30 2 2 2 2 4 4 4 4 6 6 6 6 0 0 0 0 #
"""


def test_chain_code_square_and_directions():
    points = chain_code_points(10, 20, [2, 2, 4, 4, 6, 6, 0, 0])
    assert points.tolist() == [[10, 20], [11, 20], [12, 20], [12, 21], [12, 22], [11, 22], [10, 22], [10, 21],
                               [10, 20]]
    # every direction once: N NE E SE S SW W NW from (5, 5)
    walk = chain_code_points(5, 5, list(range(8)))
    steps = np.diff(walk, axis=0).tolist()
    assert steps == [[0, -1], [1, -1], [1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1]]
    with pytest.raises(ValueError, match="0..7"):
        chain_code_points(0, 0, [1, 8])


def test_parse_ics(tmp_path):
    path = tmp_path / "A-0007-1.ics"
    path.write_text(ICS.format(name="A-0007-1", density=3, digitizer="HOWTEK MULTIRAD850", rows=40, cols=30,
                               ov_lcc="OVERLAY"))
    header = parse_ics(path)
    assert (header.case_name, header.patient_id, header.site) == ("A_0007_1", "A_0007", "A")
    assert header.density == 3 and header.age == 57 and header.digitizer == "HOWTEK MULTIRAD850"
    assert set(header.views) == {"LEFT_CC", "LEFT_MLO"}
    view = header.views["LEFT_CC"]
    assert (view.rows, view.cols, view.bits, view.resolution_um, view.overlay) == (40, 30, 12, 50.0, True)
    assert header.views["LEFT_MLO"].overlay is False
    bad = tmp_path / "bad.ics"
    bad.write_text("filename X\nDENSITY 2\n")
    with pytest.raises(DataError, match="bad.ics.*no view lines"):
        parse_ics(bad)


def test_parse_overlay_abnormalities_attributes_and_outlines(tmp_path):
    path = tmp_path / "A_0007_1.LEFT_CC.OVERLAY"
    path.write_text(OVERLAY)
    first, second = parse_overlay(path)
    assert (first.index, first.lesion_type, first.kind, first.pathology) == (1, "MASS", "mass", "MALIGNANT")
    assert first.lesion_types == [{"LESION_TYPE": "MASS", "SHAPE": "OVAL", "MARGINS": "CIRCUMSCRIBED"}]
    assert (first.assessment, first.subtlety) == (4, 3)
    assert first.boundary.shape == (33, 2)  # start + 32 steps, the chain spans two lines
    assert first.boundary[0].tolist() == [10, 12] and first.boundary[-1].tolist() == [10, 12]
    assert len(first.cores) == 1 and first.cores[0].shape == (9, 2)
    assert second.kind == "calcification" and second.lesion_types[0]["TYPE"] == "PLEOMORPHIC"
    assert second.pathology == "BENIGN" and second.boundary[0].tolist() == [30, 30]


def test_optical_density_formulas():
    assert optical_density(np.array([4096.99 - 1009.01 * 2.0]), "LUMISYS")[0] == pytest.approx(2.0, abs=1e-5)
    assert optical_density(np.array([1000.0]), "HOWTEK-MGH")[0] == pytest.approx(3.789 - 0.94568, abs=1e-5)
    assert optical_density(np.array([2000.0]), "HOWTEK-ISMD")[0] == pytest.approx(
        3.96604095240593 - 2000 * 0.00099055807612, abs=1e-5)
    dba_gl = 10 ** (4.80662 - 1.07553 * 1.5)
    assert optical_density(np.array([dba_gl]), "DBA")[0] == pytest.approx(1.5, abs=1e-5)
    assert math.isfinite(float(optical_density(np.array([0.0]), "DBA")[0]))  # log of 0 guarded
    od = np.array([-0.3, 0.0, 1.25, 4.0, 4.6], dtype=np.float32)
    np.testing.assert_allclose(display_from_od(od), [4.0, 4.0, 2.75, 0.0, 0.0])
    levels = np.array([[0, 1, 1000, 4095, 65535]], dtype=np.uint16)  # the lookup-table path = the formula
    for scanner in ("DBA", "HOWTEK-MGH", "HOWTEK-ISMD", "LUMISYS"):
        np.testing.assert_allclose(optical_density(levels, scanner), optical_density(levels.astype(float), scanner),
                                   rtol=1e-6)
    with pytest.raises(DataError, match="unknown DDSM scanner"):
        optical_density(np.array([1.0]), "AGFA")


def test_scanner_by_digitiser_and_site():
    assert scanner_of("DBA M2100 ImageClear", "A") == "DBA"
    assert scanner_of("HOWTEK MULTIRAD850", "A") == "HOWTEK-MGH"
    assert scanner_of("HOWTEK", "D") == "HOWTEK-ISMD"
    assert scanner_of("LUMISYS LASER", "C") == "LUMISYS"
    assert scanner_of("", "B") == "LUMISYS"
    with pytest.raises(DataError, match="unknown DDSM digitiser"):
        scanner_of("AGFA", "Q")


def test_unswap_words_for_12_and_16_bit():
    rng = np.random.default_rng(0)
    grey = (1000 + np.cumsum(rng.integers(-3, 4, (64, 64)), axis=1)).astype(np.uint16)
    words, swapped = unswap_words(grey.byteswap(), 12)
    assert swapped and np.array_equal(words, grey)
    words, swapped = unswap_words(grey, 12)
    assert not swapped and np.array_equal(words, grey)
    wide = (30000 + np.cumsum(rng.integers(-50, 51, (64, 64)), axis=1)).astype(np.uint16)
    words, swapped = unswap_words(wide.byteswap(), 16)
    assert swapped and np.array_equal(words, wide)
    assert not unswap_words(wide, 16)[1]


def _grey_levels(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(500, 3500, cols)[None, :] + rng.integers(0, 60, (rows, cols))
    return base.astype(np.uint16)


def _write_case(root: Path, diagnosis: str, name: str, digitizer: str, rows: int, cols: int, seed: int,
                overlay: bool = False, skip_view: str | None = None, png_view: str | None = None) -> dict:
    letter, number, seq = name.split("-")
    case_dir = root / "cases" / diagnosis / f"{diagnosis}_01" / f"case{number}"
    case_dir.mkdir(parents=True)
    (case_dir / f"{name}.ics").write_text(ICS.format(name=name, density=2, digitizer=digitizer, rows=rows, cols=cols,
                                                     ov_lcc="OVERLAY" if overlay else "NON_OVERLAY"))
    stem = f"{letter}_{number}_{seq}"
    truth = {}
    for k, view in enumerate(("LEFT_CC", "LEFT_MLO")):
        if view == skip_view:
            continue
        grey = _grey_levels(rows, cols, seed + k)
        truth[view] = grey
        if view == png_view:
            half = cv2.resize((grey >> 4).astype(np.uint8), (cols // 2, rows // 2), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(case_dir / f"{stem}.{view}.png"), half)
            truth[view] = half
        else:  # byte-swapped words, as in the real files
            (case_dir / f"{stem}.{view}.LJPEG").write_bytes(imagecodecs.ljpeg_encode(grey.byteswap(), bitspersample=16))
    if overlay:
        (case_dir / f"{stem}.LEFT_CC.OVERLAY").write_text(OVERLAY)
    return truth


def test_ljpeg_encoder_exists_and_decode_undoes_the_swap(tmp_path):
    grey = _grey_levels(20, 16, 3)
    path = tmp_path / "x.LJPEG"
    path.write_bytes(imagecodecs.ljpeg_encode(grey.byteswap(), bitspersample=16))
    np.testing.assert_array_equal(decode_ljpeg(path, 20, 16, 12), grey)
    plain = tmp_path / "plain.LJPEG"
    plain.write_bytes(imagecodecs.ljpeg_encode(grey, bitspersample=12))
    np.testing.assert_array_equal(decode_ljpeg(plain, 20, 16, 12), grey)
    with pytest.raises(DataError, match="x.LJPEG.*the .ics says 21 rows"):
        decode_ljpeg(path, 21, 16, 12)
    junk = tmp_path / "junk.LJPEG"
    junk.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match="junk.LJPEG"):
        decode_ljpeg(junk, 20, 16, 12)


def test_cases_layout_calibration_overlay_masks_and_missing_views(tmp_path):
    normals = _write_case(tmp_path, "normals", "A-0001-1", "HOWTEK MULTIRAD850", 48, 40, seed=1,
                          skip_view="LEFT_MLO")
    cancers = _write_case(tmp_path, "cancers", "D-4002-1", "HOWTEK", 48, 40, seed=5, overlay=True,
                          png_view="LEFT_MLO")
    with pytest.warns(UserWarning, match=r"skipped 1 item.*A_0001_1\.LEFT_MLO\.LJPEG: view image missing"):
        records = list_source("ddsm", tmp_path)
    assert [r.image_id for r in records] == ["D_4002_1.LEFT_CC", "D_4002_1.LEFT_MLO", "A_0001_1.LEFT_CC"]
    lesioned, png, healthy = records  # listing order = path order (cases/cancers before cases/normals)
    assert (healthy.label, healthy.patient_id, healthy.meta["diagnosis"], healthy.meta["scanner"]) == (
        0, "A_0001", "normals", "HOWTEK-MGH")
    assert lesioned.label == 1 and lesioned.meta["scanner"] == "HOWTEK-ISMD" and lesioned.meta["density"] == 2
    assert lesioned.meta["pathology"] == "BENIGN,MALIGNANT"
    assert [les.kind for les in lesioned.lesions] == ["mass", "calcification"]

    image = read_image(healthy)
    expected = 4.0 - np.clip(3.789 - 0.00094568 * normals["LEFT_CC"].astype(np.float64), 0, 4.0)
    assert image.pixels.dtype == np.float32 and image.shape == (48, 40)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)
    assert image.spacing_mm == pytest.approx(0.05) and image.meta["value_range"] == (0.0, 4.0)
    assert image.pixels[:, -1].mean() > image.pixels[:, 0].mean()  # high grey level = dense = bright

    raw = list_source("ddsm", tmp_path, diagnosis="cancers", calibration="raw")
    assert [r.image_id for r in raw] == ["D_4002_1.LEFT_CC", "D_4002_1.LEFT_MLO"]
    np.testing.assert_array_equal(read_image(raw[0]).pixels, cancers["LEFT_CC"])

    masks = lesion_masks(lesioned, (48, 40))
    assert set(masks) == {"mass", "calcification"}
    assert masks["mass"].sum() == 81 and masks["mass"][12:21, 10:19].all()  # 9x9 square incl. boundary
    assert masks["calcification"].sum() == 25 and masks["calcification"][30:35, 30:35].all()
    half = lesion_masks(lesioned, (24, 20))  # outlines scale to a half-size image
    assert half["mass"][6:10, 5:9].all() and 16 <= half["mass"].sum() <= 30

    small = read_image(png)  # a PNG beside the .ics: read as is, spacing scaled from the .ics
    assert small.shape == (24, 20) and small.pixels.dtype == np.uint8
    assert small.spacing_mm == pytest.approx(0.1)
    np.testing.assert_array_equal(small.pixels, cancers["LEFT_MLO"])
    assert lesion_masks(png, small.shape) == {}

    with pytest.raises(DataError, match="unknown diagnosis.*normals, benigns"):
        list_source("ddsm", tmp_path, diagnosis="healthy")
    with pytest.raises(DataError, match="root folder not found"):
        list_source("ddsm", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no DDSM case \(an .ics header\) found under .*empty"):
        list_source("ddsm", tmp_path / "empty")
    assert lesioned.meta["lesion_type"] == "calcification,mass" and healthy.meta["lesion_type"] is None


def test_unknown_source_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'inbreast'.*ddsm, cbis_ddsm, mini_ddsm, mias, manifest, images"):
        list_source("inbreast", tmp_path)


def test_unknown_option_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match=r"unknown option\(s\) diagnoses for source 'ddsm'; valid: diagnosis, calibration"):
        list_source("ddsm", tmp_path, diagnoses="normals")


def test_ljpeg_falls_back_to_libjpeg_and_names_packages_when_none_decodes(tmp_path, monkeypatch):
    import sys

    grey = _grey_levels(12, 10, 4)
    path = tmp_path / "y.LJPEG"
    path.write_bytes(imagecodecs.ljpeg_encode(grey.byteswap(), bitspersample=16))
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # as if imagecodecs were not installed
    np.testing.assert_array_equal(decode_ljpeg(path, 12, 10, 12), grey)  # pylibjpeg-libjpeg decodes it
    monkeypatch.setitem(sys.modules, "libjpeg", None)
    with pytest.raises(DataError, match=r"y\.LJPEG: no installed decoder.*pip install imagecodecs"):
        decode_ljpeg(path, 12, 10, 12)
