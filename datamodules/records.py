"""What every reader hands on: one record per mammogram, read lazily.

A *source* (DDSM, CBIS-DDSM, MINI-DDSM, mini-MIAS, a manifest, the synthetic set) lists
`ImageRecord`s; `datamodules.readers.read_image(record)` turns one into a `Mammogram` (pixels at
native spacing) and `datamodules.readers.lesion_masks(record, shape)` into boolean lesion masks.
Everything downstream (preprocessing, patches, evaluation grids) sees only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Lesion kinds used across sources (CBIS-DDSM "calcification", MIAS "CALC" ... are mapped to these).
LESION_KINDS = ("mass", "calcification", "other")


@dataclass(frozen=True)
class Lesion:
    """One annotated abnormality. Exactly one geometry field is set, in native pixels of its image.

    - ``mask_path``: a binary mask image (CBIS-DDSM ROI DICOM; a MINI-DDSM outline JPEG when
      ``mask_is_outline``, which is filled after thresholding);
    - ``outline``: closed polygon as ``((x, y), ...)`` (column, row), e.g. a DDSM ``.OVERLAY`` BOUNDARY;
    - ``circle``: ``(column, row, radius)`` with a top-left origin (MIAS coordinates already flipped).
    A lesion with no geometry (MIAS rows without coordinates) has ``has_geometry == False``.
    """

    kind: str
    pathology: str | None = None
    mask_path: Path | None = None
    mask_is_outline: bool = False
    outline: tuple[tuple[int, int], ...] | None = None
    circle: tuple[float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_geometry(self) -> bool:
        return self.mask_path is not None or self.outline is not None or self.circle is not None


@dataclass
class ImageRecord:
    """A mammogram as listed by a source; nothing is read until `read_image` is called.

    ``reader`` names the decoder (``"dicom"``, ``"image"`` for PNG/JPEG/PGM/TIFF, ``"ddsm"`` for
    LJPEG + .ics). ``spacing_mm`` is the dataset default used when the file itself carries none.
    ``meta`` holds what is known: ``side``, ``view``, ``density`` (BI-RADS 1-4), ``scanner``,
    ``pathology``, ``split``, ``source``.
    """

    image_id: str
    patient_id: str
    path: Path
    reader: str
    label: int = 0  # 0 = healthy, 1 = abnormal
    spacing_mm: float | None = None
    lesions: list[Lesion] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pixel_annotation(self) -> bool:
        """True when every lesion has a geometry, so pixel metrics can use this image."""
        return all(lesion.has_geometry for lesion in self.lesions)


@dataclass
class Mammogram:
    """Pixels at native spacing, bright = dense tissue (MONOCHROME2 convention), plus metadata.

    ``pixels`` keeps the decoder's dtype (uint8 / uint16, or float32 after a calibration such as the
    DDSM optical density); scaling to [0, 1] is preprocessing's job, done one documented way.
    """

    pixels: np.ndarray
    spacing_mm: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[:2])  # type: ignore[return-value]


class DataError(RuntimeError):
    """A user-fixable data problem; the message names the file or key and what to do."""
