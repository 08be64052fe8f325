"""The one interface every model serves, and the test/predict steps written once against it."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor


class AnomalyDetector(pl.LightningModule):
    """Base of every model: `score_patches(x) -> Tensor[N]`, higher = more anomalous.

    ``x`` is float32 N x 1 x 64 x 64 in [0, 1]. SPN-ready autoencoders also serve
    ``encode(x) -> Tensor[N, 64]`` (continuous) or ``encode_codes(x) -> LongTensor[N, 64]`` (VQ-VAE).

    Test and predict batches are evaluation items (one image per batch, see
    `datamodules.EvaluationDataModule`): a dict whose ``patches`` (M x 1 x 64 x 64) are the patches
    of the image's evaluation grid. The step scores them in chunks of ``score_batch_size`` and returns
    ``{"scores": Tensor[M]}``; the evaluation callback in `experiments` turns them into maps and metrics.
    """

    score_batch_size: int = 512

    def score_patches(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def score_grid(self, patches: Tensor) -> Tensor:
        """Scores many patches in chunks, in eval mode, without gradient."""
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.score_patches(chunk.to(self.device, non_blocking=True)).float()
                for chunk in patches.split(self.score_batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else patches.new_zeros(0)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"scores": self.score_grid(batch["patches"])}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"scores": self.score_grid(batch["patches"])}
