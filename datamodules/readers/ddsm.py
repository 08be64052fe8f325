"""The original DDSM distribution: ``cases/<diagnosis>/<volume>/case<NNNN>/`` with .ics, .LJPEG, .OVERLAY.

This module lists the cases (`list_ddsm`), reads a view (`read_ddsm`) and calibrates it; the ``.ics`` /
``.OVERLAY`` parsing is in `ddsm_ics_overlay`, the LJPEG decoding (with the byte-swapped words undone)
in `ljpeg`.

- Display rule (``calibration="od"``, the default): grey level -> optical density with the digitiser's
  formula, clipped to [0, OD_REF], then ``pixels = OD_REF - OD`` (float32, bright = dense, the same
  physical scale for every scanner; ``meta['value_range'] = (0, OD_REF)``). ``calibration="raw"`` keeps
  the grey levels (already bright = dense on all four digitisers).
- Lesions: one per ABNORMALITY of the view's ``.OVERLAY``; its filled BOUNDARY polygon is the lesion mask.
A view stored as PNG/JPEG beside its .ics (MINI-DDSM, resized samples) is read as is, its spacing
scaled from the .ics resolution by the size ratio, and outlines scaled to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.readers._common import OD_REF, SkipReport, sorted_paths
from datamodules.readers.ddsm_ics_overlay import overlay_lesions, parse_ics
from datamodules.readers.images import read_image_pixels
from datamodules.readers.ljpeg import decode_ljpeg
from datamodules.records import DataError, ImageRecord, Lesion, Mammogram

#: Volume folders of the DDSM ``cases/`` tree (and the MINI-DDSM class folders) -> diagnosis.
DIAGNOSES = {
    "normals": "normals", "normal": "normals",
    "benigns": "benigns", "benign": "benigns",
    "cancers": "cancers", "cancer": "cancers",
    "benign_without_callbacks": "benign_without_callbacks", "benign_without_callback": "benign_without_callbacks",
}
#: View file suffixes in order of preference.
VIEW_SUFFIXES = (".LJPEG", ".ljpeg", ".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".tif", ".tiff", ".pgm")
SCANNERS = ("DBA", "HOWTEK-MGH", "HOWTEK-ISMD", "LUMISYS")


def scanner_of(digitizer: str, site: str) -> str:
    """Calibration key: DBA, HOWTEK-MGH (site A), HOWTEK-ISMD (site D) or LUMISYS (sites B, C)."""
    text = digitizer.upper()
    if "DBA" in text:
        return "DBA"
    if "LUMISYS" in text:
        return "LUMISYS"
    if "HOWTEK" in text:
        return "HOWTEK-ISMD" if site.upper() == "D" else "HOWTEK-MGH"
    by_site = {"A": "HOWTEK-MGH", "B": "LUMISYS", "C": "LUMISYS", "D": "HOWTEK-ISMD"}
    if site.upper() in by_site:
        return by_site[site.upper()]
    raise DataError(f"unknown DDSM digitiser {digitizer!r} at site {site!r}; expected DBA, HOWTEK or LUMISYS")


def optical_density(grey_levels: np.ndarray, scanner: str) -> np.ndarray:
    """Optical density (float32) from raw DDSM grey levels with the digitiser's published formula.

    Integer grey levels go through a 65536-entry lookup table (a full film in ~0.1 s instead of ~1 s).
    """
    grey_levels = np.asarray(grey_levels)
    if grey_levels.dtype in (np.uint8, np.uint16):
        table = _od_formula(np.arange(1 << (8 * grey_levels.dtype.itemsize), dtype=np.float64), scanner)
        return table[grey_levels]
    return _od_formula(grey_levels.astype(np.float64), scanner)


def _od_formula(gl: np.ndarray, scanner: str) -> np.ndarray:
    if scanner == "DBA":
        od = (np.log10(np.maximum(gl, 1.0)) - 4.80662) / -1.07553
    elif scanner == "HOWTEK-MGH":
        od = 3.789 - 0.00094568 * gl
    elif scanner == "HOWTEK-ISMD":
        od = 3.96604095240593 - 0.00099055807612 * gl
    elif scanner == "LUMISYS":
        od = (gl - 4096.99) / -1009.01
    else:
        raise DataError(f"unknown DDSM scanner {scanner!r}; expected one of {', '.join(SCANNERS)}")
    return od.astype(np.float32)


def display_from_od(od: np.ndarray) -> np.ndarray:
    """Display intensity bright = dense: ``OD_REF - clip(OD, 0, OD_REF)`` as float32."""
    out = np.clip(np.asarray(od, dtype=np.float32), 0.0, OD_REF)
    np.subtract(np.float32(OD_REF), out, out=out)
    return out


def _find_view_file(case_dir: Path, case_name: str, view: str) -> Path | None:
    candidates = {p.name: p for p in case_dir.glob(f"*.{view}.*") if p.is_file()}
    for suffix in VIEW_SUFFIXES:
        for name, path in candidates.items():
            if name.endswith(f".{view}{suffix}"):
                return path
    return None


def _diagnosis_of(path: Path) -> str | None:
    for part in reversed(path.parts[:-1]):
        if part.lower() in DIAGNOSES:
            return DIAGNOSES[part.lower()]
    return None


def list_ddsm(root: str | Path, diagnosis: str | list[str] | None = None, calibration: str = "od") -> list[ImageRecord]:
    """One record per view of every DDSM case under ``root`` (optionally only some diagnoses).

    ``diagnosis``: "normals", "benigns", "cancers", "benign_without_callbacks" or a list of them.
    ``label`` is 1 for views with an .OVERLAY, 0 otherwise; ``meta['diagnosis']`` is the case's folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ddsm: root folder not found: {root}")
    if calibration not in ("od", "raw"):
        raise DataError(f"ddsm: calibration must be 'od' or 'raw', got {calibration!r}")
    wanted: set[str] | None = None
    if diagnosis is not None:
        names = [diagnosis] if isinstance(diagnosis, str) else list(diagnosis)
        unknown = [n for n in names if n.lower() not in DIAGNOSES]
        if unknown:
            raise DataError(f"ddsm: unknown diagnosis {unknown}; valid: normals, benigns, cancers, benign_without_callbacks")
        wanted = {DIAGNOSES[n.lower()] for n in names}
    report = SkipReport(f"ddsm {root}")
    records: list[ImageRecord] = []
    headers = sorted_paths(root.rglob("*.ics"))
    if not headers:
        raise DataError(f"ddsm: no DDSM case (an .ics header) found under {root}; expected cases/<diagnosis>/...")
    for ics_path in headers:
        diag = _diagnosis_of(ics_path.relative_to(root)) or _diagnosis_of(ics_path)
        if wanted is not None and diag not in wanted:
            continue
        try:
            header = parse_ics(ics_path)
        except DataError as exc:
            report.skip(ics_path, str(exc))
            continue
        case_dir = ics_path.parent
        scanner = None
        if calibration == "od":
            try:
                scanner = scanner_of(header.digitizer, header.site)
            except DataError as exc:
                report.skip(ics_path, str(exc))
                continue
        for view, info in header.views.items():
            path = _find_view_file(case_dir, header.case_name, view)
            if path is None:
                report.skip(case_dir / f"{header.case_name}.{view}.LJPEG", "view image missing")
                continue
            frame = (info.rows, info.cols)
            lesions: list[Lesion] = []
            overlay = case_dir / f"{header.case_name}.{view}.OVERLAY"
            if not overlay.is_file():
                found = list(case_dir.glob(f"*.{view}.OVERLAY"))
                overlay = found[0] if found else overlay
            if overlay.is_file():
                try:
                    lesions = overlay_lesions(overlay, frame)
                except DataError as exc:
                    report.skip(overlay, str(exc))
                    continue
            elif info.overlay:
                report.skip(overlay, "the .ics marks this view OVERLAY but the file is missing")
                continue
            side, _, view_name = view.partition("_")
            pathologies = sorted({les.pathology for les in lesions if les.pathology})
            records.append(
                ImageRecord(
                    image_id=f"{header.case_name}.{view}",
                    patient_id=header.patient_id,
                    path=path,
                    reader="ddsm",
                    label=1 if lesions else 0,
                    spacing_mm=info.resolution_um / 1000.0,
                    lesions=lesions,
                    meta={
                        "source": "ddsm",
                        "side": side,
                        "view": view_name,
                        "density": header.density,
                        "age": header.age,
                        "digitizer": header.digitizer,
                        "scanner": scanner or "",
                        "site": header.site,
                        "diagnosis": diag,
                        "pathology": ",".join(pathologies) if pathologies else None,
                        "lesion_type": ",".join(sorted({les.kind for les in lesions})) or None,
                        "bits": info.bits,
                        "frame_shape": frame,
                        "frame_spacing_mm": info.resolution_um / 1000.0,
                        "calibration": calibration if path.suffix.lower() == ".ljpeg" else "none",
                        "ics_path": str(ics_path),
                    },
                )
            )
    report.finish(len(records))
    return records


def frame_spacing(spacing_mm: float, frame_shape: tuple[int, int], shape: tuple[int, int]) -> float:
    """Spacing of an image of ``shape`` that shows the same film as ``frame_shape`` at ``spacing_mm``."""
    ratio = 0.5 * (frame_shape[0] / shape[0] + frame_shape[1] / shape[1])
    return float(spacing_mm) * ratio


def read_ddsm(record: ImageRecord) -> Mammogram:
    """Read one DDSM view: LJPEG decoded + calibrated (see module doc), or a PNG/JPEG beside its .ics."""
    path = Path(record.path)
    meta = dict(record.meta)
    frame = tuple(meta.get("frame_shape") or ())
    base_spacing = float(meta.get("frame_spacing_mm") or record.spacing_mm or 0.05)
    if path.suffix.lower() == ".ljpeg":
        if len(frame) != 2:
            raise DataError(f"{path}: the record has no .ics size (meta['frame_shape']) to decode the LJPEG")
        words = decode_ljpeg(path, int(frame[0]), int(frame[1]), int(meta.get("bits", 12)))
        calibration = meta.get("calibration", "od")
        if calibration == "od":
            scanner = meta.get("scanner") or scanner_of(str(meta.get("digitizer", "")), str(meta.get("site", "")))
            pixels = display_from_od(optical_density(words, scanner))
            value_range = (0.0, float(OD_REF))
        else:
            pixels = words
            value_range = (0.0, float((1 << int(meta.get("bits", 12))) - 1))
        spacing = base_spacing
    else:
        pixels = read_image_pixels(path)
        info = np.iinfo(pixels.dtype) if np.issubdtype(pixels.dtype, np.integer) else None
        value_range = (float(info.min), float(info.max)) if info else (float(pixels.min()), float(pixels.max()))
        spacing = frame_spacing(base_spacing, frame, pixels.shape) if len(frame) == 2 else base_spacing
    meta.update({"value_range": value_range, "source_path": str(path)})
    return Mammogram(pixels=np.ascontiguousarray(pixels), spacing_mm=spacing, meta=meta)
