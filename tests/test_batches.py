"""The batch contract (`datamodules.batches`): what the datasets produce passes, a wrong key is one line."""

from __future__ import annotations

import pytest
import torch

from datamodules.batches import PatchBatch, ScanItem, check_patch_batch, check_scan_item
from lightning_modules.base import batch_patches


def patch_batch(n: int = 3, p: int = 8) -> dict:
    return {"patches": torch.rand(n, 1, p, p), "index": torch.arange(n), "centers": torch.zeros(n, 2, dtype=torch.int64),
            "context": torch.zeros(n, 2), "patient_id": ["a"] * n, "label": torch.zeros(n, dtype=torch.int64)}


def scan_item(m: int = 4, p: int = 8) -> dict:
    return {"image_id": "i0", "patient_id": "a", "scan": torch.rand(20, 10), "breast_mask": torch.ones(20, 10, dtype=bool),
            "lesion_mask": torch.zeros(20, 10, dtype=bool), "centers": torch.zeros(m, 2, dtype=torch.int64),
            "patches": torch.rand(m, 1, p, p), "context": torch.zeros(m, 2), "spacing_mm": 0.2, "stride": 16,
            "meta": {}}


def test_well_formed_batches_pass_unchanged() -> None:
    batch, item = patch_batch(), scan_item()
    assert check_patch_batch(batch, 8) is batch and check_scan_item(item, 8) is item
    optional = {"contralateral"}  # only where the other breast is known and asked for
    assert set(batch) == set(PatchBatch.__annotations__) and set(item) == set(ScanItem.__annotations__) - optional
    paired = {**scan_item(), "contralateral": {**scan_item(), "image_id": "i1"}}
    assert check_scan_item(paired, 8) is paired
    skipped = {"image_id": "x", "skipped": "unreadable", "source_path": "/x.png",
               "centers": torch.zeros(0, 2, dtype=torch.int64), "context": torch.zeros(0, 2),
               "patches": torch.zeros(0, 1, 8, 8)}
    assert check_scan_item(skipped, 8) is skipped
    assert batch_patches(batch) is batch["patches"] and batch_patches(item) is item["patches"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("patches"), r"^patch batch: 'patches' must be float32 \? x 1 x 8 x 8, missing$"),
        (lambda b: b.update(patches=torch.rand(3, 1, 4, 4)),
         r"^patch batch: 'patches' must be float32 \? x 1 x 8 x 8, got torch.float32 tensor of shape \(3, 1, 4, 4\)$"),
        (lambda b: b.update(centers=torch.zeros(3, 2)), r"'centers' must be int64 3 x 2, got torch.float32 tensor"),
        (lambda b: b.update(patient_id=["a"]), r"'patient_id' must be a list of 3 str, got list"),
        (lambda b: b.pop("label"), r"'label' must be int64 3, missing"),
    ],
)
def test_a_malformed_patch_batch_is_one_line_naming_the_key(change, message: str) -> None:
    batch = patch_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        check_patch_batch(batch, 8)


def test_a_malformed_scan_item_names_its_image_and_key() -> None:
    item = scan_item()
    item["image"] = item.pop("scan")  # the old name
    with pytest.raises(ValueError, match=r"^scan item 'i0': 'scan' must be float32 \? x \?, missing$"):
        check_scan_item(item)
    item = scan_item()
    item["lesion_mask"] = torch.zeros(10, 20, dtype=bool)
    with pytest.raises(ValueError, match=r"'lesion_mask' must be bool 20 x 10, got torch.bool tensor of shape \(10, 20\)"):
        check_scan_item(item)
    item = scan_item()
    item["stride"] = 16.0
    with pytest.raises(ValueError, match=r"'stride' must be a int, got float"):
        check_scan_item(item)
    item = {**scan_item(), "contralateral": {**scan_item(), "image_id": "i1"}}
    item["contralateral"].pop("breast_mask")
    with pytest.raises(ValueError, match=r"^scan item 'i1': 'breast_mask' must be bool 20 x 10, missing$"):
        check_scan_item(item)
    with pytest.raises(ValueError, match=r"^scan item 'i0': 'contralateral' must be the scan item of the other breast"):
        check_scan_item({**scan_item(), "contralateral": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"batch has no 'patches' .*got keys \['image'\]"):
        batch_patches({"image": torch.rand(1, 1, 8, 8)})
    with pytest.raises(KeyError, match=r"got Tensor"):
        batch_patches(torch.rand(1, 1, 8, 8))
