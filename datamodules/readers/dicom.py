"""DICOM mammograms via pydicom: bright = dense, BitsStored / rescale honoured, compressed data decoded.

pydicom decodes native and (with pylibjpeg installed) JPEG-family pixel data itself; when it has no
plugin for a transfer syntax, the frame is handed to imagecodecs. MONOCHROME1 images are inverted so
every reader returns the MONOCHROME2 convention (bright = dense tissue).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from datamodules.records import DataError, Mammogram

#: Transfer syntax UID -> imagecodecs decoder name, for the fallback when pydicom has no plugin.
_IMAGECODECS_DECODERS = {
    "1.2.840.10008.1.2.4.50": "jpeg8_decode",
    "1.2.840.10008.1.2.4.51": "jpeg8_decode",
    "1.2.840.10008.1.2.4.57": "ljpeg_decode",
    "1.2.840.10008.1.2.4.70": "ljpeg_decode",
    "1.2.840.10008.1.2.4.80": "jpegls_decode",
    "1.2.840.10008.1.2.4.81": "jpegls_decode",
    "1.2.840.10008.1.2.4.90": "jpeg2k_decode",
    "1.2.840.10008.1.2.4.91": "jpeg2k_decode",
    "1.2.840.10008.1.2.4.201": "htj2k_decode",
    "1.2.840.10008.1.2.4.202": "htj2k_decode",
    "1.2.840.10008.1.2.4.203": "htj2k_decode",
}

_CODEC_HINT = (
    "install a decoder for it: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000) or `pip install imagecodecs`"
)


def _dcmread(path: Path, **kwargs: Any) -> pydicom.Dataset:
    if not path.is_file():
        raise DataError(f"DICOM file not found: {path}")
    try:
        return pydicom.dcmread(str(path), **kwargs)
    except InvalidDicomError:
        try:
            return pydicom.dcmread(str(path), force=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a data error
            raise DataError(f"{path} is not a readable DICOM file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path} is not a readable DICOM file ({exc})") from exc


def dicom_shape(path: str | Path) -> tuple[int, int]:
    """(rows, cols) of a DICOM image from its header only; cheap enough to run on every CBIS file."""
    path = Path(path)
    ds = _dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError(f"{path} has no Rows/Columns: not an image DICOM")
    return int(ds.Rows), int(ds.Columns)


def _decode_with_imagecodecs(ds: pydicom.Dataset, path: Path, syntax: str, cause: Exception) -> np.ndarray:
    name = _IMAGECODECS_DECODERS.get(syntax)
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    if name is None or imagecodecs is None or not hasattr(imagecodecs, name):
        raise DataError(
            f"{path}: pixel data use the compressed transfer syntax {syntax} "
            f"({getattr(pydicom.uid.UID(syntax), 'name', syntax)}) and no installed package decodes it; "
            f"{_CODEC_HINT} ({cause})"
        ) from cause
    from pydicom.encaps import generate_frames

    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    first = next(generate_frames(ds.PixelData, number_of_frames=frames))
    try:
        return np.asarray(getattr(imagecodecs, name)(first))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: imagecodecs.{name} could not decode the pixel data ({exc})") from exc


def _stored_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    syntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
    if "PixelData" not in ds:
        raise DataError(f"{path} holds no pixel data (a DICOM without an image)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing plugin or damaged data
        compressed = bool(syntax) and pydicom.uid.UID(syntax).is_compressed
        if not compressed:
            raise DataError(f"{path}: cannot decode the pixel data ({exc})") from exc
        pixels = _decode_with_imagecodecs(ds, path, syntax, exc)
    if pixels.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        pixels = pixels[0]  # multi-frame: the first frame is the image
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2) if pixels.shape[2] in (3, 4) else pixels[0]
    return pixels


#: Sources whose DICOMs carry no spacing, recognised by their PatientID, and their documented spacing.
#: CBIS-DDSM (PatientID / file name ``Mass-Test_P_00016_LEFT_CC``): DDSM film at 42-50 um, see cbis_ddsm.py;
#: mini-MIAS (``mdb001``): 200 um, see mias.py.
DOCUMENTED_SPACING = (
    (re.compile(r"^(Mass|Calc)-(Training|Test)_P_\d+", re.IGNORECASE), 0.05, "CBIS-DDSM"),
    (re.compile(r"^mdb\d{3}", re.IGNORECASE), 0.2, "mini-MIAS"),
)


def _spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float], str] | None:
    """(row, col) spacing in mm and the tag it came from: PixelSpacing, else ImagerPixelSpacing."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None:
            try:
                row, col = (float(v) for v in list(value)[:2])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return (row, col), key
    return None


def documented_spacing(identifier: str) -> tuple[float, str] | None:
    """The documented spacing (mm) and source name for an image of a known source, by PatientID / name."""
    for pattern, spacing, source in DOCUMENTED_SPACING:
        if pattern.match(str(identifier or "")):
            return spacing, source
    return None


def resolve_spacing(ds: pydicom.Dataset, path: Path, default_spacing_mm: float | None) -> tuple[float, str]:
    """The pixel spacing of a DICOM and where it came from; never a silent guess.

    Order: the header (PixelSpacing, then ImagerPixelSpacing), the caller's configured ``spacing_mm``,
    the documented spacing of a recognised source (CBIS-DDSM: 0.05 mm); else a one-line `DataError`.
    """
    header = _spacing(ds)
    if header is not None:
        (row, col), key = header
        return float(np.mean((row, col))), key
    if default_spacing_mm is not None:
        return float(default_spacing_mm), "configured spacing_mm"
    known = documented_spacing(str(ds.get("PatientID", "")))
    if known is not None:
        return known[0], f"{known[1]} documented default"
    raise DataError(
        f"{path} has neither PixelSpacing nor ImagerPixelSpacing and is from no source with a documented "
        f"spacing; set spacing_mm (e.g. --data.init_args.predict_options '{{spacing_mm: 0.05}}')"
    )


def read_dicom(path: str | Path, default_spacing_mm: float | None = None) -> Mammogram:
    """Decode one DICOM mammogram to pixels (bright = dense) with its spacing (see `resolve_spacing`).

    Integer output keeps the stored dtype; a non-identity RescaleSlope/Intercept gives float32.
    ``meta['value_range']`` is the (low, high) the values can take, for normalisation downstream.
    """
    path = Path(path)
    ds = _dcmread(path)
    pixels = _stored_pixels(ds, path)
    bits_allocated = int(getattr(ds, "BitsAllocated", pixels.dtype.itemsize * 8))
    bits_stored = int(getattr(ds, "BitsStored", bits_allocated) or bits_allocated)
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    if np.issubdtype(pixels.dtype, np.integer) and not signed and bits_stored < pixels.dtype.itemsize * 8:
        pixels = pixels & np.asarray((1 << bits_stored) - 1, dtype=pixels.dtype)
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "MONOCHROME1":
        if np.issubdtype(pixels.dtype, np.integer):
            pixels = (np.asarray(high + low, dtype=np.int64) - pixels.astype(np.int64)).astype(pixels.dtype)
        else:
            pixels = (high + low) - pixels
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        ends = sorted((low * slope + intercept, high * slope + intercept))
        low, high = ends[0], ends[1]
    spacing, spacing_source = resolve_spacing(ds, path, default_spacing_mm)
    meta: dict[str, Any] = {
        "photometric": photometric,
        "bits_stored": bits_stored,
        "value_range": (float(low), float(high)),
        "spacing_from_header": spacing_source in ("PixelSpacing", "ImagerPixelSpacing"),
        "spacing_source": spacing_source,
        "source_path": str(path),
    }
    for key, tag in (("side", "ImageLaterality"), ("view", "ViewPosition"), ("patient_id", "PatientID")):
        value = ds.get(tag)
        if value:
            meta[key] = str(value)
    return Mammogram(pixels=np.ascontiguousarray(pixels), spacing_mm=spacing, meta=meta)
