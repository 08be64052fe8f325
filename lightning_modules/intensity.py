"""Table 1's `Intensity` baseline: score = mean patch intensity; nothing is trained."""

from __future__ import annotations

from torch import Tensor

from lightning_modules.base import AnomalyDetector
from lightning_modules.networks import PATCH_SIZE


class IntensityBaseline(AnomalyDetector):
    """Score = mean patch intensity, nothing trained: what brightness alone achieves (masses are denser,
    hence brighter, than their surroundings). Every model in Table 1 is read against it."""

    def __init__(self, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.save_hyperparameters()

    def score_patches(self, x: Tensor) -> Tensor:
        self.check_patches(x)
        return x.float().flatten(1).mean(1)


__all__ = ["IntensityBaseline"]
