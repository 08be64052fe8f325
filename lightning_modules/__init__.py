"""Models: one LightningModule per model over plain torch networks, all serving `AnomalyDetector`."""

from lightning_modules.base import AnomalyDetector
from lightning_modules.beta_vae import BetaVAE
from lightning_modules.cae import CAE
from lightning_modules.fanogan import FAnoGAN
from lightning_modules.vqvae import VQVAE

try:  # written in parallel by the SPN engineer; the package must import while it is missing
    from lightning_modules.rat_spn_stage import RatSpnStage
except ImportError as _missing:  # pragma: no cover - only until rat_spn_stage.py lands
    if getattr(_missing, "name", None) != "lightning_modules.rat_spn_stage":
        raise
    RatSpnStage = None  # type: ignore[assignment,misc]

__all__ = ["AnomalyDetector", "CAE", "BetaVAE", "VQVAE", "FAnoGAN", "RatSpnStage"]
