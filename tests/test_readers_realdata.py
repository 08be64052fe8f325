"""Readers on the real public samples in ../shared/data (skipped with the reason where absent)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datamodules.readers import lesion_masks, list_source, read_image
from datamodules.readers.cbis_ddsm import pick_mask, read_description_csv
from datamodules.readers.dicom import dicom_shape, read_dicom
from datamodules.readers.images import read_image_pixels

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize(
    ("name", "count", "density_column"),
    [("mass_case_description_train_set.csv", 1318, "breast density"),
     ("mass_case_description_test_set.csv", 378, "breast density"),
     ("calc_case_description_train_set.csv", 1546, "breast density"),
     ("calc_case_description_test_set.csv", 326, "breast density")],
)
def test_cbis_csv_row_counts_and_clean_paths(shared_data, name, count, density_column):
    rows = read_description_csv(shared_data / "cbis-ddsm" / "csv" / name)
    assert len(rows) == count
    for row in rows:
        for key in ("image file path", "cropped image file path", "roi mask file path"):
            assert row[key].endswith(".dcm") and row[key] == row[key].strip() and "\n" not in row[key]
        assert row[density_column] in {"0", "1", "2", "3", "4"}
        assert row["pathology"] in {"BENIGN", "MALIGNANT", "BENIGN_WITHOUT_CALLBACK"}


CROPS = {
    "Mass-Test_P_00016_LEFT_CC_1": ((384, 385), (4006, 1846)),
    "Mass-Test_P_00116_RIGHT_MLO_1": ((483, 286), (4144, 2600)),
    "Mass-Test_P_00116_RIGHT_MLO_2": ((486, 497), (4144, 2600)),
}


def test_cbis_sample_crops_decode_to_uint16_and_are_not_taken_for_masks(shared_data):
    samples = shared_data / "cbis-ddsm" / "samples"
    found = sorted((samples / "Input Example").rglob("*.dcm"))
    assert len(found) == 3
    for path in found:
        case = path.relative_to(samples / "Input Example" / "All Mass Test").parts[0]
        crop_shape, full_shape = CROPS[case]
        image = read_dicom(path, default_spacing_mm=0.05)
        assert image.pixels.dtype == np.uint16 and image.shape == crop_shape
        assert dicom_shape(path) == crop_shape
        assert image.meta["photometric"] == "MONOCHROME2" and image.spacing_mm == 0.05
        assert len(np.unique(image.pixels)) > 1000 and int(image.pixels.max()) > 30000  # grey levels, not 0/255
        assert pick_mask([path], full_shape) is None  # two of them sit in "ROI mask images" folders
    full = {p.name.split("=")[0]: read_image_pixels(p) for p in (samples / "Output Structure Example").rglob("*=full.png")}
    assert {k: v.shape for k, v in full.items()} == {
        "Mass-Test_P_00016_LEFT_CC": (4006, 1846), "Mass-Test_P_00116_RIGHT_MLO": (4144, 2600)}
    assert all(v.dtype == np.uint8 for v in full.values())


def test_cbis_listing_without_full_images_skips_every_image_with_a_count(shared_data):
    rows = read_description_csv(shared_data / "cbis-ddsm" / "csv" / "mass_case_description_test_set.csv")
    images = {row["image file path"].split("/")[0] for row in rows}
    assert len(images) == 361  # 378 rows: several abnormalities share an image
    with pytest.warns(UserWarning, match="skipped 361 item"):
        assert list_source("cbis_ddsm", shared_data / "cbis-ddsm", abnormality="mass", split="test") == []


def test_mini_ddsm_overlay_polygons_match_the_outline_masks(shared_data):
    root = shared_data / "mini-ddsm-subset"
    by_masks = {r.image_id: r for r in list_source("mini_ddsm", root)}
    by_overlay = {r.image_id: r for r in list_source("mini_ddsm", root, geometry="overlay")}
    assert len(by_masks) == 40 and sum(r.label for r in by_masks.values()) == 20
    compared = {}
    for image_id, record in by_masks.items():
        if not record.lesions:
            continue
        overlay = by_overlay[image_id]
        if len(overlay.lesions) != len(record.lesions):
            assert image_id.startswith("C_0236_1.RIGHT")  # 3 abnormalities, 2 mask files
            continue
        image = read_image(record)
        assert image.spacing_mm == pytest.approx(0.1, abs=0.002)
        scale = (image.shape[0] / overlay.meta["frame_shape"][0], image.shape[1] / overlay.meta["frame_shape"][1])
        assert scale == pytest.approx((0.5, 0.5), abs=0.002)
        filled = np.zeros(image.shape, bool)
        for mask in lesion_masks(record, image.shape).values():
            filled |= mask
        polygon = np.zeros(image.shape, bool)
        for mask in lesion_masks(overlay, image.shape).values():
            polygon |= mask
        compared[image_id] = (filled & polygon).sum() / (filled | polygon).sum()
    assert len(compared) == 18
    assert min(compared.values()) > 0.95, compared
    kinds = {les.kind for r in by_masks.values() for les in r.lesions}
    assert kinds == {"mass", "calcification"}


def test_ddsm_normals_pngs_and_label_maps_read_right(shared_data):
    root = shared_data / "ddsm-normals" / "segmentation_data"
    records = list_source("images", root, spacing_mm=0.2)  # the PNGs carry no spacing; it is never guessed
    assert len(records) == 66
    assert all("label_map_path" in r.meta for r in records)
    assert sum(r.patient_id.startswith(("A_", "D_")) for r in records) == 53 + 1  # D_4595 is not in the index
    fractions = []
    for record in records:
        image = read_image(record)
        assert image.shape == (960, 480) and image.pixels.dtype == np.uint8
        labels = cv2.imread(record.meta["label_map_path"], cv2.IMREAD_UNCHANGED)
        assert labels.shape == (960, 480) and set(np.unique(labels)) <= {64, 128, 192, 255}
        foreground = labels != 64
        fractions.append(foreground.mean())
        assert image.pixels[foreground].mean() > image.pixels[~foreground].mean() + 20  # breast is bright
    assert 0.2 < min(fractions) and max(fractions) < 0.9


def test_ddsm_reader_reads_the_mini_ddsm_cases_through_their_ics(shared_data):
    records = list_source("ddsm", shared_data / "mini-ddsm-subset")
    assert len(records) == 40 and {r.meta["diagnosis"] for r in records} == {"benigns"}
    assert sum(r.label for r in records) == 20 and {r.meta["scanner"] for r in records} == {"LUMISYS"}
    assert all(r.meta["calibration"] == "none" for r in records)  # JPEG views: no optical density
    image = read_image(records[0])
    assert image.pixels.dtype == np.uint8 and image.spacing_mm == pytest.approx(0.1, abs=0.002)


def test_cbis_real_csv_paths_find_files_built_from_them(shared_data, tmp_path):
    """The real mass-test CSV's own path strings lead to DICOMs laid out exactly as they say."""
    from test_readers_dicom import write_dicom

    csv_dir = shared_data / "cbis-ddsm" / "csv"
    rows = read_description_csv(csv_dir / "mass_case_description_test_set.csv")[:6]
    built = set()
    for k, row in enumerate(rows):
        full = np.full((40, 30), 1000 + k, np.uint16)
        write_dicom(tmp_path / row["image file path"], full)
        mask = np.zeros((40, 30), np.uint8)
        mask[k : k + 5, 3:9] = 255
        write_dicom(tmp_path / row["roi mask file path"], mask)
        if row["cropped image file path"] != row["roi mask file path"]:
            write_dicom(tmp_path / row["cropped image file path"], np.ones((6, 7), np.uint16))
        built.add(row["image file path"].split("/")[0])
    with pytest.warns(UserWarning, match=f"skipped {361 - len(built)} item"):
        records = list_source("cbis_ddsm", tmp_path, abnormality="mass", split="test", csv_dir=csv_dir)
    assert {r.image_id for r in records} == built
    for record in records:
        masks = lesion_masks(record, (40, 30))
        assert list(masks) == ["mass"] and masks["mass"].sum() >= 30
        assert record.patient_id.startswith("P_") and record.meta["side"] in {"LEFT", "RIGHT"}
