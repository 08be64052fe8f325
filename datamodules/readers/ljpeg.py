"""DDSM's lossless JPEG (``.LJPEG``, ITU T.81 process 14): decoding and undoing the byte-swapped words.

`decode_ljpeg` tries the installed decoders best first (imagecodecs, then pylibjpeg-libjpeg, then
libjpeg-turbo through imagecodecs); the 16-bit words come out byte-swapped from the real files, which
`unswap_words` detects (values above 2**BITS_PER_PIXEL, or for 16-bit data the far rougher image) and undoes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from datamodules.records import DataError


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
