"""Table 1's stages: which `lightning` commands, with which configs and overrides, in which order.

`build_stages` lists the reproduction: fit CAE, beta-VAE, VQ-VAE, their three RAT-SPN stages and both
f-AnoGAN stages, calibrate the RAT-SPNs, then test the seven models and the `Intensity` baseline on the
mass and calc test sets; `stage_args` is one stage's command line. `table1_runs` runs them (reused when
done, rerun when their settings changed); `table1_report` reads what the test stages wrote into the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.configs import CONFIG_DIR  # the checkout's configs/ or the packaged ones

PROFILES = ("quick", "paper", "smoke", "real")
#: data sources `--data` names (each a configs/data/<name>.yaml); a path to any data YAML works too
DATA_CHOICES = ("synthetic", "cbis_ddsm", "ddsm", "mini_ddsm", "mias", "manifest")
TEST_SETS = (("mass", "masses"), ("calc", "calcs"))
#: Table 1's model order (paper), then the baseline every model is read against
MODEL_ORDER = ("CAE", "CAE-RATSPN", "bVAE", "bVAE-RATSPN", "VQVAE", "VQVAE-RATSPN", "f-AnoGAN", "Intensity")


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


def data_args(
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
#: fits whose model has a ``seed`` hyper-parameter of its own (the VQ-VAE's code restarts, the RAT-SPN's init)
SEEDED_FITS = ("vqvae", "cae_spn", "bvae_spn", "vqvae_spn")
CALIBRATED_CKPT = "calibrated.ckpt"
#: ``--score-smoothing-px`` default of the calibrated RAT-SPN rows: sigma (px) of the Gaussian average of
#: neighbouring grid scores before the calibration (`RatSpnStage(score_smoothing_px)`); the raw rows keep 0
#: (the paper's per-patch score). Chosen on lesion validation, README "Border-aware scoring".
DEFAULT_SMOOTHING_PX = 16.0
#: ``--smoothing-space``: what the calibrated RAT-SPN rows smooth. ``calibrated`` (default): the -log p of a first
#: Mondrian calibration of the raw scores, calibrated again after smoothing (`RatSpnStage(smooth_calibrated)`);
#: ``raw``: the raw -log p(z), calibrated once. Chosen on lesion validation, README "Border-aware scoring".
SMOOTHING_SPACES = ("calibrated", "raw")
#: ``--contralateral``: the calibrated RAT-SPN rows score bilateral asymmetry against the woman's other breast
#: (`RatSpnStage(contralateral=...)`, ``data.with_contralateral``); "none" = one-sided
#: (`lightning_modules.contralateral.OPTIONS`, spelled out: importing it would load torch and every model into this
#: module, which the `mammospn` commands import at start-up; a test keeps the two equal)
CONTRALATERAL = ("none", "mean", "max")
#: ``--contralateral`` / ``--contralateral-radius-px`` defaults: the mean of the other breast's calibrated scores in
#: the square of half-side 32 px around the mirrored place (centred on its image median); chosen on mini-MIAS lesion
#: validation over three fits, README "Bilateral asymmetry". Images without a listed other breast stay one-sided.
DEFAULT_CONTRALATERAL = "mean"
DEFAULT_CONTRALATERAL_RADIUS_PX = 32.0
#: the test sets whose RAT-SPN rows score bilaterally; the others are scored one-sided by the same calibrated
#: checkpoint (their items do not carry the other breast). Chosen on lesion validation: masses gained on every
#: column, calcifications lost (pixel AUC 0.64 -> 0.43 on mini-MIAS's two validation images; a 65-px reference of
#: dense tissue drowns a speck). README "Bilateral asymmetry".
CONTRALATERAL_TEST_SETS = ("mass",)
SCORING_NOTES = {
    "raw": "-log p(z) of the autoencoder's latents (paper).",
    "mondrian": "-log of the conformal p-value of -log p(z) among healthy validation patches of the same "
                "border-distance stratum (`<fit>_calibrate` stages).",
    "context+mondrian": "conditional -log p(z | distances to skin line and film cut), calibrated by border "
                        "stratum like `mondrian`.",
}


def smoothing_of(scoring: str, smoothing_px: float | None = None) -> float:
    """The RAT-SPN rows' score smoothing (px): ``smoothing_px`` when given, else `DEFAULT_SMOOTHING_PX` for a
    calibrated ``scoring`` and 0 for ``raw`` (the paper's)."""
    if smoothing_px is None:
        return 0.0 if scoring == "raw" else DEFAULT_SMOOTHING_PX
    if smoothing_px < 0:
        raise ValueError(f"--score-smoothing-px must be >= 0, got {smoothing_px:g}")
    return float(smoothing_px)


def smooths_calibrated(scoring: str, smoothing_space: str) -> bool:
    """Whether the RAT-SPN rows smooth calibrated scores (`RatSpnStage(smooth_calibrated)`): with a calibrated
    ``scoring`` and ``smoothing_space`` "calibrated" (`SMOOTHING_SPACES`); the one rule for the stages and the notes."""
    return scoring != "raw" and smoothing_space == "calibrated"


def build_stages(
    profile: str, data: str = "synthetic", data_root: str | None = None, seed: int = 0,
    healthy_root: str | None = None, threshold_rule: str = "image_percentile", scoring: str = "mondrian",
    smoothing_px: float | None = None, smoothing_space: str = "calibrated", contralateral: str = DEFAULT_CONTRALATERAL,
    contralateral_radius_px: float = DEFAULT_CONTRALATERAL_RADIUS_PX,
) -> list[Stage]:
    """The reproduction's stages in run order (8 fits, then 16 tests: 8 models x mass/calc).

    ``threshold_rule="calibrated"``: the RAT-SPN rows segment at (and count FROC candidates above) the
    threshold their checkpoint carries; their test stages are named ``...-calibrated`` so the per-image
    percentile results stay. Every other row keeps the per-image percentile; each row says its rule.
    ``scoring`` (`SCORINGS`) other than "raw" adds a calibration stage after each RAT-SPN fit, whose
    calibrated checkpoint the RAT-SPN rows are tested with. ``smoothing_px`` (`smoothing_of`) goes to the
    RAT-SPN fits as ``score_smoothing_px``, so their calibration and tests score the smoothed grid; with a
    calibrated ``scoring`` and ``smoothing_space`` "calibrated" (`SMOOTHING_SPACES`) they smooth calibrated scores.
    ``contralateral`` "mean" (default) / "max" (`CONTRALATERAL`) makes the calibrated RAT-SPN rows of the
    `CONTRALATERAL_TEST_SETS` score the bilateral asymmetry against the woman's other breast within
    ``contralateral_radius_px`` (their calibration's and tests' items carry it; the other rows stay one-sided).
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
    if smoothing_space not in SMOOTHING_SPACES:
        raise ValueError(f"--smoothing-space must be one of {SMOOTHING_SPACES}, got {smoothing_space!r}")
    smoothing = smoothing_of(scoring, smoothing_px)
    if smoothing > 0:
        spn_extra += ["--model.init_args.score_smoothing_px", f"{smoothing:g}"]
        if smooths_calibrated(scoring, smoothing_space):
            spn_extra += ["--model.init_args.smooth_calibrated", "true"]
    if contralateral not in CONTRALATERAL:
        raise ValueError(f"--contralateral must be one of {CONTRALATERAL}, got {contralateral!r}")
    paired: list[str] = []
    if contralateral != "none" and scoring != "raw":  # the raw rows (the paper's) score each breast alone
        if not contralateral_radius_px >= 0:
            raise ValueError(f"--contralateral-radius-px must be >= 0, got {contralateral_radius_px:g}")
        spn_extra += ["--model.init_args.contralateral", contralateral, "--model.init_args.contralateral_radius_px",
                      f"{contralateral_radius_px:g}"]
        paired = ["--data.init_args.with_contralateral", "true"]  # the calibration and the bilateral test sets
    # models with a seed of their own take the stage's seed too: Lightning refuses a model and a data module
    # whose logged ``seed`` hyper-parameters differ, and --seed N must move every random choice
    seeded = ["--model.init_args.seed", str(seed)]

    def extra(spec: FitSpec) -> list[str]:
        return list(spec.extra) + (spn_extra if spec.model.endswith("-RATSPN") else []) + (
            seeded if spec.name in SEEDED_FITS else [])
    profile_yaml = str(CONFIG_DIR / "profiles" / f"{profile}.yaml")
    data_first, data_last, data_overrides = data_args(data, data_root, seed, healthy_root)
    estimates = ESTIMATES[profile]
    stages: list[Stage] = []
    for spec in FITS:
        overrides = extra(spec) + list(data_overrides)
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
                    overrides=extra(spec) + list(data_overrides) + paired, estimate_s=estimates["test"],
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
                test_overrides = extra(spec) + test_overrides
                if model.endswith("-RATSPN") and test_set in CONTRALATERAL_TEST_SETS:
                    test_overrides += paired  # items carry the other breast; without it the model scores one-sided
                source = spec.name
            rule = threshold_rule if model.endswith("-RATSPN") else "image_percentile"
            suffix = "" if rule == "image_percentile" else f"-{rule}"
            calibrated = model.endswith("-RATSPN") and scoring != "raw"
            stages.append(
                Stage(
                    name=f"test-{test_set}-{model_slug(model)}{suffix}",
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


def select_models(stages: Sequence[Stage], models: Sequence[str]) -> list[Stage]:
    """The stages that Table 1 rows ``models`` need: their tests, and every fit or calibration they load.

    Order is kept. An unknown row name raises ``ValueError`` naming it and the known rows.
    """
    unknown = [m for m in models if m not in MODEL_ORDER]
    if unknown:
        raise ValueError(f"--models: unknown row {', '.join(map(repr, unknown))}; rows are {', '.join(MODEL_ORDER)}")
    by_name = {s.name: s for s in stages}
    keep: set[str] = set()
    todo = [s for s in stages if s.kind == "test" and s.model in models]
    while todo:
        stage = todo.pop()
        if stage.name in keep:
            continue
        keep.add(stage.name)
        todo.extend(by_name[name] for name in stage_inputs(stage) if name in by_name)
    return [s for s in stages if s.name in keep]


def stage_inputs(stage: Stage) -> list[str]:
    """Names of the stages whose outputs ``stage`` loads: the fit it names, and that fit's calibration when it is
    tested with the calibrated checkpoint."""
    if stage.checkpoint_from is None:
        return []
    calibrated = stage.checkpoint_file == CALIBRATED_CKPT
    return [stage.checkpoint_from, *([f"{stage.checkpoint_from}_calibrate"] if calibrated else [])]


def model_slug(model: str) -> str:
    """A model's display name as a file / stage name part (``CAE-RATSPN`` -> ``cae_ratspn``)."""
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
