"""Models: one LightningModule per model over plain torch networks, all serving `AnomalyDetector`."""

from lightning_modules.base import AnomalyDetector
from lightning_modules.beta_vae import BetaVAE
from lightning_modules.cae import CAE
from lightning_modules.fanogan import FAnoGAN
from lightning_modules.intensity import IntensityBaseline
from lightning_modules.rat_spn_stage import RatSpnStage
from lightning_modules.vqvae import VQVAE

__all__ = ["AnomalyDetector", "CAE", "BetaVAE", "VQVAE", "FAnoGAN", "IntensityBaseline", "RatSpnStage"]
