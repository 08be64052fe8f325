"""A generic manifest CSV for any other data: ``image_path, patient_id, label, mask_path, spacing_mm, ...``.

``label``: 0 / 1 or ``healthy`` / ``normal`` / ``lesion`` / ``abnormal``. Several rows for one image (one per
lesion, the CBIS convention) are merged into one record; a lesion row without a mask is reported and skipped.

Paths are relative to the CSV's folder (absolute paths work too). ``mask_path`` may be empty or hold
several masks separated by ``;``; ``lesion_kind`` (or ``kind`` / ``lesion_type``) names their kind
("mass" default, "calc" accepted for "calcification");
``image_id``, ``pathology``, ``side``, ``view``, ``density`` are used when present and every other
column goes into ``meta``. DICOM (.dcm) images use the DICOM reader, everything else OpenCV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from datamodules.readers._common import SkipReport
from datamodules.readers.images import DICOM_SUFFIXES
from datamodules.records import LESION_KINDS, DataError, ImageRecord, Lesion

REQUIRED = ("image_path", "patient_id", "label")
KNOWN = ("image_path", "patient_id", "label", "mask_path", "spacing_mm", "image_id", "lesion_kind", "kind",
         "lesion_type", "pathology", "mask_is_outline")
#: Accepted spellings of the labels (case-insensitive), besides 0 / 1.
LABEL_WORDS = {"0": 0, "1": 1, "healthy": 0, "normal": 0, "negative": 0, "lesion": 1, "abnormal": 1, "positive": 1}
#: Accepted spellings of the lesion kinds.
KIND_ALIASES = {"calc": "calcification", "calcifications": "calcification", "masses": "mass"}


def list_manifest(root: str | Path, spacing_mm: float | None = None) -> list[ImageRecord]:
    """Records of a manifest CSV (``root`` = the CSV path); rows whose files are missing are skipped."""
    path = Path(root)
    if not path.is_file():
        raise DataError(f"manifest: CSV file not found: {path}")
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (a manifest needs {', '.join(REQUIRED)})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    report = SkipReport(f"manifest {path}")
    records: list[ImageRecord] = []
    seen: dict[str, ImageRecord] = {}
    for number, row in enumerate(rows, start=2):
        if not row.get("image_path"):
            raise DataError(f"{path} line {number}: empty image_path")
        image = Path(row["image_path"])
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            report.skip(image, f"image of line {number} missing")
            continue
        label = _label(row["label"], path, number)
        spacing_text = row.get("spacing_mm", "")
        try:
            spacing = float(spacing_text) if spacing_text else spacing_mm
        except ValueError as exc:
            raise DataError(f"{path} line {number}: spacing_mm {spacing_text!r} is not a number") from exc
        kind = (row.get("lesion_kind") or row.get("kind") or row.get("lesion_type") or "mass").lower()
        kind = KIND_ALIASES.get(kind, kind)
        if kind not in LESION_KINDS:
            raise DataError(f"{path} line {number}: lesion kind {kind!r} is not one of {', '.join(LESION_KINDS)}")
        outline = row.get("mask_is_outline", "").lower() in ("1", "true", "yes")
        masks = [m.strip() for m in row.get("mask_path", "").split(";") if m.strip()]
        lesions, absent = [], None
        for mask in masks:
            mask_path = Path(mask) if Path(mask).is_absolute() else base / mask
            if not mask_path.is_file():
                absent = mask_path
                break
            lesions.append(Lesion(kind=kind, pathology=row.get("pathology") or None, mask_path=mask_path,
                                  mask_is_outline=outline))
        if absent is not None:
            report.skip(absent, f"mask of line {number} missing")
            continue
        if label == 1 and not lesions:
            report.skip(image, f"line {number} is a lesion row without a mask_path (a lesion image needs its mask)")
            continue
        image_id = row.get("image_id") or str(Path(row["image_path"]).with_suffix("")).replace("\\", "/")
        if image_id in seen:  # one row per lesion (the CBIS convention): merge into the image's record
            first = seen[image_id]
            if first.patient_id != row["patient_id"] or first.path != image:
                raise DataError(f"{path} line {number}: image_id {image_id!r} appears again with another "
                                f"patient_id or image_path ({first.patient_id}, {first.path})")
            first.lesions.extend(lesions)
            first.label = max(first.label, label)
            if lesions:
                first.meta["lesion_type"] = ",".join(sorted({x.kind for x in first.lesions}))
            continue
        meta: dict[str, Any] = {k: v for k, v in row.items() if k not in KNOWN and k}
        meta.update({"source": "manifest", "pathology": row.get("pathology") or None,
                     "lesion_type": kind if lesions else None})
        if meta.get("density", "").isdigit():
            meta["density"] = int(meta["density"])
        seen[image_id] = ImageRecord(
                image_id=image_id,
                patient_id=row["patient_id"],
                path=image,
                reader="dicom" if image.suffix.lower() in DICOM_SUFFIXES else "image",
                label=label,
                spacing_mm=spacing,
                lesions=lesions,
                meta=meta,
            )
        records.append(seen[image_id])
    report.finish(len(records))
    return records


def _label(text: str, path: Path, number: int) -> int:
    """0 (healthy) or 1 (lesion) from ``0/1`` or a word of `LABEL_WORDS`; `DataError` naming the line otherwise."""
    word = text.strip().lower()
    if word in LABEL_WORDS:
        return LABEL_WORDS[word]
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if value in (0.0, 1.0):
        return int(value)
    raise DataError(f"{path} line {number}: label {text!r} is not 0/1 or one of {', '.join(LABEL_WORDS)}")
