"""LightningDataModules: healthy training patches, evaluation images, and `MammographyDataModule`
combining them from one data config (``configs/data/*.yaml``).

Batches (contracts): training / validation = dicts of cached patches (see `PatchDataset`); test / predict /
lesion validation = one evaluation item per batch (DataLoader ``batch_size=None``), see `EvaluationDataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from datamodules.fileio import dumps_json, file_sha256, read_json, write_json
from datamodules.grids import (
    SelectionDecision,
    extract_patches,
    grid_centers,
    patch_context,
    select_test_image,
    write_selection_report,
)
from datamodules.patches import (
    PatchCache,
    PatchDataset,
    build_patch_cache,
    cache_key,
    check_patchable,
    collate_patch_batch,
    listing_fingerprint,
    open_verified,
    publish_cache,
    remove_stale_builds,
    split_patients,
    to_uint8,
    with_progress,
)
from datamodules.preprocessing import preprocess_record
from datamodules.records import DataError, ImageRecord

log = logging.getLogger(__name__)

#: test_set name -> lesion kind of `datamodules.readers.lesion_masks`
TEST_SET_KINDS = {"mass": "mass", "calc": "calcification"}
SOURCES = ("synthetic", "cbis_ddsm", "ddsm", "mini_ddsm", "mias", "manifest")
EVAL_CACHE_FORMAT = 2  # 2: item meta carries MIAS density (background tissue F / G / D)


class DataValueError(DataError, ValueError):
    """A data config value out of range; the message names the key (``data.init_args.x``) and what is allowed."""


def _check_values(**values: Any) -> None:
    """Refuses, before any work starts, a data value that cannot work; one line naming its key."""
    def fail(key: str, allowed: str) -> None:
        raise DataValueError(f"data.init_args.{key} must be {allowed}, got {values[key]!r}")

    if values["source"] not in SOURCES:
        fail("source", f"one of {', '.join(SOURCES)}")
    if values["test_set"] not in TEST_SET_KINDS:
        fail("test_set", f"one of {', '.join(TEST_SET_KINDS)}")
    for key in ("patch_size", "stride", "batch_size"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1:
            fail(key, "an integer >= 1")
    for key in ("patches_inside", "patches_contour", "num_workers", "eval_num_workers"):
        if not isinstance(values[key], int) or values[key] < 0:
            fail(key, "an integer >= 0")
    if values["patches_inside"] + values["patches_contour"] == 0:
        fail("patches_inside", "> 0 when patches_contour is 0 (no training patches otherwise)")
    for key in ("pixel_spacing_mm", "max_lesion_area_patches"):
        if not values[key] > 0:
            fail(key, "> 0")
    if not 0 < values["val_fraction"] < 1:
        fail("val_fraction", "in (0, 1): the share of healthy patients held out for val/loss")
    if not 0 <= values["lesion_validation_fraction"] < 1:
        fail("lesion_validation_fraction", "in [0, 1)")


def _kind(test_set: str) -> str:
    if test_set not in TEST_SET_KINDS:
        raise DataError(f"data.test_set must be one of {sorted(TEST_SET_KINDS)}, got {test_set!r}")
    return TEST_SET_KINDS[test_set]


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

    Item (contract): ``image_id``, ``patient_id``, ``image`` float32 H x W in [0, 1], ``breast_mask`` and
    ``lesion_mask`` bool H x W, ``centers`` int64 M x 2 (every ``stride`` px inside the breast), ``patches``
    float32 M x 1 x s x s (reflect-padded), ``context`` float32 M x 2 (`grids.patch_context` of each centre),
    ``spacing_mm``, ``stride``, ``meta``. Images are quantised to
    uint8 like the training patches, so a model sees the same grey levels in training and evaluation.
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
    ) -> None:
        self.items = list(items)
        self.skip_unreadable = skip_unreadable
        self.stride = int(stride)
        self.patch_size = int(patch_size)
        self.spacing_mm = float(spacing_mm)
        self.kind = kind
        self.remove_pectoral = remove_pectoral

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, entry: Path | ImageRecord) -> dict[str, Any]:
        if isinstance(entry, ImageRecord):
            pre = preprocess_record(entry, self.spacing_mm, self.remove_pectoral, with_lesions=self.kind is not None)
            lesion = pre.lesion_masks.get(self.kind) if self.kind else None
            return {
                "image_id": entry.image_id,
                "patient_id": entry.patient_id,
                "image": to_uint8(pre.image),
                "breast_mask": pre.breast_mask,
                "lesion_mask": lesion if lesion is not None else np.zeros_like(pre.breast_mask),
                "spacing_mm": pre.spacing_mm,
                "meta": _item_meta(entry, pre.meta, self.kind),
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

    def _skipped(self, entry: Path | ImageRecord, reason: str) -> dict[str, Any]:
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One evaluation item; with ``skip_unreadable`` (predict) a `DataError` gives a skipped item instead."""
        try:
            raw = self._load(self.items[index])
        except DataError as err:
            if not self.skip_unreadable:
                raise
            return self._skipped(self.items[index], str(err))
        image = raw["image"].astype(np.float32) / 255.0
        breast = raw["breast_mask"].astype(bool)
        centers = grid_centers(breast, self.stride)
        patches = extract_patches(image, centers, self.patch_size)
        context = patch_context(breast, centers)
        return {
            "image_id": raw["image_id"],
            "patient_id": raw["patient_id"],
            "image": torch.from_numpy(image),
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
    kind = _kind(test_set)
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
    key = cache_key(params)
    cache_root = Path(cache_root)
    final = cache_root / f"eval-{name}-{test_set}-{key}"
    info = open_verified(final, open_evaluation_cache, "evaluation cache")
    if info is not None:
        rank_zero_info("evaluation cache reused: %s (%d images)", final, len(info["files"]))
        _report_skipped(info["summary"].get("skipped", []), len(records), name, final / "selection.json")
        return [final / f for f in info["files"]], info["summary"]
    cache_root.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache_root, f"eval-{name}-{test_set}-{key}")
    tmp = cache_root / f".eval-{name}-{test_set}-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    iterator: Any = with_progress(records, len(records), f"{name} images", progress)
    try:
        decisions: list[SelectionDecision] = []
        files: list[str] = []
        skipped: list[dict[str, str]] = []
        for record in iterator:
            try:
                pre = preprocess_record(record, spacing_mm, remove_pectoral, with_lesions=True)
                check_patchable(pre, patch_size, record.path)
            except Exception as err:  # noqa: BLE001 - reported and skipped, never fatal mid-run
                log.warning("skipped unreadable image %s: %s", record.path, err)
                skipped.append({"path": str(record.path), "error": str(err)})
                continue
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
        _report_skipped(skipped, len(records), name, final / "selection.json")
        summary = write_selection_report(decisions, tmp / "selection.json", skipped)
        summary["report"] = str(final / "selection.json")
        info = {"key": key, "params": params, "files": files, "summary": summary, "skipped": skipped,
                "sha256": {f: file_sha256(tmp / f) for f in [*files, "selection.json"]}}
        write_json(tmp / "DONE.json", info, indent=1)
        publish_cache(tmp, final, open_evaluation_cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rank_zero_info(f"{name} set ({test_set}): {summary['selected']} of {len(records)} images selected; excluded "
                   f"by reason: {summary['excluded_by_reason'] or 'none'}; report {final / 'selection.json'}")
    return [final / f for f in files], summary


class HealthyPatchDataModule(pl.LightningDataModule):
    """Train / validation patches of healthy images, split by patient, served from the patch cache."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        cache_dir: str | Path = "cache",
        pixel_spacing_mm: float = 0.2,
        patch_size: int = 64,
        patches_inside: int = 60,
        patches_contour: int = 60,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        remove_pectoral: bool = False,
        cache_key_extra: dict[str, Any] | None = None,
        progress: bool = True,
        contour_edge: bool = False,
        contour_band_px: float = 0.0,
    ) -> None:
        super().__init__()
        self.records = list(records)
        self.contour_edge = contour_edge
        self.contour_band_px = contour_band_px
        self.cache_dir = Path(cache_dir)
        self.pixel_spacing_mm = pixel_spacing_mm
        self.patch_size = patch_size
        self.patches_inside = patches_inside
        self.patches_contour = patches_contour
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.remove_pectoral = remove_pectoral
        self.cache_key_extra = cache_key_extra or {}
        self.progress = progress
        self.cache: PatchCache | None = None
        self.train_dataset: PatchDataset | None = None
        self.val_dataset: PatchDataset | None = None
        self._shuffle_generator: torch.Generator | None = None
        self._pending_shuffle_state: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Builds (or reuses) the patch cache and splits it by patient."""
        if self.cache is not None:
            return
        self.cache = build_patch_cache(
            self.records, self.cache_dir, spacing_mm=self.pixel_spacing_mm, patch_size=self.patch_size,
            n_inside=self.patches_inside, n_contour=self.patches_contour, seed=self.seed,
            remove_pectoral=self.remove_pectoral, contour_edge=self.contour_edge, contour_band_px=self.contour_band_px,
            extra_key=self.cache_key_extra,
            progress=self.progress,
        )
        _, val_patients = split_patients(self.cache.patients, self.val_fraction, self.seed)
        val_numbers = [i for i, p in enumerate(self.cache.patients) if p in val_patients]
        is_val = np.isin(self.cache.patient_index, val_numbers)
        self.train_dataset = PatchDataset(self.cache, np.flatnonzero(~is_val))
        self.val_dataset = PatchDataset(self.cache, np.flatnonzero(is_val))
        if len(self.val_dataset) == 0:
            rank_zero_warn(f"no healthy validation patches ({len(self.cache.patients)} patient(s), val_fraction "
                           f"{self.val_fraction}): val/loss will not be logged; add healthy patients")
        rank_zero_info("healthy patches: %d train, %d validation (%d / %d patients)", len(self.train_dataset),
                 len(self.val_dataset), len(self.cache.patients) - len(val_patients), len(val_patients))

    def _loader(self, dataset: PatchDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit")
            return self._loader(self.train_dataset if shuffle else self.val_dataset, shuffle)
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            if self._pending_shuffle_state is not None:  # resumed from a checkpoint: go on where it stopped
                generator.set_state(self._pending_shuffle_state)
                self._pending_shuffle_state = None
            self._shuffle_generator = generator
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate_patch_batch,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The shuffle generator's state (saved in every checkpoint), so a resumed fit continues the epoch order
        instead of replaying epoch 0's."""
        if self._shuffle_generator is None:
            return {}
        return {"shuffle_generator": self._shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what `state_dict` saved: applied now, or when the training loader is created."""
        state = state_dict.get("shuffle_generator")
        if state is None:
            return
        if self._shuffle_generator is not None:
            self._shuffle_generator.set_state(state)
        else:
            self._pending_shuffle_state = state


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
    ) -> None:
        super().__init__()
        _kind(test_set)
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
        self.selection: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, EvaluationDataset] = {}

    def dataset(self, name: str) -> EvaluationDataset:
        """The evaluation dataset ``"test"``, ``"lesion_validation"`` or ``"predict"`` (built on first use)."""
        if name in self._datasets:
            return self._datasets[name]
        common = dict(stride=self.stride, patch_size=self.patch_size, spacing_mm=self.pixel_spacing_mm,
                      remove_pectoral=self.remove_pectoral)
        if name == "predict":
            if not self.predict_records:
                raise DataError("nothing to predict: set data.predict_path to an image file or folder")
            ds = EvaluationDataset(self.predict_records, kind=None, skip_unreadable=True, **common)
        elif name in ("test", "lesion_validation"):
            records = self.test_records if name == "test" else self.lesion_validation_records
            if not records:
                raise DataError(f"the data source lists no {name.replace('_', ' ')} images for test_set "
                                f"{self.test_set!r}; check data.root and data.source")
            files, summary = build_evaluation_cache(
                records, self.cache_dir, self.test_set, name=name, spacing_mm=self.pixel_spacing_mm,
                patch_size=self.patch_size, max_lesion_area_patches=self.max_lesion_area_patches,
                remove_pectoral=self.remove_pectoral, extra_key=self.cache_key_extra, progress=self.progress,
            )
            self.selection[name] = summary
            if not files and name == "test":  # a test of nothing would write results that mean nothing
                excluded = summary.get("excluded_by_reason") or {}
                raise DataError(
                    f"no evaluable {name.replace('_', ' ')} images: {len(records)} listed, "
                    f"{summary.get('skipped_unreadable', 0)} unreadable, {summary.get('excluded', 0)} excluded "
                    f"by the test-set rule ({excluded or 'none'}); see {summary.get('report')}")
            ds = EvaluationDataset(files, kind=_kind(self.test_set), **common)
        else:
            raise KeyError(f"unknown evaluation set {name!r}")
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


@dataclass
class SourceRecords:
    """What a data source lists: healthy images, lesion test images, lesion validation images."""

    healthy: list[ImageRecord]
    test: list[ImageRecord]
    lesion_validation: list[ImageRecord]


def _split_lesion_records(
    records: list[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(test, validation) lesion records, split by patient."""
    if not records or fraction <= 0:
        return records, []
    _, val_patients = split_patients([r.patient_id for r in records], fraction, seed)
    return ([r for r in records if r.patient_id not in val_patients],
            [r for r in records if r.patient_id in val_patients])


def list_source_records(
    source: str,
    root: str | Path,
    test_set: str = "mass",
    *,
    healthy_source: str | None = None,
    healthy_root: str | Path | None = None,
    source_options: dict[str, Any] | None = None,
    healthy_options: dict[str, Any] | None = None,
    lesion_validation_fraction: float = 0.2,
    data_seed: int = 0,
    scale: str = "quick",
) -> SourceRecords:
    """Lists healthy, test and lesion-validation records of a configured source (see `MammographyDataModule`)."""
    from datamodules.readers import list_source

    if source not in SOURCES:
        raise DataError(f"data.source must be one of {list(SOURCES)}, got {source!r}")
    kind = _kind(test_set)
    root = Path(root)
    opts = dict(source_options or {})
    healthy_opts = dict(healthy_options or {})
    abnormality = test_set

    def has_kind(r: ImageRecord) -> bool:
        return any(lesion.kind == kind for lesion in r.lesions)

    def in_a_test_set(r: ImageRecord) -> bool:  # of either test_set (mass or calc)
        return any(lesion.kind in TEST_SET_KINDS.values() for lesion in r.lesions)

    if source == "synthetic":
        from datamodules.synthetic import ensure_synthetic

        root = Path(ensure_synthetic(root, seed=data_seed, scale=scale))
        healthy = list_source("ddsm", root / "ddsm", diagnosis="normals")
        cbis = root / "cbis-ddsm"
        test = list_source("cbis_ddsm", cbis, abnormality=abnormality, split="test")
        val = list_source("cbis_ddsm", cbis, abnormality=abnormality, split="train")
        other = [list_source("cbis_ddsm", cbis, abnormality=a, split=sp)
                 for a in TEST_SET_KINDS if a != abnormality for sp in ("test", "train")]
        every_lesion = [r for listing in other for r in listing]
    elif source == "cbis_ddsm":
        if healthy_root is None:
            raise DataError("data.source cbis_ddsm has no normal mammograms: set data.healthy_root to a DDSM "
                            "folder (with cases/normals) and data.healthy_source (default ddsm)")
        test = list_source("cbis_ddsm", root, abnormality=abnormality, split="test", **opts)
        val = list_source("cbis_ddsm", root, abnormality=abnormality, split="train", **opts)
        other = [list_source("cbis_ddsm", root, abnormality=a, split=sp, **opts)
                 for a in TEST_SET_KINDS if a != abnormality for sp in ("test", "train")]
        every_lesion = [r for listing in other for r in listing]
        healthy = []
    elif source == "ddsm":
        diagnoses = opts.pop("lesion_diagnoses", ["cancers", "benigns"])
        healthy = list_source("ddsm", root, diagnosis=opts.pop("diagnosis", "normals"), **opts)
        lesion = [r for d in diagnoses for r in list_source("ddsm", root, diagnosis=d, **opts)]
        test, val = _split_lesion_records([r for r in lesion if has_kind(r)], lesion_validation_fraction, data_seed)
        every_lesion = [r for r in lesion if in_a_test_set(r)]
    else:  # mini_ddsm, mias, manifest: one listing, healthy = label 0
        listed = list_source(source, root, **opts)
        healthy = [r for r in listed if r.label == 0]
        lesion = [r for r in listed if r.label != 0 and has_kind(r)]
        test, val = _split_lesion_records(lesion, lesion_validation_fraction, data_seed)
        every_lesion = [r for r in listed if r.label != 0 and in_a_test_set(r)]
    if healthy_root is not None:
        hsource = healthy_source or "ddsm"
        if hsource == "ddsm":
            healthy_opts.setdefault("diagnosis", "normals")
        healthy = list_source(hsource, healthy_root, **healthy_opts)
        if hsource != "ddsm":
            healthy = [r for r in healthy if r.label == 0]
    # every woman with a lesion image in a test or lesion-validation set of this source, of either test_set
    # (a calc evaluation must not meet the other breast of its women in a mass-configured training set)
    lesion_patients = {r.patient_id for r in [*test, *val, *every_lesion]}
    overlap = [r for r in healthy if r.patient_id in lesion_patients]
    if overlap:
        rank_zero_info("%d healthy images dropped: their patients have lesion images in the test/validation sets",
                 len(overlap))
        healthy = [r for r in healthy if r.patient_id not in lesion_patients]
    return SourceRecords(healthy=list(healthy), test=list(test), lesion_validation=list(val))


class MammographyDataModule(pl.LightningDataModule):
    """The data module every config names: healthy patches (fit), a lesion test set (test), files (predict).

    Args:
        source: "synthetic" (generated on first use under ``root``), "cbis_ddsm", "ddsm", "mini_ddsm",
            "mias" or "manifest" (``root`` = the manifest CSV).
        root: folder (or manifest file) of the source.
        test_set: "mass" or "calc": which lesions the test / lesion-validation sets hold.
        healthy_source / healthy_root / healthy_options: where healthy training images come from when not
            from ``source`` itself; required for "cbis_ddsm" (e.g. ``ddsm`` at a DDSM root with cases/normals).
        source_options: extra keyword arguments of ``datamodules.readers.list_source`` for ``source``
            (e.g. ``csv_dir`` for CBIS-DDSM, ``lesion_diagnoses`` for DDSM).
        scale: synthetic set size ("tiny", "quick", "full").
        seed: patch sampling, the healthy train / validation patient split and shuffling.
        data_seed: the synthetic set and the lesion test / validation split; kept apart from ``seed`` so
            runs with other training seeds are tested on the same images (paired comparisons).
        predict_path: an image file or folder scored by ``lightning predict``; ``predict_options`` go to
            ``list_source("images", ...)``, e.g. ``{spacing_mm: 0.1}`` for image files without spacing.
        cache_dir: where patch and evaluation caches live (keyed by every parameter that shapes them).
        pixel_spacing_mm, patch_size, patches_inside, patches_contour, val_fraction, stride,
        max_lesion_area_patches, remove_pectoral: see PROTOCOL "Data" and "Scoring full images".
        lesion_validation_fraction: for sources without a lesion validation split of their own, the fraction
            of lesion patients held out from the test set for validation curves.
        max_healthy_images: use only the first N healthy images (quick runs; None = all).
        contour_edge: the contour patches are drawn from the skin line *and* the breast's border on the
            image edge (chest-wall side), not from the skin line alone (the paper's rule, the default).
        contour_band_px: > 0 draws the contour patches from the band of breast pixels closer than that to the
            contour instead of the line itself, so training sees the border at every offset the evaluation
            grid does (`patches.sample_centers`). Default 32 (half a patch; chosen on mini-MIAS lesion
            validation, README "Border-aware scoring"); 0 = on the line, the paper's literal rule.
        evaluate_on: "test" (default) or "lesion_validation": which lesion set `lightning test` scores; the
            latter picks a scoring option without looking at the test set.
        max_lesion_validation_images: score only a seeded (``data_seed``) sample of N lesion validation
            images during fit (CBIS-DDSM's train split has ~1,200 per lesion type; None = all).
        num_workers: training / validation DataLoader workers. 0 is fastest here: the memmapped cache
            serves ~100,000 patches/s in the main process, and worker IPC only slows it down.
        eval_num_workers: workers of the test / predict / lesion-validation loaders (reading and
            patch extraction per image; worth 1-2 when images are not cached, e.g. predict).
    """

    def __init__(
        self,
        source: str = "synthetic",
        root: str = "data/synthetic",
        test_set: str = "mass",
        healthy_source: str | None = None,
        healthy_root: str | None = None,
        healthy_options: dict[str, Any] | None = None,
        source_options: dict[str, Any] | None = None,
        scale: str = "quick",
        predict_path: str | None = None,
        predict_options: dict[str, Any] | None = None,
        cache_dir: str = "cache",
        pixel_spacing_mm: float = 0.2,
        patch_size: int = 64,
        patches_inside: int = 60,
        patches_contour: int = 60,
        val_fraction: float = 0.1,
        stride: int = 16,
        batch_size: int = 64,
        num_workers: int = 0,
        eval_num_workers: int = 0,
        seed: int = 0,
        data_seed: int = 0,
        max_lesion_area_patches: float = 4,
        remove_pectoral: bool = False,
        lesion_validation_fraction: float = 0.2,
        max_healthy_images: int | None = None,
        max_lesion_validation_images: int | None = None,
        progress: bool = True,
        contour_edge: bool = False,
        contour_band_px: float = 32.0,
        evaluate_on: str = "test",
    ) -> None:
        super().__init__()
        _check_values(source=source, test_set=test_set, pixel_spacing_mm=pixel_spacing_mm, patch_size=patch_size,
                      patches_inside=patches_inside, patches_contour=patches_contour, val_fraction=val_fraction,
                      stride=stride, batch_size=batch_size, num_workers=num_workers, eval_num_workers=eval_num_workers,
                      max_lesion_area_patches=max_lesion_area_patches,
                      lesion_validation_fraction=lesion_validation_fraction)
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self.test_set = test_set
        self.healthy_source = healthy_source
        self.healthy_root = healthy_root
        self.healthy_options = healthy_options
        self.source_options = source_options
        self.scale = scale
        self.predict_path = predict_path
        self.predict_options = predict_options
        self.cache_dir = cache_dir
        self.pixel_spacing_mm = pixel_spacing_mm
        self.patch_size = patch_size
        self.patches_inside = patches_inside
        self.patches_contour = patches_contour
        self.val_fraction = val_fraction
        self.stride = stride
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_num_workers = eval_num_workers
        self.seed = seed
        self.data_seed = data_seed
        self.max_lesion_area_patches = max_lesion_area_patches
        self.remove_pectoral = remove_pectoral
        self.lesion_validation_fraction = lesion_validation_fraction
        self.max_healthy_images = max_healthy_images
        self.max_lesion_validation_images = max_lesion_validation_images
        self.progress = progress
        self.contour_edge = contour_edge
        if not float(contour_band_px) >= 0:
            raise DataError(f"data.init_args.contour_band_px must be >= 0 (px at evaluation spacing), got {contour_band_px!r}")
        self.contour_band_px = float(contour_band_px)
        if evaluate_on not in ("test", "lesion_validation"):
            raise DataError(f"data.init_args.evaluate_on must be 'test' or 'lesion_validation', got {evaluate_on!r}")
        self.evaluate_on = evaluate_on
        self._records: SourceRecords | None = None
        self._healthy: HealthyPatchDataModule | None = None
        self._evaluation: EvaluationDataModule | None = None

    def _key_extra(self) -> dict[str, Any]:
        return {"source": self.source, "root": str(Path(self.root).resolve()), "scale": self.scale,
                "healthy_root": str(self.healthy_root), "data_seed": self.data_seed}

    @property
    def records(self) -> SourceRecords:
        """The source's listing (read once)."""
        if self._records is None:
            self._records = list_source_records(
                self.source, self.root, self.test_set, healthy_source=self.healthy_source,
                healthy_root=self.healthy_root, source_options=self.source_options,
                healthy_options=self.healthy_options, lesion_validation_fraction=self.lesion_validation_fraction,
                data_seed=self.data_seed, scale=self.scale,
            )
            if self.max_healthy_images is not None:
                self._records.healthy = self._records.healthy[: self.max_healthy_images]
            n_val = self.max_lesion_validation_images
            if n_val is not None and len(self._records.lesion_validation) > n_val:
                order = np.random.default_rng(self.data_seed).permutation(len(self._records.lesion_validation))
                keep = sorted(order[:n_val].tolist())
                self._records.lesion_validation = [self._records.lesion_validation[i] for i in keep]
        return self._records

    @property
    def healthy(self) -> HealthyPatchDataModule:
        """The healthy-patch data module (train / val)."""
        if self._healthy is None:
            self._healthy = HealthyPatchDataModule(
                self.records.healthy, self.cache_dir, self.pixel_spacing_mm, self.patch_size,
                self.patches_inside, self.patches_contour, self.val_fraction, self.batch_size,
                self.num_workers, self.seed, self.remove_pectoral, self._key_extra(), self.progress,
                self.contour_edge, self.contour_band_px,
            )
        return self._healthy

    @property
    def evaluation(self) -> EvaluationDataModule:
        """The evaluation data module (test / lesion validation / predict)."""
        if self._evaluation is None:
            predict: list[ImageRecord] = []
            if self.predict_path:
                from datamodules.readers import list_source

                predict = list_source("images", self.predict_path, **(self.predict_options or {}))
                if not predict:
                    raise DataError(f"data.predict_path {self.predict_path}: no DICOM/PNG/JPEG/PGM/TIFF images there")
            self._evaluation = EvaluationDataModule(
                [], [], predict, self.test_set, self.cache_dir,
                self.pixel_spacing_mm, self.patch_size, self.stride, self.max_lesion_area_patches,
                self.eval_num_workers, self.remove_pectoral, self._key_extra(), self.progress,
            )
        return self._evaluation

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self.healthy.setup(stage)
        if stage == "test":
            self._listed_evaluation().setup(stage)
        if stage == "predict":
            self.evaluation.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.healthy.train_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to resume bit-identically: the training shuffle state."""
        return self.healthy.state_dict() if self._healthy is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.healthy.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self.healthy.val_dataloader()

    def _listed_evaluation(self) -> EvaluationDataModule:
        """The evaluation module with the source's lesion listings filled in (listed on first need only,
        so ``predict`` on files never generates or lists a data set)."""
        evaluation = self.evaluation
        if not evaluation.test_records and not evaluation.lesion_validation_records:
            evaluation.test_records = list(self.records.test)
            evaluation.lesion_validation_records = list(self.records.lesion_validation)
        return evaluation

    def test_dataloader(self) -> DataLoader:
        if self.evaluate_on == "lesion_validation":  # choosing an option without looking at the test set
            return self.lesion_validation_dataloader()
        return self._listed_evaluation().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.evaluation.predict_dataloader()

    def lesion_validation_dataloader(self) -> DataLoader:
        """Evaluation items of the lesion validation set (for AUC curves during fit)."""
        return self._listed_evaluation().lesion_validation_dataloader()

    def calibration_records(self, part: str = "fit") -> list[ImageRecord]:
        """Healthy *validation* images (never training, test or lesion images) for score calibration.

        The validation patients (the patch cache's patient split) are sorted and halved: ``part="fit"``
        (even positions) fits a calibration, ``part="check"`` (odd positions) is held out to check it. With a
        single validation patient her images alternate instead (with a warning).
        """
        if part not in ("fit", "check"):
            raise DataError(f"calibration part must be 'fit' or 'check', got {part!r}")
        healthy = self.healthy
        healthy.setup("validate")
        _, val_patients = split_patients(healthy.cache.patients, self.val_fraction, self.seed)
        ordered = sorted(val_patients)
        if len(ordered) >= 2:
            chosen = set(ordered[0::2] if part == "fit" else ordered[1::2])
            records = [r for r in self.records.healthy if r.patient_id in chosen]
        else:  # one validation patient: her images alternate (held out by image, not by patient)
            mine = [r for r in self.records.healthy if r.patient_id in val_patients]
            records = mine[0::2] if part == "fit" else mine[1::2]
            rank_zero_warn(f"calibration: one healthy validation patient, so its {part!r} half is held out by image, "
                           "not by patient; raise data.val_fraction for a patient-level check")
        if not records:
            raise DataError(f"no healthy validation images for calibration part {part!r} ({len(ordered)} validation "
                            "patient(s)); raise data.val_fraction or add healthy images")
        return records

    def calibration_dataloader(self, part: str = "fit") -> DataLoader:
        """Evaluation items (whole grids, with ``context``) of `calibration_records` ``part``."""
        ds = EvaluationDataset(self.calibration_records(part), stride=self.stride, patch_size=self.patch_size,
                               spacing_mm=self.pixel_spacing_mm, kind=None, remove_pectoral=self.remove_pectoral)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.eval_num_workers)

    def selection_summary(self) -> dict[str, Any]:
        """Test / lesion-validation selection summaries built so far (counts by exclusion reason)."""
        return dict(self.evaluation.selection)
