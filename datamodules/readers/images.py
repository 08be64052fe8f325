"""PNG / JPEG / PGM / TIFF mammograms (8 or 16 bit, grey) via OpenCV, plus the "images" source listing.

OpenCV reads with ``IMREAD_UNCHANGED`` so 16-bit files keep their values; PGM/PPM headers with ``#``
comment lines (P5 binary and P2 ASCII) are parsed here when OpenCV declines them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datamodules.readers._common import SkipReport, grey, sorted_paths
from datamodules.records import DataError, ImageRecord, Mammogram

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".pnm", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: File-name stems ending like these are annotations, not mammograms (MINI-DDSM masks, tissue label maps).
ANNOTATION_STEM = re.compile(r"(_LI|_mask\d*|_roi)$", re.IGNORECASE)
#: DDSM-style names: ``A_0002_1.RIGHT_MLO`` -> patient ``A_0002``, side, view.
DDSM_NAME = re.compile(r"^([A-D])_(\d{4})_\d+\.(LEFT|RIGHT)_(CC|MLO)$", re.IGNORECASE)


def _pnm_tokens(data: bytes) -> tuple[list[bytes], int]:
    """Header tokens of a PNM file (magic, width, height, maxval) and the offset of the raster."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            while pos < len(data) and data[pos : pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace() and data[pos : pos + 1] != b"#":
            pos += 1
        if start == pos:
            raise ValueError("truncated PNM header")
        tokens.append(data[start:pos])
    return tokens, pos + 1  # exactly one whitespace byte separates maxval from a binary raster


def read_pnm(path: Path) -> np.ndarray:
    """Decode a grey PGM (P5 binary or P2 ASCII, 8 or 16 bit, ``#`` comments anywhere in the header)."""
    data = path.read_bytes()
    try:
        tokens, offset = _pnm_tokens(data)
        magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    except (ValueError, IndexError) as exc:
        raise DataError(f"{path}: not a readable PGM file ({exc})") from exc
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    if magic == b"P5":
        if len(data) - offset < width * height * dtype.itemsize:
            raise DataError(f"{path}: PGM raster is truncated ({len(data) - offset} bytes for {width}x{height})")
        raster = np.frombuffer(data, dtype=dtype, count=width * height, offset=offset)
    elif magic == b"P2":
        body = re.sub(rb"#[^\n\r]*", b" ", data[offset - 1 :])
        raster = np.array(body.split()[: width * height], dtype=np.int64)
    else:
        raise DataError(f"{path}: PNM type {magic!r} is not a grey image (expected P5 or P2)")
    if raster.size != width * height:
        raise DataError(f"{path}: PGM raster holds {raster.size} values, header says {width}x{height}")
    out_dtype = np.uint16 if maxval > 255 else np.uint8
    return raster.reshape(height, width).astype(out_dtype)


def read_image_pixels(path: str | Path) -> np.ndarray:
    """Grey pixels of an image file with their stored dtype (uint8 or uint16); DataError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    pixels = None
    try:
        pixels = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        pixels = None
    if pixels is None and path.suffix.lower() in (".pgm", ".pnm"):
        pixels = read_pnm(path)
    if pixels is None:
        raise DataError(f"{path}: OpenCV cannot decode this file (not a PNG/JPEG/PGM/TIFF image, or damaged)")
    return grey(pixels, path)


def value_range(pixels: np.ndarray) -> tuple[float, float]:
    """The (low, high) range an integer image's dtype spans; the observed range for floats."""
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        return float(info.min), float(info.max)
    return float(np.min(pixels)), float(np.max(pixels))


def read_image_file(path: str | Path, spacing_mm: float, meta: dict[str, Any] | None = None) -> Mammogram:
    """One image file as a Mammogram at the given spacing (image files carry none themselves)."""
    path = Path(path)
    pixels = read_image_pixels(path)
    info = dict(meta or {})
    info.setdefault("value_range", value_range(pixels))
    info["source_path"] = str(path)
    return Mammogram(pixels=np.ascontiguousarray(pixels), spacing_mm=float(spacing_mm), meta=info)


def name_facts(stem: str) -> dict[str, str]:
    """Patient, side and view from a DDSM-style file stem (``A_0002_1.RIGHT_MLO``); empty if not one."""
    match = DDSM_NAME.match(stem)
    if not match:
        return {}
    letter, number, side, view = match.groups()
    return {"patient_id": f"{letter.upper()}_{number}", "side": side.upper(), "view": view.upper()}


def _label_map_for(path: Path) -> Path | None:
    """A tissue label map beside an image: ``<dir>_labels/<stem>_LI.png`` (the ddsm-normals layout)."""
    sibling = path.parent.with_name(path.parent.name + "_labels") / f"{path.stem}_LI.png"
    return sibling if sibling.is_file() else None


def list_images(
    root: str | Path, spacing_mm: float | None = None, include_annotations: bool = False
) -> list[ImageRecord]:
    """Every DICOM/PNG/JPEG/PGM/TIFF under ``root`` (a file or a folder, recursively), unannotated.

    Spacing is never guessed: a DICOM's header wins; files without one take ``spacing_mm`` when given,
    else their source's documented spacing when the name (or DICOM PatientID) identifies it (CBIS-DDSM
    0.05 mm, mini-MIAS 0.2 mm); any other file fails on reading with a one-line error asking for
    ``spacing_mm``. ``meta['spacing_source']`` says which rule applied. Label maps and lesion masks
    (``*_LI``, ``*_Mask*``) are left out unless asked for.
    """
    from datamodules.readers.dicom import documented_spacing

    root = Path(root)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES
        files = sorted_paths(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    else:
        raise DataError(f"images: {root} is neither an image file nor a folder")
    records: list[ImageRecord] = []
    report = SkipReport(f"images {root}")
    for path in files:
        if not include_annotations and ANNOTATION_STEM.search(path.stem):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES + DICOM_SUFFIXES:
            report.skip(path, "not a DICOM/PNG/JPEG/PGM/TIFF file")
            continue
        facts = name_facts(path.stem)
        meta: dict[str, Any] = {"source": "images", **{k: v for k, v in facts.items() if k != "patient_id"}}
        label_map = _label_map_for(path)
        if label_map is not None:
            meta["label_map_path"] = str(label_map)
        rel = path.relative_to(root) if root.is_dir() else Path(path.name)
        image_id = str(rel.with_suffix("")).replace("\\", "/")
        is_dicom = path.suffix.lower() in DICOM_SUFFIXES
        spacing = None if spacing_mm is None else float(spacing_mm)
        known = None if is_dicom or spacing is not None else documented_spacing(path.stem)
        if known is not None:
            spacing = known[0]
            meta["spacing_source"] = f"{known[1]} documented default (file name)"
        elif spacing is not None and not is_dicom:
            meta["spacing_source"] = "configured spacing_mm"
        records.append(
            ImageRecord(
                image_id=image_id,
                patient_id=facts.get("patient_id", image_id),
                path=path,
                reader="dicom" if is_dicom else "image",
                label=0,
                spacing_mm=spacing,
                meta=meta,
            )
        )
    report.finish(len(records))
    if not records:
        raise DataError(f"images: no DICOM/PNG/JPEG/PGM/TIFF image found under {root}")
    return records
