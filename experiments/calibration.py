"""Fitting and checking the conformal calibration of a trained model (`lightning_modules.calibration`).

    lightning validate --config configs/cae_spn.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt \\
        --trainer.callbacks+=experiments.calibration.ConformalCalibration [--trainer.callbacks.alpha 0.01]

After validation the callback scores every grid patch of the healthy validation images
(`MammographyDataModule.calibration_dataloader`, two halves by patient) and checks the calibration by
two-fold cross-fitting: a calibrator fitted on one half gives the other half's p-values, and the share of
those breast pixels whose p-value falls below alpha, for alpha from 0.001 to 0.2, is the calibration
curve (ideal: equal to alpha; each image is checked by a calibrator that never saw it). The calibrator
kept is then fitted on both halves (``cross_fit=False``: fitted on the "fit" half only, checked on the
other), because the border strata's tails need every healthy image there is: on mini-MIAS, 4 fit images
left the border strata 3-5x over-flagged on lesion images. It writes
``calibrated.ckpt`` (the checkpoint plus the calibrator buffers and ``calibration_alpha``, the
false-positive rate of the calibrated threshold) and ``calibrated.calibration.json`` + ``.png`` beside
the checkpoint (named after the output checkpoint). Test and predict with ``--ckpt_path .../calibrated.ckpt`` then score -log p. Nothing here
ever sees a test or lesion image.

A model that scores bilateral asymmetry (``contralateral``) gets a third calibrator, fitted on the healthy images
that carry their other breast (``data.with_contralateral``; a healthy woman's two images are in the same half), and
the check then measures the p-values the model gives: bilateral where an image has its pair, one-sided where not;
``one_sided_pixel_rate`` is the same curve for the one-sided p-values the checkpoint gives an image without its pair.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from experiments import anomaly_maps, evaluation_results
from lightning_modules.base import batch_patches
from lightning_modules.calibration import MondrianConformal

log = logging.getLogger(__name__)

#: nominal false-positive rates of the calibration check (PROTOCOL / issue: 0.001 to 0.2)
CHECK_ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def report_path(checkpoint: Path, suffix: str = ".json") -> Path:
    """Where the calibration check of a calibrated checkpoint lives: ``<stem>.calibration.json`` (or ``.png``)
    beside it; the one naming rule for the callback that writes it and the tables that read it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.calibration{suffix}")


def observed_rates(p_values: np.ndarray, alphas: tuple[float, ...] = CHECK_ALPHAS) -> list[float]:
    """Share of ``p_values`` (any shape, NaN ignored) below each alpha: the calibration curve."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return [float("nan")] * len(alphas)
    return [float((p < a).mean()) for a in alphas]


class ConformalCalibration(pl.Callback):
    """Fits the model's calibrator on healthy validation images and checks it on held-out ones.

    Args:
        alpha: false-positive rate of the stored calibrated threshold (-log alpha on the calibrated scale).
        bins_px: border-distance strata (px); ``[]`` = one stratum (plain split-conformal calibration).
        min_count: calibration patches a stratum needs; fewer -> its side's scores, else all of them.
        output: where to write the calibrated checkpoint; default ``calibrated.ckpt`` beside ``--ckpt_path``.
        normalise: normalised conformal (each stratum's median and robust scale, then one pooled rank) instead
            of a rank within each stratum: the tails then come from every healthy patch.
        cross_fit: check by two-fold cross-fitting and keep a calibrator fitted on every validation image
            (default); False fits on the "fit" half and checks on the "check" half.
    """

    def __init__(self, alpha: float = 0.01, bins_px: list[float] | None = None, min_count: int = 50,
                 output: str | None = None, normalise: bool = False, cross_fit: bool = True) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"trainer.callbacks.alpha must lie in (0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.bins_px = [16.0, 32.0, 64.0] if bins_px is None else [float(b) for b in bins_px]
        self.min_count = int(min_count)
        self.output = output
        self.normalise = bool(normalise)
        self.cross_fit = bool(cross_fit)

    def _output(self, trainer: pl.Trainer) -> Path:
        if self.output:
            return Path(self.output)
        if not trainer.ckpt_path:
            raise ValueError("ConformalCalibration needs --ckpt_path (the checkpoint to calibrate) or an output path")
        return Path(trainer.ckpt_path).with_name("calibrated.ckpt")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if not hasattr(dm, "calibration_dataloader"):
            raise RuntimeError("ConformalCalibration needs a datamodule with calibration_dataloader(part)")
        def conformal(values: list[torch.Tensor], images: list[dict[str, Any]],
                      device: torch.device | str) -> tuple[MondrianConformal, dict[str, Any]]:
            calibrator = MondrianConformal(self.bins_px, self.min_count, self.normalise).to(device)
            info = calibrator.fit(torch.cat(values), torch.cat([i["context"] for i in images]))
            return calibrator, info

        def make(images: list[dict[str, Any]]) -> tuple[MondrianConformal, MondrianConformal, MondrianConformal,
                                                        dict[str, Any]]:
            """The calibrators fitted on ``images``: the first calibration of the raw scores (fitted only when the
            model smooths calibrated scores; on the CPU, beside the scored images), the calibrator of what the
            model then ranks, and the calibrator of the bilateral asymmetry (fitted only when the model scores
            it, on the images that carry their other breast)."""
            pre = (conformal([i["raw"] for i in images], images, "cpu")[0] if pl_module.smooths_calibrated
                   else MondrianConformal())
            calibrator, info = conformal([_input(pl_module, i, pre) for i in images], images, pl_module.device)
            bilateral = MondrianConformal()
            paired = [i for i in images if i.get("other") is not None]
            if pl_module.contralateral_reference and paired:
                bilateral = conformal([_bilateral(pl_module, i, pre, calibrator) for i in paired], paired, "cpu")[0]
            info["paired_images"] = len(paired)
            return pre, calibrator, bilateral, info

        known: dict[str, torch.Tensor] = {}  # raw scores by image: a healthy woman's two images are each other's pair
        halves = {part: [_scored(pl_module, item, known) for item in dm.calibration_dataloader(part)]
                  for part in ("fit", "check")}
        if pl_module.contralateral_reference and not any(i.get("other") is not None for h in halves.values()
                                                         for i in h):
            log.warning("calibration: the model scores bilateral asymmetry (contralateral %s) but no healthy "
                        "validation image came with its other breast (data.with_contralateral: true? pairs listed?), so "
                        "every image is scored one-sided", pl_module.contralateral_reference)
        folds = [("fit", "check"), ("check", "fit")] if self.cross_fit else [("fit", "check")]
        checked, one_sided = [], []  # what the model gives; for a bilateral model also the one-sided p-values
        for fit_part, check_part in folds:
            pre, calibrator, bilateral, _ = make(halves[fit_part])
            checked += [_p_values(image, _final(pl_module, image, pre, calibrator, bilateral))
                        for image in halves[check_part]]
            if bilateral.fitted:  # the rows scored one-sided by the same checkpoint (calcifications, unpaired images)
                one_sided += [_p_values(image, _one_sided(pl_module, image, pre, calibrator))
                              for image in halves[check_part]]
        kept = halves["fit"] + halves["check"] if self.cross_fit else halves["fit"]
        pre, calibrator, bilateral, fit_info = make(kept)
        pl_module.pre_calibrator = pre.to(pl_module.device)
        pl_module.calibrator = calibrator
        pl_module.bilateral_calibrator = bilateral.to(pl_module.device)
        pl_module.calibration_alpha.fill_(self.alpha)
        report = _check_report(checked)
        if one_sided:
            report["one_sided_pixel_rate"] = _check_report(one_sided)["pixel_rate"]
        n_fit_images = len(kept)
        report.update(alpha=self.alpha, bins_px=self.bins_px, normalise=self.normalise, min_count=self.min_count,
                      smooth_calibrated=pl_module.smooths_calibrated,
                      contralateral=pl_module.contralateral_reference, paired_fit_images=fit_info["paired_images"],
                      fit_images=n_fit_images, check="two-fold cross-fit" if self.cross_fit else "held-out half",
                      fit_patches=fit_info["n"], stratum_counts=fit_info["counts"], stratum_pooled=fit_info["pooled"],
                      stratum_median_raw_score=fit_info["median_raw_score"],
                      threshold=calibrator.threshold(self.alpha), checkpoint=str(trainer.ckpt_path))
        out = self._output(trainer)
        out.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(out)
        evaluation_results.write_metrics_json(report_path(out), report)
        from experiments.figures import calibration_figure

        calibration_figure(report, report_path(out, ".png"))
        at = dict(zip(CHECK_ALPHAS, report["pixel_rate"]))
        log.warning("calibrated checkpoint: %s (%d fit patches from %d images; held-out healthy pixels with "
                    "p < 0.05: %.3f, p < 0.01: %.3f)", out, fit_info["n"], n_fit_images, at[0.05], at[0.01])


def _scored(pl_module: pl.LightningModule, item: dict, known: dict[str, torch.Tensor] | None = None,
            nested: bool = False) -> dict[str, Any]:
    """One healthy validation image, scored once: raw grid scores (`AnomalyDetector.score_grid`, unsmoothed),
    context, and what its smoothing and pixel map need; for a model that scores bilateral asymmetry, its other
    breast's (``other``) too, when the item carries it. ``known`` keeps the raw scores by image id, so an image met
    again (as a pair's other breast, or itself after its partner) is not scored twice."""
    known = {} if known is None else known
    key = item.get("image_id")
    context = item["context"].reshape(-1, 2)
    raw = known.get(key) if key is not None else None
    if raw is None:
        raw = pl_module.score_grid(batch_patches(item), context).detach().cpu()
        if key is not None:
            known[key] = raw
    other = item.get("contralateral")
    pair = (_scored(pl_module, other, known, nested=True)
            if other is not None and not nested and pl_module.contralateral_reference else None)
    return {"raw": raw, "context": context.cpu(), "centers": item["centers"], "breast_mask": item["breast_mask"],
            "stride": int(item["stride"]), "other": pair}


def _input(pl_module: pl.LightningModule, image: dict[str, Any], pre: Any) -> torch.Tensor:
    """What the model's calibrator ranks for one scored image (on the CPU, like its raw scores), given the first
    calibrator ``pre`` (`AnomalyDetector.calibration_input`: smoothed, after ``pre`` when the model smooths
    calibrated scores)."""
    return pl_module.calibration_input(image["raw"], image, pre).detach().cpu()


def _one_sided(pl_module: pl.LightningModule, image: dict[str, Any], pre: Any, calibrator: Any) -> torch.Tensor:
    """One scored image's calibrated -log p (CPU) under the calibrator pair (``pre``, ``calibrator``): the model's
    path given no other breast (the bilateral calibrator, unfitted here, is then never read)."""
    return pl_module.calibrated_scores(image["raw"], image,
                                       calibrators=(pre, calibrator, MondrianConformal())).detach().cpu()


def _bilateral(pl_module: pl.LightningModule, image: dict[str, Any], pre: Any, calibrator: Any) -> torch.Tensor:
    """What the bilateral calibrator ranks for a scored image with its other breast (`AnomalyDetector.bilateral_input`)."""
    return pl_module.bilateral_input(_one_sided(pl_module, image, pre, calibrator), image,
                                     _one_sided(pl_module, image["other"], pre, calibrator), image["other"]).cpu()


def _final(pl_module: pl.LightningModule, image: dict[str, Any], pre: Any, calibrator: Any,
           bilateral: Any) -> torch.Tensor:
    """A scored image's -log p (CPU) as the model would score it with these calibrators: the model's own path
    (`AnomalyDetector.calibrated_scores`), bilateral where the image has its other breast and ``bilateral`` is
    fitted, else one-sided."""
    other = image.get("other")
    return pl_module.calibrated_scores(image["raw"], image, None if other is None else other["raw"], other,
                                       (pre, calibrator, bilateral)).detach().cpu()


def _p_values(image: dict[str, Any], calibrated: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(patch, breast-pixel) p-values of one scored image's calibrated -log p ``calibrated`` (CPU)."""
    amap = anomaly_maps.anomaly_map(calibrated.numpy(), image["centers"], image["breast_mask"], image["stride"])
    return torch.exp(-calibrated).numpy(), np.exp(-amap[np.isfinite(amap)])


def _check_report(checked: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Calibration curve of held-out healthy images: patch-level and pixel-level p < alpha shares."""
    patches = np.concatenate([c[0] for c in checked]) if checked else np.zeros(0)
    pixels = np.concatenate([c[1] for c in checked]) if checked else np.zeros(0)
    return {"alphas": list(CHECK_ALPHAS), "patch_rate": observed_rates(patches),
            "pixel_rate": observed_rates(pixels), "check_images": len(checked),
            "check_patches": int(patches.size), "check_pixels": int(pixels.size)}


__all__ = ["CHECK_ALPHAS", "ConformalCalibration", "observed_rates", "report_path"]
