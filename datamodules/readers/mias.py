"""mini-MIAS: ``mdbNNN.pgm`` (1024 x 1024, 200 um) plus ``Info.txt``.

Info rows: ``mdb001 G CIRC B 535 425 197`` = reference, tissue (F/G/D), class (CALC, CIRC, SPIC, MISC,
ARCH, ASYM, NORM), severity (B/M), x, y, radius. The origin is the BOTTOM-left corner, so the circle
is stored top-left as (column = x, row = height - y). Abnormal rows without coordinates give a
lesion without geometry: the image is abnormal but ``has_pixel_annotation`` is False (pixel metrics
skip it). Images mdb(2k-1) and mdb(2k) are one woman: patient ``mias_<k>``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from datamodules.readers._common import SkipReport
from datamodules.records import DataError, ImageRecord, Lesion

#: MIAS class -> lesion kind (circumscribed, spiculated, ill-defined masses are masses).
KIND_OF_CLASS = {"CALC": "calcification", "CIRC": "mass", "SPIC": "mass", "MISC": "mass",
                 "ARCH": "other", "ASYM": "other"}
TISSUE = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
SEVERITY = {"B": "BENIGN", "M": "MALIGNANT"}
ROW = re.compile(r"^\s*(mdb\d{3})\s+([FGD])\s+(CALC|CIRC|SPIC|MISC|ARCH|ASYM|NORM)\b(.*)$", re.IGNORECASE)
MIAS_SIZE = 1024


def parse_info(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Info.txt rows per image reference (free text skipped); each row a dict of its fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mini-MIAS Info.txt not found: {path}")
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = ROW.match(line)
        if not match:
            continue
        ref, tissue, cls, rest = match.groups()
        tokens = rest.split()
        entry: dict[str, Any] = {"tissue": tissue.upper(), "class": cls.upper(), "severity": None,
                                 "x": None, "y": None, "radius": None}
        if tokens and tokens[0].upper() in SEVERITY:
            entry["severity"] = tokens.pop(0).upper()
        numbers = []
        for token in tokens:
            try:
                numbers.append(float(token))
            except ValueError:
                break
        if len(numbers) >= 3:
            entry["x"], entry["y"], entry["radius"] = numbers[:3]
        rows.setdefault(ref.lower(), []).append(entry)
    if not rows:
        raise DataError(f"{path}: no image rows like 'mdb001 G CIRC B 535 425 197' found")
    return rows


def list_mias(root: str | Path, spacing_mm: float = 0.2, info: str | Path | None = None) -> list[ImageRecord]:
    """One record per ``mdbNNN.pgm`` listed in Info.txt; abnormal images without coordinates are reported."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"mias: root folder not found: {root}")
    info_path = Path(info) if info is not None else next(
        (p for p in (root / "Info.txt", root / "info.txt", root / "INFO.TXT") if p.is_file()), root / "Info.txt"
    )
    table = parse_info(info_path)
    files = {p.stem.lower(): p for p in root.rglob("*") if p.suffix.lower() == ".pgm"}
    report = SkipReport(f"mias {root}")
    records: list[ImageRecord] = []
    no_geometry: list[str] = []
    for ref in sorted(table):
        path = files.get(ref)
        if path is None:
            report.skip(root / f"{ref}.pgm", "image listed in Info.txt is missing")
            continue
        lesions = []
        for entry in table[ref]:
            if entry["class"] == "NORM":
                continue
            circle = None
            if entry["x"] is not None:
                circle = (float(entry["x"]), float(MIAS_SIZE - entry["y"]), float(entry["radius"]))
            lesions.append(
                Lesion(
                    kind=KIND_OF_CLASS[entry["class"]],
                    pathology=SEVERITY.get(entry["severity"] or ""),
                    circle=circle,
                    meta={"frame_shape": (MIAS_SIZE, MIAS_SIZE), "mias_class": entry["class"]},
                )
            )
        number = int(ref[3:])
        record = ImageRecord(
            image_id=ref,
            patient_id=f"mias_{(number + 1) // 2:03d}",
            path=path,
            reader="image",
            label=1 if lesions else 0,
            spacing_mm=float(spacing_mm),
            lesions=lesions,
            meta={
                "source": "mias",
                "tissue": TISSUE[table[ref][0]["tissue"]],
                "density": table[ref][0]["tissue"],  # background tissue F / G / D: the density group
                "view": "MLO",
                "pathology": next((les.pathology for les in lesions if les.pathology), None),
                "lesion_type": ",".join(sorted({les.kind for les in lesions})) or None,
                "classes": [e["class"] for e in table[ref]],
            },
        )
        if lesions and not record.has_pixel_annotation:
            no_geometry.append(ref)
        records.append(record)
    report.finish(len(records))
    if no_geometry:
        warnings.warn(
            f"mias: {len(no_geometry)} abnormal image(s) have no lesion coordinates and are excluded from "
            f"pixel metrics: {', '.join(no_geometry)}",
            stacklevel=2,
        )
    return records
