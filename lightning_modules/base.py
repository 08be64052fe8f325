"""The one interface every model serves, and the test/predict steps written once against it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor


def class_tag(obj: object) -> str:
    """``"<module>.<ClassName>"`` stored in every checkpoint so it loads without its config."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


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

    def _eval_call(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` in eval mode without gradient, restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(x)
        finally:
            self.train(was_training)

    def score_grid(self, patches: Tensor) -> Tensor:
        """Scores many patches in chunks, in eval mode, without gradient."""

        def score_all(x: Tensor) -> Tensor:
            chunks = [
                self.score_patches(chunk.to(self.device, non_blocking=True)).float()
                for chunk in x.split(self.score_batch_size)
            ]
            return torch.cat(chunks) if chunks else x.new_zeros(0)

        return self._eval_call(score_all, patches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anomaly_model_class"] = class_tag(self)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return {"scores": self.score_grid(batch["patches"])}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"scores": self.score_grid(batch["patches"])}
