"""Healthy training patches: seeded sampling (inside the breast and on its contour), a memory-mapped
on-disk cache keyed by every parameter that shapes it, the patient-wise split and the dataset serving it.

Cache layout, one folder per key under the cache root: ``patches-<key>/``
``patches.u8`` (raw uint8, N x size x size; value / 255 = the [0, 1] image), ``index.npz`` (per patch:
``image`` and ``patient`` numbers, ``center`` row/col at evaluation spacing, ``label``, ``on_contour``),
``DONE.json`` (parameters, image and patient lists, skipped files; written last). Built, checked and
swapped in through `caches.CacheFolder`, the skeleton it shares with the evaluation cache.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from datamodules.batches import PatchBatch, check_patch_batch
from datamodules.caches import (  # noqa: F401 - publish_cache, remove_stale_builds, with_progress: re-exported
    # (the patch cache's API before the skeleton moved to caches)
    CacheFolder,
    listing_fingerprint,
    publish_cache,
    readable,
    remove_stale_builds,
    with_progress,
)
from datamodules.fileio import file_sha256, read_json
from datamodules.grids import extract_patches, film_cut, patch_context
from datamodules.preprocessing import PreprocessedImage, preprocess_record
from datamodules.records import DataError, ImageRecord

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the cache layout or the sampling code changes meaning


def contour_mask(breast: np.ndarray) -> np.ndarray:
    """The breast's skin line: mask pixels with a background 4-neighbour; the image edge does not count."""
    u8 = breast.astype(np.uint8)
    eroded = cv2.erode(u8, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return breast & (eroded == 0)


def sample_centers(
    breast: np.ndarray,
    n_inside: int = 60,
    n_contour: int = 60,
    rng: np.random.Generator | None = None,
    inner_margin_px: int = 8,
    contour_edge: bool = False,
    contour_band_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patch centres: ``n_inside`` in the breast (at least ``inner_margin_px`` from the skin line
    where possible) and ``n_contour`` on the skin line. Returns (centres int64 K x 2, on_contour bool K).
    ``contour_edge``: the film cut (`grids.film_cut`: the straight chest-wall line, next to the image edge or
    black padding, and the breast on the image edge) counts as contour too, so patches there are as common
    in training as at test.
    ``contour_band_px`` > 0: the contour patches are drawn from the breast pixels closer than that to the
    contour, not from the line itself. The evaluation grid puts patch centres at every offset from the
    breast border, while line sampling (offset 0) plus the inner margin leave offsets 1 .. margin unseen,
    and the bands a few pixels from a sharp film cut rare: those patches then score as anomalies of
    their own (measured on mini-MIAS, README "Border-aware scoring").
    Draws without replacement unless a region has fewer pixels than asked for.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    breast = np.asarray(breast, dtype=bool)
    if not breast.any():
        raise DataError("cannot sample patches from an empty breast mask")
    inner = breast
    if inner_margin_px > 0:
        k = 2 * inner_margin_px + 1
        eroded = cv2.erode(breast.astype(np.uint8), np.ones((k, k), np.uint8), borderType=cv2.BORDER_REPLICATE)
        if eroded.any():
            inner = eroded.astype(bool)
    contour = contour_mask(breast)
    if contour_edge:
        contour = contour | film_cut(breast)
    if not contour.any():  # the breast fills the image: no skin line, use its border instead
        contour = breast
    elif contour_band_px > 0:
        # exact Euclidean distance of every pixel to the nearest contour pixel (cv2: to the nearest zero)
        to_line = cv2.distanceTransform((~contour).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        contour = breast & (to_line < float(contour_band_px))
    parts = []
    for region, n in ((inner, n_inside), (contour, n_contour)):
        coords = np.argwhere(region)
        pick = rng.choice(len(coords), size=n, replace=len(coords) < n) if n else np.zeros(0, np.int64)
        parts.append(coords[pick])
    centers = np.concatenate(parts).astype(np.int64)
    on_contour = np.zeros(len(centers), dtype=bool)
    on_contour[n_inside:] = True
    return centers, on_contour


def to_uint8(patches: np.ndarray) -> np.ndarray:
    """[0, 1] floats to the cache's uint8 (round to nearest)."""
    return np.clip(np.rint(np.asarray(patches, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator for one image: depends on the seed and the image id only, not the listing order."""
    return np.random.default_rng([int(seed), zlib.crc32(image_id.encode())])


def check_patchable(pre: PreprocessedImage, patch_size: int, path: object) -> None:
    """Refuses (``DataError`` naming ``path``) an image smaller than one patch at evaluation spacing."""
    h, w = pre.image.shape[:2]
    if min(h, w) < patch_size:
        raise DataError(f"{path}: too small for one {patch_size} x {patch_size} px patch ({h} x {w} px at "
                        f"{pre.spacing_mm:g} mm)")


def image_patches(
    pre: PreprocessedImage, n_inside: int = 60, n_contour: int = 60, size: int = 64, seed: int = 0,
    contour_edge: bool = False, contour_band_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The healthy patches of one preprocessed image: (uint8 K x size x size, centres K x 2, on_contour K,
    context float32 K x 2 from `grids.patch_context`)."""
    centers, on_contour = sample_centers(pre.breast_mask, n_inside, n_contour, image_rng(seed, pre.image_id),
                                         contour_edge=contour_edge, contour_band_px=contour_band_px)
    context = patch_context(pre.breast_mask, centers)
    return to_uint8(extract_patches(pre.image, centers, size)), centers, on_contour, context


@dataclass
class PatchCache:
    """A complete patch cache on disk, opened read-only (the memmap opens lazily, once per process)."""

    path: Path
    info: dict[str, Any]
    image_index: np.ndarray
    patient_index: np.ndarray
    centers: np.ndarray
    labels: np.ndarray
    on_contour: np.ndarray
    context: np.ndarray  # float32 N x 2, `grids.patch_context` of each patch centre

    @property
    def patch_size(self) -> int:
        return int(self.info["params"]["patch_size"])

    @property
    def patients(self) -> list[str]:
        return list(self.info["patients"])

    def __len__(self) -> int:
        return int(self.info["num_patches"])

    def patch_patient_ids(self) -> np.ndarray:
        """Patient id of every patch (object array)."""
        return np.asarray(self.patients, dtype=object)[self.patient_index]

    def memmap(self) -> np.ndarray:
        """The uint8 N x size x size patches, memory-mapped read-only."""
        s = self.patch_size
        return np.memmap(self.path / "patches.u8", dtype=np.uint8, mode="r", shape=(len(self), s, s))

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> PatchCache:
        """Opens a complete cache folder, checked against its ``DONE.json`` (sizes, shapes, checksums).

        Raises `DataError` naming the damaged file (missing marker, unreadable index, truncated or
        overwritten patches) in one line; `build_patch_cache` then rebuilds the cache.
        """
        path = Path(path)
        done = path / "DONE.json"
        if not done.is_file():
            raise DataError(f"{done}: missing, so {path} is not a complete patch cache")
        try:
            info = read_json(done)
            num, size = int(info["num_patches"]), int(info["params"]["patch_size"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{done}: damaged patch cache marker ({err})") from None
        index = path / "index.npz"
        try:
            with np.load(index) as z:
                arrays = {k: z[k] for k in INDEX_KEYS}
        except Exception as err:  # noqa: BLE001 - BadZipFile, EOFError, KeyError, OSError: all "damaged"
            raise DataError(f"{index}: damaged patch cache index ({type(err).__name__}: {err})") from None
        lengths = {k: len(v) for k, v in arrays.items()}
        if set(lengths.values()) != {num} or arrays["center"].shape != (num, 2):
            raise DataError(f"{index}: index lengths {lengths} do not match {num} patches in {done.name}")
        data = path / "patches.u8"
        expected = num * size * size
        actual = data.stat().st_size if data.is_file() else -1
        if actual != expected:
            raise DataError(f"{data}: {max(actual, 0)} bytes, expected {expected} ({num} patches of {size} x {size})")
        if verify and "sha256" in info:
            for name, digest in info["sha256"].items():
                if file_sha256(path / name) != digest:
                    raise DataError(f"{path / name}: checksum differs from {done.name} (overwritten or corrupted)")
        return cls(path, info, arrays["image"], arrays["patient"], arrays["center"], arrays["label"],
                   arrays["on_contour"], arrays["context"])


#: per-patch arrays of ``index.npz``
INDEX_KEYS = ("image", "patient", "center", "label", "on_contour", "context")


def build_patch_cache(
    records: Sequence[ImageRecord],
    cache_root: str | Path,
    *,
    spacing_mm: float = 0.2,
    patch_size: int = 64,
    n_inside: int = 60,
    n_contour: int = 60,
    seed: int = 0,
    remove_pectoral: bool = False,
    contour_edge: bool = False,
    contour_band_px: float = 0.0,
    extra_key: dict[str, Any] | None = None,
    progress: bool = True,
    preprocess: Callable[[ImageRecord], PreprocessedImage] | None = None,
) -> PatchCache:
    """Returns the patch cache of ``records``, building it once; a changed parameter or listing gets a new key.

    ``extra_key`` adds caller parameters to the key (source name, root, normalisation...). Unreadable
    images are logged with their path and skipped; the count is logged at the end.
    """
    if not records:
        raise DataError("no healthy images to sample patches from; check the data source and root")
    params = {
        "format": CACHE_FORMAT,
        "spacing_mm": float(spacing_mm),
        "patch_size": int(patch_size),
        "n_inside": int(n_inside),
        "n_contour": int(n_contour),
        "seed": int(seed),
        "remove_pectoral": bool(remove_pectoral),
        "contour_edge": bool(contour_edge),
        "contour_band_px": float(contour_band_px),
        "normalisation": "background-median/breast-p99.5, uint8",
        "listing": listing_fingerprint(records),
        **(extra_key or {}),
    }
    folder = CacheFolder(cache_root, "patches", params, PatchCache.open, "patch cache")
    reused = folder.reuse()
    if reused is not None:
        rank_zero_info("patch cache reused: %s", folder.path)
        if reused.info.get("skipped"):
            rank_zero_warn(f"{len(reused.info['skipped'])} of {len(records)} healthy images were skipped as "
                           f"unreadable when the patch cache was built (listed in {folder.path / 'DONE.json'})")
        return reused
    if preprocess is None:

        def preprocess(r: ImageRecord) -> PreprocessedImage:
            return preprocess_record(r, spacing_mm, remove_pectoral=remove_pectoral, with_lesions=False)

    def prepare(record: ImageRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        pre = preprocess(record)
        check_patchable(pre, patch_size, record.path)
        return image_patches(pre, n_inside, n_contour, patch_size, seed, contour_edge, contour_band_px)

    with folder.building() as tmp:
        images: list[str] = []
        patients: list[str] = []
        patient_number: dict[str, int] = {}
        skipped: list[dict[str, str]] = []
        idx_image, idx_patient, centers_all, labels, contour_flags, contexts = [], [], [], [], [], []
        with open(tmp / "patches.u8", "wb") as out:
            for record, (patches, centers, on_contour, context) in readable(
                records, prepare, skipped, "healthy patches", progress
            ):
                out.write(patches.tobytes())
                number = patient_number.setdefault(record.patient_id, len(patients))
                if number == len(patients):
                    patients.append(record.patient_id)
                k = len(patches)
                idx_image.append(np.full(k, len(images), np.int32))
                idx_patient.append(np.full(k, number, np.int32))
                centers_all.append(centers)
                labels.append(np.full(k, int(record.label), np.int64))
                contour_flags.append(on_contour)
                contexts.append(context)
                images.append(record.image_id)
        if skipped:
            log.warning("%d of %d images skipped (unreadable); see %s", len(skipped), len(records),
                        folder.path / "DONE.json")
        if not images:
            raise DataError(f"none of the {len(records)} healthy images could be read; first error: "
                            f"{skipped[0]['path']}: {skipped[0]['error']}")
        np.savez(
            tmp / "index.npz",
            image=np.concatenate(idx_image),
            patient=np.concatenate(idx_patient),
            center=np.concatenate(centers_all),
            label=np.concatenate(labels),
            on_contour=np.concatenate(contour_flags),
            context=np.concatenate(contexts),
        )
        num = int(sum(len(a) for a in idx_image))
        info = {"key": folder.key, "params": params, "num_patches": num, "images": images, "patients": patients,
                "skipped": skipped}
        folder.publish(tmp, info, ("patches.u8", "index.npz"))
    rank_zero_info("patch cache built: %s (%d patches from %d images)", folder.path, num, len(images))
    return PatchCache.open(folder.path, verify=False)  # just written and hashed


def split_patients(patients: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[set[str], set[str]]:
    """Seeded patient-wise split: (train patients, validation patients); at least one each when >= 2 patients."""
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = int(round(val_fraction * len(unique)))
    if len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1) if val_fraction > 0 else 0
    val = {unique[i] for i in order[:n_val]}
    return set(unique) - val, val


def collate_patch_batch(batch: Any) -> Any:
    """Collate for `PatchDataset`: its ``__getitems__`` already returns a batch dict, passed on as is."""
    if isinstance(batch, dict):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)


class PatchDataset(Dataset):
    """Serves cached patches as training batches: ``__getitems__`` slices the memmap once per batch and
    returns a checked `batches.PatchBatch` (the contract). Use with ``collate_fn=collate_patch_batch``."""

    def __init__(self, cache: PatchCache, indices: np.ndarray | None = None) -> None:
        self.cache = cache
        self.indices = np.arange(len(cache), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self._data: np.ndarray | None = None
        self._patient_ids = cache.patients

    def __len__(self) -> int:
        return len(self.indices)

    def _memmap(self) -> np.ndarray:
        if self._data is None:
            self._data = self.cache.memmap()
        return self._data

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None  # each worker process maps the file itself
        return state

    def __getitems__(self, positions: Sequence[int]) -> PatchBatch:
        glob = np.sort(self.indices[np.asarray(positions, dtype=np.int64)])
        raw = self._memmap()[glob]
        patches = torch.from_numpy(raw).unsqueeze(1).float().div_(255.0)
        patients = self.cache.patient_index[glob]
        return check_patch_batch({
            "patches": patches,
            "index": torch.from_numpy(glob),
            "centers": torch.from_numpy(self.cache.centers[glob]),
            "context": torch.from_numpy(self.cache.context[glob]),
            "patient_id": [self._patient_ids[p] for p in patients],
            "label": torch.from_numpy(self.cache.labels[glob]),
        }, self.cache.patch_size)

    def __getitem__(self, position: int) -> dict[str, Any]:
        batch = self.__getitems__([position])
        return {k: (v[0] if not isinstance(v, list) else v[0]) for k, v in batch.items()}
