"""Data pipeline speed: images/s for read + resample + breast mask + 120 patches on the `quick` synthetic set,
and patches/s served by the training DataLoader from the memory-mapped cache beside a plain in-memory tensor
slicing loop (the ceiling), as a ratio measured in the same run. Target: >= 20,000 patches/s.

Environment: ``BENCH_DATA_ROOT`` (default data/synthetic), ``BENCH_DATA_SCALE`` (default quick),
``BENCH_DATA_IMAGES`` (images timed for preprocessing, default 16).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

TARGET_PATCHES_PER_S = 20_000


def _serve_rate(loader, min_seconds: float = 2.0) -> float:
    """Patches per second over whole epochs of ``loader`` (at least ``min_seconds``; first epoch warms up)."""
    for _ in loader:  # warm-up: page cache, worker start
        break
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for batch in loader:
            n += len(batch["index"])
    return n / (time.perf_counter() - start)


def _tensor_rate(data: torch.Tensor, batch_size: int, min_seconds: float = 2.0) -> float:
    """Patches per second of the ceiling: random batches sliced from a uint8 tensor in memory, to float."""
    generator = torch.Generator().manual_seed(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for idx in torch.randperm(len(data), generator=generator).split(batch_size):
            x = data[idx].unsqueeze(1).float().div_(255.0)
            n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    from datamodules.datamodules import MammographyDataModule
    from datamodules.patches import image_patches
    from datamodules.preprocessing import preprocess_record

    torch.set_num_threads(1)
    root = os.environ.get("BENCH_DATA_ROOT", "data/synthetic")
    scale = os.environ.get("BENCH_DATA_SCALE", "quick")
    n_images = int(os.environ.get("BENCH_DATA_IMAGES", "16"))
    dm = MammographyDataModule(source="synthetic", root=root, scale=scale, progress=False,
                               cache_dir=os.path.join(tempfile.gettempdir(), "mammospn-bench-cache"))
    records = dm.records.healthy
    print(f"synthetic set {root} ({scale}): {len(records)} healthy images")

    subset = records[:n_images]
    start = time.perf_counter()
    n_patches = 0
    for record in subset:
        pre = preprocess_record(record, dm.pixel_spacing_mm, with_lesions=False)
        n_patches += len(image_patches(pre, 60, 60, 64, seed=0)[0])
    elapsed = time.perf_counter() - start
    print(f"read + resample + mask + 120 patches: {len(subset) / elapsed:.2f} images/s "
          f"({len(subset)} images, {n_patches} patches, {elapsed:.1f} s)")

    start = time.perf_counter()
    dm.setup("fit")
    print(f"patch cache ready in {time.perf_counter() - start:.1f} s: {len(dm.healthy.cache)} patches "
          f"at {dm.healthy.cache.path}")

    ceiling = _tensor_rate(torch.from_numpy(np.array(dm.healthy.cache.memmap())), dm.batch_size)
    served = _serve_rate(dm.train_dataloader())
    verdict = "meets" if served >= TARGET_PATCHES_PER_S else "BELOW"
    print(f"training DataLoader (memmap cache, num_workers=0, batch {dm.batch_size}): {served:,.0f} patches/s "
          f"({verdict} the {TARGET_PATCHES_PER_S:,} target)")
    print(f"in-memory uint8 tensor slicing loop:                {ceiling:,.0f} patches/s")
    dm.healthy.num_workers = 2
    with_workers = _serve_rate(dm.healthy.train_dataloader(), min_seconds=1.5)
    print(f"training DataLoader with num_workers=2 (for comparison): {with_workers:,.0f} patches/s")
    print(f"ratio DataLoader / in-memory slicing: {served / ceiling:.2f}")

    start = time.perf_counter()
    test_set = dm.evaluation.dataset("test")
    print(f"test evaluation cache ready in {time.perf_counter() - start:.1f} s ({len(test_set)} images)")
    start = time.perf_counter()
    n_grid = sum(len(item["centers"]) for item in dm.test_dataloader())
    elapsed = time.perf_counter() - start
    print(f"evaluation items from the cache (grid + reflect-padded patches): {len(test_set) / elapsed:.1f} images/s, "
          f"{n_grid / elapsed:,.0f} grid patches/s")


if __name__ == "__main__":
    main()
