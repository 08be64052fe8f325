"""`mammospn border-study`: the border-aware scoring options of the RAT-SPN stage, side by side.

    mammospn table1 --profile real --data mias --data-root DIR --out OUT      # first: the CAE and CAE-RATSPN fits
    mammospn border-study --table1 OUT --data mias --data-root DIR [--split lesion_validation]

Reuses Table 1's CAE and CAE-RATSPN fits in ``OUT/runs`` and adds, each one `lightning` command:

- ``suppress``: the naive fix, every patch within one patch (64 px) of the border gets the image's lowest score;
- ``context``: the conditional RAT-SPN, -log p(z | position) (`RatSpnStage(context=True)`, a new EM fit);
- ``mondrian`` / ``normalised``: conformal calibration by border stratum (`experiments.calibration`) of the
  plain RAT-SPN, by rank within each stratum / by per-stratum location and scale and one pooled rank;
- ``mondrian+smooth<sigma>`` per ``--smoothing-px`` (default `table1_stages.DEFAULT_SMOOTHING_PX`, 16): the
  -log p of a first Mondrian calibration averaged over neighbouring patches (Gaussian, sigma px), then calibrated
  again (`RatSpnStage(smooth_calibrated=True)`); the default one is Table 1's default RAT-SPN row;
- ``context+mondrian``, ``context+normalised`` and ``CAE+mondrian`` (the autoencoder alone, calibrated the
  same way);
- ``mondrian+smooth16+bilateral-<mean|max><radius>`` per ``--bilateral-radius-px`` (default 32): Table 1's default
  row scored against the woman's other breast (`RatSpnStage(contralateral=...)`, ``data.with_contralateral``).

``--variants NAME ...`` runs only those.

Every variant is tested on ``--split`` (``test``, or ``lesion_validation`` to choose a default without
looking at the test set) and ``border_study.md`` / ``.csv`` gather pixel AUC, interior AUC, lesion hit
rate (all / lesions near the border / interior), FROC sensitivity, the top-1 % near-border share beside
the border zone's, Hausdorff and the calibration check. Finished steps are reused while Table 1's CAE and
CAE-RATSPN checkpoints are the ones they came from (their sha256 in ``border-eval/INPUTS.json``); after a refit
the study's earlier outputs are moved aside (``<name>.replaced-<time>``) and every step is redone.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.fileio import atomic_write, file_sha256, read_json, write_json
from experiments import calibration, table1_stages
from experiments.table1_runs import move_aside
from lightning_modules import contralateral

#: rank within each stratum: the callback's default strata (16 / 32 / 64 px, at least 50 patches each)
MONDRIAN = ["--trainer.callbacks.bins_px", "[16,32,64]", "--trainer.callbacks.min_count", "50"]
#: location / scale per stratum, interpolated in distance, one pooled rank: finer strata are affordable
NORMALISED = ["--trainer.callbacks.bins_px", "[8,16,24,32,48,64,96]", "--trainer.callbacks.min_count", "30",
              "--trainer.callbacks.normalise", "true"]
COLUMNS = (
    ("pixel_auc", "pixel AUC"), ("interior_pixel_auc", "interior AUC"), ("image_auc_mean", "image AUC"),
    ("lesion_hit_rate", "hit"), ("lesion_hit_rate_near_border", "hit (border)"),
    ("lesion_hit_rate_interior", "hit (interior)"), ("sensitivity_at_0.5_fp", "sens@0.5"),
    ("sensitivity_at_1_fp", "sens@1"), ("sensitivity_at_2_fp", "sens@2"),
    ("top1_near_border_fraction_mean", "top-1% near border"), ("border_area_fraction_mean", "border zone"),
    ("hausdorff_px_mean", "H px"), ("hausdorff_cells_mean", "H cells"),
)


@dataclass
class Variant:
    name: str
    config: str  # model YAML
    fit: str  # run folder whose checkpoint is scored ("cae", "cae_spn" from Table 1, or a fit of this study)
    calibration: list[str] | None = None  # ConformalCalibration arguments; None = raw scores
    hparams: tuple[tuple[str, Any], ...] = ()  # scoring options written into a copy of the checkpoint (first)
    needs_autoencoder: bool = True
    data: tuple[str, ...] = ()  # data options of its calibration and test (e.g. the other breast's item)


VARIANTS = (
    Variant("CAE", "cae.yaml", "cae", needs_autoencoder=False),
    Variant("CAE-RATSPN", "cae_spn.yaml", "cae_spn"),
    Variant("suppress", "cae_spn.yaml", "cae_spn", hparams=(("border_suppression_px", 64.0),)),
    Variant("context", "cae_spn.yaml", "border_cae_spn_context"),
    Variant("mondrian", "cae_spn.yaml", "cae_spn", calibration=MONDRIAN),
    Variant("normalised", "cae_spn.yaml", "cae_spn", calibration=NORMALISED),
    Variant("context+mondrian", "cae_spn.yaml", "border_cae_spn_context", calibration=MONDRIAN),
    Variant("context+normalised", "cae_spn.yaml", "border_cae_spn_context", calibration=NORMALISED),
    Variant("CAE+mondrian", "cae.yaml", "cae", calibration=MONDRIAN, needs_autoencoder=False),
)


def smoothing_variants(sigmas_px: list[float]) -> tuple[Variant, ...]:
    """``mondrian+smooth<sigma>`` per sigma: the calibrated grid scores smoothed (`RatSpnStage(score_smoothing_px,
    smooth_calibrated=True)`) and calibrated again; ``--smoothing-px`` 16 (the default) is Table 1's default row."""
    return tuple(Variant(f"mondrian+smooth{sigma:g}", "cae_spn.yaml", "cae_spn", calibration=MONDRIAN,
                         hparams=(("score_smoothing_px", float(sigma)), ("smooth_calibrated", True)))
                 for sigma in sigmas_px)


def bilateral_variants(sigma_px: float, radii_px: list[float]) -> tuple[Variant, ...]:
    """``mondrian+smooth<sigma>+bilateral-<mean|max><radius>``: Table 1's default scoring (the ``sigma`` row of
    `smoothing_variants`), then each calibrated score minus the other breast's mean / max within the radius,
    calibrated again on healthy pairs (`RatSpnStage(contralateral=...)`, ``table1 --contralateral``)."""
    smooth = (("score_smoothing_px", float(sigma_px)), ("smooth_calibrated", True))
    return tuple(Variant(f"mondrian+smooth{sigma_px:g}+bilateral-{ref}{radius:g}", "cae_spn.yaml", "cae_spn",
                         calibration=MONDRIAN, data=("--data.init_args.with_contralateral", "true"),
                         hparams=(*smooth, ("contralateral", ref), ("contralateral_radius_px", float(radius))))
                 for ref in contralateral.REFERENCES for radius in radii_px)


def _slug(name: str) -> str:
    return name.lower().replace("+", "_").replace("-", "_")


def _base_args(args: argparse.Namespace, config: str, fit: str) -> list[str]:
    data_first, data_last, overrides = table1_stages.data_args(args.data, args.data_root, args.seed)
    profile = str(table1_stages.CONFIG_DIR / "profiles" / f"{args.profile}.yaml")
    configs = [*data_first, str(table1_stages.CONFIG_DIR / config), profile, *data_last,
               *table1_stages.profile_overlays(args.profile, fit if fit in ("cae", "cae_spn") else "cae_spn")]
    out = [a for c in configs for a in ("--config", c)] + overrides
    return out


def with_hparams(ckpt: Path, out: Path, hparams: dict[str, Any]) -> Path:
    """A copy of ``ckpt`` whose saved hyper-parameters carry ``hparams``: LightningCLI instantiates a model
    tested with ``--ckpt_path`` from the checkpoint's hyper-parameters, over any ``--model.init_args`` given,
    so a scoring option travels in the checkpoint, like the calibrator does."""
    import torch

    if not out.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state.setdefault("hyper_parameters", {}).update(hparams)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(out, buffer.getvalue())
    return out


def _derived_checkpoints(runs: Path) -> list[Path]:
    """The study's checkpoint copies and calibrations beside Table 1's checkpoints (with their reports), of
    every variant a study may have run (any ``--smoothing-px``), never Table 1's own files."""
    paths = []
    for fit in sorted({v.fit for v in VARIANTS} - {"border_cae_spn_context"}):
        folder = runs / fit / "checkpoints"
        copies = [folder / f"{_slug(v.name)}.ckpt" for v in VARIANTS] + sorted(folder.glob("mondrian_smooth*.ckpt"))
        paths += [p for p in copies if p.exists()]
        paths += [p for p in sorted(folder.glob("calibrated-*")) if ".replaced-" not in p.name]  # not moved twice
    return paths


def retire_stale(out: Path, inputs: dict[str, str], log: Any) -> list[Path]:
    """Moves the study's earlier outputs aside when Table 1's checkpoints they came from have changed (a refit),
    or when their origin is unknown; records ``inputs`` (checkpoint digests) for the next run. Returns what moved."""
    runs, eval_dir = out / "runs", out / "border-eval"
    record = eval_dir / "INPUTS.json"
    if record.is_file() and read_json(record) == inputs:
        return []
    derived = [eval_dir, runs / "border_cae_spn_context", *_derived_checkpoints(runs)]
    moved = [move_aside(path) for path in derived if path.exists()]
    if moved:
        log(f"border study: Table 1's checkpoints changed since the last study; earlier outputs moved aside "
            f"({len(moved)}, e.g. {moved[0]})")
    write_json(record, inputs)
    return moved


def _run(argv: list[str], log: Any) -> None:
    from experiments import cli

    log("lightning " + " ".join(argv[:1] + ["..."] + argv[-6:]))
    try:
        cli.run_cli(argv)
    except SystemExit as err:
        if err.code not in (0, None):
            raise RuntimeError(f"border study step failed: lightning {' '.join(argv)}") from err


def run(args: argparse.Namespace) -> int:
    log = print
    out = Path(args.table1)
    runs, eval_dir = out / "runs", out / "border-eval"
    ae_ckpt = table1_stages.checkpoint_path(runs, "cae")
    if not ae_ckpt.is_file() or not table1_stages.checkpoint_path(runs, "cae_spn").is_file():
        print(f"mammospn border-study: no CAE / CAE-RATSPN fits in {runs}; run `mammospn table1 --out {out}` first")
        return 2
    variants = (VARIANTS + smoothing_variants(args.smoothing_px)
                + bilateral_variants(table1_stages.DEFAULT_SMOOTHING_PX, args.bilateral_radius_px))
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in variants})
        if unknown:
            print(f"mammospn border-study: unknown --variants {', '.join(unknown)}; one of: "
                  f"{', '.join(v.name for v in variants)}", file=sys.stderr)
            return 2
        variants = tuple(v for v in variants if v.name in args.variants)
    spn_ckpt = table1_stages.checkpoint_path(runs, "cae_spn")
    retire_stale(out, {"cae": file_sha256(ae_ckpt), "cae_spn": file_sha256(spn_ckpt)}, log)
    ae = ["--model.init_args.autoencoder_ckpt", str(ae_ckpt)]
    # the conditional RAT-SPN: the Table 1 stage's settings plus context
    context_fit = runs / "border_cae_spn_context"
    if any(v.fit == context_fit.name for v in variants) and not (context_fit / "checkpoints" / "last.ckpt").is_file():
        _run(["fit", *_base_args(args, "cae_spn.yaml", "cae_spn"), *ae, "--model.init_args.context", "true",
              "--run.name", context_fit.name, "--run.root", str(runs), "--run.results_dir", str(eval_dir)], log)
    split = ["--data.init_args.evaluate_on", args.split]
    rows = []
    for variant in variants:
        base = _base_args(args, variant.config, variant.fit) + (ae if variant.needs_autoencoder else []) + list(variant.data)
        ckpt = table1_stages.checkpoint_path(runs, variant.fit)  # best.ckpt (else last.ckpt), as Table 1 tests
        if variant.config.endswith("_spn.yaml"):
            # scoring options before the calibration, which ranks what the model scores; a RAT-SPN variant
            # scores unsmoothed unless it says so, whatever smoothing Table 1's fit carries
            hparams = {"score_smoothing_px": 0.0, "smooth_calibrated": False, "contralateral": "none",
                       **dict(variant.hparams)}
            ckpt = with_hparams(ckpt, ckpt.with_name(f"{_slug(variant.name)}.ckpt"), hparams)
        if variant.calibration is not None:
            calibrated = ckpt.with_name(f"calibrated-{_slug(variant.name)}.ckpt")
            if not calibrated.is_file():
                _run(["validate", *base, "--ckpt_path", str(ckpt), "--run.name", variant.fit, "--run.root", str(runs),
                      "--run.results_dir", str(eval_dir), "--run.evaluate", "false",
                      "--trainer.callbacks+=experiments.calibration.ConformalCalibration",
                      "--trainer.callbacks.output", str(calibrated), *variant.calibration], log)
            ckpt = calibrated
        name = f"{_slug(variant.name)}-{args.split}"
        metrics = eval_dir / name / "metrics.json"
        if not metrics.is_file():
            _run(["test", *base, *split, "--ckpt_path", str(ckpt), "--run.name", name,
                  "--run.root", str(runs), "--run.results_dir", str(eval_dir)], log)
        summary = read_json(metrics)
        row = {"variant": variant.name, **{key: summary.get(key) for key, _ in COLUMNS}}
        report = calibration.report_path(ckpt)
        if variant.calibration is not None and report.is_file():
            cal = read_json(report)
            rates = dict(zip(cal["alphas"], cal["pixel_rate"]))
            row["healthy p<0.05"] = rates.get(0.05)
        rows.append(row)
    write_json(out / "border_study.json", {"split": args.split, "data": args.data, "rows": rows})
    text = format_markdown(rows, args)
    atomic_write(out / "border_study.md", text)
    atomic_write(out / "border_study.csv", format_csv(rows))
    print(text)
    return 0


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 10 else f"{value:.1f}" if isinstance(value, float) else str(value)


def format_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    heads = ["variant", *[h for _, h in COLUMNS], "healthy p<0.05"]
    lines = [f"# Border-aware scoring, {args.data} ({args.split} split, profile {args.profile}, seed {args.seed})", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = [row["variant"], *[_cell(row.get(k)) for k, _ in COLUMNS], _cell(row.get("healthy p<0.05"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Threshold rule: each image's own 99th percentile (Hausdorff; FROC sweeps one global threshold).",
              "hit = share of images whose highest breast pixel lies in a lesion; border = lesions whose centre lies",
              "within one patch (64 px) of the breast border. healthy p<0.05 = share of held-out healthy validation",
              "pixels with p < 0.05 (ideal 0.05)."]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = ["variant", *[k for k, _ in COLUMNS], "healthy p<0.05"]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def add_study_arguments(parser: argparse.ArgumentParser, split_default: str, split_help: str) -> None:
    """The flags every study of a Table 1 folder takes (this one and `mammospn score-study`): where the fits are,
    the data and profile they were made with, and which lesion split to score."""
    parser.add_argument("--table1", required=True, help="a `mammospn table1 --out` folder with the CAE fits")
    parser.add_argument("--data", default="synthetic", help="data source name or configs/data/*.yaml (as table1)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--profile", default="quick", choices=table1_stages.PROFILES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default=split_default, choices=("test", "lesion_validation"), help=split_help)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_study_arguments(parser, "test", "which lesion set the variants are scored on (choose a default on "
                                        "lesion_validation)")
    parser.add_argument("--smoothing-px", type=float, nargs="+", default=[table1_stages.DEFAULT_SMOOTHING_PX],
                        metavar="SIGMA", help="a mondrian+smooth<SIGMA> variant per sigma (px) of the grid smoothing")
    parser.add_argument("--bilateral-radius-px", type=float, nargs="*", default=[32.0], metavar="PX",
                        help="a ...+bilateral-mean<PX> and ...+bilateral-max<PX> variant per radius (the other breast's "
                             "reference square); none with no value")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="only these variants (by name, e.g. mondrian+smooth16 mondrian+smooth16+bilateral-mean32)")
