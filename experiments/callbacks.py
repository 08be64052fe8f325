"""`EvaluationCallback`: full-image evaluation as a Lightning callback, at test time and during fit.

At ``test`` it turns each evaluation item's grid scores (``outputs["scores"]`` of the model's
``test_step``) into an anomaly map, accumulates the metrics, logs the scalars (``test/pixel_auc``, ...)
to every logger, per-image tables, heatmap panels (uint8) and the score distribution to W&B (both drawn
by `figures`), and writes ``metrics.json``, ``per_image.csv``, ``score_hist.npz`` and
``maps/<image_id>.npz`` under ``output_dir``.
During ``fit`` it scores the datamodule's lesion validation set (never the test set) every
``every_n_epochs`` epochs and logs ``val_lesion/pixel_auc`` etc., so curves show while training and a
``ModelCheckpoint`` can monitor them; the latest such evaluation is also written to
``<output_dir>/val_lesion/{metrics.json,per_image.csv}``.

Distributed: under DDP every rank evaluates its share of the test images, the per-image results and
pixel tables are gathered (``all_gather_object``) and rank 0 writes the files; the fit-time lesion
validation runs on rank 0 and its numbers are broadcast so every rank logs the same values.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from datamodules import fileio
from datamodules.patches import with_progress
from datamodules.records import DataError
from experiments import anomaly_maps, evaluation, evaluation_results, metrics
from experiments.checkpoints import checkpoint_info
from experiments.figures import heatmap_panel, panel_at_height, score_distribution_image
from experiments.loggers import same_size

#: scalars of the summary that are logged to every logger (prefix "test/" or ``monitor_prefix``/)
LOGGED_KEYS = (
    "pixel_auc",
    "image_auc_mean",
    "image_auc_std",
    "hausdorff_px_mean",
    "hausdorff_px_std",
    "hausdorff_mm_mean",
    "hausdorff_mm_std",
    "top1_near_border_fraction_mean",
    "border_area_fraction_mean",
    "hausdorff_cells_mean",
    "lesion_hit_rate",
    "lesion_hit_rate_near_border",
    "lesion_hit_rate_interior",
    "sensitivity_at_0.5_fp",
    "sensitivity_at_1_fp",
    "sensitivity_at_2_fp",
    "sensitivity_at_1_fp_near_border",
    "sensitivity_at_1_fp_interior",
    "interior_pixel_auc",
    "n_images",
    "n_evaluated",
    "n_excluded",
)


def _skipped_images(trainer: pl.Trainer, name: str = "test") -> dict[str, Any]:
    """The images of evaluation set ``name`` left out as unreadable (path and why), from the datamodule's
    selection report."""
    report = getattr(getattr(trainer, "datamodule", None), "selection_summary", None)
    selection = (report() if callable(report) else {}).get(name) or {}
    skipped = list(selection.get("skipped", []))
    return {"n_skipped": len(skipped), "skipped": skipped,
            "n_excluded_by_selection": int(selection.get("excluded", 0))}


def _scoring_precision(pl_module: pl.LightningModule) -> str:
    """What the model scored in (`AnomalyDetector.scoring_precision`): ``bf16`` or ``fp32``."""
    method = getattr(pl_module, "scoring_precision", None)
    return method() if callable(method) else "fp32"


class EvaluationCallback(pl.Callback):
    """Scores full images into anomaly maps and logs / writes the paper's metrics (see module docstring).

    Args:
        output_dir: where the files go; default ``<trainer.log_dir>/evaluation``.
        every_n_epochs: during fit, evaluate the lesion validation set at the 1st, (N+1)th, (2N+1)th ...
            validation run (= epochs 0, N, 2N, ... with ``check_val_every_n_epoch=1``) and in the last
            epoch, so a checkpoint monitoring ``val_lesion/...`` always finds the key; 0 = only at test.
            All test dataloaders of one ``trainer.test`` call are pooled into one evaluation.
        threshold: segmentation rule: "image_percentile" (the image's own breast pixels, paper),
            "healthy_percentile" (of the healthy validation patch scores), "fixed" (``threshold_value``), or
            "calibrated" (the model's own ``threshold`` buffer, fitted on healthy validation images).
        percentile: the percentile both percentile rules use (99 = top 1 %).
        save_maps: how many test images (the first ones rank 0 sees) get ``maps/<image_id>.npz`` and a W&B
            heatmap panel; ``maps/`` is emptied of an earlier run's ``.npz`` files when a test starts.
        monitor_prefix: prefix of the keys logged during fit (``val_lesion/pixel_auc``, ...).
        threshold_value: the threshold of the "fixed" rule.
        healthy_max_patches: at most this many healthy validation patches set the "healthy_percentile".
        dataset: name written into metrics.json; default from the datamodule's ``source`` / ``test_set``.
        histogram_bins: bins of ``score_hist.npz``.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        every_n_epochs: int = 0,
        threshold: str = "image_percentile",
        percentile: float = 99.0,
        save_maps: int = 4,
        monitor_prefix: str = "val_lesion",
        threshold_value: float | None = None,
        healthy_max_patches: int = 20000,
        dataset: str | None = None,
        histogram_bins: int = 100,
    ) -> None:
        super().__init__()
        if threshold not in anomaly_maps.THRESHOLD_RULES:
            raise ValueError(
                f"EvaluationCallback.threshold={threshold!r} unknown; choose one of {anomaly_maps.THRESHOLD_RULES}"
            )
        if threshold == "fixed" and threshold_value is None:
            raise ValueError("EvaluationCallback.threshold='fixed' needs threshold_value")
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"EvaluationCallback.percentile={percentile} must lie in (0, 100)")
        if every_n_epochs < 0 or save_maps < 0:
            raise ValueError("EvaluationCallback.every_n_epochs and save_maps must be >= 0")
        self.output_dir = output_dir
        self.every_n_epochs = int(every_n_epochs)
        self.threshold = threshold
        self.percentile = float(percentile)
        self.save_maps = int(save_maps)
        self.monitor_prefix = monitor_prefix
        self.threshold_value = threshold_value
        self.healthy_max_patches = int(healthy_max_patches)
        self.dataset = dataset
        self.histogram_bins = int(histogram_bins)
        self.last_summary: dict[str, Any] = {}
        self.last_fit_summary: dict[str, Any] = {}
        self._acc: evaluation_results.EvaluationAccumulator | None = None
        self._panels: list[tuple[str, np.ndarray]] = []
        self._maps_written = 0
        self._eval_seconds = 0.0
        self._start = 0.0
        self._validation_runs = 0
        self._staging: Path | None = None

    # ------------------------------------------------------------------ helpers

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """The folder results go to (``output_dir`` or ``<trainer.log_dir>/evaluation``)."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "evaluation"

    def _dataset_name(self, trainer: pl.Trainer) -> str:
        if self.dataset:
            return self.dataset
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return "unknown"
        hparams = getattr(dm, "hparams", {}) or {}
        parts = [getattr(dm, key, None) or hparams.get(key) for key in ("source", "test_set")]
        parts = [str(p) for p in parts if p]
        return "/".join(parts) or type(dm).__name__

    def _healthy_threshold(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The ``percentile`` of healthy validation patch scores (the "healthy_percentile" rule)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_dataloader"):
            raise RuntimeError(
                "EvaluationCallback.threshold='healthy_percentile' needs a datamodule with val_dataloader() "
                "(healthy validation patches); use threshold='image_percentile' or 'fixed' otherwise"
            )
        scores, seen = [], 0
        for batch in dm.val_dataloader():
            scores.append(pl_module.score_item(batch).detach().cpu().numpy())
            seen += len(scores[-1])
            if seen >= self.healthy_max_patches:
                break
        if not seen:
            raise RuntimeError("EvaluationCallback: the healthy validation set is empty; no threshold")
        return float(np.percentile(np.concatenate(scores)[: self.healthy_max_patches], self.percentile))

    def _new_accumulator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> evaluation_results.EvaluationAccumulator:
        value = self.threshold_value
        if self.threshold == "healthy_percentile":
            value = self._healthy_threshold(trainer, pl_module)
        elif self.threshold == "calibrated":
            value = anomaly_maps.model_threshold(pl_module)
        return evaluation_results.EvaluationAccumulator(self.threshold, self.percentile, value,
                                                keep_image_tables=trainer.world_size > 1)

    def _gather(self, trainer: pl.Trainer, acc: evaluation_results.EvaluationAccumulator) -> evaluation_results.EvaluationAccumulator:
        """Under DDP, every rank gets the union of all ranks' images (duplicates dropped by image_id)."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return acc
        states: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, acc.state())
        merged = evaluation_results.EvaluationAccumulator(acc.threshold_rule, acc.percentile, acc.threshold_value,
                                                  keep_image_tables=True)
        for state in states:
            merged.merge_state(state)
        return merged

    @staticmethod
    def _log_scalars(pl_module: pl.LightningModule, prefix: str, summary: Mapping[str, Any]) -> None:
        for key in LOGGED_KEYS:
            value = summary.get(key)
            if value is None:
                continue
            pl_module.log(f"{prefix}/{key}", float(value), sync_dist=False)

    # ------------------------------------------------------------------ test

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._acc = self._new_accumulator(trainer, pl_module)
        self._panels = []
        self._maps_written = 0
        self._eval_seconds = 0.0
        self._discard_staging()
        if trainer.is_global_zero:
            # The results are built in a staging folder and published as one unit at the end (maps/ of
            # this run only, so Fig. 2 never mixes test sets; a crash leaves the earlier set whole).
            self._staging = fileio.staging_directory(self.resolve_output_dir(trainer) / "test-results")
            (self._staging / "maps").mkdir()
        self._start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._acc is None:  # test hooks called without on_test_epoch_start (defensive)
            self._acc = self._new_accumulator(trainer, pl_module)
        scores = outputs["scores"] if isinstance(outputs, Mapping) else outputs
        if scores is None:
            raise RuntimeError(
                f"EvaluationCallback: {type(pl_module).__name__}.test_step returned no 'scores'; it must return "
                "{'scores': Tensor[M]} (see lightning_modules.base.AnomalyDetector)"
            )
        if not isinstance(batch, Mapping) or "centers" not in batch:
            raise RuntimeError(
                "EvaluationCallback: test batches must be evaluation items (dicts with 'centers', 'breast_mask', "
                "'lesion_mask', ...; DataLoader batch_size=None)"
            )
        begin = time.perf_counter()
        ev = self._acc.add(batch, scores)
        result, amap, seg = ev.result, ev.anomaly_map, ev.segmentation
        if trainer.is_global_zero and self._maps_written < self.save_maps:
            out = self._staging / "maps" / f"{evaluation_results.safe_file_stem(result.image_id)}.npz"
            evaluation_results.write_map(out, batch, amap, seg, result)
            self._maps_written += 1
            if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
                breast = metrics.as_numpy(batch["breast_mask"]).astype(bool)
                lesion = metrics.as_numpy(batch["lesion_mask"]).astype(bool)
                image = metrics.as_numpy(batch["scan"]).astype(np.float32)
                caption = (f"{result.image_id} | {type(pl_module).__name__}: AUC {result.auc:.3f}, "
                           f"H {result.hausdorff_px:.1f} px "
                           f"({result.hausdorff_mm:.1f} mm), {self._acc.rule_name}")
                self._panels.append((caption, heatmap_panel(image, breast, lesion & breast, amap, seg)))
        self._eval_seconds += time.perf_counter() - begin

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._acc is None:
            return
        acc = self._gather(trainer, self._acc)
        elapsed = time.perf_counter() - self._start
        summary: dict[str, Any] = acc.summary()
        summary.update(
            dataset=self._dataset_name(trainer),
            model=f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            percentile=self.percentile,
            test_seconds=elapsed,
            evaluation_seconds=self._eval_seconds,
            images_per_s=summary["n_images"] / elapsed if elapsed > 0 else math.nan,
            patches_per_s=summary["n_patches"] / elapsed if elapsed > 0 else math.nan,
            world_size=trainer.world_size,
            scoring_precision=_scoring_precision(pl_module),  # bf16 autocast or fp32 (`--trainer.precision`)
            checkpoint=checkpoint_info(trainer.ckpt_path),  # which weights produced these numbers
            **_skipped_images(trainer),
        )
        if summary["n_evaluated"] == 0:
            self._discard_staging()
            self._acc = None
            reasons = {k: v for k, v in summary["excluded_reasons"].items() if v}
            raise DataError(f"no evaluable test images: {summary['n_images']} scored, all excluded from the metrics "
                            f"({reasons or 'none scored'}); no results written")
        self.last_summary = summary
        self._log_scalars(pl_module, "test", summary)
        if trainer.is_global_zero:
            out, staging = self.resolve_output_dir(trainer), self._staging
            hist = acc.score_histogram(self.histogram_bins)
            evaluation_results.write_metrics_json(staging / "metrics.json", summary)
            evaluation_results.write_per_image_csv(staging / "per_image.csv", acc.results)
            evaluation_results.write_npz(staging / "score_hist.npz", threshold_rule=np.array(summary["threshold_rule"]),
                                 model=np.array(summary["model"]), **hist)
            fileio.publish_entries(staging, out, marker="metrics.json")
            self._staging = None
            self._log_wandb(trainer, acc, summary, hist)
        self._acc = None

    def _discard_staging(self) -> None:
        staging, self._staging = getattr(self, "_staging", None), None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._discard_staging()  # a crashed test publishes nothing; the earlier results stay whole

    def _log_wandb(self, trainer: pl.Trainer, acc: evaluation_results.EvaluationAccumulator,
                   summary: Mapping[str, Any], hist: Mapping[str, np.ndarray]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        columns = evaluation.ImageResult.columns()
        # the per-image table carries each saved image's heatmap panel, all panels at one height
        # (and one width: panels of scans with other aspect ratios are padded, W&B shows a list at one size)
        captions = [caption for caption, _ in self._panels]
        resized = same_size([panel_at_height(panel) for _, panel in self._panels])
        panels = {caption.split(" | ", 1)[0]: (caption, panel) for caption, panel in zip(captions, resized)}
        rows = [[getattr(r, c) for c in columns]
                + [wandb.Image(panels[r.image_id][1], caption=panels[r.image_id][0]) if r.image_id in panels else None]
                for r in acc.results]
        title = f"{summary['model'].rsplit('.', 1)[-1]} on {summary['dataset']}"
        payload = {
            "test/per_image": wandb.Table(columns=[*columns, "heatmap"], data=rows),
            "test/heatmaps": [wandb.Image(panel, caption=caption) for caption, panel in panels.values()],
            "test/score_distribution": wandb.Image(score_distribution_image(hist, title), caption=title),
        }
        for key in ("healthy", "lesion"):
            if np.asarray(hist[key]).sum() > 0:
                payload[f"test/score_histogram_{key}"] = wandb.Histogram(
                    np_histogram=(np.asarray(hist[key]).tolist(), np.asarray(hist["bin_edges"]).tolist())
                )
        for logger in loggers:
            logger.experiment.log(payload)
            logger.experiment.summary["test/threshold_rule"] = summary["threshold_rule"]
            logger.experiment.summary["test/empty_policy"] = summary["empty_policy"]

    # ------------------------------------------------------------------ fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_runs = 0

    def _due(self, trainer: pl.Trainer) -> bool:
        """Due on the first validation run, every ``every_n_epochs``-th one after it, and the last epoch's."""
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return False
        runs = self._validation_runs
        self._validation_runs = runs + 1
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return runs % self.every_n_epochs == 0 or last

    def evaluate_lesion_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Scores every item of ``trainer.datamodule.lesion_validation_dataloader()``; returns the summary.

        The latest evaluation's ``metrics.json`` and ``per_image.csv`` also go to
        ``<output_dir>/<monitor_prefix>/`` (overwritten, atomically, each time).
        """
        loader = getattr(trainer.datamodule, "lesion_validation_dataloader", None)
        if loader is None:
            raise RuntimeError("the datamodule has no lesion_validation_dataloader()")
        acc = self._new_accumulator(trainer, pl_module)
        items = loader()
        total = len(items) if hasattr(items, "__len__") else None
        show = trainer.progress_bar_callback is not None and trainer.is_global_zero
        start = time.perf_counter()
        with torch.no_grad():
            for item in with_progress(items, total, f"{self.monitor_prefix} (epoch {trainer.current_epoch})", show):
                acc.add(item, pl_module.score_item(item).detach().cpu())
        summary = acc.summary()
        summary.update(epoch=trainer.current_epoch, global_step=trainer.global_step,
                       dataset=self._dataset_name(trainer), seconds=time.perf_counter() - start,
                       model=f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                       **_skipped_images(trainer, "lesion_validation"))
        out = self.resolve_output_dir(trainer) / self.monitor_prefix
        evaluation_results.write_metrics_json(out / "metrics.json", summary)
        evaluation_results.write_per_image_csv(out / "per_image.csv", acc.results)
        return summary

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        if getattr(trainer, "datamodule", None) is None or not hasattr(
            trainer.datamodule, "lesion_validation_dataloader"
        ):
            rank_zero_warn(
                "EvaluationCallback(every_n_epochs>0) needs a datamodule with lesion_validation_dataloader(); "
                "lesion validation metrics are not logged"
            )
            return
        summary = self.evaluate_lesion_validation(trainer, pl_module) if trainer.is_global_zero else None
        summary = trainer.strategy.broadcast(summary, src=0)
        self.last_fit_summary = summary
        self._log_scalars(pl_module, self.monitor_prefix, summary)
