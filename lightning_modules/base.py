"""The one interface every model serves, and the test/predict steps written once against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from lightning_modules.calibration import MondrianConformal
from lightning_modules.contralateral import contralateral_reference, register_mirrored
from lightning_modules.grid_smoothing import smooth_grid
from lightning_modules.networks import PATCH_SIZE


def class_tag(obj: object) -> str:
    """``"<module>.<ClassName>"`` stored in every checkpoint so it loads without its config."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast has a fast path on ``device``: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 / AMX; elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch has no public CPU-capability query for bf16; oneDNN's own check is what its kernels use
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False
    return False


def batch_patches(batch: Mapping[str, Any]) -> Tensor:
    """The ``patches`` (float32 N x 1 x P x P) of a batch: a training `datamodules.batches.PatchBatch` or an
    evaluation `ScanItem`, read by key (models do not import `datamodules`); one-line `KeyError` otherwise."""
    if not isinstance(batch, Mapping) or "patches" not in batch:
        got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"batch has no 'patches' (a datamodules.batches.PatchBatch or ScanItem), got {got}")
    return batch["patches"]


class AnomalyDetector(pl.LightningModule):
    """Base of every model: `score_patches(x) -> Tensor[N]`, higher = more anomalous.

    ``x`` is float32 N x 1 x P x P in [0, 1], P = `patch_size` (the ``patch_size`` hyper-parameter, default
    64), checked by `check_patches` in every ``score_patches``. SPN-ready autoencoders also serve
    ``encode(x) -> Tensor[N, 64]`` (continuous) or ``encode_codes(x) -> LongTensor[N, 64]`` (VQ-VAE).

    Training batches are `datamodules.batches.PatchBatch` dicts; test and predict batches are
    `datamodules.batches.ScanItem` dicts (one image per batch) whose ``patches`` (M x 1 x P x P) are the
    patches of the image's evaluation grid; both are read through `batch_patches`. The step scores them in chunks of ``score_batch_size`` and returns
    ``{"scores": Tensor[M]}``; the evaluation callback in `experiments` turns them into maps and metrics.
    """

    score_batch_size: int = 512
    #: whether `score_patches` takes the patch context (``score_patches(x, context)``, N x 2 px distances to
    #: the skin line and the chest wall, `datamodules.grids.patch_context`); True for a conditional RAT-SPN
    uses_context: bool = False
    #: channels-last memory format for the networks while scoring in bf16 on a CPU (oneDNN's fast path there,
    #: `make bench`): None = automatically then (test / predict only), True / False = always / never
    score_channels_last: bool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # conformal calibration (empty until `mammospn calibrate` fits it on healthy validation images)
        self.calibrator = MondrianConformal()
        # a first calibration of the raw scores, fitted only for a model that smooths calibrated scores
        # (`smooths_calibrated`): its -log p are smoothed over the grid and `calibrator` ranks those
        self.pre_calibrator = MondrianConformal()
        # the calibration of the bilateral asymmetry (`bilateral_input`), fitted only for a model that scores it
        self.bilateral_calibrator = MondrianConformal()
        self.register_buffer("calibration_alpha", torch.tensor(0.0))  # 0 = no calibrated threshold

    def score_patches(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        """The side of the patches this model takes: its ``patch_size`` hyper-parameter (checkpoints from before
        it was one hold 64-px models)."""
        return int(self.hparams.get("patch_size", PATCH_SIZE))

    def check_patches(self, x: Tensor) -> None:
        """Refuses, in one line, input that is not N x 1 x P x P with P = `patch_size`."""
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != p or x.shape[3] != p:
            raise ValueError(f"{type(self).__name__} scores patches of N x 1 x {p} x {p} (its patch_size), got "
                             f"{tuple(x.shape)}; set data.init_args.patch_size to the model's")

    @property
    def threshold(self) -> float | None:
        """The calibrated score threshold (false-positive rate ``calibration_alpha`` on healthy tissue), or None."""
        alpha = float(self.calibration_alpha)
        if not self.calibrator.fitted or not 0.0 < alpha < 1.0:
            return None
        return self.calibrator.threshold(alpha)

    def _eval_call(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` in eval mode without gradient, restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(x)
        finally:
            self.train(was_training)

    def scoring_precision(self) -> str:
        """``"bf16"`` when the trainer runs ``precision="bf16-mixed"`` and the hardware has fast bf16
        (`bf16_supported`), else ``"fp32"``: what `score_grid` scores in (written into metrics.json)."""
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        return "bf16" if precision == "bf16-mixed" and bf16_supported(self.device) else "fp32"

    def _channels_last(self, precision: str) -> bool:
        if self.score_channels_last is not None:
            return self.score_channels_last
        trainer = self._trainer
        scoring = trainer is not None and (trainer.testing or trainer.predicting)
        return scoring and precision == "bf16" and self.device.type == "cpu"

    @contextmanager
    def _memory_format(self, channels_last: bool) -> Iterator[None]:
        """The networks' convolution weights in channels-last while scoring, back to contiguous afterwards
        (training and checkpoints never see it)."""
        convs = [m for m in self.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
        if not channels_last or not convs:
            yield
            return
        for conv in convs:
            conv.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            for conv in convs:
                conv.to(memory_format=torch.contiguous_format)

    def score_grid(self, patches: Tensor, context: Tensor | None = None) -> Tensor:
        """Raw scores (float32) of many patches in chunks, in eval mode, without gradient.

        `score_patches` runs under bf16 autocast when `scoring_precision` says so (``--trainer.precision
        bf16-mixed`` on hardware with fast bf16), in channels-last on a CPU, and in fp32 otherwise: autocast is
        switched off here where bf16 would be emulated, whatever the trainer's precision context.
        """
        if self.uses_context and context is None:
            raise ValueError(f"{type(self).__name__} scores patches given their context: the batch has no 'context'")
        ctx = context.split(self.score_batch_size) if self.uses_context else None
        precision = self.scoring_precision()
        channels_last = self._channels_last(precision)
        device_type = self.device.type
        autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16"
                    else torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext())

        def score_all(x: Tensor) -> Tensor:
            chunks = []
            with self._memory_format(channels_last):
                for i, chunk in enumerate(x.split(self.score_batch_size)):
                    chunk = chunk.to(self.device, non_blocking=True)
                    if channels_last:
                        chunk = chunk.contiguous(memory_format=torch.channels_last)
                    with autocast:
                        s = self.score_patches(chunk, ctx[i].to(self.device)) if ctx is not None else self.score_patches(chunk)
                    chunks.append(s.float())
            return torch.cat(chunks) if chunks else x.new_zeros(0)

        return self._eval_call(score_all, patches)

    @property
    def smooths_calibrated(self) -> bool:
        """True when the grid smoothing applies to calibrated scores (``smooth_calibrated``, a model option)."""
        return bool(getattr(self.hparams, "smooth_calibrated", False))

    def grid_scores(self, item: Mapping[str, Any]) -> Tensor:
        """The scores `calibrator` ranks, of an evaluation item's grid patches: the one path calibration and scoring
        share (`score_grid`, then `calibration_input`)."""
        return self.calibration_input(self.raw_grid_scores(item), item)

    def calibration_input(self, raw: Tensor, item: Mapping[str, Any],
                          pre_calibrator: MondrianConformal | None = None) -> Tensor:
        """From an item's raw grid scores to what `calibrator` ranks.

        ``score_smoothing_px`` (a model option, default 0) replaces each score by the Gaussian-weighted mean of
        its neighbouring grid patches' scores (`grid_smoothing.smooth_grid`, over the item's ``centers``). With
        ``smooth_calibrated`` the smoothed scores are the -log p of a first calibration (``pre_calibrator``, default
        the model's own, once fitted): the border strata's raw excess then never leaks into the patches inside
        them, and `calibrator`, fitted on the same smoothed healthy values, turns them into valid p-values again.
        """
        pre = self.pre_calibrator if pre_calibrator is None else pre_calibrator
        scores = raw
        if self.smooths_calibrated and pre.fitted:
            scores = pre(scores, item["context"].reshape(-1, 2).to(scores.device))
        sigma = float(getattr(self.hparams, "score_smoothing_px", 0.0) or 0.0)
        if sigma > 0:
            scores = smooth_grid(scores, item["centers"], int(item["stride"]), sigma)
        return scores

    @property
    def contralateral_reference(self) -> str | None:
        """"mean" or "max" when the model scores bilateral asymmetry (the ``contralateral`` option), else None."""
        reference = getattr(self.hparams, "contralateral", "none") or "none"
        return None if reference == "none" else str(reference)

    def bilateral_input(self, scores: Tensor, item: Mapping[str, Any], other_scores: Tensor,
                        other: Mapping[str, Any]) -> Tensor:
        """What `bilateral_calibrator` ranks: an item's calibrated grid ``scores`` minus the calibrated
        ``other_scores`` of the woman's other breast (the item ``other``) around the same place
        (`contralateral.contralateral_reference` over ``contralateral_radius_px``, after
        `contralateral.register_mirrored` of the two breast masks)."""
        shift = register_mirrored(torch.as_tensor(item["breast_mask"]).cpu(), torch.as_tensor(other["breast_mask"]).cpu())
        reference = contralateral_reference(
            scores.cpu(), item["centers"], other_scores.cpu(), other["centers"], int(other["breast_mask"].shape[-1]),
            shift, float(getattr(self.hparams, "contralateral_radius_px", 32.0)), self.contralateral_reference)
        return scores - reference.to(scores.device)

    def raw_grid_scores(self, item: Mapping[str, Any]) -> Tensor:
        """An item's raw grid scores (`score_grid` over its patches, given their context), before any calibration."""
        context = item.get("context")
        return self.score_grid(batch_patches(item), None if context is None else context.reshape(-1, 2))

    def calibrated_scores(self, raw: Tensor, item: Mapping[str, Any], other_raw: Tensor | None = None,
                          other: Mapping[str, Any] | None = None,
                          calibrators: tuple[MondrianConformal, MondrianConformal, MondrianConformal] | None = None,
                          ) -> Tensor:
        """From an item's raw grid scores to its scores under ``calibrators`` (first, main and bilateral
        calibrator; default the model's own): `calibration_input`, then -log p by the main calibrator when it is
        fitted (one-sided); with the other breast's raw scores ``other_raw`` (the item ``other``) and a fitted
        bilateral calibrator, the calibrated bilateral asymmetry instead (`bilateral_input`). The one path
        `score_item` and the calibration check (`experiments.calibration`, with candidate calibrators) share."""
        pre, calibrator, bilateral = (calibrators if calibrators is not None
                                      else (self.pre_calibrator, self.calibrator, self.bilateral_calibrator))

        def one_sided(values: Tensor, of: Mapping[str, Any]) -> Tensor:
            values = self.calibration_input(values, of, pre)
            context = of.get("context")
            if context is not None and calibrator.fitted:
                values = calibrator(values, context.reshape(-1, 2).to(values.device))
            return values

        scores = one_sided(raw, item)
        if other_raw is not None and other is not None and self.contralateral_reference and bilateral.fitted \
                and scores.numel() and other_raw.numel():
            difference = self.bilateral_input(scores, item, one_sided(other_raw, other), other)
            scores = bilateral(difference, item["context"].reshape(-1, 2).to(scores.device))
        return scores

    def one_sided_scores(self, item: Mapping[str, Any]) -> Tensor:
        """An item's grid scores (`grid_scores`), calibrated (-log p) when the calibrator is fitted."""
        return self.calibrated_scores(self.raw_grid_scores(item), item)

    def score_item(self, batch: Mapping[str, Any]) -> Tensor:
        """Scores of an evaluation item's grid patches (`calibrated_scores`): calibrated (-log p) when the
        calibrator is fitted.

        With the ``contralateral`` option and a fitted `bilateral_calibrator`, an item that carries its other
        breast (``batch["contralateral"]``, ``data.with_contralateral: true``) scores the calibrated bilateral asymmetry
        instead (`bilateral_input`, then `bilateral_calibrator`); without a pair it keeps its one-sided score.
        ``border_suppression_px`` (a model option, default 0) gives every patch whose centre lies closer
        than that to the skin line or the chest wall the image's lowest score: the naive border fix,
        kept as a comparison row (it hides lesions by the border too).
        """
        context = batch.get("context")
        other = batch.get("contralateral")
        if not (self.contralateral_reference and self.bilateral_calibrator.fitted):
            other = None  # scored one-sided: the other breast need not be scored at all
        scores = self.calibrated_scores(self.raw_grid_scores(batch), batch,
                                        None if other is None else self.raw_grid_scores(other), other)
        if context is not None:
            context = context.reshape(-1, 2).to(scores.device)
            suppress = float(getattr(self.hparams, "border_suppression_px", 0.0) or 0.0)
            if suppress > 0 and scores.numel():
                near = torch.minimum(context[:, 0], context[:, 1]) < suppress
                scores = torch.where(near, scores.min(), scores)
        return scores

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anomaly_model_class"] = class_tag(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Sizes the calibrator like the saved one; a checkpoint from before calibration loads uncalibrated.

        Test, validate and predict restore the weights only: the fit's callback states (checkpointing,
        RNG) have no callback to go to there, so they are dropped from the loaded copy, which Lightning
        would otherwise report on every evaluation ("callbacks used to create the checkpoint ...").
        """
        trainer = self._trainer
        if trainer is not None and trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING):
            checkpoint.pop("callbacks", None)
        self.restore_calibrators(checkpoint.get("state_dict", {}))

    def restore_calibrators(self, state: dict[str, Tensor]) -> None:
        """Sizes every calibrator (also a nested model's, the RAT-SPN stage's autoencoder) like its saved state, and
        gives a calibrator the checkpoint lacks (saved before it existed) its empty, unfitted state."""
        for key, value in self.state_dict().items():
            if "calibrator." in key or key.rpartition(".")[2] == "calibration_alpha":
                state.setdefault(key, value)
        for prefix, module in self.named_modules():
            if isinstance(module, MondrianConformal):
                module.resize_for(state, f"{prefix}.")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"scores": self.score_item(batch)}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"scores": self.score_item(batch)}
