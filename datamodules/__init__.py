"""Data layer: readers, preprocessing (breast masks, [0, 1] images), healthy patch caches, evaluation
grids, the batch contract (`PatchBatch`, `ScanItem`) and the LightningDataModules every config names
(`MammographyDataModule`)."""

from datamodules.batches import PatchBatch, ScanItem, SkippedScan, check_patch_batch, check_scan_item
from datamodules.datamodules import HealthyPatchDataModule, MammographyDataModule
from datamodules.evaluation_set import EvaluationDataModule, EvaluationDataset, build_evaluation_cache
from datamodules.grids import extract_patches, grid_centers, select_test_image
from datamodules.patches import PatchCache, PatchDataset, build_patch_cache, sample_centers, split_patients
from datamodules.preprocessing import (
    PreprocessedImage,
    breast_mask,
    normalize_intensity,
    preprocess_mammogram,
    preprocess_record,
    resample,
)
from datamodules.sources import SourceRecords, list_source_records

__all__ = [
    "EvaluationDataModule",
    "EvaluationDataset",
    "HealthyPatchDataModule",
    "MammographyDataModule",
    "PatchBatch",
    "PatchCache",
    "PatchDataset",
    "PreprocessedImage",
    "ScanItem",
    "SkippedScan",
    "SourceRecords",
    "breast_mask",
    "build_evaluation_cache",
    "build_patch_cache",
    "check_patch_batch",
    "check_scan_item",
    "extract_patches",
    "grid_centers",
    "list_source_records",
    "normalize_intensity",
    "preprocess_mammogram",
    "preprocess_record",
    "resample",
    "sample_centers",
    "select_test_image",
    "split_patients",
]
