"""CBIS-DDSM: the four description CSVs plus the DICOM tree, in any of the real download layouts.

Quirks handled: calc CSVs say ``breast density`` (mass: ``breast_density``); records end in CRLF and
path fields may hold a newline inside their quotes (the csv module reads them, every path is
stripped). Files are found by the case folder (the first path component, crop/mask folders add
``_<abnormality id>``) wherever it sits up to three levels below ``root``, by walking that folder, so
the CSV layout, the NBIA "descriptive" layout and ``1-1.dcm`` names all work. The ROI mask is the
DICOM of the full image's rows x cols (ties broken by 0/255 values), never chosen by name.
"""

from __future__ import annotations

import csv
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from datamodules.readers._common import SkipReport, sorted_paths
from datamodules.readers.dicom import dicom_shape, read_dicom
from datamodules.records import DataError, ImageRecord, Lesion

#: Columns every CBIS-DDSM CSV must have (names normalised: lower case, ``_`` -> space).
REQUIRED_COLUMNS = (
    "patient id", "breast density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "pathology", "image file path", "roi mask file path",
)
CASE_FOLDER = re.compile(r"^(Mass|Calc)-(Training|Test)_P_\d+_(LEFT|RIGHT)_(CC|MLO)(_\d+)?$", re.IGNORECASE)
#: Default spacing of CBIS-DDSM images, whose DICOMs carry none (DDSM scans at 42-50 um).
DEFAULT_SPACING_MM = 0.05


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").strip().lower().split())


def csv_name(abnormality: str, split: str) -> str:
    """File name of one official description CSV, e.g. ``mass_case_description_test_set.csv``."""
    return f"{abnormality}_case_description_{split}_set.csv"


def read_description_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CBIS-DDSM description CSV with normalised keys and every value stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CBIS-DDSM description CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration as exc:
            raise DataError(f"{path} is empty; expected a CBIS-DDSM description CSV") from exc
        keys = [_norm(h) for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in keys]
        if missing:
            raise DataError(f"{path} lacks the column(s) {', '.join(missing)} of a CBIS-DDSM description CSV")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            rows.append({k: v.strip() for k, v in zip(keys, values)})
    return rows


def _find_csv_dir(root: Path, name: str, csv_dir: str | Path | None) -> Path:
    if csv_dir is not None:
        return Path(csv_dir)
    for candidate in (root / "csv", root):
        if (candidate / name).is_file():
            return candidate
    found = sorted_paths(root.rglob(name)) if root.is_dir() else []
    if found:
        return found[0].parent
    raise DataError(f"cbis_ddsm: {name} not found in {root / 'csv'} nor under {root}; set csv_dir")


def index_case_folders(root: Path, max_depth: int = 3) -> dict[str, Path]:
    """Case folder name -> path for every CBIS case folder at most ``max_depth`` levels below root."""
    found: dict[str, Path] = {}
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir():
                continue
            if CASE_FOLDER.match(entry.name):
                found.setdefault(entry.name, Path(entry.path))
            elif depth + 1 < max_depth:
                stack.append((Path(entry.path), depth + 1))
    return found


def _dicoms_in(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    out = []
    for base, _, files in os.walk(folder):
        out.extend(Path(base) / f for f in files if f.lower().endswith(".dcm"))
    return sorted_paths(out)


def _first_component(path_text: str) -> str:
    return path_text.replace("\\", "/").strip().strip("/").split("/")[0].strip()


def _is_binary_mask(path: Path) -> bool:
    pixels = read_dicom(path, default_spacing_mm=1.0).pixels
    return bool(np.isin(np.unique(pixels), (0, 1, 255, 65535)).all())


def pick_mask(candidates: list[Path], full_shape: tuple[int, int], tolerance: float = 0.01) -> Path | None:
    """The ROI mask among a lesion's DICOMs: rows x cols of the full image (within 1 %), 0/255 values."""
    shapes = {}
    for path in candidates:
        try:
            shapes[path] = dicom_shape(path)
        except DataError:
            continue
    exact = [p for p, s in shapes.items() if s == tuple(full_shape)]
    if not exact:
        exact = [
            p for p, s in shapes.items()
            if abs(s[0] - full_shape[0]) <= tolerance * full_shape[0]
            and abs(s[1] - full_shape[1]) <= tolerance * full_shape[1]
        ]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        binary = [p for p in exact if _is_binary_mask(p)]
        return binary[0] if binary else exact[0]
    return None


def _pick_full(candidates: list[Path]) -> tuple[Path, tuple[int, int]] | None:
    best = None
    for path in candidates:
        try:
            shape = dicom_shape(path)
        except DataError:
            continue
        if best is None or shape[0] * shape[1] > best[1][0] * best[1][1]:
            best = (path, shape)
    return best


def _shape_text(path: Path) -> str:
    try:
        rows, cols = dicom_shape(path)
    except DataError:
        return "unreadable"
    return f"{rows}x{cols}"


_PATHOLOGY_ORDER = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")


def _merged_pathology(values: list[str]) -> str | None:
    upper = {v.upper() for v in values if v}
    for name in _PATHOLOGY_ORDER:
        if name in upper:
            return name
    return sorted(upper)[0] if upper else None


def list_cbis_ddsm(root: str | Path, abnormality: str = "mass", split: str = "test",
                   csv_dir: str | Path | None = None, spacing_mm: float = DEFAULT_SPACING_MM) -> list[ImageRecord]:
    """One record per full mammogram of a CBIS-DDSM set, lesions of all its CSV rows attached.

    ``abnormality``: "mass" | "calc"; ``split``: "train" | "test". Images whose full DICOM or any ROI
    mask is missing are logged with the path and skipped (an incompletely annotated image would give
    wrong pixel labels); one warning gives the count.
    """
    abnormality = str(abnormality).lower()
    split = str(split).lower()
    if abnormality not in ("mass", "calc"):
        raise DataError(f"cbis_ddsm: abnormality must be 'mass' or 'calc', got {abnormality!r}")
    if split not in ("train", "test"):
        raise DataError(f"cbis_ddsm: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cbis_ddsm: root folder not found: {root}")
    name = csv_name(abnormality, split)
    csv_path = _find_csv_dir(root, name, csv_dir) / name
    rows = read_description_csv(csv_path)
    folders = index_case_folders(root)
    groups: OrderedDict[str, list[dict[str, str]]] = OrderedDict()
    for row in rows:
        groups.setdefault(_first_component(row["image file path"]), []).append(row)
    report = SkipReport(f"cbis_ddsm {abnormality}/{split}")
    records: list[ImageRecord] = []
    kind = "mass" if abnormality == "mass" else "calcification"
    for case, case_rows in groups.items():
        full = _pick_full(_dicoms_in(folders.get(case)))
        if full is None:
            where = folders.get(case, root / case)
            report.skip(where / case_rows[0]["image file path"].split("/", 1)[-1], "full mammogram DICOM missing")
            continue
        full_path, full_shape = full
        lesions: list[Lesion] = []
        missing = None
        for row in case_rows:
            abn_id = row["abnormality id"]
            mask_folder = _first_component(row["roi mask file path"]) or f"{case}_{abn_id}"
            crop_folder = _first_component(row.get("cropped image file path", "")) or mask_folder
            candidates = _dicoms_in(folders.get(mask_folder))
            if crop_folder != mask_folder:
                candidates += _dicoms_in(folders.get(crop_folder))
            candidates = [p for p in dict.fromkeys(candidates) if p != full_path]
            mask_path = pick_mask(candidates, full_shape)
            if mask_path is None:
                where = folders.get(mask_folder, root / mask_folder)
                if candidates:
                    shapes = ", ".join(f"{p.name} {_shape_text(p)}" for p in candidates[:4])
                    missing = (where, f"no ROI mask of the full image's size {full_shape[0]}x{full_shape[1]} "
                                      f"among its DICOMs ({shapes})")
                else:
                    missing = (where / row["roi mask file path"].split("/", 1)[-1], "ROI mask DICOM missing")
                break
            crops = [p for p in candidates if p != mask_path]
            extra = {k: row[k] for k in ("mass shape", "mass margins", "calc type", "calc distribution") if k in row}
            lesions.append(
                Lesion(
                    kind=kind,
                    pathology=row["pathology"].upper() or None,
                    mask_path=mask_path,
                    meta={
                        "abnormality_id": abn_id,
                        "assessment": row.get("assessment"),
                        "subtlety": row.get("subtlety"),
                        "crop_path": str(crops[0]) if crops else None,
                        **{k.replace(" ", "_"): v for k, v in extra.items()},
                    },
                )
            )
        if missing is not None:
            report.skip(*missing)
            continue
        first = case_rows[0]
        density = first.get("breast density")
        records.append(
            ImageRecord(
                image_id=case,
                patient_id=first["patient id"],
                path=full_path,
                reader="dicom",
                label=1,
                spacing_mm=float(spacing_mm),
                lesions=lesions,
                meta={
                    "source": "cbis_ddsm",
                    "split": split,
                    "abnormality": abnormality,
                    "side": first["left or right breast"].upper(),
                    "view": first["image view"].upper(),
                    "density": int(density) if density and density.isdigit() else density,
                    "pathology": _merged_pathology([r["pathology"] for r in case_rows]),
                    "lesion_type": kind,
                    "full_shape": full_shape,
                    "csv_path": str(csv_path),
                },
            )
        )
    report.finish(len(records))
    return records
