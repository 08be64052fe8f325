"""`mammospn score-study`: scoring rules for the CAE-RATSPN compared in seconds, over saved grid scores.

    mammospn table1 --profile real --data mias --data-root DIR --out OUT      # first: the CAE and CAE-RATSPN fits
    mammospn score-study --table1 OUT --profile real --data mias --data-root DIR [--split lesion_validation]

`mammospn border-study` tests each option of the model as its own `lightning` command; this study scores
every grid patch of the lesion images (``--split``, both test sets) and of the healthy validation images once,
keeps four raw terms per patch (``likelihood``: the RAT-SPN's -log p(z); ``reconstruction``: the autoencoder's
own score; ``intensity``: the patch's mean brightness; ``likelihood_flips``: -log p(z) averaged over the patch and
its three mirror images) in ``OUT/score-study/scores-*.pt``, and then evaluates
rules built from them through the project's calibrator (`MondrianConformal`, border strata 16 / 32 / 64 px,
fitted on every healthy validation image) and evaluation (`EvaluationAccumulator`), as the model would:

- a term alone, raw or Mondrian-calibrated, its grid scores smoothed (`grid_smoothing.smooth_grid`) or
  median-filtered (`grid_smoothing.median_grid`) first;
- Fisher's combination of calibrated terms (the sum of their -log p, calibrated again on the same healthy
  images), e.g. the likelihood with the reconstruction error, which a latent density cannot see;
- a calibrated score minus its image's median, calibrated again (an image-level shift, e.g. breast density);
- finer border strata (to 128 px), smoothing after the calibration (then calibrated again), and the likelihood
  averaged over the patch's left-right / top-bottom flips (``likelihood_flips``, test-time augmentation).

Every calibrated rule is checked by two-fold cross-fitting over the healthy validation halves (share of held-out
breast pixels with p < 0.05, ideal 0.05). The saved scores are reused while Table 1's checkpoints are the ones they
came from (sha256). Written to ``OUT/score_study-<split>.md`` / ``.json``. Choose on ``--split lesion_validation``;
the test split only reports. Every rule here scores each breast alone; Table 1's default scores mini-MIAS images
against the other breast as well (`RatSpnStage(contralateral=...)`), whose rows `mammospn border-study` runs.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.fileio import atomic_write, file_sha256, write_json
from experiments import anomaly_maps, border_study, table1_stages
from experiments.calibration import observed_rates
from experiments.evaluation_results import EvaluationAccumulator
from lightning_modules.calibration import MondrianConformal
from lightning_modules.grid_smoothing import median_grid, smooth_grid

TERMS = ("likelihood", "reconstruction", "intensity", "likelihood_flips")
#: the calibration of Table 1's RAT-SPN rows (`experiments.calibration.ConformalCalibration` defaults)
BINS_PX, MIN_COUNT = (16.0, 32.0, 64.0), 50
Image = dict[str, Any]
Rule = Callable[[Image], Tensor]


# --- scoring every patch once ---------------------------------------------------------------------------------

def _image(model: Any, item: dict) -> Image:
    """The raw terms (`TERMS`) of one evaluation item's grid patches, with what its evaluation needs."""
    patches = item["patches"]
    context = item.get("context")
    context = None if context is None else context.reshape(-1, 2)

    def likelihood(x: Tensor) -> Tensor:
        return model.score_grid(x.contiguous(), context if model.uses_context else None)

    terms = {"likelihood": likelihood(patches),
             "reconstruction": model.autoencoder.score_grid(patches),
             "intensity": patches.mean(dim=(1, 2, 3)).float()}
    # test-time flips: the mean -log p(z) of the patch mirrored left-right, top-bottom and both (a lone patch's
    # score is partly the noise of its latent; a lesion stays unlikely under every view)
    terms["likelihood_flips"] = torch.stack([terms["likelihood"], *(likelihood(patches.flip(dims)) for dims in
                                                                    ((-1,), (-2,), (-1, -2)))]).mean(0)
    keep = ("image_id", "patient_id", "breast_mask", "lesion_mask", "centers", "spacing_mm", "stride", "meta")
    return {"terms": {k: v.cpu() for k, v in terms.items()}, "context": None if context is None else context.cpu(),
            "patch_size": int(patches.shape[-1]), **{k: item[k] for k in keep if k in item}}


def _cached(path: Path, inputs: dict[str, str], build: Callable[[], Any]) -> Any:
    """``build()``, saved at ``path`` with ``inputs`` and reused while they match."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("inputs") == inputs:
            return saved["value"]
    value = build()
    buffer = io.BytesIO()
    torch.save({"inputs": inputs, "value": value}, buffer)
    atomic_write(path, buffer.getvalue())
    return value


def score_images(args: argparse.Namespace, test_set: str, split: str, inputs: dict[str, str]) -> dict[str, list[Image]]:
    """Lesion images of ``split`` for ``test_set`` (``lesion``) and the two healthy validation halves
    (``healthy_fit``, ``healthy_check``), scored by Table 1's CAE-RATSPN (best checkpoint, unsmoothed); saved in
    ``OUT/score-study`` and reused while Table 1's checkpoints are the same (``inputs``)."""
    from experiments import cli

    folder = Path(args.table1) / "score-study"
    runs = Path(args.table1) / "runs"
    ckpt = table1_stages.checkpoint_path(runs, "cae_spn")
    argv = [*border_study._base_args(args, "cae_spn.yaml", "cae_spn"),
            "--model.init_args.autoencoder_ckpt", str(table1_stages.checkpoint_path(runs, "cae")),
            "--data.init_args.test_set", test_set, "--data.init_args.evaluate_on", split,
            "--run.name", "score-study", "--run.root", str(folder / "runs")]
    parsed = cli.run_cli(argv, run=False)
    model, dm = parsed.model, parsed.datamodule
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(state)
    model.load_state_dict(state["state_dict"])
    model.eval()

    def lesion() -> list[Image]:
        dm.setup("test")
        return [_image(model, item) for item in dm.test_dataloader()]

    def healthy() -> dict[str, list[Image]]:
        dm.setup("fit")
        return {f"healthy_{part}": [_image(model, item) for item in dm.calibration_dataloader(part)]
                for part in ("fit", "check")}

    return {"lesion": _cached(folder / f"scores-{test_set}-{split}.pt", inputs, lesion),
            **_cached(folder / "scores-healthy.pt", inputs, healthy)}


# --- rules ------------------------------------------------------------------------------------------------

def term(name: str, smoothing_px: float = 0.0, median_cells: int = 0) -> Callable[[list[Image]], Rule]:
    """A raw term, smoothed (Gaussian, px) or median-filtered (radius in grid cells) over the grid."""
    def fitted(_: list[Image]) -> Rule:
        def rule(image: Image) -> Tensor:
            s = image["terms"][name].float()
            s = smooth_grid(s, image["centers"], image["stride"], smoothing_px)
            return median_grid(s, image["centers"], image["stride"], median_cells)
        return rule
    return fitted


def mondrian(inner: Callable[[list[Image]], Rule], bins_px: tuple[float, ...] = BINS_PX) -> Callable[[list[Image]], Rule]:
    """-log p of ``inner``'s scores among the healthy images' scores of the same border stratum."""
    def fitted(healthy: list[Image]) -> Rule:
        score = inner(healthy)
        calibrator = MondrianConformal(bins_px, MIN_COUNT)
        calibrator.fit(torch.cat([score(i) for i in healthy]), torch.cat([i["context"] for i in healthy]))
        return lambda image: calibrator(score(image), image["context"])
    return fitted


def smoothed(inner: Callable[[list[Image]], Rule], sigma_px: float) -> Callable[[list[Image]], Rule]:
    """``inner``'s scores smoothed over the grid afterwards (e.g. calibrated -log p; calibrate again to keep p-values)."""
    def fitted(healthy: list[Image]) -> Rule:
        score = inner(healthy)
        return lambda image: smooth_grid(score(image), image["centers"], image["stride"], sigma_px)
    return fitted


def fisher(*parts: Callable[[list[Image]], Rule]) -> Callable[[list[Image]], Rule]:
    """Fisher's combination: the sum of calibrated terms' -log p, calibrated again (`mondrian` of the sum)."""
    def summed(healthy: list[Image]) -> Rule:
        rules = [p(healthy) for p in parts]
        return lambda image: sum(r(image) for r in rules)
    return mondrian(summed)


def minus_image_median(inner: Callable[[list[Image]], Rule]) -> Callable[[list[Image]], Rule]:
    """``inner``'s scores minus their image's median, calibrated again."""
    def shifted(healthy: list[Image]) -> Rule:
        score = inner(healthy)
        return lambda image: (lambda s: s - s.median())(score(image))
    return mondrian(shifted)


SMOOTH = table1_stages.DEFAULT_SMOOTHING_PX
#: Table 1's default RAT-SPN row for an image without its other breast (and the one-sided step of the bilateral
#: default): the calibrated -log p smoothed, calibrated again (`RatSpnStage(smooth_calibrated)`). The bilateral rows
#: need the other breast's item: `mammospn border-study` scores them.
DEFAULT = mondrian(smoothed(mondrian(term("likelihood")), SMOOTH))
DEFAULT_NAME = f"likelihood mondrian, smooth{SMOOTH:g}, mondrian (default, one-sided)"
RULES: dict[str, tuple[Callable[[list[Image]], Rule], bool]] = {  # name: (rule, calibrated)
    "likelihood raw (paper)": (term("likelihood"), False),
    "reconstruction raw (CAE)": (term("reconstruction"), False),
    "intensity raw": (term("intensity"), False),
    "likelihood mondrian": (mondrian(term("likelihood")), True),
    f"likelihood mondrian+smooth{SMOOTH:g} (raw scores smoothed; the default before)": (
        mondrian(term("likelihood", SMOOTH)), True),
    DEFAULT_NAME: (DEFAULT, True),
    "likelihood mondrian+median1": (mondrian(term("likelihood", median_cells=1)), True),
    f"reconstruction mondrian+smooth{SMOOTH:g}": (mondrian(term("reconstruction", SMOOTH)), True),
    f"intensity mondrian+smooth{SMOOTH:g}": (mondrian(term("intensity", SMOOTH)), True),
    "likelihood + reconstruction (Fisher)": (fisher(DEFAULT, mondrian(term("reconstruction", SMOOTH))), True),
    "likelihood + intensity (Fisher)": (fisher(DEFAULT, mondrian(term("intensity", SMOOTH))), True),
    "likelihood + reconstruction + intensity (Fisher)": (
        fisher(DEFAULT, mondrian(term("reconstruction", SMOOTH)), mondrian(term("intensity", SMOOTH))), True),
    "default minus image median": (minus_image_median(DEFAULT), True),
    # the ring just past the last border stratum (64-128 px) calibrated on its own
    f"likelihood mondrian (strata to 128 px)+smooth{SMOOTH:g}": (
        mondrian(term("likelihood", SMOOTH), (*BINS_PX, 96.0, 128.0)), True),
    f"likelihood over 4 flips mondrian+smooth{SMOOTH:g}": (mondrian(term("likelihood_flips", SMOOTH)), True),
}


def evaluate(rule: Rule, images: list[Image]) -> dict[str, Any]:
    """The project's evaluation of ``rule``'s scores on ``images`` (each image's 99th percentile for H / FROC)."""
    acc = EvaluationAccumulator()
    for image in images:
        item = {**image, "patches": torch.zeros(1, 1, image["patch_size"], image["patch_size"])}
        acc.add(item, rule(image).numpy())
    return acc.summary()


def cross_fit_rate(fit: Callable[[list[Image]], Rule], halves: tuple[list[Image], list[Image]],
                   alpha: float = 0.05) -> float:
    """Share of held-out healthy breast pixels with p < ``alpha``: each half scored by a rule fitted on the other."""
    pixels = []
    for fit_half, check_half in (halves, halves[::-1]):
        rule = fit(fit_half)
        for image in check_half:
            amap = anomaly_maps.anomaly_map(rule(image).numpy(), image["centers"], np.asarray(image["breast_mask"],
                                            bool), image["stride"])
            pixels.append(np.exp(-amap[np.isfinite(amap)]))
    return observed_rates(np.concatenate(pixels), (alpha,))[0]


def run(args: argparse.Namespace) -> int:
    out = Path(args.table1)
    runs = out / "runs"
    ckpts = {name: table1_stages.checkpoint_path(runs, name) for name in ("cae", "cae_spn")}
    if not all(p.is_file() for p in ckpts.values()):
        print(f"mammospn score-study: no CAE / CAE-RATSPN fits in {runs}; run `mammospn table1 --out {out}` first")
        return 2
    inputs = {name: file_sha256(p) for name, p in ckpts.items()}
    inputs["terms"] = ",".join(TERMS)  # a cache written before a term was added is rebuilt, not read half
    rows = []
    for test_set in args.test_sets:
        images = score_images(args, test_set, args.split, inputs)
        healthy = images["healthy_fit"] + images["healthy_check"]
        for name, (fit, calibrated) in RULES.items():
            summary = evaluate(fit(healthy), images["lesion"])
            row = {"test_set": test_set, "rule": name, "images": len(images["lesion"]),
                   **{key: summary.get(key) for key, _ in border_study.COLUMNS}}
            if calibrated:
                row["healthy p<0.05"] = cross_fit_rate(fit, (images["healthy_fit"], images["healthy_check"]))
            rows.append(row)
            print(f"{test_set:5s} {name:50s} pixel AUC {border_study._cell(row['pixel_auc'])} hit {border_study._cell(row['lesion_hit_rate'])}"
                  f" sens@1 {border_study._cell(row['sensitivity_at_1_fp'])} H {border_study._cell(row['hausdorff_px_mean'])}", flush=True)
    stem = out / f"score_study-{args.split}"  # one per split: a test-split run keeps the validation one
    write_json(stem.with_suffix(".json"), {"split": args.split, "data": args.data, "inputs": inputs, "rows": rows})
    text = format_markdown(rows, args)
    atomic_write(stem.with_suffix(".md"), text)
    print(text)
    return 0


def format_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    heads = ["test set", "rule", "images", *[h for _, h in border_study.COLUMNS], "healthy p<0.05"]
    lines = [f"# Scoring rules over saved grid scores, {args.data} ({args.split} split, profile {args.profile}, "
             f"seed {args.seed})", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = [row["test_set"], row["rule"], str(row["images"]),
                 *[border_study._cell(row.get(k)) for k, _ in border_study.COLUMNS],
                 border_study._cell(row.get("healthy p<0.05"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Calibrated rules: Mondrian conformal -log p (border strata 16 / 32 / 64 px) fitted on every healthy",
              "validation image; healthy p<0.05 = share of held-out healthy pixels with p < 0.05 under two-fold",
              "cross-fitting (ideal 0.05). Fisher = sum of the terms' -log p, calibrated again. Threshold rule: each",
              "image's own 99th percentile (H); FROC sweeps one global threshold."]
    return "\n".join(lines) + "\n"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    border_study.add_study_arguments(parser, "lesion_validation",
                                     "which lesion images the rules are scored on (choose on lesion_validation)")
    parser.add_argument("--test-sets", nargs="+", default=["mass", "calc"], choices=("mass", "calc"))
