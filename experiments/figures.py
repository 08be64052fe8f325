"""Pictures: prediction outputs (map .npy, heatmap overlay, thresholded mask) and the paper's Fig. 2 and Fig. 3.

Fig. 2 (`figure2`): per test set, the scan, its ground truth, then per model the heatmap and the
thresholded mask with its Hausdorff distance, read from the evaluation callback's ``maps/<image_id>.npz``.
Fig. 3 (`figure3`): healthy vs lesion pixel score distributions per model, from ``score_hist.npz``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datamodules.fileio import atomic_write_with
from experiments import evaluation


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def normalise_map(anomaly_map: np.ndarray) -> np.ndarray:
    """Scores scaled to [0, 1] by the 1st and 99.9th percentile of the finite values (0 elsewhere)."""
    finite = np.isfinite(anomaly_map)
    out = np.zeros(anomaly_map.shape, dtype=np.float32)
    if not finite.any():
        return out
    lo, hi = np.percentile(anomaly_map[finite], [1.0, 99.9])
    scale = hi - lo if hi > lo else 1.0
    out[finite] = np.clip((anomaly_map[finite] - lo) / scale, 0.0, 1.0)
    return out


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: the grey scan with a jet heatmap blended in where the map is finite (inside the breast)."""
    grey = (np.clip(_as_numpy(image).astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    heat = cv2.applyColorMap((normalise_map(anomaly_map) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    inside = np.isfinite(anomaly_map)
    blended = rgb.copy()
    blended[inside] = (alpha * heat[inside] + (1 - alpha) * rgb[inside]).astype(np.uint8)
    return blended


def _write_atomic_png(path: Path, image: np.ndarray) -> None:
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    atomic_write_with(path, lambda tmp: cv2.imwrite(str(tmp), data))


def _write_atomic_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_with(path, lambda tmp: np.save(tmp, array))


def write_prediction(
    item: Mapping[str, Any], scores: Any, output_dir: str | Path, percentile: float = 99.0
) -> list[Path]:
    """Writes ``<id>_map.npy`` (float32, NaN outside the breast), ``<id>_overlay.png`` and ``<id>_mask.png``.

    Map and mask are those of the evaluation (bilinear grid map; pixels above the image's own percentile).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image = _as_numpy(item["image"]).astype(np.float32)
    image = image.reshape(image.shape[-2:])
    breast = item.get("breast_mask")
    breast = _as_numpy(breast).astype(bool).reshape(image.shape) if breast is not None else None
    breast = breast if breast is not None else np.ones(image.shape, dtype=bool)
    stride = int(_as_numpy(item.get("stride", 16)))
    anomaly_map = evaluation.anomaly_map(scores, item["centers"], breast, stride)
    threshold = evaluation.image_percentile_threshold(anomaly_map, breast, percentile)
    mask = evaluation.segment(anomaly_map, breast, threshold)
    stem = evaluation.safe_file_stem(item.get("image_id", "image"))
    paths = [output_dir / f"{stem}_map.npy", output_dir / f"{stem}_overlay.png", output_dir / f"{stem}_mask.png"]
    _write_atomic_npy(paths[0], anomaly_map)
    _write_atomic_png(paths[1], heatmap_overlay(image, anomaly_map))
    _write_atomic_png(paths[2], mask.astype(np.uint8) * 255)
    return paths


# --- Table 1 figures -----------------------------------------------------------------------------


def _pick(data: Mapping[str, Any], *names: str) -> np.ndarray | None:
    for name in names:
        if name in data:
            return np.asarray(data[name])
    return None


def _save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return path


def common_image_ids(map_dirs: Sequence[Path]) -> list[str]:
    """Image ids that have a ``maps/<id>.npz`` in every given folder, sorted."""
    sets = [{p.stem for p in Path(d).glob("*.npz")} for d in map_dirs]
    return sorted(set.intersection(*sets)) if sets else []


def figure2(
    map_dirs: Mapping[str, Path], out_path: str | Path, image_id: str | None = None, title: str = ""
) -> Path | None:
    """Fig. 2: scan, ground truth, then per model heatmap and thresholded mask (H in the title).

    ``map_dirs`` maps model name -> its evaluation ``maps/`` folder; the image shown is ``image_id`` or
    the first image every model has a map for. Returns None when no image is shared by all models.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = {k: Path(v) for k, v in map_dirs.items()}
    ids = common_image_ids(list(dirs.values()))
    if image_id is None:
        if not ids:
            return None
        image_id = ids[0]
    loaded = {name: dict(np.load(d / f"{image_id}.npz", allow_pickle=False)) for name, d in dirs.items()}
    first = next(iter(loaded.values()))
    scan = _pick(first, "image", "scan")
    truth = _pick(first, "lesion_mask", "ground_truth", "gt")
    ncols = 1 + len(loaded)
    fig, axes = plt.subplots(2, ncols, figsize=(2.0 * ncols, 5.0), squeeze=False)
    scan_img = scan if scan is not None else np.zeros((2, 2))
    axes[0, 0].imshow(scan_img, cmap="gray")
    axes[0, 0].set_title("scan", fontsize=8)
    axes[1, 0].imshow(truth if truth is not None else np.zeros((2, 2)), cmap="gray")
    axes[1, 0].set_title("ground truth", fontsize=8)
    for k, (name, data) in enumerate(loaded.items(), start=1):
        amap = _pick(data, "anomaly_map", "map", "scores")
        amap = np.zeros((2, 2), np.float32) if amap is None else amap.astype(np.float32)
        seg = _pick(data, "segmentation", "threshold_mask", "pred_mask", "mask")
        if seg is None:
            finite = np.isfinite(amap)
            seg = evaluation.segment(amap, finite, evaluation.image_percentile_threshold(amap, finite))
        h = _pick(data, "hausdorff_px", "hausdorff", "H")
        h_text = f"H={float(h):.1f} px" if h is not None and np.size(h) == 1 and np.isfinite(float(h)) else "H=n/a"
        if scan is not None and scan.shape == amap.shape:
            axes[0, k].imshow(scan_img, cmap="gray")
        heat = np.ma.masked_where(~np.isfinite(amap), normalise_map(amap))
        axes[0, k].imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=0.6 if scan is not None else 1.0)
        axes[0, k].set_title(name, fontsize=8)
        axes[1, k].imshow(seg, cmap="gray")
        axes[1, k].set_title(h_text, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{image_id}", fontsize=9)
    return _save_figure(fig, Path(out_path))


def figure3(hist_files: Mapping[str, Path], out_path: str | Path, title: str = "") -> Path | None:
    """Fig. 3: healthy vs lesion pixel score distributions of one model, one panel per test set.

    ``hist_files`` maps test-set name -> ``score_hist.npz`` holding bin ``edges`` and ``healthy`` /
    ``lesion`` counts (or raw score samples under the same names). Returns None when none exist.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {k: Path(v) for k, v in hist_files.items() if Path(v).is_file()}
    if not files:
        return None
    fig, axes = plt.subplots(1, len(files), figsize=(4.2 * len(files), 3.0), squeeze=False)
    for ax, (set_name, path) in zip(axes[0], files.items()):
        data = dict(np.load(path, allow_pickle=False))
        edges = _pick(data, "edges", "bin_edges", "bins")
        for label, keys, color in (
            ("healthy", ("healthy", "healthy_counts", "normal"), "tab:blue"),
            ("lesion", ("lesion", "lesion_counts", "anomalous", "anomaly"), "tab:red"),
        ):
            values = _pick(data, *keys)
            if values is None:
                continue
            if edges is not None and values.size == edges.size - 1:
                total = values.sum()
                density = values / (total * np.diff(edges)) if total > 0 else values
                ax.stairs(density, edges, label=label, color=color, fill=True, alpha=0.4)
            else:
                ax.hist(values.ravel(), bins=50, density=True, alpha=0.4, label=label, color=color)
        ax.set_title(f"{title} {set_name}".strip(), fontsize=9)
        ax.set_xlabel("anomaly score")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return _save_figure(fig, Path(out_path))


def calibration_figure(report: Mapping[str, Any], out_path: str | Path) -> Path:
    """Calibration plot: observed share of held-out healthy pixels (and patches) with p < alpha vs alpha.

    ``report``: `experiments.calibration.ConformalCalibration`'s ``calibration.json`` content. Log-log axes;
    the diagonal is perfect calibration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.asarray(report["alphas"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=150)
    ax.plot(alphas, alphas, color="0.6", lw=1, ls="--", label="ideal")
    ax.plot(alphas, report["pixel_rate"], "o-", label=f"pixels ({report.get('check_images', '?')} images)")
    ax.plot(alphas, report["patch_rate"], "s:", ms=4, label="grid patches")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nominal alpha")
    ax.set_ylabel("held-out healthy share with p < alpha")
    ax.set_title("conformal calibration, healthy validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(out_path))


def froc_figure(metrics_files: Mapping[str, Path], out_path: str | Path, title: str = "FROC") -> Path | None:
    """FROC of one test set: lesion sensitivity against false-positive regions per image, one line per model.

    ``metrics_files`` maps model name -> its evaluation ``metrics.json`` (the ``froc`` curve written by
    `experiments.evaluation.EvaluationAccumulator`); the 0.5 / 1 / 2 FP-per-image operating points of
    Table 1 are marked by vertical lines. Returns None when no file holds a curve.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for model, path in metrics_files.items():
        path = Path(path)
        froc = json.loads(path.read_text()).get("froc") if path.is_file() else None
        if froc and froc.get("fp_per_image"):
            fp = np.array([np.nan if v is None else v for v in froc["fp_per_image"]], dtype=float)
            sens = np.array([np.nan if v is None else v for v in froc["sensitivity_all"]], dtype=float)
            order = np.argsort(fp, kind="stable")
            curves[model] = (fp[order], sens[order])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for model, (fp, sens) in curves.items():
        ax.plot(fp, sens, marker=".", label=model)
    for rate in (0.5, 1.0, 2.0):
        ax.axvline(rate, color="grey", lw=0.6, ls=":")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(0, max(8.0, max(float(np.nanmax(c[0])) for c in curves.values())))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive regions per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save_figure(fig, Path(out_path))


def val_loss_figure(curves: Mapping[str, Mapping[int, float]], out_path: str | Path) -> Path | None:
    """val/loss against epoch, one panel per fit (their scales differ), to see whether each fit plateaued.

    ``curves`` maps fit name -> {epoch: val/loss}. Returns None when there is no curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    cols = min(4, len(curves))
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(curves):]:
        ax.axis("off")
    for ax, (name, curve) in zip(axes.ravel(), curves.items()):
        epochs = sorted(curve)
        ax.plot(epochs, [curve[e] for e in epochs], marker=".")
        best = min(epochs, key=curve.__getitem__)
        ax.axvline(best, color="grey", lw=0.6, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("val/loss", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(out_path))
