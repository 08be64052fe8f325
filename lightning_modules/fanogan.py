"""f-AnoGAN baseline (Schlegl et al. 2019) in two stages, both from configs with manual optimisation.

``stage="gan"``: WGAN-GP (lambda 10, one critic step per batch, a generator step every ``n_critic``
batches, Adam 1e-4, betas (0, 0.9)). ``stage="encoder"``: the izi_f encoder, generator and critic frozen
(loaded from ``generator_ckpt`` at fit start, so loading the finished checkpoint never needs that file).
Score = MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x)))), f = the critic's last conv features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import AnomalyDetector, batch_patches
from lightning_modules.networks import PATCH_SIZE, Critic, GanEncoder, Generator, gradient_penalty

STAGES = ("gan", "encoder")


def _param_sum(module: torch.nn.Module) -> Tensor:
    return sum(p.sum() for p in module.parameters() if p.requires_grad)


class FAnoGAN(AnomalyDetector):
    """WGAN-GP generator + critic and the izi_f encoder; ``width`` / ``latent_dim`` shrink it for CPU runs."""

    def __init__(
        self,
        stage: str = "gan",
        generator_ckpt: str | None = None,
        latent_dim: int = 128,
        width: int = 64,
        lr: float = 1e-4,
        beta1: float = 0.0,
        beta2: float = 0.9,
        n_critic: int = 5,
        gp_weight: float = 10.0,
        kappa: float = 1.0,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"model.init_args.stage must be one of {STAGES}, got {stage!r}")
        if stage == "encoder" and not generator_ckpt:
            raise ValueError("model.init_args.generator_ckpt is required with stage 'encoder' (the stage-'gan' checkpoint)")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, width, patch_size)
        self.critic = Critic(width, patch_size)
        self.encoder = GanEncoder(latent_dim, width, patch_size)
        self._critic_steps = 0
        self._gan_loaded = False
        # each stage trains only its own networks; frozen ones never register with DDP's reducer
        if stage == "encoder":
            self.generator.requires_grad_(False)
            self.critic.requires_grad_(False)
        else:
            self.encoder.requires_grad_(False)

    # ----- stage plumbing -------------------------------------------------------------------
    def train(self, mode: bool = True) -> FAnoGAN:
        """In the encoder stage the frozen generator (BatchNorm) and critic always stay in eval mode."""
        super().train(mode)
        if self.hparams.stage == "encoder":
            self.generator.eval()
            self.critic.eval()
        return self

    def load_gan(self, path: str | Path) -> None:
        """Copies generator and critic weights from a stage-'gan' FAnoGAN checkpoint (widths must match)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.init_args.generator_ckpt: no checkpoint at {path} (train stage 'gan' first)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt.get("hyper_parameters", {})
        for key in ("width", "latent_dim"):
            if key in hp and hp[key] != self.hparams[key]:
                raise ValueError(f"{path}: GAN was trained with {key}={hp[key]}, this model has {key}={self.hparams[key]}")
        state = ckpt.get("state_dict", ckpt)
        for name in ("generator", "critic"):
            sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            if not sub:
                raise ValueError(f"{path}: no '{name}.*' weights; is it an FAnoGAN stage-'gan' checkpoint?")
            getattr(self, name).load_state_dict(sub)
        self._gan_loaded = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.stage == "encoder" and not self._gan_loaded:
            self.load_gan(self.hparams.generator_ckpt)

    def configure_optimizers(self) -> Any:
        betas = (self.hparams.beta1, self.hparams.beta2)
        lr = self.hparams.lr
        if self.hparams.stage == "gan":
            return [
                torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            ]
        return torch.optim.Adam(self.encoder.parameters(), lr=lr, betas=betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fanogan_critic_steps"] = self._critic_steps  # a resumed run keeps the n_critic phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._critic_steps = int(checkpoint.get("fanogan_critic_steps", 0))
        self._gan_loaded = True  # the checkpoint's own generator and critic win over generator_ckpt

    # ----- losses ---------------------------------------------------------------------------
    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.hparams.latent_dim, generator=generator)
        return z.to(self.device)

    def izif_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample izi_f loss and reconstruction G(E(x)): pixel MSE + kappa x critic-feature MSE."""
        recon = self.generator(self.encoder(x))
        pix = (x.float() - recon.float()).pow(2).mean(dim=(1, 2, 3))
        feat = (self.critic.features(x).float() - self.critic.features(recon).float()).pow(2).mean(dim=1)
        return pix + self.hparams.kappa * feat, recon

    def _gan_step(self, x: Tensor) -> Tensor:
        opt_d, opt_g = self.optimizers()
        n = x.shape[0]
        with torch.no_grad():
            fake = self.generator(self.sample_z(n))
        d_real = self.critic(x).float()
        d_fake = self.critic(fake).float()
        gp = gradient_penalty(self.critic, x, fake)
        wasserstein = d_real.mean() - d_fake.mean()
        loss_d = -wasserstein + self.hparams.gp_weight * gp.mean()
        opt_d.zero_grad(set_to_none=True)
        # zero-weight term: every trainable parameter takes part in each backward, as DDP without
        # find_unused_parameters requires; the generator's zero gradients are cleared before its own step
        self.manual_backward(loss_d + 0.0 * _param_sum(self.generator))
        opt_d.step()
        self._critic_steps += 1
        self.log("train/loss", loss_d.detach(), prog_bar=True, batch_size=n)
        self.log("train/wasserstein", wasserstein.detach(), prog_bar=True, batch_size=n)
        self.log("train/gp", gp.mean().detach(), batch_size=n)
        if self._critic_steps % self.hparams.n_critic == 0:
            # the critic's gradients from this backward are discarded by the next critic step's zero_grad
            loss_g = -self.critic(self.generator(self.sample_z(n))).float().mean()
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_g)
            opt_g.step()
            self.log("train/g_loss", loss_g.detach(), batch_size=n)
        return loss_d.detach()

    def _encoder_step(self, x: Tensor) -> Tensor:
        opt = self.optimizers()
        loss = self.izif_loss(x)[0].mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        return loss.detach()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_patches(batch)
        return self._gan_step(x) if self.hparams.stage == "gan" else self._encoder_step(x)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """val/loss: the critic's Wasserstein estimate (stage gan, fixed z per batch) or the izi_f loss."""
        x = batch_patches(batch)
        if self.hparams.stage == "gan":
            gen = torch.Generator().manual_seed(batch_idx)
            fake = self.generator(self.sample_z(x.shape[0], gen))
            loss = self.critic(x).float().mean() - self.critic(fake).float().mean()
        else:
            loss = self.izif_loss(x)[0].mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    # ----- scoring --------------------------------------------------------------------------
    def score_patches(self, x: Tensor) -> Tensor:
        """izi_f anomaly score per patch: MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))."""
        self.check_patches(x)
        return self._eval_call(lambda t: self.izif_loss(t)[0].float(), x)

    def residual_map(self, x: Tensor) -> Tensor:
        """Per-pixel squared error between x and G(E(x)), N x 1 x 64 x 64."""
        return self._eval_call(lambda t: (t.float() - self.generator(self.encoder(t)).float()).pow(2), x)
