"""MINI-DDSM (Kaggle): ``Normal|Benign|Cancer/<case>/<name>.jpg`` at half DDSM resolution.

Lesion masks are JPEG images of the lesion OUTLINE (``*_Mask.jpg``, ``*_MASK2.jpg``): thresholded at
127 and filled when drawn. The index ``DataWMask.csv`` (read first; faster) or ``DataWMask.xlsx``
adds age, density and the listed mask files. Lesion kinds come from the DDSM ``.OVERLAY`` beside the
image when present (mask k <-> abnormality k), else "other". Spacing: from the ``.ics`` resolution
scaled by the JPEG/.ics size ratio when the header is there (about 0.1 mm), else ``spacing_mm``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from datamodules.readers._common import SkipReport, natural_key, sorted_paths
from datamodules.readers.ddsm_ics_overlay import overlay_lesions, parse_ics
from datamodules.readers.images import name_facts
from datamodules.records import DataError, ImageRecord, Lesion

CLASS_FOLDERS = {"normal": "Normal", "benign": "Benign", "cancer": "Cancer"}
MASK_STEM = re.compile(r"_mask\d*$", re.IGNORECASE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _clean(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text in ("-", "nan", "None") else text


def read_index(root: Path) -> dict[str, dict[str, str]]:
    """``DataWMask`` rows keyed by image file name; empty when neither the CSV nor the xlsx is there."""
    csv_path, xlsx_path = root / "DataWMask.csv", root / "DataWMask.xlsx"
    rows: list[dict[str, str]] = []
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = [{k.strip(): _clean(v) for k, v in row.items() if k} for row in csv.DictReader(handle)]
        source = csv_path
    elif xlsx_path.is_file():
        try:
            import openpyxl
        except ImportError as exc:
            raise DataError(f"{xlsx_path}: reading the MINI-DDSM index needs openpyxl (`pip install openpyxl`)") from exc
        book = openpyxl.load_workbook(xlsx_path, read_only=True, data_only=True)
        try:
            sheet = book.worksheets[0]
            values = sheet.iter_rows(values_only=True)
            header = [str(h).strip() if h is not None else "" for h in next(values)]
            rows = [{h: _clean(v) for h, v in zip(header, row) if h} for row in values]
        finally:
            book.close()
        source = xlsx_path
    else:
        return {}
    if rows and "fileName" not in rows[0]:
        raise DataError(f"{source} lacks the column fileName of the MINI-DDSM index")
    return {row["fileName"]: row for row in rows if row.get("fileName")}


def _mask_files(image: Path, index_row: dict[str, str] | None, root: Path) -> tuple[list[Path], list[Path]]:
    """(present, missing) mask files of an image: those the index lists, else ``<stem>_Mask*.jpg`` beside it."""
    if index_row is not None and ("Tumour_Contour" in index_row or "Tumour_Contour2" in index_row):
        listed = [index_row.get("Tumour_Contour", ""), index_row.get("Tumour_Contour2", "")]
        paths = [root / p.replace("\\", "/") for p in listed if p]
        present = [p for p in paths if p.is_file()]
        missing = [p for p in paths if not p.is_file()]
        return present, missing
    stem = image.stem
    found = [p for p in image.parent.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.lower().startswith(stem.lower() + "_mask")]
    return sorted(found, key=lambda p: natural_key(p.name)), []


def list_mini_ddsm(root: str | Path, spacing_mm: float = 0.1, geometry: str = "masks",
                   classes: str | list[str] | None = None) -> list[ImageRecord]:
    """One record per MINI-DDSM image under ``root`` (optionally only some of Normal/Benign/Cancer).

    ``geometry``: "masks" (the outline JPEGs, default) or "overlay" (the DDSM chain codes, scaled).
    Images whose listed mask files are missing are logged and skipped; one warning gives the count.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"mini_ddsm: root folder not found: {root}")
    if geometry not in ("masks", "overlay"):
        raise DataError(f"mini_ddsm: geometry must be 'masks' or 'overlay', got {geometry!r}")
    wanted = None
    if classes is not None:
        names = [classes] if isinstance(classes, str) else list(classes)
        wanted = {n.lower() for n in names}
        if not wanted <= set(CLASS_FOLDERS):
            raise DataError(f"mini_ddsm: classes must be among Normal, Benign, Cancer, got {names}")
    index = read_index(root)
    report = SkipReport(f"mini_ddsm {root}")
    records: list[ImageRecord] = []
    class_dirs = sorted_paths(p for p in root.iterdir() if p.is_dir() and p.name.lower() in CLASS_FOLDERS)
    if not class_dirs:
        raise DataError(f"mini_ddsm: no Normal/Benign/Cancer folder in {root}")
    for class_dir in class_dirs:
        status = CLASS_FOLDERS[class_dir.name.lower()]
        if wanted is not None and status.lower() not in wanted:
            continue
        for case_dir in sorted_paths(p for p in class_dir.iterdir() if p.is_dir()):
            headers = sorted(case_dir.glob("*.ics"))
            header = None
            if headers:
                try:
                    header = parse_ics(headers[0])
                except DataError as exc:
                    report.skip(headers[0], str(exc))
            images = sorted_paths(
                p for p in case_dir.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not MASK_STEM.search(p.stem)
            )
            for image in images:
                row = index.get(image.name)
                facts = name_facts(image.stem)
                view_key = f"{facts.get('side', '')}_{facts.get('view', '')}"
                ics_view = header.views.get(view_key) if header else None
                frame = (ics_view.rows, ics_view.cols) if ics_view else None
                overlay_path = image.with_suffix(".OVERLAY")
                abnormalities = overlay_lesions(overlay_path, frame) if overlay_path.is_file() and frame else []
                if geometry == "overlay" and abnormalities:
                    lesions = abnormalities
                else:
                    present, missing = _mask_files(image, row, root)
                    if missing:
                        report.skip(missing[0], "lesion mask listed in the MINI-DDSM index is missing")
                        continue
                    lesions = []
                    for k, mask in enumerate(present):
                        twin = abnormalities[k] if k < len(abnormalities) else None
                        lesions.append(
                            Lesion(
                                kind=twin.kind if twin else "other",
                                pathology=twin.pathology if twin else (status.upper() if status != "Normal" else None),
                                mask_path=mask,
                                mask_is_outline=True,
                                meta={"abnormality": k + 1, **({"lesion_type": twin.meta.get("lesion_type")} if twin else {})},
                            )
                        )
                meta: dict[str, Any] = {
                    "source": "mini_ddsm",
                    "status": status,
                    "side": facts.get("side") or (row or {}).get("Side"),
                    "view": facts.get("view") or (row or {}).get("View"),
                    "overlay_abnormalities": len(abnormalities),
                    "pathology": status.upper() if status != "Normal" else None,
                    "lesion_type": ",".join(sorted({les.kind for les in lesions})) or None,
                }
                if row:
                    density = row.get("Density", "")
                    age = row.get("Age", "")
                    meta["density"] = int(float(density)) if density else None
                    meta["age"] = int(float(age)) if age else None
                if header is not None:
                    meta.update({"density": meta.get("density") or header.density, "digitizer": header.digitizer,
                                 "site": header.site})
                if ics_view is not None:
                    meta["frame_shape"] = frame
                    meta["frame_spacing_mm"] = ics_view.resolution_um / 1000.0
                records.append(
                    ImageRecord(
                        image_id=image.stem,
                        patient_id=facts.get("patient_id", f"{status}/{case_dir.name}"),
                        path=image,
                        reader="image",
                        label=1 if lesions else 0,
                        spacing_mm=(ics_view.resolution_um / 1000.0 * 2.0) if ics_view else float(spacing_mm),
                        lesions=lesions,
                        meta=meta,
                    )
                )
    report.finish(len(records))
    return records
