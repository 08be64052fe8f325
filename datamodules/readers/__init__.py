"""Readers for every mammography source; see `list_source`, `read_image` and `lesion_masks`.

``list_source(name, root, **options)`` lists `ImageRecord`s without reading pixels;
``read_image(record)`` decodes one to a `Mammogram` (native spacing, bright = dense);
``lesion_masks(record, shape)`` draws its lesions, union per kind, at a given native shape.

Sources and their options (an unknown option is an error naming the valid ones):

- ``ddsm``: root holding ``cases/<diagnosis>/<volume>/case<NNNN>/``; ``diagnosis`` (normals | benigns |
  cancers | benign_without_callbacks, or a list), ``calibration`` ("od" default: OD_REF - optical
  density, float32 in [0, 4]; "raw": grey levels).
- ``cbis_ddsm``: root of the DICOM tree; ``abnormality`` ("mass" | "calc"), ``split`` ("train" | "test"),
  ``csv_dir`` (default root/csv or found under root), ``spacing_mm`` (0.05, CBIS DICOMs carry none).
- ``mini_ddsm``: root holding ``Normal|Benign|Cancer``; ``geometry`` ("masks" | "overlay"), ``classes``,
  ``spacing_mm`` (0.1, used only without an .ics).
- ``mias``: root with ``mdbNNN.pgm`` and ``Info.txt``; ``info`` (another Info path), ``spacing_mm`` (0.2).
- ``manifest``: root = the CSV; ``spacing_mm`` (default for rows without one).
- ``images``: a file or folder; ``spacing_mm`` (0.2 for files without spacing), ``include_annotations``.

``Mammogram.meta['value_range']`` is the (low, high) the pixel values can take (dtype range, DICOM
BitsStored range, or (0, 4) for calibrated DDSM), for preprocessing to normalise one documented way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.readers._common import (
    binarise_mask,
    fill_circle,
    fill_outline_image,
    fill_polygon,
    fit_mask,
    frame_scale,
)
from datamodules.records import DataError, ImageRecord, Mammogram

__all__ = ["SOURCES", "READERS", "list_source", "read_image", "lesion_masks", "read_mask_file"]

#: Valid source names for `list_source`.
SOURCES = ("ddsm", "cbis_ddsm", "mini_ddsm", "mias", "manifest", "images")
#: Valid values of ``ImageRecord.reader``.
READERS = ("dicom", "image", "ddsm")
#: Mammogram.meta keys that describe the decoded pixels; these always come from the decoder.
_DECODER_KEYS = ("value_range", "photometric", "bits_stored", "spacing_from_header", "spacing_source",
                 "source_path")


def _lister(name: str) -> Callable[..., list[ImageRecord]]:
    """The lister of a source: ``datamodules.readers.<name>.list_<name>``, imported on first use."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}")
    return getattr(importlib.import_module(f"datamodules.readers.{name}"), f"list_{name}")


def list_source(name: str, root: str | Path, **options: Any) -> list[ImageRecord]:
    """List the mammograms of source ``name`` under ``root`` (manifest: the CSV path); reads no pixels.

    Missing files are logged with their path and skipped; one warning gives the count.
    """
    key = str(name).strip().lower().replace("-", "_")
    lister = _lister(key)
    valid = [p for p in inspect.signature(lister).parameters if p != "root"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)} for source {key!r}; valid: {', '.join(valid)}")
    return lister(root, **options)


def read_image(record: ImageRecord) -> Mammogram:
    """Decode a record's pixels at native spacing, bright = dense, dispatching on ``record.reader``."""
    if record.reader == "dicom":
        from datamodules.readers.dicom import read_dicom

        image = read_dicom(record.path, default_spacing_mm=record.spacing_mm)
        decoded = {k: image.meta[k] for k in _DECODER_KEYS if k in image.meta}
        image.meta = {**image.meta, **record.meta, **decoded}  # the listing's facts win over header tags
        return image
    if record.reader == "image":
        from datamodules.readers.ddsm import frame_spacing
        from datamodules.readers.images import read_image_file

        if record.spacing_mm is None:
            raise DataError(f"{record.path}: an image file carries no pixel spacing; give the source a spacing_mm")
        image = read_image_file(record.path, record.spacing_mm, meta=dict(record.meta))
        frame = record.meta.get("frame_shape")
        if frame and record.meta.get("frame_spacing_mm"):
            image.spacing_mm = frame_spacing(record.meta["frame_spacing_mm"], tuple(frame), image.shape)
        return image
    if record.reader == "ddsm":
        from datamodules.readers.ddsm import read_ddsm

        return read_ddsm(record)
    raise DataError(f"{record.image_id}: unknown reader {record.reader!r}; valid readers: {', '.join(READERS)}")


def read_mask_file(path: str | Path, outline: bool = False) -> np.ndarray:
    """Bool mask from a mask file (DICOM or image); ``outline`` fills a closed contour image first."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        from datamodules.readers.dicom import read_dicom

        pixels = read_dicom(path, default_spacing_mm=1.0).pixels
    else:
        from datamodules.readers.images import read_image_pixels

        pixels = read_image_pixels(path)
    if outline:
        return fill_outline_image(pixels)
    return binarise_mask(pixels)


def lesion_masks(record: ImageRecord, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Kind ("mass" | "calcification" | "other") -> bool mask of ``shape``, the union of that kind's lesions.

    Kinds without a lesion that has geometry are absent. Outlines and circles are scaled from their
    frame (``lesion.meta['frame_shape']``) to ``shape``; mask files must match ``shape`` (within 1 %).
    """
    shape = (int(shape[0]), int(shape[1]))
    masks: dict[str, np.ndarray] = {}
    for lesion in record.lesions:
        if not lesion.has_geometry:
            continue
        if lesion.mask_path is not None:
            drawn = fit_mask(read_mask_file(lesion.mask_path, lesion.mask_is_outline), shape, Path(lesion.mask_path))
        elif lesion.outline is not None:
            drawn = fill_polygon(lesion.outline, shape, frame_scale(lesion, shape))
        else:
            drawn = fill_circle(lesion.circle, shape, frame_scale(lesion, shape))  # type: ignore[arg-type]
        if lesion.kind in masks:
            masks[lesion.kind] |= drawn
        else:
            masks[lesion.kind] = drawn.copy()
    return masks
