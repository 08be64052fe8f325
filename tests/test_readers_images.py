"""Image-file reader (PNG / JPEG / PGM / TIFF, 8 and 16 bit) and the "images" source."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datamodules.readers import list_source, read_image
from datamodules.readers.images import name_facts, read_image_pixels, read_pnm
from datamodules.records import DataError


def gradient(dtype=np.uint8, rows: int = 24, cols: int = 16) -> np.ndarray:
    top = np.iinfo(dtype).max
    return (np.arange(rows * cols).reshape(rows, cols) * 997 % (top + 1)).astype(dtype)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_lossless_formats_roundtrip(tmp_path, suffix, dtype):
    pixels = gradient(dtype)
    path = tmp_path / f"img{suffix}"
    assert cv2.imwrite(str(path), pixels)
    out = read_image_pixels(path)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_and_colour_png_become_grey(tmp_path):
    flat = np.full((32, 32), 140, dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), flat)
    out = read_image_pixels(tmp_path / "a.jpg")
    assert out.shape == (32, 32) and abs(int(out.mean()) - 140) <= 1
    pixels = gradient()
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([pixels] * 3))
    np.testing.assert_array_equal(read_image_pixels(tmp_path / "rgb.png"), pixels)


def _pgm_header(magic: str, cols: int, rows: int, maxval: int) -> bytes:
    return (f"{magic}\n# written by a scanner\n{cols} # width\n# another comment\n{rows}\n{maxval}\n").encode()


def test_pgm_with_comment_lines_binary_and_ascii(tmp_path):
    pixels = gradient(np.uint8, 7, 5)
    binary = tmp_path / "c8.pgm"
    binary.write_bytes(_pgm_header("P5", 5, 7, 255) + pixels.tobytes())
    np.testing.assert_array_equal(read_image_pixels(binary), pixels)
    np.testing.assert_array_equal(read_pnm(binary), pixels)
    wide = gradient(np.uint16, 7, 5)
    sixteen = tmp_path / "c16.pgm"
    sixteen.write_bytes(_pgm_header("P5", 5, 7, 65535) + wide.astype(">u2").tobytes())
    np.testing.assert_array_equal(read_image_pixels(sixteen), wide)
    ascii_pgm = tmp_path / "a.pgm"
    body = "\n".join(" ".join(str(v) for v in row) + " # row" for row in pixels)
    ascii_pgm.write_bytes(_pgm_header("P2", 5, 7, 255) + body.encode() + b"\n")
    np.testing.assert_array_equal(read_image_pixels(ascii_pgm), pixels)
    np.testing.assert_array_equal(read_pnm(ascii_pgm), pixels)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="broken.png"):
        read_image_pixels(bad)
    with pytest.raises(DataError, match="not found.*absent.png"):
        read_image_pixels(tmp_path / "absent.png")
    truncated = tmp_path / "short.pgm"
    truncated.write_bytes(_pgm_header("P5", 50, 50, 255) + b"\0" * 10)
    with pytest.raises(DataError, match="short.pgm"):
        read_image_pixels(truncated)


def test_images_source_lists_a_folder_skips_annotations_and_finds_label_maps(tmp_path):
    seg, labels = tmp_path / "fgt_seg", tmp_path / "fgt_seg_labels"
    seg.mkdir()
    labels.mkdir()
    cv2.imwrite(str(seg / "A_0002_1.RIGHT_MLO.png"), gradient())
    cv2.imwrite(str(seg / "B_3001_1.LEFT_CC.png"), gradient())
    cv2.imwrite(str(seg / "B_3001_1.LEFT_CC_Mask.png"), gradient())
    cv2.imwrite(str(labels / "A_0002_1.RIGHT_MLO_LI.png"), np.full((24, 16), 64, np.uint8))
    records = list_source("images", tmp_path, spacing_mm=0.25)
    assert [r.image_id for r in records] == ["fgt_seg/A_0002_1.RIGHT_MLO", "fgt_seg/B_3001_1.LEFT_CC"]
    first = records[0]
    assert first.patient_id == "A_0002" and first.meta["side"] == "RIGHT" and first.meta["view"] == "MLO"
    assert first.meta["label_map_path"].endswith("A_0002_1.RIGHT_MLO_LI.png")
    assert "label_map_path" not in records[1].meta
    image = read_image(first)
    assert image.spacing_mm == 0.25 and image.shape == (24, 16) and image.meta["value_range"] == (0.0, 255.0)
    single = list_source("images", seg / "B_3001_1.LEFT_CC.png")
    assert len(single) == 1 and single[0].spacing_mm is None and single[0].label == 0  # never guessed
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM/PNG/JPEG/PGM/TIFF image found under .*empty"):
        list_source("images", tmp_path / "empty")
    with pytest.raises(DataError, match="missing_dir is neither an image file nor a folder"):
        list_source("images", tmp_path / "missing_dir")


def test_name_facts_parses_ddsm_names_only():
    assert name_facts("D_4574_1.LEFT_CC") == {"patient_id": "D_4574", "side": "LEFT", "view": "CC"}
    assert name_facts("scan_0001") == {}
