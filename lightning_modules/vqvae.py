"""VQ-VAE (paper eq. 2): reconstruction MSE + codebook loss + 0.25 x commitment loss, straight-through
gradients; anomaly score = reconstruction MSE. The 8 x 8 code indices are the 64 discrete latents of
the SPN stage. The encoder outputs are standardised per channel before the codebook
(``standardize_latents``: their early common drift is what left the codes behind), the codebook
starts from the first batch's encoder outputs and follows them as an
exponential moving average (``codebook_ema_decay``; 0 = eq. 2's gradient-trained codebook, which falls
behind the encoder and collapses within a few dozen steps at the quick profile's learning rate); codes
unused for a while are re-seeded from encoder outputs every ``revive_every`` steps. Codebook health is
logged (perplexity, share of codes used per batch, dead and revived codes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_modules.base import batch_patches
from lightning_modules.networks import LATENT_DIM, PATCH_SIZE, VQAutoencoder, perplexity
from lightning_modules.reconstruction import ReconstructionDetector


class VQVAE(ReconstructionDetector):
    """VQ-VAE over the shared trunk + ``num_residual_blocks`` residual blocks; ``num_embeddings`` = K."""

    def __init__(
        self,
        lr: float = 1e-4,
        num_embeddings: int = 512,
        embedding_dim: int = LATENT_DIM,
        commitment: float = 0.25,
        num_residual_blocks: int = 6,
        revive_every: int = 1,
        dead_threshold: float = 0.03,
        usage_decay: float = 0.5,
        codebook_ema_decay: float = 0.99,
        standardize_latents: bool = True,
        seed: int = 0,
        lr_plateau_patience: int = 0,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = VQAutoencoder(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            num_residual_blocks=num_residual_blocks,
            commitment=commitment,
            ema_decay=codebook_ema_decay,
            standardize_latents=standardize_latents,
            patch_size=patch_size,
        )
        self._last_z: Tensor | None = None

    @property
    def num_embeddings(self) -> int:
        return self.net.quantizer.num_embeddings

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.net(x)[0]

    def _losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        recon, vq_loss, idx, z = self.net(x)
        mse = (recon.float() - x.float()).pow(2).mean(dim=(1, 2, 3))
        return mse, vq_loss, idx, z

    def per_sample_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Score = reconstruction MSE per patch (the codebook terms only shape training)."""
        mse, _, _, _ = self._losses(x)
        return mse, {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_patches(batch)
        mse, vq_loss, idx, z = self._losses(x)
        loss = (mse + vq_loss).mean()
        quantizer = self.net.quantizer
        hist = quantizer.update_usage(idx, self.hparams.usage_decay)
        if quantizer.ema_decay > 0:
            counts, sums = quantizer.assignment_statistics(z, idx)
            if dist.is_available() and dist.is_initialized():  # every rank takes the same codebook step
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            quantizer.ema_update(counts, sums)
        n = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/mse", mse.mean().detach(), batch_size=n)
        self.log("train/vq_loss", vq_loss.mean().detach(), batch_size=n)
        self.log("train/perplexity", perplexity(hist), prog_bar=True, batch_size=n)
        self.log("train/codebook_usage", (hist > 0).float().mean(), batch_size=n)  # share of codes used
        dead = (quantizer.usage < self.hparams.dead_threshold).sum().float()
        self.log("train/dead_codes", dead, batch_size=n)
        self._last_z = z.detach()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_patches(batch)
        mse, vq_loss, idx, _ = self._losses(x)
        loss = (mse + vq_loss).mean()
        n = x.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/mse", mse.mean(), sync_dist=True, batch_size=n)
        hist = torch.bincount(idx.flatten(), minlength=self.num_embeddings).float()
        self.log("val/perplexity", perplexity(hist / hist.sum()), sync_dist=True, batch_size=n)
        self.log("val/codebook_usage", (hist > 0).float().mean(), sync_dist=True, batch_size=n)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """On the very first training batch, seeds the codebook from that batch's encoder outputs."""
        quantizer = self.net.quantizer
        if bool(quantizer.initialized):
            return
        with torch.no_grad():
            z = self.net.encode(batch_patches(batch).to(self.device))
        quantizer.init_from(z, torch.Generator().manual_seed(int(self.hparams.seed)))
        self._sync_codebook()

    def _sync_codebook(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.net.quantizer.embedding.weight.data, src=0)
            dist.broadcast(self.net.quantizer.usage, src=0)
            dist.broadcast(self.net.quantizer.ema_count, src=0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``revive_every`` optimiser steps, re-seeds dead codes (identically on every DDP rank)."""
        every = self.hparams.revive_every
        if self._last_z is None or every <= 0 or self.global_step == 0 or self.global_step % every:
            return
        gen = torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + int(self.global_step))
        revived = self.net.quantizer.revive(self._last_z, self.hparams.dead_threshold, gen)
        self._sync_codebook()
        self.log("train/revived_codes", float(revived), batch_size=1)
        self._last_z = None

    def encode_codes(self, x: Tensor) -> Tensor:
        """The 8 x 8 code indices flattened: LongTensor N x 64 in [0, K); eval mode, no gradient."""
        return self._eval_call(self.net.encode_codes, x)

    def codebook_usage(self, x: Tensor) -> dict[str, float]:
        """Perplexity and number of unused codes over the patches ``x`` (for reports)."""
        codes = self.encode_codes(x)
        hist = torch.bincount(codes.flatten(), minlength=self.num_embeddings).float()
        return {"perplexity": float(perplexity(hist / hist.sum())), "unused_codes": int((hist == 0).sum())}
