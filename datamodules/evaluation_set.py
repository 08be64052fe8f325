"""The evaluation set: whole scans with their breast and lesion masks, the scoring grid and its patches.

Lesion images (test, lesion validation) are preprocessed, selected by the test-set rule
(`grids.select_test_image`) and cached once as one ``.npz`` per selected image under
``<cache>/eval-<name>-<test_set>-<key>/`` (``DONE.json`` lists the files with checksums, ``selection.json``
says why each candidate was kept or left out). Predict and calibration images are read on access.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.batches import ScanItem, SkippedScan, check_scan_item
from datamodules.caches import CacheFolder, listing_fingerprint, readable
from datamodules.fileio import dumps_json, file_sha256, read_json
from datamodules.grids import (
    SelectionDecision,
    extract_patches,
    grid_centers,
    patch_context,
    select_test_image,
    write_selection_report,
)
from datamodules.patches import check_patchable, to_uint8
from datamodules.preprocessing import PreprocessedImage, preprocess_record
from datamodules.records import DataError, ImageRecord
from datamodules.sources import lesion_kind

log = logging.getLogger(__name__)

EVAL_CACHE_FORMAT = 2  # 2: item meta carries MIAS density (background tissue F / G / D)


def _item_meta(record: ImageRecord, meta: dict[str, Any], kind: str | None) -> dict[str, Any]:
    lesion_types = sorted({lesion.kind for lesion in record.lesions})
    pathologies = sorted({str(lesion.pathology) for lesion in record.lesions if lesion.pathology})
    return {
        "density": meta.get("density"),
        "lesion_type": kind if kind and kind in lesion_types else (",".join(lesion_types) or None),
        "pathology": meta.get("pathology") or (",".join(pathologies) or None),
        "side": meta.get("side"),
        "view": meta.get("view"),
        "source_path": str(record.path),
        "has_pixel_annotation": bool(record.has_pixel_annotation and record.lesions),
        **{k: meta[k] for k in ("native_spacing_mm", "native_shape", "spacing_source") if k in meta},
    }


class EvaluationDataset(Dataset):
    """Evaluation items, one image each: from cached ``.npz`` files or read from records on access.

    Each item is a checked `batches.ScanItem` (the contract; a `batches.SkippedScan` for an unreadable
    predict file). Scans are quantised to uint8 like the training patches, so a model sees the same grey
    levels in training and evaluation.
    """

    def __init__(
        self,
        items: Sequence[Path | ImageRecord],
        stride: int = 16,
        patch_size: int = 64,
        spacing_mm: float = 0.2,
        kind: str | None = None,
        remove_pectoral: bool = False,
        skip_unreadable: bool = False,
        contralateral: Mapping[str, ImageRecord] | None = None,
    ) -> None:
        self.items = list(items)
        self.contralateral = dict(contralateral or {})
        self.skip_unreadable = skip_unreadable
        self.stride = int(stride)
        self.patch_size = int(patch_size)
        self.spacing_mm = float(spacing_mm)
        self.kind = kind
        self.remove_pectoral = remove_pectoral

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, entry: Path | ImageRecord, kind: str | None = None) -> dict[str, Any]:
        if isinstance(entry, ImageRecord):
            pre = preprocess_record(entry, self.spacing_mm, self.remove_pectoral, with_lesions=kind is not None)
            lesion = pre.lesion_masks.get(kind) if kind else None
            return {
                "image_id": entry.image_id,
                "patient_id": entry.patient_id,
                "image": to_uint8(pre.image),
                "breast_mask": pre.breast_mask,
                "lesion_mask": lesion if lesion is not None else np.zeros_like(pre.breast_mask),
                "spacing_mm": pre.spacing_mm,
                "meta": _item_meta(entry, pre.meta, kind),
            }
        with np.load(entry, allow_pickle=False) as z:
            return {
                "image_id": str(z["image_id"]),
                "patient_id": str(z["patient_id"]),
                "image": z["image"],
                "breast_mask": z["breast_mask"],
                "lesion_mask": z["lesion_mask"],
                "spacing_mm": float(z["spacing_mm"]),
                "meta": json.loads(str(z["meta"])),
            }

    def _skipped(self, entry: Path | ImageRecord, reason: str) -> SkippedScan:
        """The item of an image that could not be read: no patches, ``skipped`` = the one-line reason."""
        path = entry.path if isinstance(entry, ImageRecord) else entry
        return {
            "image_id": entry.image_id if isinstance(entry, ImageRecord) else Path(entry).stem,
            "skipped": reason,
            "source_path": str(path),
            "centers": torch.zeros(0, 2, dtype=torch.int64),
            "context": torch.zeros(0, 2),
            "patches": torch.zeros(0, 1, self.patch_size, self.patch_size),
        }

    def __getitem__(self, index: int) -> ScanItem | SkippedScan:
        """One evaluation item; with ``skip_unreadable`` (predict) a `DataError` gives a skipped item instead.

        An image whose other breast is known (``contralateral``, `sources.contralateral_pairs`) carries that
        image's item under ``"contralateral"`` (no lesion mask); an unreadable other breast is reported in one line
        and the image is scored alone.
        """
        try:
            raw = self._load(self.items[index], self.kind)
        except DataError as err:
            if not self.skip_unreadable:
                raise
            return self._skipped(self.items[index], str(err))
        item = self._grid_item(raw)
        other = self.contralateral.get(raw["image_id"])
        if other is not None:
            try:
                item["contralateral"] = self._grid_item(self._load(other))
            except DataError as err:
                log.warning("%s: its other breast %s is unreadable, so it is scored alone: %s",
                            raw["image_id"], other.image_id, err)
        return check_scan_item(item, self.patch_size)

    def _grid_item(self, raw: dict[str, Any]) -> dict[str, Any]:
        image = raw["image"].astype(np.float32) / 255.0
        breast = raw["breast_mask"].astype(bool)
        centers = grid_centers(breast, self.stride)
        patches = extract_patches(image, centers, self.patch_size)
        context = patch_context(breast, centers)
        return {
            "image_id": raw["image_id"],
            "patient_id": raw["patient_id"],
            "scan": torch.from_numpy(image),
            "breast_mask": torch.from_numpy(breast),
            "lesion_mask": torch.from_numpy(raw["lesion_mask"].astype(bool)),
            "centers": torch.from_numpy(centers),
            "context": torch.from_numpy(context),
            "patches": torch.from_numpy(patches).unsqueeze(1),
            "spacing_mm": raw["spacing_mm"],
            "stride": self.stride,
            "meta": raw["meta"],
        }


def open_evaluation_cache(path: Path) -> dict[str, Any]:
    """The ``DONE.json`` of a complete evaluation cache after checking every listed file against its checksum;
    `DataError` naming the first damaged file otherwise."""
    done = path / "DONE.json"
    if not done.is_file():
        raise DataError(f"{done}: missing, so {path} is not a complete evaluation cache")
    try:
        info = read_json(done)
        files, digests, _ = info["files"], info.get("sha256", {}), info["summary"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{done}: damaged evaluation cache marker ({err})") from None
    for name in [*files, "selection.json"]:
        file = path / name
        if not file.is_file():
            raise DataError(f"{file}: listed in {done.name} but missing")
        if name in digests and file_sha256(file) != digests[name]:
            raise DataError(f"{file}: checksum differs from {done.name} (truncated, overwritten or corrupted)")
    return info


def _report_skipped(skipped: list[dict[str, str]], n_records: int, name: str, report: object) -> None:
    """Warns with the count and the first reasons of images left out as unreadable (at build and at reuse)."""
    if not skipped:
        return
    first = "; ".join(f"{s['path']}: {s['error']}" for s in skipped[:3])
    log.warning("%d of %d %s images skipped (unreadable; listed in %s): %s", len(skipped), n_records, name, report, first)


def build_evaluation_cache(
    records: Sequence[ImageRecord],
    cache_root: str | Path,
    test_set: str,
    *,
    name: str = "test",
    spacing_mm: float = 0.2,
    patch_size: int = 64,
    max_lesion_area_patches: float = 4,
    remove_pectoral: bool = False,
    extra_key: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[Path], dict[str, Any]]:
    """Preprocesses, selects (the test-set rule) and caches lesion images once; returns (npz paths, summary).

    The selection report (every candidate, selected or not and why) is ``<cache>/selection.json``.
    """
    kind = lesion_kind(test_set)
    lesion_fp = hashlib.sha256(
        "".join(repr([(x.kind, str(x.mask_path), x.outline, x.circle) for x in r.lesions]) for r in records).encode()
    ).hexdigest()
    params = {
        "format": EVAL_CACHE_FORMAT,
        "name": name,
        "test_set": test_set,
        "spacing_mm": float(spacing_mm),
        "patch_size": int(patch_size),
        "max_lesion_area_patches": float(max_lesion_area_patches),
        "remove_pectoral": bool(remove_pectoral),
        "normalisation": "background-median/breast-p99.5, uint8",
        "listing": listing_fingerprint(records),
        "lesions": lesion_fp,
        **(extra_key or {}),
    }
    folder = CacheFolder(cache_root, f"eval-{name}-{test_set}", params, open_evaluation_cache, "evaluation cache")
    report = folder.path / "selection.json"
    info = folder.reuse()
    if info is not None:
        rank_zero_info("evaluation cache reused: %s (%d images)", folder.path, len(info["files"]))
        _report_skipped(info["summary"].get("skipped", []), len(records), name, report)
        return [folder.path / f for f in info["files"]], info["summary"]

    def prepare(record: ImageRecord) -> PreprocessedImage:
        pre = preprocess_record(record, spacing_mm, remove_pectoral, with_lesions=True)
        check_patchable(pre, patch_size, record.path)
        return pre

    with folder.building() as tmp:
        decisions: list[SelectionDecision] = []
        files: list[str] = []
        skipped: list[dict[str, str]] = []
        for record, pre in readable(records, prepare, skipped, f"{name} images", progress):
            lesion = pre.lesion_masks.get(kind)
            decision = select_test_image(
                record.image_id, record.patient_id, lesion, pre.breast_mask, kind,
                has_pixel_annotation=record.has_pixel_annotation,
                max_lesion_area_patches=max_lesion_area_patches, patch_size=patch_size,
            )
            decisions.append(decision)
            if not decision.selected:
                continue
            fname = f"{len(files):05d}.npz"
            np.savez(
                tmp / fname,
                image_id=np.array(record.image_id),
                patient_id=np.array(record.patient_id),
                image=to_uint8(pre.image),
                breast_mask=pre.breast_mask,
                lesion_mask=lesion,
                spacing_mm=np.array(pre.spacing_mm),
                meta=np.array(dumps_json(_item_meta(record, pre.meta, kind), indent=None)),
            )
            files.append(fname)
        _report_skipped(skipped, len(records), name, report)
        summary = write_selection_report(decisions, tmp / "selection.json", skipped)
        summary["report"] = str(report)
        info = {"key": folder.key, "params": params, "files": files, "summary": summary, "skipped": skipped}
        folder.publish(tmp, info, [*files, "selection.json"])
    rank_zero_info(f"{name} set ({test_set}): {summary['selected']} of {len(records)} images selected; excluded "
                   f"by reason: {summary['excluded_by_reason'] or 'none'}; report {report}")
    return [folder.path / f for f in files], summary


class EvaluationDataModule(pl.LightningDataModule):
    """Test images (selected by the test-set rule, cached), lesion validation images, and predict files."""

    def __init__(
        self,
        test_records: Sequence[ImageRecord] = (),
        lesion_validation_records: Sequence[ImageRecord] = (),
        predict_records: Sequence[ImageRecord] = (),
        test_set: str = "mass",
        cache_dir: str | Path = "cache",
        pixel_spacing_mm: float = 0.2,
        patch_size: int = 64,
        stride: int = 16,
        max_lesion_area_patches: float = 4,
        num_workers: int = 0,
        remove_pectoral: bool = False,
        cache_key_extra: dict[str, Any] | None = None,
        progress: bool = True,
        contralateral: Mapping[str, ImageRecord] | None = None,
    ) -> None:
        super().__init__()
        lesion_kind(test_set)
        self.contralateral = dict(contralateral or {})
        self.test_records = list(test_records)
        self.lesion_validation_records = list(lesion_validation_records)
        self.predict_records = list(predict_records)
        self.test_set = test_set
        self.cache_dir = Path(cache_dir)
        self.pixel_spacing_mm = pixel_spacing_mm
        self.patch_size = patch_size
        self.stride = stride
        self.max_lesion_area_patches = max_lesion_area_patches
        self.num_workers = num_workers
        self.remove_pectoral = remove_pectoral
        self.cache_key_extra = cache_key_extra or {}
        self.progress = progress
        self._caches: dict[str, tuple[list[Path], dict[str, Any]]] = {}
        self._datasets: dict[str, EvaluationDataset] = {}

    def _lesion_records(self, name: str) -> list[ImageRecord]:
        if name not in ("test", "lesion_validation"):
            raise KeyError(f"unknown evaluation set {name!r}")
        records = self.test_records if name == "test" else self.lesion_validation_records
        if not records:
            raise DataError(f"the data source lists no {name.replace('_', ' ')} images for test_set "
                            f"{self.test_set!r}; check data.root and data.source")
        return records

    def cached_items(self, name: str) -> tuple[list[Path], dict[str, Any]]:
        """(item files, selection summary) of lesion set ``name`` (``"test"`` or ``"lesion_validation"``):
        `build_evaluation_cache` of its records, run once per module."""
        if name not in self._caches:
            self._caches[name] = build_evaluation_cache(
                self._lesion_records(name), self.cache_dir, self.test_set, name=name,
                spacing_mm=self.pixel_spacing_mm, patch_size=self.patch_size,
                max_lesion_area_patches=self.max_lesion_area_patches, remove_pectoral=self.remove_pectoral,
                extra_key=self.cache_key_extra, progress=self.progress,
            )
        return self._caches[name]

    def selection(self, name: str) -> dict[str, Any]:
        """The selection summary of lesion set ``name``: counts selected / excluded by reason / unreadable."""
        return self.cached_items(name)[1]

    def selection_summary(self) -> dict[str, dict[str, Any]]:
        """Selection summaries of the lesion sets built so far (nothing is built to answer)."""
        return {name: summary for name, (_, summary) in self._caches.items()}

    def dataset(self, name: str) -> EvaluationDataset:
        """The evaluation dataset ``"test"``, ``"lesion_validation"`` or ``"predict"`` (built on first use)."""
        if name in self._datasets:
            return self._datasets[name]
        common = dict(stride=self.stride, patch_size=self.patch_size, spacing_mm=self.pixel_spacing_mm,
                      remove_pectoral=self.remove_pectoral, contralateral=self.contralateral)
        if name == "predict":
            if not self.predict_records:
                raise DataError("nothing to predict: set data.predict_path to an image file or folder")
            ds = EvaluationDataset(self.predict_records, kind=None, skip_unreadable=True, **common)
        else:
            files, summary = self.cached_items(name)
            if not files and name == "test":  # a test of nothing would write results that mean nothing
                excluded = summary.get("excluded_by_reason") or {}
                raise DataError(
                    f"no evaluable {name.replace('_', ' ')} images: {len(self._lesion_records(name))} listed, "
                    f"{summary.get('skipped_unreadable', 0)} unreadable, {summary.get('excluded', 0)} excluded "
                    f"by the test-set rule ({excluded or 'none'}); see {summary.get('report')}")
            ds = EvaluationDataset(files, kind=lesion_kind(self.test_set), **common)
        self._datasets[name] = ds
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            self.dataset("test")
        elif stage == "predict" and self.predict_records:
            self.dataset("predict")

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(self.dataset(name), batch_size=None, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def lesion_validation_dataloader(self) -> DataLoader:
        """Lesion images of the validation split (never the test set), for AUC curves during fit."""
        return self._loader("lesion_validation")

