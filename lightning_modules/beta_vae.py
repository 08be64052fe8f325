"""beta-VAE (paper eq. 1, beta = 0.1): loss and anomaly score = per-patch beta-ELBO loss.

Scale: the reconstruction term is the pixel-mean squared error and the KL term (summed over the
64 latents) is divided by the number of pixels, i.e. (SSE + beta * KL) / 4096 for 64 x 64 patches -- the Gaussian
likelihood's balance between the two terms, at MSE scale. Training samples z by reparameterisation;
scoring uses the posterior mean, so scores are deterministic."""

from __future__ import annotations

from torch import Tensor

from lightning_modules.networks import LATENT_DIM, PATCH_SIZE, DenseAutoencoder
from lightning_modules.reconstruction import ReconstructionDetector


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent units: Tensor[N]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


class BetaVAE(ReconstructionDetector):
    """Variational AE on the shared conv trunk; ``encode(x)`` returns the posterior mean (N x 64)."""

    def __init__(self, lr: float = 1e-5, beta: float = 0.1, latent_dim: int = LATENT_DIM, lr_plateau_patience: int = 0,
                 patch_size: int = PATCH_SIZE):
        super().__init__()
        self.save_hyperparameters()
        self.net = DenseAutoencoder(latent_dim=latent_dim, variational=True, patch_size=patch_size)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.net(x, sample=False)[0]

    def per_sample_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        recon, mu, logvar = self.net(x, sample=self.training)
        mse = (recon.float() - x.float()).pow(2).mean(dim=(1, 2, 3))
        kl = gaussian_kl(mu.float(), logvar.float())
        loss = mse + self.hparams.beta * kl / float(self.patch_size * self.patch_size)
        return loss, {"mse": mse.mean().detach(), "kl": kl.mean().detach()}

    def encode(self, x: Tensor) -> Tensor:
        """Posterior mean N x 64 (the latent handed to the SPN stage); eval mode, no gradient."""
        return self._eval_call(lambda t: self.net.encode(t)[0].float(), x)


__all__ = ["BetaVAE", "gaussian_kl"]
