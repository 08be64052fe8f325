"""`mammospn preview --data configs/data/<x>.yaml --out sheet.png`: a contact sheet of a data config.

Top rows: test images (breast outline cyan, lesion masks red) and healthy training images (outline only),
as the pipeline sees them at evaluation spacing. Bottom: a seeded sample of cached training patches
(contour patches framed orange). If the sheet looks wrong, the data is read wrong.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datamodules.fileio import atomic_write_with
from datamodules.records import DataError


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``init_args`` of a data config (a ``data:`` block or a bare ``class_path``/``init_args``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    block = config.get("data", config)
    if not isinstance(block, dict):
        raise DataError(f"{path}: the 'data' key must be a mapping with class_path and init_args")
    class_path = block.get("class_path", "datamodules.MammographyDataModule")
    if class_path.split(".")[-1] != "MammographyDataModule":
        raise DataError(f"{path}: data.class_path {class_path!r} is not datamodules.MammographyDataModule")
    args = dict(block.get("init_args") or {})
    for item in overrides or []:
        if "=" not in item:
            raise DataError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        args[key.strip()] = yaml.safe_load(value)
    return args


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mammospn preview``."""
    parser.add_argument("--data", required=True, help="a data config, e.g. configs/data/synthetic.yaml")
    parser.add_argument("--out", default="sheet.png", help="PNG file to write (default sheet.png)")
    parser.add_argument("--images", type=int, default=4, help="test images to show (default 4)")
    parser.add_argument("--healthy", type=int, default=2, help="healthy images to show (default 2)")
    parser.add_argument("--patches", type=int, default=32, help="training patches to show (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch sample")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an init_arg of the config (repeatable), e.g. --set scale=tiny")


def _outline(ax: Any, mask: np.ndarray, color: str) -> None:
    if mask.any():
        ax.contour(mask.astype(np.uint8), levels=[0.5], colors=[color], linewidths=0.8)


def make_sheet(module: Any, out: str | Path, n_images: int = 4, n_healthy: int = 2, n_patches: int = 32,
               seed: int = 0) -> dict[str, int]:
    """Draws the contact sheet of a `MammographyDataModule` to ``out`` (temp name, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.preprocessing import preprocess_record

    panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
    if n_images > 0:
        try:
            dataset = module.evaluation.dataset("test")
        except DataError as err:
            print(f"preview: no test images ({err})")
            dataset = []
        for i in range(min(n_images, len(dataset))):
            item = dataset[i]
            panels.append((f"test {item['image_id']}", item["scan"].numpy(), item["breast_mask"].numpy(),
                           item["lesion_mask"].numpy()))
    n_images_shown = len(panels)
    skipped: list[str] = []
    for record in module.records.healthy:
        if len(panels) >= n_images_shown + n_healthy:
            break
        try:
            pre = preprocess_record(record, module.pixel_spacing_mm, module.remove_pectoral, with_lesions=False)
        except DataError as err:  # a bad file is reported and skipped, like fit does
            print(f"preview: skipped {record.path}: {err}")
            skipped.append(str(record.path))
            continue
        panels.append((f"healthy {record.image_id}", pre.image, pre.breast_mask, None))
    module.healthy.setup("fit")
    cache = module.healthy.cache
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(cache), size=min(n_patches, len(cache)), replace=False))
    patches = cache.memmap()[picks]

    cols = max(4, min(8, len(panels) or 1))
    image_rows = -(-len(panels) // cols) if panels else 0
    patch_cols = 8
    patch_rows = -(-len(picks) // patch_cols)
    fig = plt.figure(figsize=(2.2 * cols, 3.2 * image_rows + 1.4 * patch_rows + 0.5))
    grid = fig.add_gridspec(2, 1, height_ratios=[max(image_rows, 1e-3) * 3.2, max(patch_rows, 1e-3) * 1.4])
    if panels:
        top = grid[0].subgridspec(image_rows, cols)
        for k, (title, image, breast, lesion) in enumerate(panels):
            ax = fig.add_subplot(top[k // cols, k % cols])
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            _outline(ax, breast, "cyan")
            if lesion is not None:
                _outline(ax, lesion, "red")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    if len(picks):
        bottom = grid[1].subgridspec(patch_rows, patch_cols)
        for k, (patch, index) in enumerate(zip(patches, picks)):
            ax = fig.add_subplot(bottom[k // patch_cols, k % patch_cols])
            ax.imshow(patch, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if cache.on_contour[index]:
                for spine in ax.spines.values():
                    spine.set_edgecolor("orange")
                    spine.set_linewidth(2)
    fig.suptitle("cyan: breast mask   red: lesion mask   orange frame: contour patch", fontsize=8)
    out = Path(out)
    try:
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
    for entry in cache.info.get("skipped", []):  # skipped while building the patch cache (now or earlier)
        if entry["path"] not in skipped:
            print(f"preview: skipped {entry['path']}: {entry['error']}")
            skipped.append(entry["path"])
    return {"images": len(panels), "patches": int(len(picks)), "skipped": len(skipped)}


def run(args: argparse.Namespace) -> int:
    """Builds the data module of ``--data`` and writes the sheet; 1 with a clear message on a data error."""
    from datamodules.datamodules import MammographyDataModule

    try:
        init_args = load_data_config(args.data, args.set)
        module = MammographyDataModule(**init_args)
        counts = make_sheet(module, args.out, args.images, args.healthy, args.patches, args.seed)
    except DataError as err:
        print(f"mammospn preview: {err}")
        return 1
    except TypeError as err:
        print(f"mammospn preview: {args.data}: bad init_args ({err})")
        return 1
    skipped = f", {counts['skipped']} unreadable image(s) skipped" if counts.get("skipped") else ""
    print(f"wrote {args.out}: {counts['images']} images, {counts['patches']} training patches{skipped}")
    return 0
