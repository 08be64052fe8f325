"""The two structures models and data meet through, defined once: `PatchBatch` (training / validation)
and `ScanItem` (test / predict / calibration / lesion validation). Their docstrings are the contract.

Why typed dicts and not dataclasses: a batch is built in DataLoader workers, moved to the device by
Lightning, read by `lightning_modules` (which may not import `datamodules`: models and data meet only
through the batch, see ARCHITECTURE "Which way the imports run") and by `experiments`, and built by
hand in tests and benchmarks. A ``TypedDict`` states its keys, shapes and dtypes here, once, for type
checkers and readers, while the object stays the plain mapping each of those already handles; a model
reads it by key (``batch["patches"]``) without importing this module. The check is explicit at the
boundary instead: the datasets pass every batch they produce through `check_patch_batch` /
`check_scan_item`, which raise one line naming the missing or malformed key.

Names: ``patches`` is always a float32 N x 1 x P x P stack in [0, 1] (what ``score_patches`` takes), in
both structures; ``centers`` always int64 rows of (row, column) patch centres at evaluation spacing; the
whole mammogram of a scan item is ``scan`` (never ``image``, which used to mean both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import Tensor
from typing_extensions import NotRequired  # typing's from Python 3.11; a torch dependency


class PatchBatch(TypedDict):
    """A batch of N cached healthy patches (`patches.PatchDataset`, collated by `patches.collate_patch_batch`).

    - ``patches``: float32 N x 1 x P x P in [0, 1] (uint8 cache value / 255), P = ``data.patch_size``;
    - ``index``: int64 N, each patch's position in the patch cache (the RAT-SPN stage caches latents by it);
    - ``centers``: int64 N x 2, (row, column) of each patch centre in its image at evaluation spacing;
    - ``context``: float32 N x 2, `grids.patch_context` of each centre (px to the skin line, to the chest wall);
    - ``patient_id``: list of N str;
    - ``label``: int64 N (0 = healthy; every training patch is healthy).
    """

    patches: Tensor
    index: Tensor
    centers: Tensor
    context: Tensor
    patient_id: list[str]
    label: Tensor


class GridPatches(TypedDict):
    """What every evaluation item has, readable or not: the scoring grid of one image.

    - ``image_id``: str;
    - ``centers``: int64 M x 2, the grid (every ``stride`` px inside the breast, `grids.grid_centers`);
    - ``patches``: float32 M x 1 x P x P in [0, 1], reflect-padded at the image edge (`grids.extract_patches`);
    - ``context``: float32 M x 2, `grids.patch_context` of each centre.
    """

    image_id: str
    centers: Tensor
    patches: Tensor
    context: Tensor


class ScanItem(GridPatches):
    """One whole mammogram at evaluation spacing with its grid (`evaluation_set.EvaluationDataset`; one item
    per DataLoader batch, ``batch_size=None``). Besides the `GridPatches` keys:

    - ``patient_id``: str;
    - ``scan``: float32 H x W in [0, 1], quantised to uint8 levels like the training patches;
    - ``breast_mask``, ``lesion_mask``: bool H x W (the lesion mask is all False for healthy / predict scans);
    - ``spacing_mm``: float (the evaluation spacing); ``stride``: int (grid step, px);
    - ``meta``: dict (``density``, ``lesion_type``, ``pathology``, ``side``, ``view``, ``source_path``,
      ``has_pixel_annotation``, native spacing and shape when known);
    - ``contralateral`` (only where the other breast's image of the same woman and view is known and asked for,
      ``data.with_contralateral``): that image's `ScanItem` (its lesion mask all False), for bilateral scoring.
    """

    patient_id: str
    scan: Tensor
    breast_mask: Tensor
    lesion_mask: Tensor
    spacing_mm: float
    stride: int
    meta: dict[str, Any]
    contralateral: NotRequired[ScanItem]


class SkippedScan(GridPatches):
    """A predict image that could not be read: empty grid (M = 0), ``skipped`` = the one-line reason,
    ``source_path`` = its file. Scorers score nothing; the prediction writer reports it."""

    skipped: str
    source_path: str


def _fail(where: str, key: str, expected: str, value: Any = None, missing: bool = False) -> None:
    got = "missing" if missing else f"got {_describe(value)}"
    raise ValueError(f"{where}: {key!r} must be {expected}, {got}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _tensor(where: str, batch: Mapping, key: str, dtype: torch.dtype, shape: tuple[int | None, ...]) -> Tensor:
    """``batch[key]`` when it is a ``dtype`` tensor of ``shape`` (None = any size); one-line error otherwise."""
    expected = f"{str(dtype).replace('torch.', '')} {' x '.join('?' if s is None else str(s) for s in shape)}"
    if key not in batch:
        _fail(where, key, expected, missing=True)
    value = batch[key]
    ok = isinstance(value, Tensor) and value.dtype == dtype and value.dim() == len(shape)
    if ok and any(s is not None and s != d for s, d in zip(shape, value.shape)):
        ok = False
    if not ok:
        _fail(where, key, expected, value)
    return value


def _grid(where: str, item: Mapping, patch_size: int | None) -> int:
    patches = _tensor(where, item, "patches", torch.float32, (None, 1, patch_size, patch_size))
    m = patches.shape[0]
    _tensor(where, item, "centers", torch.int64, (m, 2))
    _tensor(where, item, "context", torch.float32, (m, 2))
    return m


def check_patch_batch(batch: Mapping, patch_size: int | None = None) -> PatchBatch:
    """``batch`` as a `PatchBatch` after checking every key's type and shape (``patch_size`` None: any P)."""
    where = "patch batch"
    if not isinstance(batch, Mapping):
        raise ValueError(f"{where}: must be a mapping with keys {sorted(PatchBatch.__annotations__)}, "
                         f"got {type(batch).__name__}")
    n = _grid(where, batch, patch_size)
    _tensor(where, batch, "index", torch.int64, (n,))
    _tensor(where, batch, "label", torch.int64, (n,))
    ids = batch.get("patient_id")
    if not isinstance(ids, list) or len(ids) != n:
        _fail(where, "patient_id", f"a list of {n} str", ids, missing="patient_id" not in batch)
    return batch  # type: ignore[return-value]


def check_scan_item(item: Mapping, patch_size: int | None = None) -> ScanItem | SkippedScan:
    """``item`` as a `ScanItem` (or a `SkippedScan`) after checking every key's type and shape."""
    if not isinstance(item, Mapping):
        raise ValueError(f"scan item: must be a mapping with keys {sorted(ScanItem.__annotations__)}, "
                         f"got {type(item).__name__}")
    where = f"scan item {item.get('image_id')!r}"
    _grid(where, item, patch_size)
    if "skipped" in item:
        return item  # type: ignore[return-value]
    scan = _tensor(where, item, "scan", torch.float32, (None, None))
    h, w = scan.shape
    _tensor(where, item, "breast_mask", torch.bool, (h, w))
    _tensor(where, item, "lesion_mask", torch.bool, (h, w))
    for key, kind in (("image_id", str), ("patient_id", str), ("meta", dict), ("stride", int), ("spacing_mm", float)):
        if not isinstance(item.get(key), kind):
            _fail(where, key, f"a {kind.__name__}", item.get(key), missing=key not in item)
    other = item.get("contralateral")
    if other is not None:
        if not isinstance(other, Mapping) or "skipped" in other:
            _fail(where, "contralateral", "the scan item of the other breast", other)
        check_scan_item(other, patch_size)
    return item  # type: ignore[return-value]


__all__ = ["GridPatches", "PatchBatch", "ScanItem", "SkippedScan", "check_patch_batch", "check_scan_item"]
