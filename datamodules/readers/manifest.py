"""A generic manifest CSV for any other data: ``image_path, patient_id, label, mask_path, spacing_mm, ...``.

Paths are relative to the CSV's folder (absolute paths work too). ``mask_path`` may be empty or hold
several masks separated by ``;``; ``lesion_kind`` (or ``kind`` / ``lesion_type``) names their kind
("mass" default, "calc" accepted for "calcification");
``image_id``, ``pathology``, ``side``, ``view``, ``density`` are used when present and every other
column goes into ``meta``. DICOM (.dcm) images use the DICOM reader, everything else OpenCV.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from datamodules.readers._common import SkipReport
from datamodules.readers.images import DICOM_SUFFIXES
from datamodules.records import LESION_KINDS, DataError, ImageRecord, Lesion

REQUIRED = ("image_path", "patient_id", "label")
KNOWN = ("image_path", "patient_id", "label", "mask_path", "spacing_mm", "image_id", "lesion_kind", "kind",
         "lesion_type", "pathology", "mask_is_outline")
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
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        if not row.get("image_path"):
            raise DataError(f"{path} line {number}: empty image_path")
        image = Path(row["image_path"])
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            report.skip(image, f"image of line {number} missing")
            continue
        try:
            label = int(float(row["label"]))
        except ValueError as exc:
            raise DataError(f"{path} line {number}: label {row['label']!r} is not 0/1") from exc
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
        image_id = row.get("image_id") or str(Path(row["image_path"]).with_suffix("")).replace("\\", "/")
        if image_id in seen:
            raise DataError(f"{path} line {number}: image_id {image_id!r} appears twice")
        seen.add(image_id)
        meta: dict[str, Any] = {k: v for k, v in row.items() if k not in KNOWN and k}
        meta.update({"source": "manifest", "pathology": row.get("pathology") or None,
                     "lesion_type": kind if lesions else None})
        if meta.get("density", "").isdigit():
            meta["density"] = int(meta["density"])
        records.append(
            ImageRecord(
                image_id=image_id,
                patient_id=row["patient_id"],
                path=image,
                reader="dicom" if image.suffix.lower() in DICOM_SUFFIXES else "image",
                label=label,
                spacing_mm=spacing,
                lesions=lesions,
                meta=meta,
            )
        )
    report.finish(len(records))
    return records
