"""`lightning predict` for a reader of mammograms: maps, readable overlays, candidate regions, DICOM out.

Per scored image, under ``<results_dir>/<run>/predictions/`` (the input folder's layout is kept, so files
with one stem in different folders never collide):

- ``<stem>_map.npy``: float32 anomaly map at evaluation spacing, NaN outside the breast
  (``<stem>_map_native.npy`` on the source's pixel grid with ``prediction.native_grid``);
- ``<stem>_mask.png``: the thresholded map (255 = above threshold, inside the breast);
- ``<stem>_overlay.png`` (drawn by `overlays`): the grey scan at full contrast, heat (`figures.CMAP`)
  only where the score is above the threshold, the breast outline (magenta), a colorbar in the model's
  score unit, a scale bar in mm, the image ID and the model;
- ``<stem>_regions.json``: connected regions above the threshold (centre, area in mm^2, peak score,
  p-value when the model is calibrated), the spacing used and where it came from;
- for DICOM inputs (``prediction.dicom``): ``<stem>_seg.dcm``, a DICOM Segmentation of the thresholded
  map on the source grid, and ``<stem>_overlay_sc.dcm``, a Secondary Capture of the overlay, both in the
  source's study and referencing its series and instance (highdicom).

For the whole run: ``predictions.csv`` (one row per image, ``image_score`` = the peak of the map) and
``summary.json`` (what was scored, what was skipped and why). An image that cannot be read is skipped with
its path and reason; the run ends with ``predict: scored N, skipped M (reasons)`` and where everything went.

Threshold: the model's calibrated ``threshold`` (attribute or buffer, finite) when it carries one, else
the chosen percentile of the image's own breast-pixel scores (default 99th, the paper's rule).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from datamodules.fileio import atomic_write, write_json
from experiments import anomaly_maps, evaluation_results, figures, metrics
from experiments.figures import figure_rgb
from experiments.overlays import overlay_figure, overlay_rgb

#: Score unit per model class, for the overlay's colorbar (a model may declare ``score_unit`` itself).
SCORE_UNITS = {
    "RatSpnStage": "-log p(z) (nats)",
    "CAE": "reconstruction MSE",
    "VQVAE": "reconstruction MSE",
    "BetaVAE": "beta-ELBO loss",
    "FAnoGAN": "f-AnoGAN score (MSE + kappa feature MSE)",
    "FAnoGANEncoder": "f-AnoGAN score (MSE + kappa feature MSE)",
}
PREDICTIONS_COLUMNS = (
    "image_id", "source_path", "image_score", "top1pct_mean", "threshold", "threshold_rule", "n_regions",
    "largest_region_mm2", "min_p_value", "native_spacing_mm", "spacing_source", "spacing_mm", "model",
    "map", "overlay", "regions", "segmentation_dcm", "overlay_dcm",
)


@dataclass
class PredictionOptions:
    """How `lightning predict` writes its outputs (the ``prediction`` section of a config)."""

    percentile: float = 99.0
    """Threshold = this percentile of the image's breast-pixel scores, unless the model carries a calibrated one."""
    native_grid: bool = False
    """Also write the map on the source image's pixel grid (``<stem>_map_native.npy``)."""
    dicom: bool = True
    """For DICOM inputs, write a DICOM Segmentation and a Secondary Capture of the overlay."""
    log_images: int = 32
    """At most this many overlays go to W&B (the predictions table always does, when W&B is on)."""


# --- what the model carries ------------------------------------------------------------------------


def calibrated_threshold(model: Any) -> float | None:
    """The model's calibrated score threshold (`anomaly_maps.model_threshold`), None when absent or not fitted:
    predict then falls back to the percentile rule instead of refusing."""
    try:
        return anomaly_maps.model_threshold(model)
    except (TypeError, ValueError, IndexError):
        return None


def p_value_function(model: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """Score -> p-value under healthy tissue, when the model is calibrated; None otherwise.

    A model whose conformal calibrator is fitted scores -log p already (`AnomalyDetector.score_item`), so
    p = exp(-score); else a model's own ``p_value(scores)``; else an empirical p-value from a
    ``calibration_scores`` buffer of healthy scores: (1 + #healthy >= s) / (n + 1), never 0.
    """
    if _calibrated_scores(model):
        return lambda s: np.exp(-np.asarray(s, dtype=np.float64))
    method = getattr(model, "p_value", None)
    if callable(method):
        return lambda s: np.asarray(metrics.as_numpy(method(np.asarray(s, dtype=np.float64))), dtype=np.float64)
    healthy = getattr(model, "calibration_scores", None)
    if healthy is None:
        return None
    ref = np.sort(metrics.as_numpy(healthy).astype(np.float64).ravel())
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return None
    return lambda s: (1.0 + ref.size - np.searchsorted(ref, np.asarray(s, np.float64), side="left")) / (ref.size + 1.0)


def _calibrated_scores(model: Any) -> bool:
    """True when the model's scores are conformally calibrated (-log p against healthy tissue)."""
    calibrator = getattr(model, "calibrator", None)
    return bool(getattr(calibrator, "fitted", False))


def score_unit(model: Any) -> str:
    """The unit of a model's anomaly score, for colorbars (``model.score_unit`` or `SCORE_UNITS`)."""
    if _calibrated_scores(model):
        return "-log p, calibrated on healthy tissue (nats)"
    unit = getattr(model, "score_unit", None)
    if isinstance(unit, str) and unit:
        return unit
    return SCORE_UNITS.get(type(model).__name__, "anomaly score")


# --- per image ---------------------------------------------------------------------------------------


def candidate_regions(amap: np.ndarray, seg: np.ndarray, spacing_mm: float, native_spacing_mm: float | None = None,
                      p_value: Callable[[np.ndarray], np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Connected regions of ``seg`` (8-connectivity), highest peak first: centre (px at evaluation spacing,
    mm, native px), area (px, mm^2), peak score and where it is, mean score, p-value of the peak when calibrated."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(seg.astype(np.uint8), connectivity=8)
    regions = []
    for label in range(1, count):
        inside = labels == label
        values = np.where(inside, amap, -np.inf)
        peak_index = np.unravel_index(int(np.argmax(values)), amap.shape)
        peak = float(amap[peak_index])
        col, row = (float(v) for v in centroids[label])
        area_px = int(stats[label, cv2.CC_STAT_AREA])
        region: dict[str, Any] = {
            "centre_row_px": round(row, 2), "centre_col_px": round(col, 2),
            "centre_row_mm": round(row * spacing_mm, 3), "centre_col_mm": round(col * spacing_mm, 3),
            "area_px": area_px, "area_mm2": round(area_px * spacing_mm**2, 3),
            "peak_score": peak, "peak_row_px": int(peak_index[0]), "peak_col_px": int(peak_index[1]),
            "mean_score": float(amap[inside].mean()),
            "p_value": float(np.asarray(p_value(np.array([peak]))).reshape(-1)[0]) if p_value else None,
        }
        if native_spacing_mm:
            factor = spacing_mm / native_spacing_mm
            region["centre_row_native_px"] = round(row * factor, 1)
            region["centre_col_native_px"] = round(col * factor, 1)
        regions.append(region)
    return sorted(regions, key=lambda r: -r["peak_score"])


def native_map(amap: np.ndarray, breast: np.ndarray, native_shape: tuple[int, int]) -> np.ndarray:
    """The map resampled (bilinear) to the source grid, NaN outside the breast mask (nearest-resampled)."""
    filled = np.where(np.isfinite(amap), amap, np.nanmin(amap) if np.isfinite(amap).any() else 0.0)
    size = (int(native_shape[1]), int(native_shape[0]))
    out = cv2.resize(filled.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    inside = cv2.resize(breast.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    out[~inside] = np.nan
    return out


def _png(image: np.ndarray) -> bytes:
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@dataclass
class Prediction:
    """What `write_prediction` wrote for one image: the predictions.csv row and every file."""

    row: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    overlay: np.ndarray | None = None


def write_prediction(
    item: Mapping[str, Any],
    scores: Any,
    output_dir: str | Path,
    stem: str | None = None,
    model: Any = None,
    model_name: str = "model",
    options: PredictionOptions | None = None,
) -> Prediction:
    """Writes every per-image output of the module docstring for one evaluation item and its patch scores."""
    options = options or PredictionOptions()
    output_dir = Path(output_dir)
    image = metrics.as_numpy(item["scan"]).astype(np.float32)
    image = image.reshape(image.shape[-2:])
    breast_value = item.get("breast_mask")
    breast = (metrics.as_numpy(breast_value).astype(bool).reshape(image.shape) if breast_value is not None
              else np.ones(image.shape, dtype=bool))
    stride = int(metrics.as_numpy(item.get("stride", 16)))
    spacing = float(metrics.as_numpy(item.get("spacing_mm", 0.2)))
    meta = dict(item.get("meta") or {})
    image_id = str(item.get("image_id", "image"))
    stem = stem or evaluation_results.safe_file_stem(image_id)
    amap = anomaly_maps.anomaly_map(scores, item["centers"], breast, stride)
    calibrated = calibrated_threshold(model)
    if calibrated is not None:
        threshold, rule = calibrated, "calibrated threshold"
    else:
        threshold = anomaly_maps.image_percentile_threshold(amap, breast, options.percentile)
        rule = f"image {options.percentile:g}th percentile"
    seg = anomaly_maps.segment(amap, breast, threshold)
    p_value = p_value_function(model)
    native_spacing = meta.get("native_spacing_mm")
    regions = candidate_regions(amap, seg, spacing, native_spacing, p_value)
    values = amap[breast & np.isfinite(amap)]
    image_score = float(values.max()) if values.size else math.nan
    top = np.sort(values)[-max(1, int(math.ceil(0.01 * values.size))):] if values.size else values
    vmax = float(np.percentile(values, 99.9)) if values.size else threshold
    vmax = max(vmax, image_score) if math.isfinite(image_score) else vmax
    unit = score_unit(model)

    base = output_dir / stem
    paths = {"map": base.with_name(f"{base.name}_map.npy"), "mask": base.with_name(f"{base.name}_mask.png"),
             "overlay": base.with_name(f"{base.name}_overlay.png"),
             "regions": base.with_name(f"{base.name}_regions.json")}
    atomic_write(paths["map"], _npy(amap))
    if options.native_grid and meta.get("native_shape"):
        paths["map_native"] = base.with_name(f"{base.name}_map_native.npy")
        atomic_write(paths["map_native"], _npy(native_map(amap, breast, tuple(meta["native_shape"]))))
    atomic_write(paths["mask"], _png(seg.astype(np.uint8) * 255))
    rgb = overlay_rgb(image, amap, breast, threshold, vmax)
    fig = overlay_figure(rgb, spacing, image_id, model_name, unit, threshold, vmax, rule, image_score)
    source = Path(str(meta.get("source_path", "")))
    dicom_in = options.dicom and source.suffix.lower() in (".dcm", ".dicom") and source.is_file()
    rendered = figure_rgb(fig) if dicom_in else None
    paths["overlay"] = figures.save_figure(fig, paths["overlay"], formats=("png",))
    spacing_info = {"spacing_mm": spacing, "native_spacing_mm": native_spacing,
                    "spacing_source": meta.get("spacing_source"), "native_shape": meta.get("native_shape")}
    write_json(paths["regions"], {
        "image_id": image_id, "source_path": meta.get("source_path") or item.get("source_path"),
        "model": model_name, "score_unit": unit, "image_score": image_score, "threshold": threshold,
        "threshold_rule": rule, "calibrated": calibrated is not None, **spacing_info, "regions": regions,
    })
    row = {
        "image_id": image_id, "source_path": meta.get("source_path", ""), "image_score": image_score,
        "top1pct_mean": float(top.mean()) if top.size else math.nan, "threshold": threshold,
        "threshold_rule": rule, "n_regions": len(regions),
        "largest_region_mm2": max((r["area_mm2"] for r in regions), default=0.0),
        "min_p_value": min((r["p_value"] for r in regions if r["p_value"] is not None), default=""),
        "native_spacing_mm": native_spacing if native_spacing is not None else "",
        "spacing_source": meta.get("spacing_source", ""), "spacing_mm": spacing, "model": model_name,
        "map": str(paths["map"]), "overlay": str(paths["overlay"]), "regions": str(paths["regions"]),
        "segmentation_dcm": "", "overlay_dcm": "",
    }
    if rendered is not None:
        from experiments.dicom_out import write_dicom_outputs

        try:
            dicom_paths = write_dicom_outputs(source, seg, rendered, base, model_name, threshold, rule)
        except Exception as err:  # noqa: BLE001 - the image's other outputs stand; say why DICOM out failed
            print(f"predict: {source}: no DICOM outputs ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
        else:
            paths.update(dicom_paths)
            row["segmentation_dcm"] = str(dicom_paths["segmentation_dcm"])
            row["overlay_dcm"] = str(dicom_paths["overlay_dcm"])
    return Prediction(row=row, paths=paths, overlay=rgb)


def output_stem(image_id: str, source_path: str, used: set[str]) -> str:
    """A relative output stem that keeps the input's folders (``a/scan`` and ``b/scan`` stay apart), each
    part made file-safe; a stem already taken (``scan.png`` beside ``scan.dcm``) gets the source's hash."""
    parts = [evaluation_results.safe_file_stem(p) for p in str(image_id).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    stem = "/".join(parts) or "image"
    if stem in used:
        stem = f"{stem}_{hashlib.sha1(str(source_path).encode()).hexdigest()[:8]}"
    used.add(stem)
    return stem


def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One row per scored image (`PREDICTIONS_COLUMNS`; NaN written as empty), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PREDICTIONS_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue())
    return path


def skip_summary(skipped: list[dict[str, str]]) -> str:
    """``2 unreadable, 1 no pixel spacing``-style counts of the skip reasons."""
    def kind(reason: str) -> str:
        text = reason.lower()
        if "spacing" in text:
            return "no pixel spacing"
        if "breast mask is empty" in text:
            return "empty image"
        if "not found" in text:
            return "missing file"
        return "unreadable"

    counts = Counter(kind(s["reason"]) for s in skipped)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


class PredictionWriter(Callback):
    """`lightning predict`'s writer: per image the outputs of `write_prediction`, then predictions.csv,
    summary.json, the summary line, and (when W&B is on) the overlays and the predictions table.

    A plain callback, not a `BasePredictionWriter`: that one makes Lightning track batch indices, which
    one-image batches (``batch_size=None``) do not have, and warn about it on every run.
    """

    def __init__(self, output_dir: str | Path, percentile: float = 99.0, native_grid: bool = False,
                 dicom: bool = True, log_images: int = 32) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.options = PredictionOptions(percentile, native_grid, dicom, log_images)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.written: list[str] = []
        self._stems: set[str] = set()
        self._overlays: list[tuple[str, Path]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows, self.skipped, self.written, self._stems, self._overlays = [], [], [], set(), []

    def _skip(self, image_id: str, path: str, reason: str) -> None:
        reason = reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason
        self.skipped.append({"image_id": image_id, "path": path, "reason": reason})
        print(f"predict: skipped {path}: {reason}", file=sys.stderr, flush=True)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        meta = dict(batch.get("meta") or {})
        image_id = str(batch.get("image_id", f"image{batch_idx}"))
        source = str(meta.get("source_path") or batch.get("source_path") or image_id)
        if batch.get("skipped"):
            self._skip(image_id, source, str(batch["skipped"]))
            return
        scores = prediction["scores"] if isinstance(prediction, dict) else prediction
        stem = output_stem(image_id, source, self._stems)
        try:
            result = write_prediction(batch, scores, self.output_dir, stem, pl_module,
                                      model_name=type(pl_module).__name__, options=self.options)
        except ValueError as err:  # e.g. NaN scores: this image is reported, the others still scored
            self._skip(image_id, source, f"could not be scored ({err})")
            return
        self.rows.append(result.row)
        self.written.extend(str(p) for p in result.paths.values())
        self._overlays.append((image_id, result.paths["overlay"]))
        spacing = result.row["native_spacing_mm"]
        spacing_text = f"native {spacing:g} mm ({result.row['spacing_source'] or 'unknown source'}) -> " if spacing else ""
        print(f"predict: {source}: {spacing_text}{result.row['spacing_mm']:g} mm, image score "
              f"{result.row['image_score']:.4g}, {result.row['n_regions']} region(s) above the "
              f"{result.row['threshold_rule']}", flush=True)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from datamodules.records import DataError

        self.output_dir.mkdir(parents=True, exist_ok=True)
        csv_path = write_predictions_csv(self.output_dir / "predictions.csv", self.rows)
        summary = {"scored": len(self.rows), "skipped": self.skipped, "model": type(pl_module).__name__,
                   "threshold": calibrated_threshold(pl_module), "percentile": self.options.percentile,
                   "predictions_csv": str(csv_path)}
        evaluation_results.write_metrics_json(self.output_dir / "summary.json", summary)
        reasons = f" ({skip_summary(self.skipped)})" if self.skipped else ""
        line = (f"predict: scored {len(self.rows)}, skipped {len(self.skipped)}{reasons}; maps, overlays, "
                f"regions{' and DICOMs' if any(r['segmentation_dcm'] for r in self.rows) else ''} in "
                f"{self.output_dir}/, one row per image in {csv_path}")
        print(line, flush=True)
        if self.rows:
            from experiments.loggers import log_predictions

            log_predictions(trainer, self.rows, self._overlays[: max(0, self.options.log_images)])
        if not self.rows:
            first = f"{self.skipped[0]['path']}: {self.skipped[0]['reason']}" if self.skipped else "no image"
            raise DataError(f"predict: no image could be scored ({len(self.skipped)} skipped; first: {first})")
