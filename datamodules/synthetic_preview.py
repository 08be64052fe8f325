"""Contact sheet of a synthetic set: a few test-set lesion images at 0.2 mm, their ROI masks outlined in red.

``mammospn synth --preview`` writes it (`write_preview`); it only reads a finished set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pydicom

from datamodules.fileio import atomic_write_with
from datamodules.records import DataError
from datamodules.synthetic_difficulty import to_eval_spacing


def _find_cbis_files(case_root: Path, full_shape: tuple[int, int]) -> np.ndarray | None:
    """The ROI mask in an abnormality folder: the DICOM of the full image's size holding only 0 and 255."""
    for path in sorted(case_root.rglob("*.dcm")):
        array = pydicom.dcmread(path).pixel_array
        if array.shape == full_shape and set(np.unique(array).tolist()) <= {0, 255}:
            return array > 0
    return None


def write_preview(root: str | Path, out_png: str | Path, n_mass: int = 4, n_calc: int = 2) -> Path:
    """Contact sheet (PNG) of a few test-set lesion images at 0.2 mm with their ROI masks outlined in red."""
    root = Path(root)
    tiles: list[np.ndarray] = []
    for kind, count in (("mass", n_mass), ("calc", n_calc)):
        csv_path = root / "cbis-ddsm" / "csv" / f"{kind}_case_description_test_set.csv"
        if not csv_path.is_file():
            raise DataError(f"{csv_path} not found: {root} is not a synthetic set (run `mammospn synth` first)")
        with open(csv_path, newline="") as handle:
            records = list(csv.DictReader(handle))
        seen: list[str] = []
        for rec in records:
            full_rel = rec["image file path"].strip()
            if full_rel in seen:
                continue
            seen.append(full_rel)
            if len(seen) > count:
                break
            dicom_root = root / "cbis-ddsm" / "CBIS-DDSM"
            full = pydicom.dcmread(dicom_root / full_rel).pixel_array
            image = to_eval_spacing(full.astype(np.float32) / 65535.0)
            tile = cv2.cvtColor(np.clip(image * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            case = full_rel.split("/")[0]
            for abn in (r for r in records if r["image file path"].strip() == full_rel):
                mask = _find_cbis_files(dicom_root / f"{case}_{abn['abnormality id']}", full.shape)
                if mask is not None:
                    small = to_eval_spacing(mask, nearest=True).astype(np.uint8)
                    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                    cv2.drawContours(tile, contours, -1, (0, 0, 255), 1)
            cv2.putText(tile, case, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
    if not tiles:
        raise DataError(f"no lesion images found under {root / 'cbis-ddsm'} to preview")
    height = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, height - t.shape[0], 0, 4, cv2.BORDER_CONSTANT) for t in tiles]
    per_row = 3
    strips = [np.hstack(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
    width = max(strip.shape[1] for strip in strips)
    sheet = np.vstack([cv2.copyMakeBorder(s, 0, 4, 0, width - s.shape[1], cv2.BORDER_CONSTANT) for s in strips])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_with(out_png, lambda tmp: cv2.imwrite(str(tmp), sheet))
    except OSError as err:
        raise DataError(f"could not write the preview image {out_png}") from err
    return out_png
