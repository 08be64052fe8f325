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
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.table1_report import (
    LOCALISATION_KEYS,
    PAIRS,
    build_table,
    calibration_notes,
    collect,
    format_training,
    training_summary,
    write_figures,
    write_table1,
)
from experiments.table1_runs import run_stages
from experiments.table1_stages import (
    CONTRALATERAL,
    CONTRALATERAL_TEST_SETS,
    DATA_CHOICES,
    DEFAULT_CONTRALATERAL,
    DEFAULT_CONTRALATERAL_RADIUS_PX,
    DEFAULT_SMOOTHING_PX,
    FITS,
    MODEL_ORDER,
    PROFILES,
    SCORING_NOTES,
    SCORINGS,
    SMOOTHING_SPACES,
    TABLE_THRESHOLD_RULES,
    Stage,
    build_stages,
    data_config,
    select_models,
    smoothing_of,
    smooths_calibrated,
    stage_args,
)

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
    parser.add_argument("--scoring", choices=SCORINGS, default="mondrian",
                        help="the RAT-SPN rows' scores: raw -log p(z) (paper), or conformal -log p-values calibrated "
                             "by border stratum on healthy validation images (mondrian), over a conditional RAT-SPN "
                             "-log p(z | position) (context+mondrian); README 'Border-aware scoring'")
    parser.add_argument("--score-smoothing-px", type=float, default=None, metavar="SIGMA",
                        help="the RAT-SPN rows' grid scores averaged over neighbouring patches (Gaussian, sigma in px) "
                             f"before the calibration; default {DEFAULT_SMOOTHING_PX:g} with a calibrated --scoring, "
                             "0 with raw (the paper's)")
    parser.add_argument("--smoothing-space", choices=SMOOTHING_SPACES, default="calibrated",
                        help="with a calibrated --scoring: smooth the -log p of a first calibration and calibrate the "
                             "smoothed values again (calibrated, default), or smooth the raw -log p(z) and calibrate "
                             "once (raw)")
    parser.add_argument("--contralateral", choices=CONTRALATERAL, default=DEFAULT_CONTRALATERAL,
                        help="with a calibrated --scoring: the mass RAT-SPN rows score each patch against the same place "
                             "in the woman's other breast (mirrored, registered by the breast masks): their calibrated "
                             "-log p minus the other breast's mean / max within --contralateral-radius-px, calibrated "
                             f"again on healthy women's pairs (default {DEFAULT_CONTRALATERAL}; none = one-sided); images "
                             "without a pair stay one-sided")
    parser.add_argument("--contralateral-radius-px", type=float, default=DEFAULT_CONTRALATERAL_RADIUS_PX,
                        metavar="PX", help="half the side of the square whose other-breast scores form the reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several seeds: the stages run once per seed (<out>/seed-<N>/) and the table is the "
                             "mean ± sd over seeds")
    parser.add_argument("--seed-models", choices=("all", "pairs"), default="all",
                        help="with --seeds: rerun every model per seed (all), or only the AE / AE-RATSPN pairs "
                             "beyond the first seed (pairs: f-AnoGAN and Intensity from the first seed)")
    parser.add_argument("--models", nargs="+", default=None, metavar="ROW",
                        help="only these Table 1 rows (e.g. CAE CAE-RATSPN Intensity) and the stages they need; "
                             f"rows: {', '.join(MODEL_ORDER)}")
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
                          args.scoring, args.score_smoothing_px, args.smoothing_space, args.contralateral,
                          args.contralateral_radius_px)
    if pairs_only:
        stages = pair_stages(stages)
    if args.models:
        stages = select_models(stages, args.models)
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
        f"RAT-SPN rows scored `{args.scoring}`: " + SCORING_NOTES[args.scoring] + _smoothing_note(args) + _contralateral_note(args),
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
        # the flags together (e.g. --threshold-rule calibrated needs a calibrated --scoring) before any stage runs
        stages = build_stages(args.profile, args.data, args.data_root, args.seed, args.healthy_root,
                              args.threshold_rule, args.scoring, args.score_smoothing_px, args.smoothing_space,
                              args.contralateral, args.contralateral_radius_px)
        if args.models:
            select_models(stages, args.models)
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


def _smoothing_note(args: argparse.Namespace) -> str:
    sigma = smoothing_of(args.scoring, args.score_smoothing_px)
    if sigma <= 0:
        return ""
    if smooths_calibrated(args.scoring, args.smoothing_space):
        return (f" The -log p of a first calibration averaged over neighbouring patches (Gaussian, sigma {sigma:g} px),"
                " then calibrated again (`--smoothing-space calibrated`).")
    return f" Grid scores averaged over neighbouring patches (Gaussian, sigma {sigma:g} px) before the calibration."


def _contralateral_note(args: argparse.Namespace) -> str:
    if args.contralateral == "none" or args.scoring == "raw":
        return ""
    sets = " and ".join(CONTRALATERAL_TEST_SETS)
    return (f" Bilateral on the {sets} rows: each calibrated -log p minus the {args.contralateral} of the other breast's "
            f"within {args.contralateral_radius_px:g} px of the mirrored place (centred on its image median), calibrated "
            "again on healthy pairs (`--contralateral`); images without a listed other breast, and the other test "
            "sets' rows, one-sided.")


def _printer() -> Any:
    def log(message: str) -> None:
        print(message, flush=True)

    return log
