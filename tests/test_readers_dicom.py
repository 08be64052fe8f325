"""DICOM reader: MONOCHROME1, BitsStored, rescale, spacing, compressed syntaxes, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    generate_uid,
)

from datamodules.readers import read_image
from datamodules.readers.dicom import dicom_shape, read_dicom
from datamodules.records import DataError, ImageRecord


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                slope: float | None = None, intercept: float | None = None, spacing: tuple | None = None,
                imager_spacing: tuple | None = None, syntax=ExplicitVRLittleEndian,
                encoded: bytes | None = None, signed: bool = False) -> Path:
    """Write a grey DICOM (native pixels, or ``encoded`` bytes encapsulated under ``syntax``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if encoded is not None:
        ds.PixelData = encapsulate([encoded])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def ramp(rows: int = 20, cols: int = 12, top: int = 4095) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) * 17 % (top + 1)).astype(np.uint16)


def test_monochrome2_native_roundtrip_with_pixel_spacing(tmp_path):
    pixels = ramp()
    path = write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12, spacing=(0.07, 0.07))
    image = read_dicom(path, default_spacing_mm=0.2)
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.spacing_mm == pytest.approx(0.07)
    assert image.meta["value_range"] == (0.0, 4095.0)
    assert image.meta["spacing_from_header"] is True


def test_monochrome1_is_inverted_within_bits_stored(tmp_path):
    pixels = ramp()
    path = write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12)
    image = read_dicom(path, default_spacing_mm=0.1)
    np.testing.assert_array_equal(image.pixels, 4095 - pixels)
    assert image.pixels[0, 0] == 4095
    assert image.spacing_mm == pytest.approx(0.1)  # no spacing in the header -> the dataset default


def test_bits_stored_masks_garbage_high_bits(tmp_path):
    pixels = ramp()
    dirty = pixels | np.uint16(0xF000)  # overlay bits above BitsStored = 12
    path = write_dicom(tmp_path / "dirty.dcm", dirty, bits_stored=12)
    image = read_dicom(path, default_spacing_mm=0.1)
    np.testing.assert_array_equal(image.pixels, pixels)
    assert int(image.pixels.max()) <= 4095


def test_rescale_slope_intercept_gives_float(tmp_path):
    pixels = ramp(top=1000)
    path = write_dicom(tmp_path / "r.dcm", pixels, bits_stored=12, slope=2.0, intercept=-100.0,
                       imager_spacing=(0.1, 0.12))
    image = read_dicom(path, default_spacing_mm=0.5)
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, pixels.astype(np.float32) * 2 - 100)
    assert image.meta["value_range"] == (-100.0, 4095 * 2 - 100.0)
    assert image.spacing_mm == pytest.approx(0.11)  # ImagerPixelSpacing when PixelSpacing is absent


def test_eight_bit_mask_and_header_only_shape(tmp_path):
    mask = np.zeros((30, 17), dtype=np.uint8)
    mask[5:9, 3:11] = 255
    path = write_dicom(tmp_path / "mask.dcm", mask)
    assert dicom_shape(path) == (30, 17)
    np.testing.assert_array_equal(read_dicom(path, 0.05).pixels, mask)


def test_jpeg_lossless_transfer_syntax_decodes_exactly(tmp_path):
    pixels = ramp(40, 24)
    encoded = imagecodecs.ljpeg_encode(pixels, bitspersample=12)
    path = write_dicom(tmp_path / "ljpeg.dcm", pixels, bits_stored=12, syntax=JPEGLosslessSV1, encoded=encoded)
    np.testing.assert_array_equal(read_dicom(path, 0.1).pixels, pixels)


def test_compressed_falls_back_to_imagecodecs_and_errors_name_the_package(tmp_path, monkeypatch):
    pixels = ramp(32, 16)
    encoded = imagecodecs.jpeg2k_encode(pixels, level=0)
    path = write_dicom(tmp_path / "j2k.dcm", pixels, bits_stored=12, syntax=JPEG2000Lossless, encoded=encoded)

    def no_plugin(self):
        raise RuntimeError("no pixel data handler available")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_plugin))
    np.testing.assert_array_equal(read_dicom(path, 0.1).pixels, pixels)  # decoded by imagecodecs
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    with pytest.raises(DataError, match=r"j2k\.dcm.*pip install"):
        read_dicom(path, 0.1)


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.dcm"):
        read_dicom(tmp_path / "nope.dcm", 0.1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a dicom file at all")
    with pytest.raises(DataError, match="junk.dcm"):
        read_dicom(junk, 0.1)
    path = write_dicom(tmp_path / "nospacing.dcm", ramp())
    with pytest.raises(DataError, match="nospacing.dcm.*spacing"):
        read_dicom(path, None)


def test_read_image_dispatches_on_reader(tmp_path):
    pixels = ramp()
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12)
    record = ImageRecord(image_id="x", patient_id="p", path=path, reader="dicom", spacing_mm=0.2, meta={"side": "L"})
    image = read_image(record)
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.spacing_mm == pytest.approx(0.2) and image.meta["side"] == "L"
    record.reader = "tiff-magic"
    with pytest.raises(DataError, match="unknown reader 'tiff-magic'.*dicom, image, ddsm"):
        read_image(record)


def test_signed_pixels_monochrome1_and_rescale_together(tmp_path):
    pixels = np.array([[-2048, -1, 0], [1, 100, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path / "signed.dcm", pixels, photometric="MONOCHROME1", bits_stored=12, signed=True,
                       slope=0.5, intercept=10.0)
    image = read_dicom(path, 0.1)
    expected = (-1 - pixels.astype(np.float32)) * 0.5 + 10.0  # inverted within [-2048, 2047], then rescaled
    np.testing.assert_allclose(image.pixels, expected)
    assert image.pixels[0, 0] > image.pixels[1, 2]  # the lowest stored value is the brightest
    assert image.meta["value_range"] == (-2048 * 0.5 + 10.0, 2047 * 0.5 + 10.0)
