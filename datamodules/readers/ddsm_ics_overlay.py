"""DDSM's text files: the ``.ics`` case header and the ``.OVERLAY`` lesion annotations.

- ``.ics``: one line per view gives LINES (rows), PIXELS_PER_LINE (cols), BITS_PER_PIXEL, RESOLUTION
  (microns); plus DENSITY, DIGITIZER, the case file name (site letter + case number).
- ``.OVERLAY``: abnormalities with LESION_TYPE (+ attributes), ASSESSMENT, SUBTLETY, PATHOLOGY and
  BOUNDARY / CORE chain codes; the filled BOUNDARY polygon is the lesion mask (`overlay_lesions`).
Used by the DDSM and MINI-DDSM readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.records import DataError, Lesion

#: The four views an .ics header may list.
VIEWS = ("LEFT_CC", "LEFT_MLO", "RIGHT_CC", "RIGHT_MLO")
#: Chain-code steps 0..7 = N, NE, E, SE, S, SW, W, NW as (dx, dy), x = column, y = row (top-left origin).
CHAIN_STEPS = np.array([(0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)], dtype=np.int64)
#: DDSM lesion types -> the project's lesion kinds.
KIND_OF_TYPE = {"MASS": "mass", "CALCIFICATION": "calcification"}


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
