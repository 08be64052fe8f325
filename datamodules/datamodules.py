"""The LightningDataModules: `HealthyPatchDataModule` (training patches) and `MammographyDataModule`, the one
every config names, combining a source's listing (`sources`), the patch cache (`patches`) and the evaluation
set (`evaluation_set`) from one data config (``configs/data/*.yaml``).

Batches: training / validation = `batches.PatchBatch` dicts of cached patches; test / predict / lesion
validation = one `batches.ScanItem` per batch (DataLoader ``batch_size=None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from datamodules.evaluation_set import EvaluationDataModule, EvaluationDataset
from datamodules.patches import (
    PatchCache,
    PatchDataset,
    build_patch_cache,
    collate_patch_batch,
    split_patients,
)
from datamodules.records import DataError, ImageRecord
from datamodules.sources import (
    SOURCES,
    TEST_SET_KINDS,
    SourceRecords,
    contralateral_pairs,
    list_source_records,
)


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
        with_contralateral: every evaluation item (test, lesion validation, calibration, predict) carries the item of
            the same woman's other breast in the same view where one is listed (`sources.contralateral_pairs`;
            predict files pair among themselves), for a model that scores bilateral asymmetry
            (`RatSpnStage(contralateral=...)`). Default False: nothing extra is read.
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
        with_contralateral: bool = False,
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
        self.with_contralateral = bool(with_contralateral)
        self._records: SourceRecords | None = None
        self._healthy: HealthyPatchDataModule | None = None
        self._evaluation: EvaluationDataModule | None = None
        self._prediction: EvaluationDataModule | None = None

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

    def _evaluation_module(self, predict: Sequence[ImageRecord] = ()) -> EvaluationDataModule:
        return EvaluationDataModule(
            [] if predict else self.records.test, [] if predict else self.records.lesion_validation, predict,
            self.test_set, self.cache_dir, self.pixel_spacing_mm, self.patch_size, self.stride,
            self.max_lesion_area_patches, self.eval_num_workers, self.remove_pectoral, self._key_extra(),
            self.progress, self._pairs(predict),
        )

    def _pairs(self, predict: Sequence[ImageRecord] = ()) -> dict[str, ImageRecord]:
        """The other breast's record of each image (``with_contralateral``; empty when off): the source's pairs, or for
        predict files the pairs among them (their names or DICOM tags give patient, side and view)."""
        if not self.with_contralateral:
            return {}
        return contralateral_pairs(predict) if predict else self.records.contralateral

    @property
    def evaluation(self) -> EvaluationDataModule:
        """The lesion evaluation sets (test / lesion validation) of the source's listing (listed on first use)."""
        if self._evaluation is None:
            self._evaluation = self._evaluation_module()
        return self._evaluation

    @property
    def prediction(self) -> EvaluationDataModule:
        """The ``data.predict_path`` files scored by ``lightning predict``; never lists or generates the source."""
        if self._prediction is None:
            if not self.predict_path:
                raise DataError("nothing to predict: set data.predict_path to an image file or folder")
            from datamodules.readers import list_source

            predict = list_source("images", self.predict_path, **(self.predict_options or {}))
            if not predict:
                raise DataError(f"data.predict_path {self.predict_path}: no DICOM/PNG/JPEG/PGM/TIFF images there")
            self._prediction = self._evaluation_module(predict)
        return self._prediction

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self.healthy.setup(stage)
        if stage == "test":
            self.evaluation.setup(stage)
        if stage == "predict" and self.predict_path:
            self.prediction.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.healthy.train_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to resume bit-identically: the training shuffle state."""
        return self.healthy.state_dict() if self._healthy is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.healthy.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self.healthy.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.evaluate_on == "lesion_validation":  # choosing an option without looking at the test set
            return self.lesion_validation_dataloader()
        return self.evaluation.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.prediction.predict_dataloader()

    def lesion_validation_dataloader(self) -> DataLoader:
        """Evaluation items of the lesion validation set (for AUC curves during fit)."""
        return self.evaluation.lesion_validation_dataloader()

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
                               spacing_mm=self.pixel_spacing_mm, kind=None, remove_pectoral=self.remove_pectoral,
                               contralateral=self._pairs())
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.eval_num_workers)

    def selection_summary(self) -> dict[str, Any]:
        """Test / lesion-validation selection summaries built so far (counts by exclusion reason)."""
        return self._evaluation.selection_summary() if self._evaluation is not None else {}
