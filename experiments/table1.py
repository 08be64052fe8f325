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

from torch import Tensor

from experiments.evaluation import atomic_write
from lightning_modules.base import AnomalyDetector

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
PROFILES = ("quick", "paper", "smoke")
DATA_CHOICES = ("synthetic", "cbis_ddsm")
TEST_SETS = (("mass", "masses"), ("calc", "calcs"))
#: Table 1's model order (paper), then the baseline every model is read against
MODEL_ORDER = ("CAE", "CAE-RATSPN", "bVAE", "bVAE-RATSPN", "VQVAE", "VQVAE-RATSPN", "f-AnoGAN", "Intensity")
#: AE -> its RAT-SPN extension, compared by a paired Wilcoxon signed-rank test on per-image AUCs
PAIRS = (("CAE", "CAE-RATSPN"), ("bVAE", "bVAE-RATSPN"), ("VQVAE", "VQVAE-RATSPN"))
ALPHA = 0.01


class IntensityBaseline(AnomalyDetector):
    """Table 1's `Intensity` row: score = mean patch intensity; nothing is trained.

    It shows what brightness alone achieves (masses are denser, hence brighter, than their surroundings).
    """

    def __init__(self) -> None:
        super().__init__()

    def score_patches(self, x: Tensor) -> Tensor:
        return x.float().flatten(1).mean(1)


# --- the stages --------------------------------------------------------------------------------


@dataclass
class Stage:
    """One `lightning` command of the reproduction."""

    name: str
    kind: str  # "fit" | "test"
    model: str  # display name (Table 1 row) or a fit step's name
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    estimate_s: float = 60.0
    test_set: str | None = None
    checkpoint_from: str | None = None  # fit stage whose checkpoint a test stage loads
    checkpoint_file: str = "best.ckpt"


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
}

#: per-profile, per-fit overrides that a single profile file cannot express (it applies to every model):
#: the paper's learning rates (1e-5 over 100 epochs) barely move a model in the few hundred steps a CPU
#: profile affords, so the short profiles train the autoencoders faster; f-AnoGAN is made narrower.
_FAST_AE = {
    "cae": ["--model.init_args.lr", "1e-3"],
    "bvae": ["--model.init_args.lr", "1e-3"],
    "vqvae": ["--model.init_args.lr", "3e-4"],
}
#: bf16 autocast trains the conv networks 2-3x faster on a CPU with bf16 support (make bench: CAE
#: 270 -> 584 patches/s); the RAT-SPN stages and all tests stay in fp32 (exact likelihoods and metrics)
_BF16 = ["--trainer.precision", "bf16-mixed"]
#: a step of 1e-4 keeps almost all of the data-driven leaf initialisation after a few hundred EM steps
_FAST_EM = {
    name: ["--model.init_args.step_size", "0.01"] for name in ("cae_spn", "bvae_spn", "vqvae_spn")
}
_SMOKE_EM = {
    name: ["--model.init_args.step_size", "0.01", "--model.init_args.init_batches", "3",
           "--model.init_args.num_repetitions", "5", "--model.init_args.num_input_distributions", "5"]
    for name in ("cae_spn", "bvae_spn", "vqvae_spn")
}
PROFILE_OVERRIDES: dict[str, dict[str, list[str]]] = {
    "smoke": {
        **_FAST_AE,
        **_SMOKE_EM,
        "fanogan_gan": ["--model.init_args.width", "8", "--model.init_args.latent_dim", "16"],
        "fanogan": ["--model.init_args.width", "8", "--model.init_args.latent_dim", "16"],
    },
    "quick": {
        **{name: [*args, *_BF16] for name, args in _FAST_AE.items()},
        **_FAST_EM,
        "fanogan_gan": ["--model.init_args.width", "32", "--model.init_args.latent_dim", "64", *_BF16],
        "fanogan": ["--model.init_args.width", "32", "--model.init_args.latent_dim", "64", *_BF16],
    },
    # the profile file sets batch 64 for every model; the RAT-SPN stages load 1024 patches per batch and
    # take EM steps of 64 (em_batch_size in their configs), so Lightning's per-batch cost is paid once per 16
    "paper": {name: ["--data.init_args.batch_size", "1024"] for name in ("cae_spn", "bvae_spn", "vqvae_spn")},
}


def _data_args(
    data: str, data_root: str | None, seed: int, healthy_root: str | None = None
) -> tuple[list[str], list[str]]:
    """(config files, overrides) selecting the data source, its root and the seed.

    A data config comes after the profile, so a profile's synthetic settings never override a real source.
    """
    configs: list[str] = []
    data_yaml = CONFIG_DIR / "data" / f"{data}.yaml"
    if data != "synthetic":
        if not data_yaml.is_file():
            raise FileNotFoundError(f"no data config {data_yaml} for --data {data}")
        configs.append(str(data_yaml))
    overrides = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    if data_root:
        overrides += ["--data.init_args.root", str(data_root)]
    if healthy_root:
        overrides += ["--data.init_args.healthy_root", str(healthy_root)]
    return configs, overrides


def build_stages(
    profile: str, data: str = "synthetic", data_root: str | None = None, seed: int = 0,
    healthy_root: str | None = None,
) -> list[Stage]:
    """The reproduction's stages in run order (8 fits, then 16 tests: 8 models x mass/calc)."""
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {PROFILES}, got {profile!r}")
    profile_yaml = str(CONFIG_DIR / "profiles" / f"{profile}.yaml")
    data_configs, data_overrides = _data_args(data, data_root, seed, healthy_root)
    estimates = ESTIMATES[profile]
    stages: list[Stage] = []
    for spec in FITS:
        overrides = list(spec.extra) + list(data_overrides) + PROFILE_OVERRIDES[profile].get(spec.name, [])
        stages.append(
            Stage(
                name=spec.name,
                kind="fit",
                model=spec.model,
                configs=[str(CONFIG_DIR / spec.config), profile_yaml, *data_configs],
                overrides=overrides,
                estimate_s=estimates[spec.estimate_key],
                checkpoint_from=spec.needs,
                checkpoint_file=spec.needs_file,
            )
        )
    tested = {spec.model: spec for spec in FITS if spec.name != "fanogan_gan"}
    for test_set, _ in TEST_SETS:
        for model in MODEL_ORDER:
            test_overrides = list(data_overrides) + ["--data.init_args.test_set", test_set]
            if model == "Intensity":
                configs = [profile_yaml, *data_configs]
                test_overrides = ["--model", f"{__name__}.IntensityBaseline", *test_overrides]
                source = None
            else:
                spec = tested[model]
                configs = [str(CONFIG_DIR / spec.config), profile_yaml, *data_configs]
                test_overrides = list(spec.extra) + PROFILE_OVERRIDES[profile].get(spec.name, []) + test_overrides
                source = spec.name
            stages.append(
                Stage(
                    name=f"test-{test_set}-{_slug(model)}",
                    kind="test",
                    model=model,
                    configs=configs,
                    overrides=test_overrides,
                    estimate_s=estimates["test"],
                    test_set=test_set,
                    checkpoint_from=source,
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
        args += ["--ckpt_path", str(checkpoint_path(runs_dir, stage.checkpoint_from))]
    return args


def stage_done(stage: Stage, runs_dir: Path, eval_dir: Path) -> bool:
    """A stage is reused when its marker, resolved config and checkpoint (fit) or metrics (test) exist."""
    run_dir = runs_dir / stage.name
    config_name = "config.yaml" if stage.kind == "fit" else f"config-{stage.kind}.yaml"
    if not (run_dir / "DONE.json").is_file() or not (run_dir / config_name).is_file():
        return False
    if stage.kind == "fit":
        return checkpoint_path(runs_dir, stage.name).is_file()
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
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        spent_actual += seconds
        spent_estimate += stage.estimate_s
        timings[stage.name] = {"kind": stage.kind, "model": stage.model, "test_set": stage.test_set,
                               "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                               "estimate_s": stage.estimate_s, "reused": False}
        atomic_write(runs_dir / stage.name / "DONE.json", json.dumps(timings[stage.name], indent=2) + "\n")
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
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


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


def format_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Table 1", notes: Sequence[str] = ()) -> str:
    """The paper's layout; the better of an AE / AE-RATSPN pair is bold when their Wilcoxon p < 0.01."""
    rules = sorted({r["threshold_rule"] for r in rows if r["threshold_rule"]})
    lines = [f"# {title}", ""]
    lines.append(
        f"Threshold rule for the segmentation (H): {', '.join(rules) or 'n/a'} "
        "(pixels above the 99th percentile of the image's own breast-pixel scores). "
        "H = Hausdorff distance in px at evaluation spacing (mm in table1.csv). "
        f"**Bold**: the better of an AE and its RAT-SPN extension, paired two-sided Wilcoxon signed-rank "
        f"test on per-image AUCs, p < {ALPHA}; p is shown on both rows of the pair."
    )
    lines += ["", "| Test data | Model | Pixel AUC | Image AUC | H | Wilcoxon p (vs) | images |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [
            _f(r["pixel_auc"]),
            f"{_f(r['image_auc_mean'])} ± {_f(r['image_auc_std'])}",
            f"{_f(r['hausdorff_px_mean'])} ± {_f(r['hausdorff_px_std'])}",
        ]
        model = r["model"]
        if r["better"]:
            cells = [f"**{c}**" for c in cells]
            model = f"**{model}**"
        p = f"{_p(r['wilcoxon_p'])} ({r['pair']})" if r["pair"] else ""
        lines.append(
            f"| {r['test_label']} | {model} | {' | '.join(cells)} | {p} | {r['n_evaluated']}/{r['n_images']} |"
        )
    lines += ["", *notes]
    return "\n".join(lines).rstrip() + "\n"


CSV_COLUMNS = (
    "test_set", "model", "pixel_auc", "image_auc_mean", "image_auc_std", "hausdorff_px_mean", "hausdorff_px_std",
    "hausdorff_mm_mean", "hausdorff_mm_std", "n_images", "n_evaluated", "pair", "wilcoxon_p", "wilcoxon_n",
    "better", "threshold_rule",
)


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``table1.csv``: every number of the table at full precision (NaN written as empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buffer.getvalue()


def write_table1(rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Writes ``table1.md`` and ``table1.csv`` atomically; returns the markdown path."""
    md = out_dir / "table1.md"
    atomic_write(md, format_markdown(rows, title, notes))
    atomic_write(out_dir / "table1.csv", format_csv(rows))
    return md


def collect(stages: Sequence[Stage], eval_dir: Path) -> list[ModelResult]:
    """The results of every test stage."""
    return [
        read_model_result(eval_dir / s.name, s.test_set or "", s.model) for s in stages if s.kind == "test"
    ]


def write_figures(stages: Sequence[Stage], eval_dir: Path, out_dir: Path) -> list[Path]:
    """``fig2_<set>.png`` (one scan, every model) and ``fig3_<model>.png`` (score distributions)."""
    from experiments import figures

    written: list[Path] = []
    tests = [s for s in stages if s.kind == "test"]
    for test_set, label in TEST_SETS:
        map_dirs = {s.model: eval_dir / s.name / "maps" for s in tests if s.test_set == test_set}
        map_dirs = {m: d for m, d in map_dirs.items() if d.is_dir()}
        path = figures.figure2(map_dirs, out_dir / f"fig2_{test_set}.png", title=f"Fig. 2 ({label})") if map_dirs else None
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
                        help="quick: CPU, synthetic, <= 45 min; paper: the paper's settings, for a GPU; smoke: tests")
    parser.add_argument("--data", choices=DATA_CHOICES, default="synthetic", help="data source of every stage")
    parser.add_argument("--data-root", default=None, help="root of the data (synthetic: where it is generated)")
    parser.add_argument("--healthy-root", default=None,
                        help="cbis_ddsm: the DDSM folder holding cases/normals (healthy training images)")
    parser.add_argument("--out", default="results", help="output folder (runs/, eval/, table1.md, figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (data sampling and training)")
    parser.add_argument("--force", action="store_true", help="rerun stages even when their outputs exist")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' lightning commands and stop")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the table and figures from finished stages")


def run(args: argparse.Namespace) -> int:
    """Runs the reproduction; returns a process exit code (0 = table written)."""
    out_dir = Path(args.out)
    try:
        stages = build_stages(args.profile, args.data, args.data_root, args.seed, args.healthy_root)
    except (ValueError, FileNotFoundError) as err:
        print(f"mammospn table1: {err}", file=sys.stderr)
        return 2
    group = f"table1-{args.profile}-{args.data}-s{args.seed}"
    runs_dir, eval_dir = out_dir / "runs", out_dir / "eval"
    if args.dry_run:
        for k, stage in enumerate(stages, 1):
            print(f"[{k:2d}/{len(stages)}] lightning {' '.join(stage_args(stage, runs_dir, eval_dir, group))}")
        return 0
    log = _printer()
    if not args.report_only:
        log(f"Table 1: {len(stages)} stages, profile {args.profile}, data {args.data}, W&B group {group}")
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
        f"Profile `{args.profile}`, data `{args.data}`, seed {args.seed}; W&B group `{group}`.",
        "Intensity: score = mean patch intensity, nothing trained (what brightness alone achieves).",
    ]
    if total is not None:
        notes.append(f"Wall time of the stages run: {total / 60:.1f} min (per stage in timings.json).")
    md = write_table1(rows, out_dir, f"Table 1 ({args.profile} profile, {args.data} data)", notes)
    figs = write_figures(stages, eval_dir, out_dir)
    from experiments.loggers import log_table1

    log_table1(out_dir, group, figs)
    log(md.read_text())
    log(f"wrote {md}, {out_dir / 'table1.csv'}, {len(figs)} figures, {timings_path}")
    return 0


def _printer() -> Any:
    def log(message: str) -> None:
        print(message, flush=True)

    return log
