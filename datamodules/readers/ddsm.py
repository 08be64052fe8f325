"""The original DDSM distribution: ``cases/<diagnosis>/<volume>/case<NNNN>/`` with .ics, .LJPEG, .OVERLAY.

- ``.ics``: one line per view gives LINES (rows), PIXELS_PER_LINE (cols), BITS_PER_PIXEL, RESOLUTION
  (microns); plus DENSITY, DIGITIZER, the case file name (site letter + case number).
- ``.LJPEG``: lossless JPEG (ITU T.81 process 14), decoded with imagecodecs; the 16-bit words come out
  byte-swapped from the real files, which is detected (values above 2**BITS_PER_PIXEL, or for 16-bit
  data the far rougher image) and undone.
- Display rule (``calibration="od"``, the default): grey level -> optical density with the digitiser's
  formula, clipped to [0, OD_REF], then ``pixels = OD_REF - OD`` (float32, bright = dense, the same
  physical scale for every scanner; ``meta['value_range'] = (0, OD_REF)``). ``calibration="raw"`` keeps
  the grey levels (already bright = dense on all four digitisers).
- ``.OVERLAY``: abnormalities with LESION_TYPE (+ attributes), ASSESSMENT, SUBTLETY, PATHOLOGY and
  BOUNDARY / CORE chain codes; the filled BOUNDARY polygon is the lesion mask.
A view stored as PNG/JPEG beside its .ics (MINI-DDSM, resized samples) is read as is, its spacing
scaled from the .ics resolution by the size ratio, and outlines scaled to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.readers._common import OD_REF, SkipReport, sorted_paths
from datamodules.readers.images import read_image_pixels
from datamodules.records import DataError, ImageRecord, Lesion, Mammogram

VIEWS = ("LEFT_CC", "LEFT_MLO", "RIGHT_CC", "RIGHT_MLO")
#: Volume folders of the DDSM ``cases/`` tree (and the MINI-DDSM class folders) -> diagnosis.
DIAGNOSES = {
    "normals": "normals", "normal": "normals",
    "benigns": "benigns", "benign": "benigns",
    "cancers": "cancers", "cancer": "cancers",
    "benign_without_callbacks": "benign_without_callbacks", "benign_without_callback": "benign_without_callbacks",
}
#: View file suffixes in order of preference.
VIEW_SUFFIXES = (".LJPEG", ".ljpeg", ".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".tif", ".tiff", ".pgm")
#: Chain-code steps 0..7 = N, NE, E, SE, S, SW, W, NW as (dx, dy), x = column, y = row (top-left origin).
CHAIN_STEPS = np.array([(0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)], dtype=np.int64)
#: DDSM lesion types -> the project's lesion kinds.
KIND_OF_TYPE = {"MASS": "mass", "CALCIFICATION": "calcification"}
SCANNERS = ("DBA", "HOWTEK-MGH", "HOWTEK-ISMD", "LUMISYS")


@dataclass
class IcsView:
    """One view line of an .ics header."""

    rows: int
    cols: int
    bits: int
    resolution_um: float
    overlay: bool


@dataclass
class IcsHeader:
    """What an .ics header says about a case."""

    path: Path
    case_name: str  # e.g. "A_0002_1" (from the ``filename A-0002-1`` line)
    patient_id: str  # e.g. "A_0002"
    site: str  # the letter A-D
    digitizer: str
    density: int | None
    age: int | None
    views: dict[str, IcsView] = field(default_factory=dict)


@dataclass
class OverlayAbnormality:
    """One ABNORMALITY block of an .OVERLAY file."""

    index: int
    lesion_type: str  # first LESION_TYPE (MASS, CALCIFICATION, ...)
    lesion_types: list[dict[str, str]]  # every LESION_TYPE line with its attributes
    assessment: int | None
    subtlety: int | None
    pathology: str | None
    boundary: np.ndarray | None  # (N, 2) x, y points
    cores: list[np.ndarray] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return KIND_OF_TYPE.get(self.lesion_type.upper(), "other")


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


def parse_ics(path: str | Path) -> IcsHeader:
    """Parse a DDSM .ics header; DataError naming the file if it has no view lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"DDSM .ics header not found: {path}")
    fields: dict[str, list[str]] = {}
    views: dict[str, IcsView] = {}
    for raw in path.read_text(errors="replace").splitlines():
        tokens = raw.split()
        if not tokens:
            continue
        key = tokens[0].upper()
        if key in VIEWS:
            values = {tokens[i].upper(): tokens[i + 1] for i in range(1, len(tokens) - 1)}
            try:
                views[key] = IcsView(
                    rows=int(values["LINES"]),
                    cols=int(values["PIXELS_PER_LINE"]),
                    bits=int(values.get("BITS_PER_PIXEL", 12)),
                    resolution_um=float(values.get("RESOLUTION", 50)),
                    overlay=tokens[-1].upper() == "OVERLAY",
                )
            except (KeyError, ValueError) as exc:
                raise DataError(f"{path}: view line {raw.strip()!r} lacks LINES/PIXELS_PER_LINE ({exc})") from exc
        else:
            fields[key] = tokens[1:]
    if not views:
        raise DataError(f"{path}: no view lines (LEFT_CC LINES ... PIXELS_PER_LINE ...) in this .ics header")
    name = (fields.get("FILENAME") or [path.stem])[0]
    match = re.match(r"([A-Da-d])[-_](\d+)[-_](\d+)", name)
    if match:
        site, number, seq = match.group(1).upper(), match.group(2), match.group(3)
        case_name, patient_id = f"{site}_{number}_{seq}", f"{site}_{number}"
    else:
        site, case_name, patient_id = "", name.replace("-", "_"), name.replace("-", "_")
    return IcsHeader(
        path=path,
        case_name=case_name,
        patient_id=patient_id,
        site=site,
        digitizer=" ".join(fields.get("DIGITIZER", [])),
        density=_int_or_none((fields.get("DENSITY") or [None])[0]),
        age=_int_or_none((fields.get("PATIENT_AGE") or [None])[0]),
        views=views,
    )


def chain_code_points(x0: int, y0: int, codes: list[int] | np.ndarray) -> np.ndarray:
    """Boundary pixels ``(N + 1, 2)`` as (x, y) of a DDSM chain code starting at (x0, y0)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() > 7):
        raise ValueError(f"chain code values must be 0..7, got {sorted(set(codes.tolist()) - set(range(8)))}")
    steps = CHAIN_STEPS[codes] if codes.size else np.zeros((0, 2), dtype=np.int64)
    start = np.array([[x0, y0]], dtype=np.int64)
    return np.concatenate([start, start + np.cumsum(steps, axis=0)], axis=0)


def _parse_chain(tokens: list[str], path: Path) -> np.ndarray:
    numbers = [t for t in tokens if t != "#"]
    try:
        values = [int(t) for t in numbers]
    except ValueError as exc:
        raise DataError(f"{path}: chain code contains a non-number ({exc})") from exc
    if len(values) < 2:
        raise DataError(f"{path}: chain code without a start point")
    try:
        return chain_code_points(values[0], values[1], values[2:])
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc


def parse_overlay(path: str | Path) -> list[OverlayAbnormality]:
    """Parse a DDSM .OVERLAY file into its abnormalities (type, attributes, pathology, outlines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"DDSM .OVERLAY file not found: {path}")
    tokens_by_line = [line.split() for line in path.read_text(errors="replace").splitlines()]
    result: list[OverlayAbnormality] = []
    current: OverlayAbnormality | None = None
    i = 0
    while i < len(tokens_by_line):
        tokens = tokens_by_line[i]
        i += 1
        if not tokens:
            continue
        key = tokens[0].upper()
        if key == "ABNORMALITY":
            current = OverlayAbnormality(
                index=_int_or_none(tokens[1] if len(tokens) > 1 else None) or len(result) + 1,
                lesion_type="", lesion_types=[], assessment=None, subtlety=None, pathology=None,
                boundary=None,
            )
            result.append(current)
            continue
        if current is None:
            continue
        if key == "LESION_TYPE":
            attrs = {"LESION_TYPE": tokens[1].upper() if len(tokens) > 1 else ""}
            rest = tokens[2:]
            for j in range(0, len(rest) - 1, 2):
                attrs[rest[j].upper()] = rest[j + 1]
            current.lesion_types.append(attrs)
            if not current.lesion_type:
                current.lesion_type = attrs["LESION_TYPE"]
        elif key == "ASSESSMENT":
            current.assessment = _int_or_none(tokens[1] if len(tokens) > 1 else None)
        elif key == "SUBTLETY":
            current.subtlety = _int_or_none(tokens[1] if len(tokens) > 1 else None)
        elif key == "PATHOLOGY":
            current.pathology = tokens[1].upper() if len(tokens) > 1 else None
        elif key in ("BOUNDARY", "CORE"):
            chain = tokens[1:]
            while "#" not in chain and i < len(tokens_by_line):
                chain.extend(tokens_by_line[i])
                i += 1
            points = _parse_chain(chain[: chain.index("#")] if "#" in chain else chain, path)
            if key == "BOUNDARY" and current.boundary is None:
                current.boundary = points
            else:
                current.cores.append(points)
    return result


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


def _roughness(words: np.ndarray) -> float:
    sample = words[:: max(1, words.shape[0] // 256), :: max(1, words.shape[1] // 256)].astype(np.float64)
    return float(np.abs(np.diff(sample, axis=1)).mean()) if sample.shape[1] > 1 else 0.0


def unswap_words(words: np.ndarray, bits: int) -> tuple[np.ndarray, bool]:
    """Undo the byte swap of DDSM's 16-bit words when present; returns (words, swapped)."""
    words = words.astype(np.uint16, copy=False)
    if words.size == 0:
        return words, False
    swapped = words.byteswap()
    if bits < 16:
        if int(words.max()) >= (1 << bits) and int(swapped.max()) < (1 << bits):
            return swapped, True
        return words, False
    if _roughness(swapped) < _roughness(words):
        return swapped, True
    return words, False


def _ljpeg_decoders() -> list[tuple[str, Callable[[bytes], np.ndarray]]]:
    """Installed lossless-JPEG decoders, best first: imagecodecs (liblj92, jpegsof3), libjpeg, libjpeg-turbo."""
    found: list[tuple[str, Callable[[bytes], np.ndarray]]] = []
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    for name in ("ljpeg_decode", "jpegsof3_decode"):
        if imagecodecs is not None and hasattr(imagecodecs, name):
            found.append((f"imagecodecs.{name}", getattr(imagecodecs, name)))
    try:
        import libjpeg  # pylibjpeg-libjpeg, Thomas Richter's libjpeg: the best-maintained LJPEG decoder
    except ImportError:
        libjpeg = None
    if libjpeg is not None:
        found.append(("libjpeg.decode", libjpeg.decode))
    if imagecodecs is not None and hasattr(imagecodecs, "jpeg8_decode"):
        found.append(("imagecodecs.jpeg8_decode", imagecodecs.jpeg8_decode))
    return found


def decode_ljpeg(path: str | Path, rows: int, cols: int, bits: int) -> np.ndarray:
    """Decode a DDSM .LJPEG (lossless JPEG) to uint16 grey levels of shape (rows, cols) from the .ics."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"DDSM LJPEG file not found: {path}")
    data = path.read_bytes()
    errors = []
    decoded = None
    for name, func in _ljpeg_decoders():
        try:
            decoded = np.asarray(func(data))
            break
        except Exception as exc:  # noqa: BLE001 - try the next decoder
            errors.append(f"{name}: {exc}")
    if decoded is None:
        hint = "; ".join(errors) or "no decoder installed: `pip install imagecodecs` or `pip install pylibjpeg-libjpeg`"
        raise DataError(f"{path}: no installed decoder reads this lossless JPEG ({hint})")
    decoded = np.squeeze(decoded)
    if decoded.shape != (rows, cols):
        if decoded.size != rows * cols:
            raise DataError(
                f"{path}: decoded {decoded.shape} but the .ics says {rows} rows x {cols} cols"
            )
        decoded = decoded.reshape(rows, cols)
    words, _ = unswap_words(decoded, bits)
    return words


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


def overlay_lesions(overlay: Path, frame_shape: tuple[int, int]) -> list[Lesion]:
    """Lesions of one .OVERLAY file, outlines in the .ics frame (``meta['frame_shape']``)."""
    lesions = []
    for abn in parse_overlay(overlay):
        outline = None
        if abn.boundary is not None:
            outline = tuple((int(x), int(y)) for x, y in abn.boundary)
        lesions.append(
            Lesion(
                kind=abn.kind,
                pathology=abn.pathology,
                outline=outline,
                meta={
                    "frame_shape": frame_shape,
                    "abnormality": abn.index,
                    "lesion_type": abn.lesion_type,
                    "lesion_types": abn.lesion_types,
                    "assessment": abn.assessment,
                    "subtlety": abn.subtlety,
                    "cores": [tuple(map(tuple, c.tolist())) for c in abn.cores],
                    "overlay_path": str(overlay),
                },
            )
        )
    return lesions


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
