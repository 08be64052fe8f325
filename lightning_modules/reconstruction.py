"""`ReconstructionDetector`: the thin Lightning shell the three autoencoders (CAE, beta-VAE, VQ-VAE) share:
train/val steps on ``batch["patches"]``, Adam, scoring in eval mode, the checkpoint class tag."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import AnomalyDetector, batch_patches


class ReconstructionDetector(AnomalyDetector):
    """Shared shell of CAE / beta-VAE / VQ-VAE: subclasses define ``per_sample_loss(x) -> (Tensor[N], logs)``
    and ``reconstruct(x)``; the loss averaged over the batch is trained on, the per-sample value scored."""

    lr: float

    def per_sample_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_patches(batch)
        per_sample, logs = self.per_sample_loss(x)
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_patches(batch)
        per_sample, _ = self.per_sample_loss(x)
        loss = per_sample.mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    #: factor the learning rate is cut by when val/loss has not improved for ``lr_plateau_patience`` epochs,
    #: where an improvement below `lr_plateau_threshold` (relative) does not count
    lr_plateau_factor: float = 0.3
    lr_plateau_threshold: float = 0.01

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """Adam at ``lr``; with ``lr_plateau_patience`` > 0 (a model option, default 0 = constant, the paper)
        the rate drops by `lr_plateau_factor` whenever val/loss stalls that many epochs, so a fit settles
        on a plateau within a short budget instead of stopping at its cap while still improving."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        patience = int(self.hparams.get("lr_plateau_patience", 0) or 0)
        if patience <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.lr_plateau_factor, patience=patience,
            threshold=self.lr_plateau_threshold, threshold_mode="rel")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}

    def score_patches(self, x: Tensor) -> Tensor:
        """Per-patch anomaly score (the model's per-sample loss), eval mode, no gradient."""
        self.check_patches(x)
        return self._eval_call(lambda t: self.per_sample_loss(t)[0].float(), x)

    def residual_map(self, x: Tensor) -> Tensor:
        """Per-pixel squared reconstruction error N x 1 x 64 x 64 (for figures)."""
        return self._eval_call(lambda t: (t.float() - self.reconstruct(t).float()).pow(2), x)


__all__ = ["ReconstructionDetector"]
