"""`mammospn table1`: train every model, test each on the mass and calc test sets, write the paper's Table 1.

Stages run in order through the `lightning` CLI (in-process): fit CAE, beta-VAE, VQ-VAE, their three
RAT-SPN stages, both f-AnoGAN stages; then test the seven models and the `Intensity` baseline on the
mass and calc test sets. A finished stage leaves ``DONE.json`` beside its outputs and is reused on a
rerun; an interrupted fit resumes from its ``last.ckpt``. Outputs under ``--out``: ``table1.md``,
``table1.csv``, ``fig2_<set>.png``, ``fig3_<model>.png``, ``timings.json``; runs in ``runs/``,
evaluation outputs in ``eval/``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.fileio import atomic_write, write_json
from experiments.configs import CONFIG_DIR  # the checkout's configs/ or the packaged ones

PROFILES = ("quick", "paper", "smoke", "real")
#: data sources `--data` names (each a configs/data/<name>.yaml); a path to any data YAML works too
DATA_CHOICES = ("synthetic", "cbis_ddsm", "ddsm", "mini_ddsm", "mias", "manifest")
TEST_SETS = (("mass", "masses"), ("calc", "calcs"))
#: Table 1's model order (paper), then the baseline every model is read against
MODEL_ORDER = ("CAE", "CAE-RATSPN", "bVAE", "bVAE-RATSPN", "VQVAE", "VQVAE-RATSPN", "f-AnoGAN", "Intensity")
#: AE -> its RAT-SPN extension, compared by a paired Wilcoxon signed-rank test on per-image AUCs
PAIRS = (("CAE", "CAE-RATSPN"), ("bVAE", "bVAE-RATSPN"), ("VQVAE", "VQVAE-RATSPN"))
ALPHA = 0.01


# --- the stages --------------------------------------------------------------------------------


@dataclass
class Stage:
    """One `lightning` command of the reproduction."""

    name: str
    kind: str  # "fit" | "validate" (the RAT-SPN rows' calibration) | "test"
    model: str  # display name (Table 1 row) or a fit step's name
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    estimate_s: float = 60.0
    test_set: str | None = None
    checkpoint_from: str | None = None  # fit stage whose checkpoint a test stage loads
    checkpoint_file: str = "best.ckpt"
    threshold_rule: str = "image_percentile"  # a test stage's segmentation / FROC operating-point rule


@dataclass
class FitSpec:
    name: str
    model: str
    config: str
    estimate_key: str
    needs: str | None = None  # a fit stage whose checkpoint this one loads
    needs_arg: str | None = None
    needs_file: str = "best.ckpt"
    extra: list[str] = field(default_factory=list)


FITS = (
    FitSpec("cae", "CAE", "cae.yaml", "ae"),
    FitSpec("bvae", "bVAE", "bvae.yaml", "ae"),
    FitSpec("vqvae", "VQVAE", "vqvae.yaml", "ae"),
    FitSpec("cae_spn", "CAE-RATSPN", "cae_spn.yaml", "spn", "cae", "autoencoder_ckpt"),
    FitSpec("bvae_spn", "bVAE-RATSPN", "bvae_spn.yaml", "spn", "bvae", "autoencoder_ckpt"),
    FitSpec("vqvae_spn", "VQVAE-RATSPN", "vqvae_spn.yaml", "spn", "vqvae", "autoencoder_ckpt"),
    FitSpec("fanogan_gan", "f-AnoGAN (WGAN-GP)", "fanogan.yaml", "gan", extra=["--model.init_args.stage", "gan"]),
    # the WGAN's validation loss (a Wasserstein estimate) says little about the generator: take its last epoch
    FitSpec("fanogan", "f-AnoGAN", "fanogan_encoder.yaml", "gan_encoder", "fanogan_gan", "generator_ckpt", "last.ckpt"),
)

#: rough seconds per stage kind on the 2-core CPU machine (quick) / a GPU (paper); drives the ETA only
ESTIMATES: dict[str, dict[str, float]] = {
    "smoke": {"ae": 8, "spn": 6, "gan": 8, "gan_encoder": 6, "test": 4},
    "quick": {"ae": 240, "spn": 90, "gan": 300, "gan_encoder": 120, "test": 45},
    "paper": {"ae": 3600, "spn": 900, "gan": 3600, "gan_encoder": 1200, "test": 120},
    "real": {"ae": 540, "spn": 180, "gan": 420, "gan_encoder": 180, "test": 25},
}

def profile_overlays(profile: str, fit: str) -> list[str]:
    """The per-fit overlay of a profile, ``configs/profiles/<profile>/<fit>.yaml``, when there is one.

    A profile file applies to every model; what differs per model (e.g. the short profiles' faster learning
    rates, the real profile's early stopping, f-AnoGAN's width) lives in these overlays. They come last, so
    they override the data config too.
    """
    path = CONFIG_DIR / "profiles" / profile / f"{fit}.yaml"
    return [str(path)] if path.is_file() else []


def data_config(data: str) -> tuple[str, Path]:
    """(name, YAML path) of ``--data``: a source name (configs/data/<name>.yaml) or a path to a data YAML."""
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--data {data}: no such data config")
        return path.stem, path
    if data not in DATA_CHOICES:
        raise ValueError(f"--data must be one of {DATA_CHOICES} or a path to a data YAML, got {data!r}")
    return data, CONFIG_DIR / "data" / f"{data}.yaml"


def _data_args(
    data: str, data_root: str | None, seed: int, healthy_root: str | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(config files before the model's, after the profile, overrides) selecting the data, its root and seed.

    The data config comes first (it names the data class the profile's overlay refines), so a profile's
    synthetic settings (e.g. the smoke profile's tiny set) apply to the synthetic default; any other data
    config is merged again after the profile, so a profile's synthetic settings never override a real source.
    """
    name, path = data_config(data)
    synthetic = name == "synthetic" and path.parent == CONFIG_DIR / "data"
    before, after = [str(path)], ([] if synthetic else [str(path)])
    overrides = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    if data_root:
        overrides += ["--data.init_args.root", str(data_root)]
    if healthy_root:
        overrides += ["--data.init_args.healthy_root", str(healthy_root)]
    return before, after, overrides


#: ``--threshold-rule`` choices: the paper's per-image percentile for every row, or the RAT-SPN stages'
#: calibrated threshold (a buffer fitted on healthy validation images) for their rows
TABLE_THRESHOLD_RULES = ("image_percentile", "calibrated")
#: ``--scoring`` of the RAT-SPN rows: the paper's raw -log p(z); Mondrian-calibrated -log p-values by border
#: stratum (a `lightning validate` stage per RAT-SPN fits `experiments.calibration.ConformalCalibration` on
#: healthy validation images; its tests load ``calibrated.ckpt``); the same over a conditional RAT-SPN
#: (-log p(z | position), fitted with ``context: true``). README "Border-aware scoring" says which and why.
SCORINGS = ("raw", "mondrian", "context+mondrian")
CALIBRATED_CKPT = "calibrated.ckpt"
SCORING_NOTES = {
    "raw": "-log p(z) of the autoencoder's latents (paper).",
    "mondrian": "-log of the conformal p-value of -log p(z) among healthy validation patches of the same "
                "border-distance stratum (`<fit>_calibrate` stages).",
    "context+mondrian": "conditional -log p(z | distances to skin line and film cut), calibrated by border "
                        "stratum like `mondrian`.",
}


def build_stages(
    profile: str, data: str = "synthetic", data_root: str | None = None, seed: int = 0,
    healthy_root: str | None = None, threshold_rule: str = "image_percentile", scoring: str = "raw",
) -> list[Stage]:
    """The reproduction's stages in run order (8 fits, then 16 tests: 8 models x mass/calc).

    ``threshold_rule="calibrated"``: the RAT-SPN rows segment at (and count FROC candidates above) the
    threshold their checkpoint carries; their test stages are named ``...-calibrated`` so the per-image
    percentile results stay. Every other row keeps the per-image percentile; each row says its rule.
    ``scoring`` (`SCORINGS`) other than "raw" adds a calibration stage after each RAT-SPN fit, whose
    calibrated checkpoint the RAT-SPN rows are tested with.
    """
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {PROFILES}, got {profile!r}")
    if threshold_rule not in TABLE_THRESHOLD_RULES:
        raise ValueError(f"--threshold-rule must be one of {TABLE_THRESHOLD_RULES}, got {threshold_rule!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"--scoring must be one of {SCORINGS}, got {scoring!r}")
    if threshold_rule == "calibrated" and scoring == "raw":
        raise ValueError("--threshold-rule calibrated needs calibrated RAT-SPN rows: --scoring mondrian or "
                         "context+mondrian")
    spn_extra = ["--model.init_args.context", "true"] if scoring.startswith("context") else []
    profile_yaml = str(CONFIG_DIR / "profiles" / f"{profile}.yaml")
    data_first, data_last, data_overrides = _data_args(data, data_root, seed, healthy_root)
    estimates = ESTIMATES[profile]
    stages: list[Stage] = []
    for spec in FITS:
        overrides = list(spec.extra) + (spn_extra if spec.model.endswith("-RATSPN") else []) + list(data_overrides)
        stages.append(
            Stage(
                name=spec.name,
                kind="fit",
                model=spec.model,
                configs=[*data_first, str(CONFIG_DIR / spec.config), profile_yaml, *data_last,
                         *profile_overlays(profile, spec.name)],
                overrides=overrides,
                estimate_s=estimates[spec.estimate_key],
                checkpoint_from=spec.needs,
                checkpoint_file=spec.needs_file,
            )
        )
    if scoring != "raw":
        for spec in FITS:
            if spec.model.endswith("-RATSPN"):
                stages.append(Stage(
                    name=f"{spec.name}_calibrate", kind="validate", model=spec.model,
                    configs=next(s.configs for s in stages if s.name == spec.name),
                    overrides=list(spec.extra) + spn_extra + list(data_overrides), estimate_s=estimates["test"],
                    checkpoint_from=spec.name))
    tested = {spec.model: spec for spec in FITS if spec.name != "fanogan_gan"}
    for test_set, _ in TEST_SETS:
        for model in MODEL_ORDER:
            test_overrides = list(data_overrides) + ["--data.init_args.test_set", test_set]
            if model == "Intensity":
                configs = [*data_first, profile_yaml, *data_last]
                test_overrides = ["--model", "lightning_modules.IntensityBaseline", *test_overrides]
                source = None
            else:
                spec = tested[model]
                configs = [*data_first, str(CONFIG_DIR / spec.config), profile_yaml, *data_last,
                           *profile_overlays(profile, spec.name)]
                test_overrides = list(spec.extra) + (spn_extra if model.endswith("-RATSPN") else []) + test_overrides
                source = spec.name
            rule = threshold_rule if model.endswith("-RATSPN") else "image_percentile"
            suffix = "" if rule == "image_percentile" else f"-{rule}"
            calibrated = model.endswith("-RATSPN") and scoring != "raw"
            stages.append(
                Stage(
                    name=f"test-{test_set}-{_slug(model)}{suffix}",
                    kind="test",
                    model=model,
                    configs=configs,
                    overrides=test_overrides,
                    estimate_s=estimates["test"],
                    test_set=test_set,
                    checkpoint_from=source,
                    checkpoint_file=CALIBRATED_CKPT if calibrated else "best.ckpt",
                    threshold_rule=rule,
                )
            )
    return stages


def _slug(model: str) -> str:
    return model.lower().replace("-", "_")


def checkpoint_path(runs_dir: Path, run_name: str, preferred: str = "best.ckpt") -> Path:
    """``<run>/checkpoints/<preferred>``, or ``last.ckpt`` when only that exists (a run that never
    produced a best checkpoint, e.g. a model whose global step does not advance)."""
    folder = runs_dir / run_name / "checkpoints"
    if not (folder / preferred).is_file() and (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    return folder / preferred


def stage_args(stage: Stage, runs_dir: Path, eval_dir: Path, group: str) -> list[str]:
    """The full `lightning` argument list of a stage (checkpoint paths resolved against ``runs_dir``)."""
    args = [stage.kind]
    for config in stage.configs:
        args += ["--config", config]
    args += list(stage.overrides)
    args += ["--run.name", stage.name, "--run.root", str(runs_dir), "--run.results_dir", str(eval_dir)]
    args += ["--run.group", group, "--run.stage", stage.kind if stage.test_set is None else f"test-{stage.test_set}"]
    if stage.kind == "fit":
        if stage.checkpoint_from:
            spec = next(s for s in FITS if s.name == stage.name)
            ckpt = checkpoint_path(runs_dir, stage.checkpoint_from, stage.checkpoint_file)
            args += [f"--model.init_args.{spec.needs_arg}", str(ckpt)]
        if (runs_dir / stage.name / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", "last"]  # an interrupted fit continues where it stopped
    elif stage.checkpoint_from:
        spec = next(s for s in FITS if s.name == stage.checkpoint_from)
        if spec.needs:
            ckpt_in = checkpoint_path(runs_dir, spec.needs, spec.needs_file)
            args += [f"--model.init_args.{spec.needs_arg}", str(ckpt_in)]
        if stage.kind == "validate":  # calibrate the fit's best checkpoint into <fit>/checkpoints/calibrated.ckpt
            ckpt = checkpoint_path(runs_dir, stage.checkpoint_from)
            args += ["--ckpt_path", str(ckpt), "--run.evaluate", "false",
                     "--trainer.callbacks+=experiments.calibration.ConformalCalibration",
                     "--trainer.callbacks.output", str(ckpt.with_name(CALIBRATED_CKPT))]
        else:
            args += ["--ckpt_path", str(checkpoint_path(runs_dir, stage.checkpoint_from, stage.checkpoint_file))]
    if stage.kind == "test" and stage.threshold_rule != "image_percentile":
        args += ["--trainer.callbacks+=experiments.callbacks.EvaluationCallback",
                 "--trainer.callbacks.output_dir", str(eval_dir / stage.name),
                 "--trainer.callbacks.threshold", stage.threshold_rule]
    return args


def stage_done(stage: Stage, runs_dir: Path, eval_dir: Path) -> bool:
    """A stage is reused when its marker, resolved config and checkpoint (fit) or metrics (test) exist."""
    run_dir = runs_dir / stage.name
    config_name = "config.yaml" if stage.kind == "fit" else f"config-{stage.kind}.yaml"
    if not (run_dir / "DONE.json").is_file() or not (run_dir / config_name).is_file():
        return False
    if stage.kind == "fit":
        return checkpoint_path(runs_dir, stage.name).is_file()
    if stage.kind == "validate":
        return (runs_dir / str(stage.checkpoint_from) / "checkpoints" / CALIBRATED_CKPT).is_file()
    return (eval_dir / stage.name / "metrics.json").is_file()


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_stages(
    stages: Sequence[Stage],
    out_dir: Path,
    group: str,
    force: bool = False,
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """Runs every stage not already done, printing which runs and the ETA; returns per-stage timings.

    The ETA scales the remaining stages' estimates by how the finished ones compared with theirs.
    """
    from experiments import cli

    runs_dir, eval_dir = out_dir / "runs", out_dir / "eval"
    timings_path = out_dir / "timings.json"
    timings: dict[str, dict[str, Any]] = {}
    if timings_path.is_file():
        timings = json.loads(timings_path.read_text()).get("stages", {})
    start = time.perf_counter()
    spent_actual = spent_estimate = 0.0
    for k, stage in enumerate(stages, 1):
        remaining = [s for s in stages[k - 1 :] if force or not stage_done(s, runs_dir, eval_dir)]
        ratio = spent_actual / spent_estimate if spent_estimate > 0 else 1.0
        eta = ratio * sum(s.estimate_s for s in remaining)
        elapsed = time.perf_counter() - start
        if not force and stage_done(stage, runs_dir, eval_dir):
            log(f"[{k:2d}/{len(stages)}] {stage.kind:4s} {stage.name:24s} reused ({runs_dir / stage.name})")
            timings.setdefault(stage.name, {"reused": True})  # keep the measured entry of the run that made it
            continue
        log(
            f"[{k:2d}/{len(stages)}] {stage.kind:4s} {stage.name:24s} running  "
            f"elapsed {_fmt_duration(elapsed)}  ETA {_fmt_duration(eta)}"
        )
        args = stage_args(stage, runs_dir, eval_dir, group)
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            cli.run_cli(args)
        except SystemExit as err:  # a config error: jsonargparse already printed the key at fault
            if err.code not in (0, None):
                raise RuntimeError(f"stage {stage.name} failed: lightning {' '.join(args)}") from err
        except ValueError as err:  # a refused value, e.g. a calibrated rule on a model without a threshold
            raise RuntimeError(f"stage {stage.name} failed: {err}") from err
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        spent_actual += seconds
        spent_estimate += stage.estimate_s
        timings[stage.name] = {"kind": stage.kind, "model": stage.model, "test_set": stage.test_set,
                               "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                               "estimate_s": stage.estimate_s, "reused": False}
        write_json(runs_dir / stage.name / "DONE.json", timings[stage.name])
        write_timings(timings_path, timings)
        log(f"        {stage.name} done in {_fmt_duration(seconds)}")
    write_timings(timings_path, timings)
    return timings


def write_timings(path: Path, timings: Mapping[str, Mapping[str, Any]]) -> None:
    """``timings.json``: wall and CPU seconds per stage (the latest run of each) and their totals.

    CPU seconds (this process, all threads) tell a run slowed by other jobs on the machine from a slow stage.
    """
    total = sum(float(t.get("seconds", 0.0)) for t in timings.values())
    cpu = sum(float(t.get("cpu_seconds", 0.0)) for t in timings.values())
    payload = {"stages": dict(timings), "total_seconds": round(total, 2), "total_cpu_seconds": round(cpu, 2),
               "cpu_count": os.cpu_count()}
    write_json(path, payload)


# --- the table ---------------------------------------------------------------------------------


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
        report = runs_dir / str(stage.checkpoint_from) / "checkpoints" / CALIBRATED_CKPT.replace(".ckpt", ".calibration.json")
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
        path = figures.figure3(hists, out_dir / f"fig3_{_slug(model)}.png", title=model)
        if path:
            written.append(path)
    return written


# --- the command -------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `mammospn table1` (the Makefile's `reproduce-table1` passes --profile, --data, --data-root)."""
    parser.add_argument("--profile", choices=PROFILES, default="quick",
                        help="quick: CPU, synthetic, <= 45 min; real: CPU, a small real source (mini-MIAS) in <= 60 "
                             "min, trained to a val/loss plateau; paper: the paper's settings, for a GPU; smoke: tests")
    parser.add_argument("--data", default="synthetic",
                        help=f"data source of every stage: one of {', '.join(DATA_CHOICES)} "
                             "(configs/data/<name>.yaml), or a path to a data YAML")
    parser.add_argument("--data-root", default=None, help="root of the data (synthetic: where it is generated)")
    parser.add_argument("--healthy-root", default=None,
                        help="cbis_ddsm: the DDSM folder holding cases/normals (healthy training images)")
    parser.add_argument("--out", default="results", help="output folder (runs/, eval/, table1.md, figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (data sampling and training)")
    parser.add_argument("--threshold-rule", choices=TABLE_THRESHOLD_RULES, default="image_percentile",
                        help="segmentation (H) and FROC operating point: each image's 99th percentile (paper), or "
                             "for the RAT-SPN rows the calibrated threshold their checkpoints carry")
    parser.add_argument("--scoring", choices=SCORINGS, default="raw",
                        help="the RAT-SPN rows' scores: raw -log p(z) (paper), or conformal -log p-values calibrated "
                             "by border stratum on healthy validation images (mondrian), over a conditional RAT-SPN "
                             "-log p(z | position) (context+mondrian); README 'Border-aware scoring'")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several seeds: the stages run once per seed (<out>/seed-<N>/) and the table is the "
                             "mean ± sd over seeds")
    parser.add_argument("--seed-models", choices=("all", "pairs"), default="all",
                        help="with --seeds: rerun every model per seed (all), or only the AE / AE-RATSPN pairs "
                             "beyond the first seed (pairs: f-AnoGAN and Intensity from the first seed)")
    parser.add_argument("--force", action="store_true", help="rerun stages even when their outputs exist")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' lightning commands and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the table and figures from finished stages")


#: the rows every seed of ``--seeds`` reruns with ``--seed-models pairs`` (the AE / AE-RATSPN pairs)
PAIR_MODELS = tuple(m for pair in PAIRS for m in pair)
#: row figures averaged over seeds (mean, and ``<key>_sd``)
SEEDED_KEYS = ("pixel_auc", "image_auc_mean", "image_auc_std", "hausdorff_px_mean", "hausdorff_px_std",
               "hausdorff_mm_mean", "hausdorff_mm_std", *LOCALISATION_KEYS)


def pair_stages(stages: Sequence[Stage]) -> list[Stage]:
    """The stages the AE / AE-RATSPN rows need: their fits and tests (no f-AnoGAN, no Intensity)."""
    fits = {spec.name for spec in FITS if spec.model in PAIR_MODELS}
    return [s for s in stages
            if (s.kind == "fit" and s.name in fits) or (s.kind in ("validate", "test") and s.model in PAIR_MODELS)]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof 1) of the finite values; sd NaN with fewer than two."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return mean, sd


def aggregate_seeds(per_seed: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Table rows over seeds: each figure's mean over seeds plus ``<key>_sd`` (ddof 1), ``n_seeds``, ``seeds``.

    A pair's row is bold only when it was the better one at p < 0.01 in every seed; ``wilcoxon_p`` is the
    largest p over the seeds (the weakest evidence). Rows keep the order of the seed with most rows.
    """
    by_key: dict[tuple[str, str], list[tuple[int, Mapping[str, Any]]]] = {}
    order: list[tuple[str, str]] = []
    for seed, rows in sorted(per_seed.items(), key=lambda kv: -len(kv[1])):
        for row in rows:
            key = (row["test_set"], row["model"])
            if key not in by_key:
                order.append(key)
            by_key.setdefault(key, []).append((seed, row))
    out = []
    for key in order:
        seeded = sorted(by_key[key], key=lambda sr: sr[0])
        rows = [r for _, r in seeded]
        first = dict(rows[0])
        for name in SEEDED_KEYS:
            first[name], first[f"{name}_sd"] = _mean_sd([r.get(name, math.nan) for r in rows])
        groups = sorted({g for r in rows for g in (r.get("density_pixel_auc") or {})})
        first["density_pixel_auc"] = {
            g: _mean_sd([(r.get("density_pixel_auc") or {}).get(g, math.nan) for r in rows])[0] for g in groups}
        ps = [r["wilcoxon_p"] for r in rows if math.isfinite(r.get("wilcoxon_p", math.nan))]
        first["wilcoxon_p"] = max(ps) if ps else math.nan
        first["better"] = all(bool(r["better"]) for r in rows)
        first["n_seeds"] = len(rows)
        first["seeds"] = " ".join(str(seed) for seed, _ in seeded)
        first["threshold_rule"] = ",".join(sorted({str(r["threshold_rule"]) for r in rows}))
        out.append(first)
    return out


def _run_seed(args: argparse.Namespace, seed: int, out_dir: Path, pairs_only: bool, log: Any) -> list[dict] | int:
    """Runs (or reuses) one seed's stages under ``out_dir`` and writes its table; returns its rows or an exit code."""
    data_name = data_config(args.data)[0]
    stages = build_stages(args.profile, args.data, args.data_root, seed, args.healthy_root, args.threshold_rule,
                          args.scoring)
    if pairs_only:
        stages = pair_stages(stages)
    group = f"table1-{args.profile}-{data_name}-s{seed}"
    runs_dir, eval_dir = out_dir / "runs", out_dir / "eval"
    if args.dry_run:
        for k, stage in enumerate(stages, 1):
            print(f"[{k:2d}/{len(stages)}] lightning {' '.join(stage_args(stage, runs_dir, eval_dir, group))}")
        return []
    if not args.report_only:
        log(f"Table 1: {len(stages)} stages, profile {args.profile}, data {data_name}, seed {seed}, W&B group {group}")
        try:
            run_stages(stages, out_dir, group, force=args.force, log=log)
        except RuntimeError as err:
            print(f"mammospn table1: {err}; fix it and rerun: finished stages are reused", file=sys.stderr)
            return 1
    try:
        results = collect(stages, eval_dir)
    except FileNotFoundError as err:
        print(f"mammospn table1: {err}", file=sys.stderr)
        return 1
    rows = build_table(results)
    timings_path = out_dir / "timings.json"
    total = json.loads(timings_path.read_text()).get("total_seconds") if timings_path.is_file() else None
    notes = [
        f"Profile `{args.profile}`, data `{data_name}`, seed {seed}; W&B group `{group}`.",
        "Intensity: score = mean patch intensity, nothing trained (what brightness alone achieves).",
        f"RAT-SPN rows scored `{args.scoring}`: " + SCORING_NOTES[args.scoring],
    ]
    if total is not None:
        notes.append(f"Wall time of the stages run: {total / 60:.1f} min (per stage in timings.json).")
    notes.extend(calibration_notes(stages, runs_dir))
    training = training_summary(stages, runs_dir)
    notes.extend(format_training(training))
    md = write_table1(rows, out_dir, f"Table 1 ({args.profile} profile, {data_name} data)", notes)
    figs = write_figures(stages, eval_dir, out_dir)
    from experiments import figures

    curves = figures.val_loss_figure({r["fit"]: r["curve"] for r in training}, out_dir / "val_loss.png")
    if curves:
        figs.append(curves)

    from experiments.loggers import log_table1

    log_table1(out_dir, group, figs)
    log(md.read_text())
    log(f"wrote {md}, {out_dir / 'table1.csv'}, {len(figs)} figures, {timings_path}")
    return rows


def run(args: argparse.Namespace) -> int:
    """Runs the reproduction; returns a process exit code (0 = table written).

    With several ``--seeds`` each seed runs in ``<out>/seed-<N>/`` (its own table there) and ``<out>/table1.md``
    is the mean ± sd over seeds.
    """
    out_dir = Path(args.out)
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
    try:
        data_config(args.data)
        if args.profile not in PROFILES:
            raise ValueError(f"--profile must be one of {PROFILES}, got {args.profile!r}")
    except (ValueError, FileNotFoundError) as err:
        print(f"mammospn table1: {err}", file=sys.stderr)
        return 2
    log = _printer()
    if len(seeds) == 1:
        result = _run_seed(args, seeds[0], out_dir, False, log)
        return result if isinstance(result, int) else 0
    per_seed: dict[int, list[dict]] = {}
    for k, seed in enumerate(seeds):
        result = _run_seed(args, seed, out_dir / f"seed-{seed}", k > 0 and args.seed_models == "pairs", log)
        if isinstance(result, int):
            return result
        per_seed[seed] = result
    if args.dry_run:
        return 0
    rows = aggregate_seeds(per_seed)
    data_name = data_config(args.data)[0]
    notes = [f"Profile `{args.profile}`, data `{data_name}`, seeds {' '.join(map(str, seeds))} "
             f"(per-seed tables in seed-<N>/; rows other than the AE / AE-RATSPN pairs "
             f"{'from the first seed only' if args.seed_models == 'pairs' else 'over every seed'})."]
    md = write_table1(rows, out_dir, f"Table 1 ({args.profile} profile, {data_name} data, {len(seeds)} seeds)", notes)
    log(md.read_text())
    log(f"wrote {md}, {out_dir / 'table1.csv'} (mean ± sd over seeds {' '.join(map(str, seeds))})")
    return 0


def _printer() -> Any:
    def log(message: str) -> None:
        print(message, flush=True)

    return log
