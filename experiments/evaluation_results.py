"""The test set's results: `EvaluationAccumulator` pools the per-image evaluations; the writers publish them.

Image by image, `EvaluationAccumulator.add` evaluates a scan (`evaluation.evaluate_scan`) and keeps its row,
its pixel tables (pooled, interior and per-group exact AUCs) and FROC counts; `summary()` gives every scalar
of ``metrics.json``. The writers put ``metrics.json``, ``per_image.csv``, ``score_hist.npz`` and
``maps/*.npz`` on disk (temporary name, then renamed); the CLI, Table 1 and the figures read them.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from datamodules.fileio import atomic_write, write_json
from experiments import localisation, metrics
from experiments.anomaly_maps import threshold_rule_name
from experiments.evaluation import (
    EXCLUSION_REASONS,
    FROC_PERCENTILES,
    GROUP_KINDS,
    ImageEvaluation,
    ImageResult,
    evaluate_scan,
)
from experiments.metrics import as_numpy


def _group_keys(row: ImageResult) -> list[str]:
    keys = []
    if row.density_group:
        keys.append(f"density:{row.density_group}")
    if row.border_group:
        keys.append(f"border:{row.border_group}")
    return keys


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


class EvaluationAccumulator:
    """Collects per-image results and the pooled pixel AUCs (all breast pixels, interior pixels, per image
    group) and the FROC counts, image by image, and summarises them.

    Memory: the per-image rows, the FROC counts (a few numbers per image) plus the exact AUCs'
    distinct-value tables (``metrics.ExactAUC``); maps are not kept. An image id seen before is skipped
    (counted in ``n_duplicates``). ``state()`` / ``merge_state()`` combine results gathered from several
    processes; with ``keep_image_tables`` each image's pixel tables are kept apart so that images two ranks
    both scored (DistributedSampler padding) are pooled once; the memory is about the same, the tables are
    just not summed yet.
    """

    def __init__(self, threshold_rule: str = "image_percentile", percentile: float = 99.0,
                 threshold_value: float | None = None, keep_image_tables: bool = False) -> None:
        self.threshold_rule = threshold_rule
        self.percentile = float(percentile)
        self.threshold_value = threshold_value
        self.keep_image_tables = keep_image_tables
        self.rule_name = threshold_rule_name(threshold_rule, self.percentile, threshold_value)
        self.reset()

    def reset(self) -> None:
        """Forgets every image."""
        self.results: list[ImageResult] = []
        self.pixels = metrics.ExactAUC()
        self.interior_pixels = metrics.ExactAUC()
        self.group_pixels: dict[str, metrics.ExactAUC] = {}
        self.image_tables: dict[str, tuple] = {}
        self.froc: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.n_duplicates = 0
        self._seen: set[str] = set()

    def _pool(self, row: ImageResult, tables: tuple | None, interior: tuple | None) -> None:
        """Adds one new image's pixel tables to the pooled, interior and group AUCs."""
        if tables is not None:
            self.pixels.update_counts(*tables)
            for key in _group_keys(row):
                self.group_pixels.setdefault(key, metrics.ExactAUC()).update_counts(*tables)
        if interior is not None:
            self.interior_pixels.update_counts(*interior)
        if self.keep_image_tables and tables is not None:
            self.image_tables[row.image_id] = (tables, interior)

    def add(self, item: Mapping, scores: object) -> ImageEvaluation:
        """Evaluates one item (`evaluate_scan`) and pools it; returns its evaluation (row, map, segmentation)."""
        ev = evaluate_scan(item, scores, self.threshold_rule, self.percentile, self.threshold_value)
        result = ev.result
        if result.image_id in self._seen:
            self.n_duplicates += 1
            return ev
        self._seen.add(result.image_id)
        self.results.append(result)
        self._pool(result, ev.tables, ev.interior_tables)
        if ev.froc is not None:
            self.froc[result.image_id] = ev.froc
        return ev

    def state(self) -> dict:
        """A picklable summary of what was collected (for gathering across processes)."""
        state: dict = {"results": [asdict(r) for r in self.results], "n_duplicates": self.n_duplicates,
                       "froc": dict(self.froc)}
        if self.keep_image_tables:
            state["image_tables"] = self.image_tables
        else:
            state["positive"] = self.pixels.counts(True)
            state["negative"] = self.pixels.counts(False)
            state["interior"] = (self.interior_pixels.counts(True), self.interior_pixels.counts(False))
            state["groups"] = {k: (a.counts(True), a.counts(False)) for k, a in self.group_pixels.items()}
        return state

    def merge_state(self, state: Mapping) -> None:
        """Adds another accumulator's ``state()``; images already present (same image_id) are skipped.

        Only a state with per-image tables (``keep_image_tables``) can leave a repeated image's pixels
        out of the pooled AUC; a summed state is added whole.
        """
        self.n_duplicates += int(state.get("n_duplicates", 0))
        new_rows: dict[str, ImageResult] = {}
        for row in state["results"]:
            if row["image_id"] in self._seen:
                self.n_duplicates += 1
                continue
            self._seen.add(row["image_id"])
            new_rows[row["image_id"]] = ImageResult(**row)
            self.results.append(new_rows[row["image_id"]])
        for image_id, counts in (state.get("froc") or {}).items():
            if image_id in new_rows:
                self.froc[image_id] = counts
        if "image_tables" in state:
            for image_id, (tables, interior) in state["image_tables"].items():
                if image_id in new_rows:
                    self._pool(new_rows[image_id], tables, interior)
        else:
            self.pixels.update_counts(state["positive"], state["negative"])
            if "interior" in state:
                self.interior_pixels.update_counts(*state["interior"])
            for key, tables in (state.get("groups") or {}).items():
                self.group_pixels.setdefault(key, metrics.ExactAUC()).update_counts(*tables)

    def froc_summary(self) -> dict:
        """The pooled FROC of the evaluated images (one global threshold swept; all lesions, near the border,
        interior), the sensitivity at `localisation.FROC_FP_RATES` false positives per image, and beside it the
        per-image percentile curve (each image at its own percentile)."""
        used = [r for r in self.results if not r.excluded and r.image_id in self.froc]
        n_lesions = sum(r.n_lesions for r in used)
        n_near = sum(r.n_lesions_near_border for r in used)
        levels = [np.asarray(self.froc[r.image_id][0], np.float64) for r in used]
        found = [np.asarray(self.froc[r.image_id][1], np.int64) for r in used]
        near = [np.asarray(self.froc[r.image_id][2], np.int64) for r in used]
        fps = [np.asarray(self.froc[r.image_id][3], np.int64) for r in used]
        thresholds, fp_per_image, sens_all = localisation.froc_global(levels, found, fps, n_lesions)
        _, _, sens_near = localisation.froc_global(levels, near, fps, n_near)
        _, _, sens_interior = localisation.froc_global(levels, [f - n for f, n in zip(found, near, strict=True)], fps,
                                                  n_lesions - n_near)
        curves = {"all": sens_all, "near_border": sens_near, "interior": sens_interior}
        out: dict = {
            "froc": {"sweep": "one global threshold over every image's score-percentile levels",
                     "thresholds": thresholds.tolist(), "fp_per_image": fp_per_image.tolist(),
                     **{f"sensitivity_{k}": v.tolist() for k, v in curves.items()}},
            "n_lesions": n_lesions, "n_lesions_near_border": n_near,
        }
        for name, sens in curves.items():
            suffix = "" if name == "all" else f"_{name}"
            for rate, value in localisation.sensitivity_at_fp(fp_per_image, sens).items():
                out[f"sensitivity_at_{_rate_key(rate)}_fp{suffix}"] = value
        if used:
            n = len(used)
            per_image_fp = np.sum(fps, axis=0) / n
            per_image_sens = np.sum(found, axis=0) / n_lesions if n_lesions else np.full(len(FROC_PERCENTILES), np.nan)
            out["froc_image_percentile"] = {"percentiles": list(FROC_PERCENTILES), "fp_per_image": per_image_fp.tolist(),
                                            "sensitivity_all": per_image_sens.tolist()}
            for rate, value in localisation.sensitivity_at_fp(per_image_fp, per_image_sens).items():
                out[f"sensitivity_at_{_rate_key(rate)}_fp_image_percentile"] = value
        found_t = sum(r.lesions_found_at_threshold for r in used)
        out["sensitivity_at_threshold"] = found_t / n_lesions if n_lesions else math.nan
        out["fp_per_image_at_threshold"] = (
            sum(r.false_positives_at_threshold for r in used) / len(used) if used else math.nan
        )
        return out

    def group_summary(self) -> dict:
        """Per image group (density F / G / D or BI-RADS 1-2 / 3-4; lesion near the border / interior):
        pooled pixel AUC, image AUC mean / std, lesion hit rate, images."""
        used = [r for r in self.results if not r.excluded]
        groups: dict[str, dict] = {kind: {} for kind in GROUP_KINDS}
        for key, acc in sorted(self.group_pixels.items()):
            kind, name = key.split(":", 1)
            rows = [r for r in used if key in _group_keys(r)]
            auc_mean, auc_std, _ = metrics.mean_std(r.auc for r in rows)
            hit, _, _ = metrics.mean_std(r.lesion_hit for r in rows)
            groups[kind][name] = {"pixel_auc": acc.compute(), "image_auc_mean": auc_mean,
                                  "image_auc_std": auc_std, "lesion_hit_rate": hit, "n_images": len(rows)}
        flat: dict = {"density_groups": groups["density"], "border_groups": groups["border"]}
        for name, values in groups["density"].items():
            flat[f"pixel_auc_density_{name}"] = values["pixel_auc"]
        for name in ("near_border", "interior"):
            values = groups["border"].get(name, {})
            flat[f"lesion_hit_rate_{name}"] = values.get("lesion_hit_rate", math.nan)
            flat[f"pixel_auc_{name}_lesions"] = values.get("pixel_auc", math.nan)
            flat[f"n_images_{name}_lesions"] = values.get("n_images", 0)
        return flat

    def summary(self) -> dict:
        """All scalars: pixel AUC, image AUC mean/std, Hausdorff mean/std (px, mm, grid cells), localisation
        (hit rate, FROC, border shares, interior AUC), per-group AUCs, counts, policies."""
        used = [r for r in self.results if not r.excluded]
        auc_mean, auc_std, n_auc = metrics.mean_std(r.auc for r in used)
        h_px_mean, h_px_std, n_h = metrics.mean_std(r.hausdorff_px for r in used)
        h_mm_mean, h_mm_std, _ = metrics.mean_std(r.hausdorff_mm for r in used)
        h_cells_mean, h_cells_std, _ = metrics.mean_std(r.hausdorff_cells for r in used)
        hit_mean, _, n_hit = metrics.mean_std(r.lesion_hit for r in used)
        border_mean, _, _ = metrics.mean_std(r.top1_near_border_fraction for r in self.results)
        border_area, _, _ = metrics.mean_std(r.border_area_fraction for r in self.results)
        reasons = Counter(r.excluded for r in self.results if r.excluded)
        strides = sorted({r.stride for r in self.results if r.stride})
        return {
            "pixel_auc": self.pixels.compute(),
            "image_auc_mean": auc_mean,
            "image_auc_std": auc_std,
            "hausdorff_px_mean": h_px_mean,
            "hausdorff_px_std": h_px_std,
            "hausdorff_mm_mean": h_mm_mean,
            "hausdorff_mm_std": h_mm_std,
            "hausdorff_cells_mean": h_cells_mean,
            "hausdorff_cells_std": h_cells_std,
            "grid_stride": strides[0] if len(strides) == 1 else strides,
            "lesion_hit_rate": hit_mean,
            "n_lesion_hit": n_hit,
            "interior_pixel_auc": self.interior_pixels.compute(),
            "top1_near_border_fraction_mean": border_mean,
            "border_area_fraction_mean": border_area,
            **self.froc_summary(),
            **self.group_summary(),
            "n_images": len(self.results),
            "n_evaluated": len(used),
            "n_excluded": len(self.results) - len(used),
            "n_duplicates": self.n_duplicates,
            "excluded_reasons": {k: int(reasons.get(k, 0)) for k in EXCLUSION_REASONS},
            "n_image_auc": n_auc,
            "n_hausdorff": n_h,
            "n_hausdorff_empty": len(used) - n_h,
            "n_patches": int(sum(r.n_patches for r in self.results)),
            "n_lesion_pixels": self.pixels.n_positive,
            "n_healthy_pixels": self.pixels.n_negative,
            "threshold_rule": self.rule_name,
            "empty_policy": metrics.HAUSDORFF_EMPTY_POLICY,
        }

    def score_histogram(self, bins: int = 100) -> dict[str, np.ndarray]:
        """Exact histograms of healthy vs lesion breast-pixel scores with shared bin edges (Fig. 3).

        "healthy" = breast pixels outside the lesion, "lesion" = lesion pixels, both of the evaluated
        (not excluded) images: the pixels the pooled pixel AUC ranks.
        """
        pos = self.pixels.counts(True)
        neg = self.pixels.counts(False)
        values = [t[0] for t in (pos, neg) if t[0].size]
        if values:
            low = min(float(v[0]) for v in values)
            high = max(float(v[-1]) for v in values)
        else:
            low, high = 0.0, 1.0
        if high <= low:
            high = low + 1.0
        edges = np.linspace(low, high, bins + 1)
        return {
            "bin_edges": edges,
            "healthy": np.histogram(neg[0], bins=edges, weights=neg[1])[0].astype(np.int64),
            "lesion": np.histogram(pos[0], bins=edges, weights=pos[1])[0].astype(np.int64),
        }


# ----------------------------------------------------------------------------------------------
# Writing results: always to a temporary name in the target folder, then renamed.


def write_metrics_json(path: str | Path, summary: Mapping) -> Path:
    """Writes the scalars as strict JSON (NaN -> null), atomically."""
    path = Path(path)
    return write_json(path, summary, sort_keys=True)


def write_per_image_csv(path: str | Path, results: list[ImageResult]) -> Path:
    """Writes one row per image (columns of `ImageResult`; NaN written as empty), atomically."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ImageResult.columns())
    writer.writeheader()
    for result in results:
        row = asdict(result)
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue().encode())
    return path


def write_npz(path: str | Path, **arrays: object) -> Path:
    """Writes a compressed ``.npz`` atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, buffer.getvalue())
    return path


def safe_file_stem(image_id: str) -> str:
    """An image id made safe as a file name (path separators and odd characters replaced)."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(image_id)).strip(".")
    return stem or "image"


def write_map(path: str | Path, item: Mapping, amap: np.ndarray, seg: np.ndarray, result: ImageResult) -> Path:
    """Saves what Fig. 2 needs for one image: scan, masks, anomaly map (float16), segmentation."""
    return write_npz(
        path,
        image=as_numpy(item["scan"]).astype(np.float32),
        breast_mask=as_numpy(item["breast_mask"]).astype(bool),
        lesion_mask=as_numpy(item["lesion_mask"]).astype(bool),
        anomaly_map=amap.astype(np.float16),
        segmentation=seg.astype(bool),
        image_id=np.array(result.image_id),
        threshold_rule=np.array(result.threshold_rule),
        threshold=np.float64(result.threshold),
        hausdorff_px=np.float64(result.hausdorff_px),
        hausdorff_mm=np.float64(result.hausdorff_mm),
        spacing_mm=np.float64(result.spacing_mm),
    )


#: the files and folders one test writes (published together; retired together)
RESULT_ENTRIES = ("metrics.json", "per_image.csv", "score_hist.npz", "maps")


def retire_results(out_dir: str | Path, reason: str) -> Path | None:
    """Moves an earlier test's results out of ``out_dir`` into ``out_dir/stale-<UTC time>/`` (with ``reason.txt``),
    so a failed test never leaves numbers that look current, and nothing is deleted. None if there were none."""
    out_dir = Path(out_dir)
    present = [out_dir / name for name in RESULT_ENTRIES if (out_dir / name).exists()]
    if not present:
        return None
    stale = out_dir / time.strftime("stale-%Y%m%dT%H%M%SZ", time.gmtime())
    stale.mkdir(parents=True, exist_ok=True)
    if (out_dir / "metrics.json").exists():  # the marker first: a crash midway leaves nothing that looks current
        os.replace(out_dir / "metrics.json", stale / "metrics.json")
    for entry in present:
        if entry.exists():
            os.replace(entry, stale / entry.name)
    atomic_write(stale / "reason.txt", reason.rstrip() + "\n")
    return stale
