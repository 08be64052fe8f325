"""Table 1 from the test stages' files: read each evaluation, build the rows, format and write the table.

`read_model_result` reads one test stage's ``metrics.json`` and ``per_image.csv``; `build_table` puts the rows
in the paper's order, each AE / AE-RATSPN pair with its paired Wilcoxon test; `format_markdown` /
`format_csv` / `write_table1` give ``table1.md`` and ``table1.csv``; the training summary and the figures
(Fig. 2, Fig. 3, FROC, val/loss) go beside them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.fileio import atomic_write
from experiments import calibration
from experiments.table1_stages import CALIBRATED_CKPT, MODEL_ORDER, TEST_SETS, Stage, model_slug

#: AE -> its RAT-SPN extension, compared by a paired Wilcoxon signed-rank test on per-image AUCs
PAIRS = (("CAE", "CAE-RATSPN"), ("bVAE", "bVAE-RATSPN"), ("VQVAE", "VQVAE-RATSPN"))
ALPHA = 0.01


@dataclass
class ModelResult:
    """One model on one test set: the evaluation's summary and its per-image AUCs."""

    test_set: str
    model: str
    summary: dict[str, Any]
    per_image_auc: dict[str, float]


def read_model_result(eval_run_dir: Path, test_set: str, model: str) -> ModelResult:
    """Reads an evaluation folder's ``metrics.json`` and ``per_image.csv`` (the EvaluationCallback's files)."""
    metrics_path = eval_run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} missing: rerun the test stage of {model} on {test_set}")
    summary = json.loads(metrics_path.read_text())
    aucs: dict[str, float] = {}
    per_image = eval_run_dir / "per_image.csv"
    if per_image.is_file():
        with per_image.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("excluded"):
                    continue
                aucs[row["image_id"]] = float(row["auc"]) if row.get("auc") not in (None, "") else math.nan
    return ModelResult(test_set, model, summary, aucs)


#: localisation columns of every row (metrics.json keys; issue 9 section 2), in table1.csv and the second table
LOCALISATION_KEYS = (
    "lesion_hit_rate", "sensitivity_at_0.5_fp", "sensitivity_at_1_fp", "sensitivity_at_2_fp",
    "top1_near_border_fraction_mean", "border_area_fraction_mean", "interior_pixel_auc",
    "hausdorff_cells_mean", "hausdorff_cells_std", "lesion_hit_rate_near_border", "lesion_hit_rate_interior",
    "sensitivity_at_1_fp_near_border", "sensitivity_at_1_fp_interior", "n_lesions", "n_lesions_near_border",
    "sensitivity_at_threshold", "fp_per_image_at_threshold",
)


def _num(summary: Mapping[str, Any], key: str) -> float:
    value = summary.get(key)
    return float(value) if value is not None else math.nan


def wilcoxon_p(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float, int]:
    """(p-value, median of b - a, n) of the paired two-sided Wilcoxon test over the images both scored."""
    from experiments import metrics

    ids = sorted(set(a) & set(b))
    res = metrics.wilcoxon_signed_rank([b[i] for i in ids], [a[i] for i in ids])
    return res.pvalue, res.median_difference, res.n_pairs


def build_table(results: Iterable[ModelResult], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Table 1 rows in the paper's order, each AE / AE-RATSPN pair with its Wilcoxon p-value.

    ``better`` is True on the row whose mean image AUC is higher when the pair differs at p < ``alpha``.
    """
    by_key = {(r.test_set, r.model): r for r in results}
    rows: list[dict[str, Any]] = []
    for test_set, label in TEST_SETS:
        for model in MODEL_ORDER:
            result = by_key.get((test_set, model))
            if result is None:
                continue
            s = result.summary
            rows.append({
                "test_set": test_set, "test_label": label, "model": model,
                "pixel_auc": _num(s, "pixel_auc"),
                "image_auc_mean": _num(s, "image_auc_mean"), "image_auc_std": _num(s, "image_auc_std"),
                "hausdorff_px_mean": _num(s, "hausdorff_px_mean"), "hausdorff_px_std": _num(s, "hausdorff_px_std"),
                "hausdorff_mm_mean": _num(s, "hausdorff_mm_mean"), "hausdorff_mm_std": _num(s, "hausdorff_mm_std"),
                "n_images": int(s.get("n_images") or 0), "n_evaluated": int(s.get("n_evaluated") or 0),
                "threshold_rule": str(s.get("threshold_rule", "")),
                "pair": "", "wilcoxon_p": math.nan, "wilcoxon_n": 0, "better": False,
                **{key: _num(s, key) for key in LOCALISATION_KEYS},
                "density_pixel_auc": {g: _num(v, "pixel_auc") for g, v in (s.get("density_groups") or {}).items()},
                "density_n_images": {g: int(v.get("n_images") or 0) for g, v in (s.get("density_groups") or {}).items()},
            })
        index = {(r["test_set"], r["model"]): r for r in rows}
        for ae, spn in PAIRS:
            if (test_set, ae) not in index or (test_set, spn) not in index:
                continue
            p, _, n = wilcoxon_p(by_key[(test_set, ae)].per_image_auc, by_key[(test_set, spn)].per_image_auc)
            row_ae, row_spn = index[(test_set, ae)], index[(test_set, spn)]
            for row, other in ((row_ae, spn), (row_spn, ae)):
                row.update(pair=other, wilcoxon_p=p, wilcoxon_n=n)
            if p < alpha:
                winner = row_spn if row_spn["image_auc_mean"] > row_ae["image_auc_mean"] else row_ae
                winner["better"] = True
    return rows


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def _threshold_note(rules: Sequence[str]) -> str:
    """What the rule names of a table mean (every table says which rule it used)."""
    meaning = {
        "image_percentile": "pixels above the given percentile of the image's own breast-pixel scores (paper)",
        "healthy_percentile": "pixels above the given percentile of healthy validation patch scores",
        "fixed": "pixels above a fixed value given by the user",
        "calibrated": "pixels above the model's calibrated threshold, fitted on healthy validation images",
    }
    parts = []
    for rule in rules:
        base = next((k for k in meaning if rule.startswith(k)), "")
        parts.append(f"`{rule}` ({meaning.get(base, 'see metrics.json')})")
    return ", ".join(parts) or "n/a"


def _pm(mean: float, sd: float, digits: int = 2) -> str:
    return f"{_f(mean, digits)} ± {_f(sd, digits)}"


def format_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Table 1", notes: Sequence[str] = ()) -> str:
    """The paper's layout, then the localisation table and the pixel AUC per breast-density group.

    The better of an AE / AE-RATSPN pair is bold when their Wilcoxon p < 0.01. Rows aggregated over
    seeds (`aggregate_seeds`) show mean ± sd over seeds and the seed count.
    """
    rules = sorted({r["threshold_rule"] for r in rows if r["threshold_rule"]})
    seeded = any(int(r.get("n_seeds") or 1) > 1 for r in rows)
    lines = [f"# {title}", ""]
    lines.append(
        f"Threshold rule for the segmentation (H) and the FROC operating point: {_threshold_note(rules)}. "
        "H = Hausdorff distance in px at evaluation spacing (mm in table1.csv; in score-grid cells in the "
        "localisation table). "
        f"**Bold**: the better of an AE and its RAT-SPN extension, paired two-sided Wilcoxon signed-rank "
        f"test on per-image AUCs, p < {ALPHA}; p is shown on both rows of the pair."
    )
    if seeded:
        lines.append("")
        lines.append("Every figure is the mean ± sd (ddof 1) over seeds (column `seeds`); image AUC and H are the "
                     "per-seed means. Bold: better at p < 0.01 in every seed; p is the largest over the seeds.")
    seeds_col = " seeds |" if seeded else ""
    lines += ["", f"| Test data | Model | Pixel AUC | Image AUC | H | Wilcoxon p (vs) | images |{seeds_col}",
              "|---|---|---|---|---|---|---|" + ("---|" if seeded else "")]
    for r in rows:
        if seeded:
            cells = [_pm(r["pixel_auc"], r.get("pixel_auc_sd", math.nan)),
                     _pm(r["image_auc_mean"], r.get("image_auc_mean_sd", math.nan)),
                     _pm(r["hausdorff_px_mean"], r.get("hausdorff_px_mean_sd", math.nan))]
        else:
            cells = [_f(r["pixel_auc"]), _pm(r["image_auc_mean"], r["image_auc_std"]),
                     _pm(r["hausdorff_px_mean"], r["hausdorff_px_std"])]
        model = r["model"]
        if r["better"]:
            cells = [f"**{c}**" for c in cells]
            model = f"**{model}**"
        p = f"{_p(r['wilcoxon_p'])} ({r['pair']})" if r["pair"] else ""
        extra = f" {int(r.get('n_seeds') or 1)} |" if seeded else ""
        lines.append(
            f"| {r['test_label']} | {model} | {' | '.join(cells)} | {p} | {r['n_evaluated']}/{r['n_images']} |{extra}"
        )
    lines += ["", "## Localisation", "",
              "Hit = share of images whose highest-scoring breast pixel lies in a lesion. Sens@k = lesion sensitivity "
              "at k false-positive regions per image (FROC: connected regions of the map above one threshold swept over "
              "the test set, a lesion found when a region's peak lies in it, pooled over the test set; each group's "
              "curve is read at its own best operating point). Top-1 % near "
              "border = share of each image's top 1 % pixels within one patch of the breast border, beside the "
              "border zone's share of the breast. Interior AUC = pixel AUC over pixels more than one patch from "
              "the border. H cells = Hausdorff in score-grid cells (px / stride). Near / interior: lesions whose "
              "centre lies within one patch of the border / the rest (lesions per group in table1.csv).",
              "",
              "| Test data | Model | Hit | Sens@0.5 | Sens@1 | Sens@2 | Top-1 % near border (zone) | Interior AUC "
              "| H cells | Hit near / interior | Sens@1 near / interior |" + (" Rule |" if len(rules) > 1 else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if len(rules) > 1 else "")]
    for r in rows:
        g = r.get
        lines.append(
            f"| {r['test_label']} | {r['model']} | {_f(g('lesion_hit_rate'))} | {_f(g('sensitivity_at_0.5_fp'))} "
            f"| {_f(g('sensitivity_at_1_fp'))} | {_f(g('sensitivity_at_2_fp'))} "
            f"| {_f(g('top1_near_border_fraction_mean'))} ({_f(g('border_area_fraction_mean'))}) "
            f"| {_f(g('interior_pixel_auc'))} | {_pm(g('hausdorff_cells_mean'), g('hausdorff_cells_std'), 1)} "
            f"| {_f(g('lesion_hit_rate_near_border'))} / {_f(g('lesion_hit_rate_interior'))} "
            f"| {_f(g('sensitivity_at_1_fp_near_border'))} / {_f(g('sensitivity_at_1_fp_interior'))} |"
            + (f" {r['threshold_rule']} |" if len(rules) > 1 else "")
        )
    groups = sorted({k for r in rows for k in (r.get("density_pixel_auc") or {})})
    if groups:
        lines += ["", "## Pixel AUC per breast-density group", "",
                  "MIAS background tissue F (fatty) / G (fatty-glandular) / D (dense-glandular); DDSM / CBIS-DDSM "
                  "BI-RADS density 1-2 vs 3-4 (images per group in brackets).", "",
                  "| Test data | Model | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for r in rows:
            aucs, counts = r.get("density_pixel_auc") or {}, r.get("density_n_images") or {}
            cells = [f"{_f(aucs.get(k, math.nan))} ({counts.get(k, 0)})" for k in groups]
            lines.append(f"| {r['test_label']} | {r['model']} | " + " | ".join(cells) + " |")
    h_note = ("H in grid cells: the paper's H of ~30 for every model (std ~12, even at AUC 0.53) is most likely in "
              "units of its stride-16 score grid, not px: compare H with the paper in cells only.")
    lines += ["", h_note, *notes]
    return "\n".join(lines).rstrip() + "\n"


CSV_COLUMNS = (
    "test_set", "model", "pixel_auc", "image_auc_mean", "image_auc_std", "hausdorff_px_mean", "hausdorff_px_std",
    "hausdorff_mm_mean", "hausdorff_mm_std", "n_images", "n_evaluated", "pair", "wilcoxon_p", "wilcoxon_n",
    "better", "threshold_rule", *LOCALISATION_KEYS, "density_pixel_auc",
)


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``table1.csv``: every number of the table at full precision (NaN written as empty)."""
    buffer = io.StringIO()
    seed_columns = sorted({k for r in rows for k in r if k.endswith("_sd")})
    columns = [*CSV_COLUMNS, *(["n_seeds", "seeds", *seed_columns] if seed_columns else [])]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                             json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v)
                         for k, v in r.items()})
    return buffer.getvalue()


def write_table1(rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Writes ``table1.md`` and ``table1.csv`` atomically; returns the markdown path."""
    md = out_dir / "table1.md"
    atomic_write(md, format_markdown(rows, title, notes))
    atomic_write(out_dir / "table1.csv", format_csv(rows))
    return md


def calibration_notes(stages: Sequence[Stage], runs_dir: Path) -> list[str]:
    """One line per calibration stage: its images and the held-out healthy pixels' p < 0.05 share (ideal 0.05)."""
    lines = []
    for stage in stages:
        report = calibration.report_path(runs_dir / str(stage.checkpoint_from) / "checkpoints" / CALIBRATED_CKPT)
        if stage.kind != "validate" or not report.is_file():
            continue
        cal = json.loads(report.read_text())
        rates = dict(zip(cal.get("alphas", []), cal.get("pixel_rate", [])))
        lines.append(f"Calibration of {stage.model}: fitted on {cal.get('fit_images')} healthy validation images, "
                     f"checked on {cal.get('check_images')}: held-out healthy pixels with p < 0.05: "
                     f"{_f(rates.get(0.05, math.nan), 3)}, p < 0.01: {_f(rates.get(0.01, math.nan), 3)}.")
    return lines


def training_curve(run_dir: Path) -> dict[int, float]:
    """A fit's ``val/loss`` per epoch from its CSV logs (``<run>/logs/version_*/metrics.csv``; a resumed fit's
    later versions win for the epochs they repeat)."""
    curve: dict[int, float] = {}
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else 0)
    for path in versions:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/loss") not in (None, "") and row.get("epoch") not in (None, ""):
                    curve[int(float(row["epoch"]))] = float(row["val/loss"])
    return dict(sorted(curve.items()))


def training_summary(stages: Sequence[Stage], runs_dir: Path) -> list[dict[str, Any]]:
    """Per fit: epochs with a validation, best val/loss and its epoch, the last val/loss and the epochs since
    the best (a fit stopped by its time or epoch cap with few epochs since its best had not plateaued)."""
    rows = []
    for stage in stages:
        if stage.kind != "fit":
            continue
        curve = training_curve(runs_dir / stage.name)
        if not curve:
            continue
        best_epoch = min(curve, key=curve.__getitem__)
        last_epoch = max(curve)
        rows.append({"fit": stage.name, "epochs": len(curve), "best_epoch": best_epoch, "best_val_loss": curve[best_epoch],
                     "last_val_loss": curve[last_epoch], "epochs_since_best": last_epoch - best_epoch,
                     "curve": curve})
    return rows


def format_training(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``## Training`` section of table1.md: how far each fit's val/loss went."""
    if not rows:
        return []
    lines = ["", "## Training", "",
             "val/loss per fit (curves in val_loss.png and runs/<fit>/logs/): a fit whose best epoch is its last "
             "few was still improving when its epoch or time cap stopped it.", "",
             "| fit | epochs | best val/loss (epoch) | last val/loss | epochs since best |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fit']} | {r['epochs']} | {r['best_val_loss']:.5g} ({r['best_epoch']}) "
                     f"| {r['last_val_loss']:.5g} | {r['epochs_since_best']} |")
    return lines


def collect(stages: Sequence[Stage], eval_dir: Path) -> list[ModelResult]:
    """The results of every test stage."""
    return [
        read_model_result(eval_dir / s.name, s.test_set or "", s.model) for s in stages if s.kind == "test"
    ]


def write_figures(stages: Sequence[Stage], eval_dir: Path, out_dir: Path) -> list[Path]:
    """``fig2_<set>.png`` (one scan, every model), ``froc_<set>.png`` (FROC, every model) and
    ``fig3_<model>.png`` (score distributions)."""
    from experiments import figures

    written: list[Path] = []
    tests = [s for s in stages if s.kind == "test"]
    for test_set, label in TEST_SETS:
        map_dirs = {s.model: eval_dir / s.name / "maps" for s in tests if s.test_set == test_set}
        map_dirs = {m: d for m, d in map_dirs.items() if d.is_dir()}
        path = figures.figure2(map_dirs, out_dir / f"fig2_{test_set}.png", title=f"Fig. 2 ({label})") if map_dirs else None
        if path:
            written.append(path)
        frocs = {s.model: eval_dir / s.name / "metrics.json" for s in tests if s.test_set == test_set}
        path = figures.froc_figure(frocs, out_dir / f"froc_{test_set}.png", title=f"FROC ({label})")
        if path:
            written.append(path)
    for model in MODEL_ORDER:
        hists = {s.test_set: eval_dir / s.name / "score_hist.npz" for s in tests if s.model == model}
        path = figures.figure3(hists, out_dir / f"fig3_{model_slug(model)}.png", title=model)
        if path:
            written.append(path)
    return written

