"""CBIS-DDSM reader on a small tree with the real CSV quirks and all three folder layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_readers_dicom import write_dicom

from datamodules.readers import lesion_masks, list_source, read_image
from datamodules.readers.cbis_ddsm import pick_mask, read_description_csv
from datamodules.records import DataError

MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
               "mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,"
               "ROI mask file path")
CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
               "calc type,calc distribution,assessment,pathology,subtlety,image file path,"
               "cropped image file path,ROI mask file path")
FULL = (60, 40)


def _row(patient, side, view, abn, pathology, case_prefix="Mass-Test", kind="mass", density="3"):
    case = f"{case_prefix}_{patient}_{side}_{view}"
    full = f"{case}/1.3.6.1.1/1.3.6.1.2/000000.dcm"
    crop = f"{case}_{abn}/1.3.6.1.3/1.3.6.1.4/000000.dcm"
    mask = f"{case}_{abn}/1.3.6.1.3/1.3.6.1.4/000001.dcm"
    # the crop path ends in a newline inside its quotes, as in the real CSVs
    return f'{patient},{density},{side},{view},{abn},{kind},OVAL,CIRCUMSCRIBED,4,{pathology},3,{full},"{crop}\n",{mask}'


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode())
    return path


def _full_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, FULL, dtype=np.uint16)


def _mask(top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(FULL, dtype=np.uint8)
    mask[top : top + size, left : left + size] = 255
    return mask


def _crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, (9, 7), dtype=np.uint16)


@pytest.fixture()
def cbis_tree(tmp_path: Path) -> Path:
    root = tmp_path / "cbis"
    rows = [
        _row("P_00001", "LEFT", "CC", 1, "BENIGN"),
        _row("P_00001", "LEFT", "CC", 2, "MALIGNANT"),
        _row("P_00002", "RIGHT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK"),
        _row("P_00003", "LEFT", "MLO", 1, "MALIGNANT"),
        _row("P_00004", "LEFT", "CC", 1, "BENIGN"),  # full image missing
        _row("P_00005", "RIGHT", "CC", 1, "BENIGN"),  # mask missing (only a crop)
        _row("P_00006", "LEFT", "MLO", 1, "BENIGN"),  # the whole abnormality folder missing
    ]
    _write_csv(root / "csv" / "mass_case_description_test_set.csv", MASS_HEADER, rows)
    tree = root / "CBIS-DDSM"  # layout 1: the CSV paths, one level below root; the mask is named 000000
    write_dicom(tree / "Mass-Test_P_00001_LEFT_CC/1.3.6.1.1/1.3.6.1.2/000000.dcm", _full_image(1))
    write_dicom(tree / "Mass-Test_P_00001_LEFT_CC_1/1.3.6.1.3/1.3.6.1.4/000000.dcm", _mask(5, 5, 6))
    write_dicom(tree / "Mass-Test_P_00001_LEFT_CC_1/1.3.6.1.3/1.3.6.1.4/000001.dcm", _crop(1))
    write_dicom(tree / "Mass-Test_P_00001_LEFT_CC_2/1.3.6.1.3/1.3.6.1.9/000000.dcm", _crop(2))
    write_dicom(tree / "Mass-Test_P_00001_LEFT_CC_2/1.3.6.1.3/1.3.6.1.8/000000.dcm", _mask(30, 20, 4))
    nbia = root / "nbia" / "All Mass Test"  # layout 2: NBIA descriptive folders, two levels below root
    write_dicom(nbia / "Mass-Test_P_00002_RIGHT_MLO/10-04-2016-DDSM-1/1-full mammogram images-2/000000.dcm",
                _full_image(2))
    write_dicom(nbia / "Mass-Test_P_00002_RIGHT_MLO_1/10-04-2016-DDSM-3/1-ROI mask images-4/000000.dcm", _crop(3))
    write_dicom(nbia / "Mass-Test_P_00002_RIGHT_MLO_1/10-04-2016-DDSM-3/1-ROI mask images-4/000001.dcm",
                _mask(10, 0, 10)[:-1])  # one row short: within 1 %? no, 59 vs 60 is 1.7 % -> too far
    write_dicom(nbia / "Mass-Test_P_00002_RIGHT_MLO_1/10-04-2016-DDSM-3/1-cropped images-5/1-1.dcm",
                _mask(10, 0, 10))
    ones = root / "Mass-Test_P_00003_LEFT_MLO"  # layout 3: 1-1.dcm names, directly below root
    write_dicom(ones / "07-20-2016-DDSM-6/1.000000-full mammogram images-7/1-1.dcm", _full_image(3))
    write_dicom(root / "Mass-Test_P_00003_LEFT_MLO_1/07-21-2016-DDSM-8/1.000000-ROI mask images-9/1-1.dcm",
                _crop(4))
    write_dicom(root / "Mass-Test_P_00003_LEFT_MLO_1/07-21-2016-DDSM-8/1.000000-ROI mask images-9/1-2.dcm",
                _mask(50, 30, 8))
    write_dicom(tree / "Mass-Test_P_00005_RIGHT_CC/1.3.6.1.1/1.3.6.1.2/000000.dcm", _full_image(5))
    write_dicom(tree / "Mass-Test_P_00005_RIGHT_CC_1/1.3.6.1.3/1.3.6.1.4/000000.dcm", _crop(5))
    write_dicom(tree / "Mass-Test_P_00006_LEFT_MLO/1.3.6.1.1/1.3.6.1.2/000000.dcm", _full_image(6))
    return root


def test_csv_quirks_are_read(cbis_tree):
    rows = read_description_csv(cbis_tree / "csv" / "mass_case_description_test_set.csv")
    assert len(rows) == 7
    assert rows[0]["cropped image file path"].endswith("/000000.dcm")  # the newline inside quotes is stripped
    assert rows[0]["roi mask file path"].endswith("000001.dcm") and rows[0]["breast density"] == "3"


def test_lists_images_in_every_layout_merging_lesions_and_skipping_missing(cbis_tree):
    with pytest.warns(UserWarning, match=r"cbis_ddsm mass/test: skipped 3 item.*listed 3.*P_00004_LEFT_CC.*"
                                         r"full mammogram DICOM missing.*P_00005_RIGHT_CC_1: no ROI mask of the full "
                                         r"image's size 60x40 among its DICOMs \(000000.dcm 9x7\); .*P_00006_LEFT_MLO_1/.*000001.dcm: "
                                         r"ROI mask DICOM missing"):
        records = list_source("cbis_ddsm", cbis_tree, abnormality="mass", split="test")
    by_id = {r.image_id: r for r in records}
    assert list(by_id) == ["Mass-Test_P_00001_LEFT_CC", "Mass-Test_P_00002_RIGHT_MLO", "Mass-Test_P_00003_LEFT_MLO"]
    first = by_id["Mass-Test_P_00001_LEFT_CC"]
    assert first.patient_id == "P_00001" and first.reader == "dicom" and first.label == 1
    assert first.meta["pathology"] == "MALIGNANT" and first.meta["density"] == 3 and first.meta["side"] == "LEFT"
    assert [les.meta["abnormality_id"] for les in first.lesions] == ["1", "2"]
    assert all(les.kind == "mass" for les in first.lesions)
    assert first.lesions[0].mask_path.name == "000000.dcm"  # mask told by size, not by the 000001 in the CSV
    assert first.lesions[0].meta["crop_path"].endswith("000001.dcm")
    image = read_image(first)
    assert image.shape == FULL and image.pixels.dtype == np.uint16 and image.spacing_mm == pytest.approx(0.05)
    np.testing.assert_array_equal(image.pixels, _full_image(1))
    masks = lesion_masks(first, image.shape)
    assert list(masks) == ["mass"] and masks["mass"].sum() == 36 + 16
    assert masks["mass"][5:11, 5:11].all() and masks["mass"][30:34, 20:24].all()
    second = by_id["Mass-Test_P_00002_RIGHT_MLO"]  # mask in the "cropped images" series, crop in "ROI mask"
    assert second.lesions[0].mask_path.name == "1-1.dcm"
    assert lesion_masks(second, FULL)["mass"].sum() == 100
    third = by_id["Mass-Test_P_00003_LEFT_MLO"]
    assert third.lesions[0].mask_path.name == "1-2.dcm" and lesion_masks(third, FULL)["mass"].sum() == 64


def test_calc_csv_with_spaced_density_column(tmp_path):
    root = tmp_path / "cbis"
    row = _row("P_00009", "RIGHT", "CC", 1, "MALIGNANT", case_prefix="Calc-Training", kind="calcification",
               density="2")
    _write_csv(root / "csv" / "calc_case_description_train_set.csv", CALC_HEADER, [row])
    case = root / "Calc-Training_P_00009_RIGHT_CC"
    write_dicom(case / "1.3.6.1.1/1.3.6.1.2/000000.dcm", _full_image(9))
    write_dicom(root / "Calc-Training_P_00009_RIGHT_CC_1/a/b/000000.dcm", _mask(1, 2, 3))
    write_dicom(root / "Calc-Training_P_00009_RIGHT_CC_1/a/b/000001.dcm", _crop(9))
    (record,) = list_source("cbis_ddsm", root, abnormality="calc", split="train")
    assert record.meta["density"] == 2 and record.meta["split"] == "train"
    assert record.lesions[0].kind == "calcification" and record.lesions[0].meta["calc_type"] == "OVAL"
    assert lesion_masks(record, FULL)["calcification"].sum() == 9


def test_pick_mask_tolerates_a_one_percent_size_difference(tmp_path):
    near = write_dicom(tmp_path / "near.dcm", np.zeros((200, 100), np.uint8))
    crop = write_dicom(tmp_path / "crop.dcm", np.zeros((20, 10), np.uint16))
    assert pick_mask([crop, near], (201, 100)) == near
    assert pick_mask([crop, near], (230, 100)) is None


def test_bad_csvs_give_one_clear_error(tmp_path):
    root = tmp_path / "cbis"
    _write_csv(root / "csv" / "mass_case_description_test_set.csv", "patient_id,pathology,image file path", ["a,b,c"])
    with pytest.raises(DataError, match=r"mass_case_description_test_set.csv lacks the column\(s\) breast density, "
                                        r"left or right breast, image view, abnormality id, abnormality type, "
                                        r"roi mask file path"):
        list_source("cbis_ddsm", root, abnormality="mass", split="test")
    with pytest.raises(DataError, match="calc_case_description_test_set.csv not found"):
        list_source("cbis_ddsm", root, abnormality="calc", split="test")
    with pytest.raises(DataError, match="abnormality must be 'mass' or 'calc'"):
        list_source("cbis_ddsm", root, abnormality="masses")
