"""Figures for a paper: one shared style, the paper's Fig. 2 (heatmaps) and Fig. 3 (score distributions).

Every figure of the project goes through `style()` (fonts, one perceptually uniform colour map `CMAP`),
`add_colorbar` (a labelled colorbar beside its axes) and `save_figure` (vector PDF + 300 dpi PNG, both
written atomically), so a new figure (FROC, calibration) looks like the others::

    with figures.style():
        fig, ax = plt.subplots()
        ...
        figures.save_figure(fig, out_dir / "froc")   # froc.pdf and froc.png

Fig. 2 (`figure2`): per image, the scan with the ground truth as a contour, then per model the heatmap
(colour = the pixel's percentile rank among that image's breast pixels, one scale shared by every model
of the row because raw scores of different models have different units) and the thresholded mask with
its Hausdorff distance in px and mm; read from the evaluation callback's ``maps/<image_id>.npz``.
Fig. 3 (`figure3`): healthy vs lesion pixel score distributions per model, from ``score_hist.npz``,
with the calibrated threshold when one is known.

W&B panels (uint8 RGB arrays the evaluation callback hands to ``wandb.Image``, no file): `heatmap_panel`
(scan | heatmap | segmentation vs truth, in the inferno colour map, not `CMAP`), `panel_at_height` (one
height for every panel) and `score_distribution_image` (the healthy vs lesion densities of one test).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.fileio import atomic_write_with
from experiments import anomaly_maps

#: The one colour map of every figure and overlay: perceptually uniform, readable in grey and by
#: colour-blind readers.
CMAP = "viridis"
#: Raster resolution of the PNG copy of every figure.
PNG_DPI = 300
_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "image.cmap": CMAP,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text (editable, searchable)
    "savefig.bbox": "tight",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context in which figures take the project's style (font sizes, `CMAP`, PDF fonts as text)."""
    plt = _pyplot()
    with plt.rc_context(_RC):
        yield


def add_colorbar(fig: Any, ax: Any, mappable: Any, label: str, **kwargs: Any) -> Any:
    """A colorbar beside ``ax`` (or a list of axes) for ``mappable``, labelled with its quantity and unit."""
    colorbar = fig.colorbar(mappable, ax=ax, fraction=kwargs.pop("fraction", 0.046), pad=kwargs.pop("pad", 0.02),
                            **kwargs)
    colorbar.set_label(label)
    return colorbar


def save_figure(fig: Any, path_stem: str | Path, formats: Sequence[str] = ("pdf", "png")) -> Path:
    """Writes ``<path_stem>.pdf`` (vector) and ``<path_stem>.png`` (300 dpi), atomically; closes ``fig``.

    A suffix on ``path_stem`` is dropped. Returns the PNG path (the first format when PNG is not asked for).
    """
    plt = _pyplot()
    stem = Path(path_stem)
    stem = stem.with_suffix("") if stem.suffix.lower() in (".png", ".pdf", ".svg") else stem
    written: dict[str, Path] = {}
    try:
        for fmt in formats:
            target = stem.with_name(f"{stem.name}.{fmt}")
            written[fmt] = atomic_write_with(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=PNG_DPI))
    finally:
        plt.close(fig)
    return written.get("png", next(iter(written.values())))


def percentile_rank(amap: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """Each breast pixel's score as its percentile rank (0-100) among the image's breast pixels; NaN outside.

    Scores of different models have different units (MSE, -log p); their ranks share one scale.
    """
    out = np.full(amap.shape, np.nan, dtype=np.float32)
    inside = breast & np.isfinite(amap)
    values = amap[inside].astype(np.float64)
    if values.size:
        order = np.sort(values)
        out[inside] = 100.0 * np.searchsorted(order, values, side="right") / values.size
    return out


def _pick(data: Mapping[str, Any], *names: str) -> np.ndarray | None:
    for name in names:
        if name in data:
            return np.asarray(data[name])
    return None


def _finite_scalar(value: np.ndarray | None) -> float | None:
    if value is None or np.size(value) != 1:
        return None
    number = float(value)
    return number if np.isfinite(number) else None


def common_image_ids(map_dirs: Sequence[Path]) -> list[str]:
    """Image ids that have a ``maps/<id>.npz`` in every given folder, sorted."""
    sets = [{p.stem for p in Path(d).glob("*.npz")} for d in map_dirs]
    return sorted(set.intersection(*sets)) if sets else []


def hausdorff_title(h_px: float | None, h_mm: float | None) -> str:
    """``H = 30.1 px (6.0 mm)``, or ``H = n/a`` when undefined (an empty mask)."""
    if h_px is None:
        return "H = n/a"
    return f"H = {h_px:.1f} px" + (f" ({h_mm:.1f} mm)" if h_mm is not None else "")


def figure2_figure(map_dirs: Mapping[str, Path], image_ids: Sequence[str], title: str = "") -> Any:
    """The Fig. 2 matplotlib figure: two rows per image (heatmaps, thresholded masks), a column per model.

    Row 1: the scan with the ground truth contour (red), then per model its heatmap over the scan, all on
    one shared scale (percentile rank within the breast, `percentile_rank`) with one colorbar.
    Row 2: the ground-truth mask, then per model the thresholded mask, the ground truth contoured on it
    and the Hausdorff distance in px and mm in the title.
    """
    plt = _pyplot()
    dirs = {k: Path(v) for k, v in map_dirs.items()}
    ncols = 1 + len(dirs)
    with style():
        fig, axes = plt.subplots(2 * len(image_ids), ncols, figsize=(1.9 * ncols + 0.6, 4.0 * len(image_ids)),
                                 squeeze=False, layout="constrained")
        for r, image_id in enumerate(image_ids):
            loaded = {name: dict(np.load(d / f"{image_id}.npz", allow_pickle=False)) for name, d in dirs.items()}
            first = next(iter(loaded.values()))
            scan = _pick(first, "image", "scan")
            truth = _pick(first, "lesion_mask", "ground_truth", "gt")
            heat_ax, mask_ax = axes[2 * r], axes[2 * r + 1]
            shape = scan.shape if scan is not None else next(
                np.asarray(_pick(d, "anomaly_map", "map")).shape for d in loaded.values())
            scan_img = scan.astype(np.float32) if scan is not None else np.zeros(shape, np.float32)
            truth = truth.astype(bool) if truth is not None else np.zeros(shape, bool)
            heat_ax[0].imshow(scan_img, cmap="gray", vmin=0, vmax=1)
            if truth.any():
                heat_ax[0].contour(truth, levels=[0.5], colors="red", linewidths=0.8)
            heat_ax[0].set_title(f"{image_id}\nscan, ground truth (red)")
            mask_ax[0].imshow(truth, cmap="gray", vmin=0, vmax=1)
            mask_ax[0].set_title("ground truth")
            image = None
            for k, (name, data) in enumerate(loaded.items(), start=1):
                amap = _pick(data, "anomaly_map", "map", "scores")
                amap = np.full(shape, np.nan, np.float32) if amap is None else amap.astype(np.float32)
                breast = _pick(data, "breast_mask")
                breast = breast.astype(bool) if breast is not None else np.isfinite(amap)
                seg = _pick(data, "segmentation", "threshold_mask", "pred_mask", "mask")
                if seg is None:
                    seg = anomaly_maps.segment(amap, breast, anomaly_maps.image_percentile_threshold(amap, breast))
                ranks = np.ma.masked_invalid(percentile_rank(amap, breast))
                heat_ax[k].imshow(scan_img, cmap="gray", vmin=0, vmax=1)
                image = heat_ax[k].imshow(ranks, cmap=CMAP, vmin=0.0, vmax=100.0, alpha=0.75)
                if truth.any():
                    heat_ax[k].contour(truth, levels=[0.5], colors="red", linewidths=0.6)
                heat_ax[k].set_title(name)
                mask_ax[k].imshow(seg.astype(bool), cmap="gray", vmin=0, vmax=1)
                if truth.any():
                    mask_ax[k].contour(truth, levels=[0.5], colors="red", linewidths=0.6)
                h_px = _finite_scalar(_pick(data, "hausdorff_px", "hausdorff", "H"))
                h_mm = _finite_scalar(_pick(data, "hausdorff_mm"))
                mask_ax[k].set_title(hausdorff_title(h_px, h_mm))
            if image is not None:
                add_colorbar(fig, list(heat_ax), image, "score percentile within the breast (%)\n"
                             "(one scale for every model of the row)")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        if title:
            fig.suptitle(title)
    return fig


def figure2(
    map_dirs: Mapping[str, Path], out_path: str | Path, image_id: str | Sequence[str] | None = None, title: str = ""
) -> Path | None:
    """Fig. 2 as ``<out_path stem>.pdf`` and ``.png``; returns the PNG path, or None without a shared image.

    ``map_dirs`` maps model name -> its evaluation ``maps/`` folder; the images shown are ``image_id``
    (one id or several) or the first image every model has a map for.
    """
    dirs = {k: Path(v) for k, v in map_dirs.items()}
    if image_id is None:
        ids = common_image_ids(list(dirs.values()))
        if not ids:
            return None
        image_ids: list[str] = ids[:1]
    else:
        image_ids = [image_id] if isinstance(image_id, str) else list(image_id)
    return save_figure(figure2_figure(dirs, image_ids, title=title), out_path)


def _hist_threshold(data: Mapping[str, Any]) -> float | None:
    return _finite_scalar(_pick(data, "calibrated_threshold", "threshold"))


def figure3_figure(hist_files: Mapping[str, Path], title: str = "",
                   thresholds: Mapping[str, float] | None = None) -> Any | None:
    """The Fig. 3 figure (one panel per test set), or None when no histogram file exists.

    The calibrated threshold is drawn as a dashed line when ``thresholds[set]`` or the file's
    ``calibrated_threshold`` gives one.
    """
    plt = _pyplot()
    files = {k: Path(v) for k, v in hist_files.items() if Path(v).is_file()}
    if not files:
        return None
    colours = plt.get_cmap(CMAP)
    with style():
        fig, axes = plt.subplots(1, len(files), figsize=(3.4 * len(files), 2.6), squeeze=False, layout="constrained")
        for ax, (set_name, path) in zip(axes[0], files.items()):
            data = dict(np.load(path, allow_pickle=False))
            edges = _pick(data, "edges", "bin_edges", "bins")
            for label, keys, colour in (
                ("healthy", ("healthy", "healthy_counts", "normal"), colours(0.15)),
                ("lesion", ("lesion", "lesion_counts", "anomalous", "anomaly"), colours(0.8)),
            ):
                values = _pick(data, *keys)
                if values is None:
                    continue
                if edges is not None and values.size == edges.size - 1:
                    total = values.sum()
                    density = values / (total * np.diff(edges)) if total > 0 else values
                    ax.stairs(density, edges, label=f"{label} pixels", color=colour, fill=True, alpha=0.45)
                else:
                    ax.hist(values.ravel(), bins=50, density=True, alpha=0.45, label=f"{label} pixels", color=colour)
            threshold = (thresholds or {}).get(set_name)
            threshold = threshold if threshold is not None else _hist_threshold(data)
            if threshold is not None:
                ax.axvline(threshold, color="black", linestyle="--", linewidth=0.9,
                           label=f"calibrated threshold {threshold:.3g}")
            ax.set_title(f"{title} {set_name}".strip())
            ax.set_xlabel("anomaly score")
            ax.set_ylabel("density")
            ax.legend()
    return fig


def figure3(hist_files: Mapping[str, Path], out_path: str | Path, title: str = "",
            thresholds: Mapping[str, float] | None = None) -> Path | None:
    """Fig. 3 as ``<out_path stem>.pdf`` and ``.png``; returns the PNG path, or None when no file exists.

    ``hist_files`` maps test-set name -> ``score_hist.npz`` holding bin ``edges`` and ``healthy`` /
    ``lesion`` counts (or raw score samples under the same names).
    """
    fig = figure3_figure(hist_files, title=title, thresholds=thresholds)
    return None if fig is None else save_figure(fig, out_path)


def calibration_figure(report: Mapping[str, Any], out_path: str | Path) -> Path:
    """Calibration plot: observed share of held-out healthy pixels (and patches) with p < alpha vs alpha,
    as ``<out_path stem>.pdf`` and ``.png`` (returns the PNG).

    ``report``: `experiments.calibration.ConformalCalibration`'s ``calibration.json`` content. Log-log axes;
    the diagonal is perfect calibration.
    """
    plt = _pyplot()
    colours = plt.get_cmap(CMAP)
    alphas = np.asarray(report["alphas"], dtype=float)
    with style():
        fig, ax = plt.subplots(figsize=(3.4, 3.2), layout="constrained")
        ax.plot(alphas, alphas, color="0.6", lw=1, ls="--", label="ideal")
        ax.plot(alphas, report["pixel_rate"], "o-", color=colours(0.2),
                label=f"pixels ({report.get('check_images', '?')} images)")
        ax.plot(alphas, report["patch_rate"], "s:", ms=4, color=colours(0.7), label="grid patches")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nominal alpha")
        ax.set_ylabel("held-out healthy share with p < alpha")
        ax.set_title("conformal calibration, healthy validation")
        ax.legend()
    return save_figure(fig, out_path)


def froc_figure(metrics_files: Mapping[str, Path], out_path: str | Path, title: str = "FROC") -> Path | None:
    """FROC of one test set: lesion sensitivity against false-positive regions per image, one line per model.

    ``metrics_files`` maps model name -> its evaluation ``metrics.json`` (the ``froc`` curve written by
    `experiments.evaluation_results.EvaluationAccumulator`); the 0.5 / 1 / 2 FP-per-image operating points of
    Table 1 are marked by vertical lines. Returns None when no file holds a curve.
    """
    import json

    plt = _pyplot()
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
    colours = plt.get_cmap(CMAP)
    with style():
        fig, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
        for k, (model, (fp, sens)) in enumerate(curves.items()):
            ax.plot(fp, sens, marker=".", label=model, color=colours(k / max(len(curves) - 1, 1)))
        for rate in (0.5, 1.0, 2.0):
            ax.axvline(rate, color="grey", lw=0.6, ls=":")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(0, max(8.0, max(float(np.nanmax(c[0])) for c in curves.values())))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false-positive regions per image")
        ax.set_ylabel("lesion sensitivity")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return save_figure(fig, out_path)


def val_loss_figure(curves: Mapping[str, Mapping[int, float]], out_path: str | Path) -> Path | None:
    """val/loss against epoch, one panel per fit (their scales differ), to see whether each fit plateaued.

    ``curves`` maps fit name -> {epoch: val/loss}. Returns None when there is no curve.
    """
    plt = _pyplot()
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    cols = min(4, len(curves))
    rows = (len(curves) + cols - 1) // cols
    with style():  # constrained layout: a row's epoch labels never run into the next row's titles
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
        for ax in axes.ravel()[len(curves):]:
            ax.axis("off")
        for ax, (name, curve) in zip(axes.ravel(), curves.items()):
            epochs = sorted(curve)
            ax.plot(epochs, [curve[e] for e in epochs], marker=".")
            best = min(epochs, key=curve.__getitem__)
            ax.axvline(best, color="grey", lw=0.6, ls=":")
            ax.set_title(f"{name}: best epoch {best}, last {epochs[-1]}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel("val/loss", fontsize=8)
    return save_figure(fig, out_path)


# --- W&B panels: uint8 RGB arrays for wandb.Image, no file written ------------------------------


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap_panel(
    image: np.ndarray, breast_mask: np.ndarray, lesion_mask: np.ndarray, amap: np.ndarray, seg: np.ndarray
) -> np.ndarray:
    """A uint8 RGB panel (H x 3W x 3): scan | heatmap over the scan | segmentation (green) vs truth (red).

    W&B renders float images black; this is what goes to ``wandb.Image``.
    """
    from matplotlib import colormaps

    image = np.nan_to_num(np.asarray(image, np.float32))
    gray = np.repeat(image[..., None], 3, axis=2)
    values = amap[breast_mask]
    norm = np.zeros_like(image)
    if values.size:
        low, high = float(np.min(values)), float(np.max(values))
        norm = np.where(breast_mask, (np.nan_to_num(amap, nan=low) - low) / max(high - low, 1e-12), 0.0)
    heat = colormaps["inferno"](norm)[..., :3]
    overlay = np.where(breast_mask[..., None], 0.45 * gray + 0.55 * heat, gray)
    masks = 0.6 * gray
    masks[lesion_mask] = 0.5 * masks[lesion_mask] + 0.5 * np.array([1.0, 0.0, 0.0])
    masks[seg] = 0.5 * masks[seg] + 0.5 * np.array([0.0, 1.0, 0.0])
    return _to_uint8(np.concatenate([gray, overlay, masks], axis=1))


#: Height (px) of every heatmap panel logged to W&B, so panels of different images compare side by side.
PANEL_HEIGHT = 256


def panel_at_height(panel: np.ndarray, height: int = PANEL_HEIGHT) -> np.ndarray:
    """``panel`` resized (area / linear) to ``height`` rows, keeping its aspect ratio."""
    import cv2

    width = max(1, round(panel.shape[1] * height / panel.shape[0]))
    interpolation = cv2.INTER_AREA if panel.shape[0] > height else cv2.INTER_LINEAR
    return cv2.resize(panel, (width, height), interpolation=interpolation)


def score_distribution_image(hist: Mapping[str, np.ndarray], title: str) -> np.ndarray:
    """A uint8 RGB plot of the healthy vs lesion pixel-score densities (Fig. 3 style)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = np.asarray(hist["bin_edges"])
    fig = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, color in (("healthy", "tab:blue"), ("lesion", "tab:red")):
        counts = np.asarray(hist[key], np.float64)
        total = counts.sum()
        if total > 0:
            density = counts / (total * np.diff(edges))
            ax.stairs(density, edges, fill=True, alpha=0.5, color=color, label=f"{key} ({int(total)} px)")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_rgb(fig)


def figure_rgb(fig: Any) -> np.ndarray:
    """The rendered figure as uint8 RGB (a W&B panel, the predict Secondary Capture); the figure stays open."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

