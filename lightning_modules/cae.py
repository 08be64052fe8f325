"""Convolutional autoencoder (paper section 2.1): MSE loss, anomaly score = per-patch MSE."""

from __future__ import annotations

from torch import Tensor

from lightning_modules.networks import LATENT_DIM, PATCH_SIZE, DenseAutoencoder
from lightning_modules.reconstruction import ReconstructionDetector


class CAE(ReconstructionDetector):
    """Convolutional AE with a 64-unit dense bottleneck; loss and score = MSE(x, D(E(x))) per patch."""

    def __init__(self, lr: float = 1e-5, latent_dim: int = LATENT_DIM, lr_plateau_patience: int = 0,
                 patch_size: int = PATCH_SIZE):
        super().__init__()
        self.save_hyperparameters()
        self.net = DenseAutoencoder(latent_dim=latent_dim, variational=False, patch_size=patch_size)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.net(x)[0]

    def per_sample_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        recon = self.net(x)[0]
        return (recon.float() - x.float()).pow(2).mean(dim=(1, 2, 3)), {}

    def encode(self, x: Tensor) -> Tensor:
        """The 64 latent units (N x 64) handed to the SPN stage; eval mode, no gradient."""
        return self._eval_call(lambda t: self.net.encode(t)[0].float(), x)
