"""f-AnoGAN: WGAN-GP stage, frozen-GAN izi_f encoder stage, score formula, round trip, config errors, bf16."""

from __future__ import annotations

import math
import os

import pytest
import pytorch_lightning as pl
import torch
from test_models_helpers import auc, healthy_patches, loader, trainer, with_blobs

from lightning_modules import FAnoGAN

SMALL = {"width": 8, "latent_dim": 32, "lr": 1e-3}


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return {
        "train": healthy_patches(256, seed=0),
        "val": healthy_patches(32, seed=4),
        "healthy": healthy_patches(64, seed=1),
        "lesion": with_blobs(healthy_patches(64, seed=2), seed=3),
    }


@pytest.fixture(scope="module")
def stages(data, tmp_path_factory) -> dict:
    """Stage gan (150 optimiser steps, 2 critic steps per generator step), then 60 encoder steps."""
    folder = tmp_path_factory.mktemp("fanogan")
    pl.seed_everything(0, verbose=False)
    gan = FAnoGAN(stage="gan", n_critic=2, **SMALL)
    tr = trainer(150)
    tr.fit(gan, loader(data["train"]), loader(data["val"], shuffle=False))
    gan_metrics = {k: float(v) for k, v in tr.callback_metrics.items()}
    opt_d, opt_g = tr.optimizers
    steps = {"critic": _adam_steps(opt_d), "generator": _adam_steps(opt_g)}
    gan_ckpt = folder / "gan.ckpt"
    tr.save_checkpoint(gan_ckpt)

    enc = FAnoGAN(stage="encoder", generator_ckpt=str(gan_ckpt), **SMALL)
    enc.load_gan(gan_ckpt)  # fit's setup() then skips loading again
    before = float(enc.score_patches(data["train"][:64]).mean())  # trained G and critic, untrained encoder
    tr2 = trainer(60)
    tr2.fit(enc, loader(data["train"]), loader(data["val"], shuffle=False))
    enc_ckpt = folder / "encoder.ckpt"
    tr2.save_checkpoint(enc_ckpt)
    return {
        "gan": gan,
        "gan_metrics": gan_metrics,
        "steps": steps,
        "gan_ckpt": gan_ckpt,
        "enc": enc,
        "enc_metrics": {k: float(v) for k, v in tr2.callback_metrics.items()},
        "enc_ckpt": enc_ckpt,
        "before": before,
    }


def _adam_steps(opt: torch.optim.Optimizer) -> int:
    states = [s for s in opt.state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def test_gan_stage_logs_and_takes_one_generator_step_per_n_critic(stages) -> None:
    m = stages["gan_metrics"]
    for key in ("train/loss", "train/wasserstein", "train/gp", "train/g_loss", "val/loss"):
        assert key in m and math.isfinite(m[key]), key
    # 150 optimiser steps with n_critic = 2: 100 critic steps and 50 generator steps
    assert stages["steps"] == {"critic": 100, "generator": 50}
    ckpt = torch.load(stages["gan_ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["fanogan_critic_steps"] == 100  # a resumed run continues the n_critic phase
    resumed = FAnoGAN.load_from_checkpoint(stages["gan_ckpt"], map_location="cpu")
    assert resumed._critic_steps == 100 and resumed._gan_loaded


def test_encoder_stage_keeps_gan_frozen_and_learns(stages, data) -> None:
    gan, enc = stages["gan"], stages["enc"]
    for name in ("generator", "critic"):
        ref = getattr(gan, name).state_dict()
        for key, value in getattr(enc, name).state_dict().items():
            assert torch.equal(value, ref[key]), f"{name}.{key} changed in the encoder stage"
    assert not any(p.requires_grad for p in enc.generator.parameters())
    assert enc.generator.training is False  # BatchNorm of the frozen generator stays in eval mode
    after = float(enc.score_patches(data["train"][:64]).mean())
    assert after < 0.7 * stages["before"]
    assert "val/loss" in stages["enc_metrics"]


def test_trained_fanogan_scores_lesions_higher(stages, data) -> None:
    enc = stages["enc"]
    a = auc(enc.score_patches(data["healthy"]), enc.score_patches(data["lesion"]))
    assert a > 0.7, f"f-AnoGAN AUC {a:.3f}"


def test_score_is_pixel_mse_plus_kappa_feature_mse(stages, data) -> None:
    enc = stages["enc"]
    x = data["lesion"][:5]
    enc.eval()
    with torch.no_grad():
        recon = enc.generator(enc.encoder(x))
        pix = ((x - recon) ** 2).mean(dim=(1, 2, 3))
        feat = ((enc.critic.features(x) - enc.critic.features(recon)) ** 2).mean(dim=1)
    enc.train()
    assert torch.allclose(enc.score_patches(x), pix + 1.0 * feat, rtol=1e-5)
    assert torch.allclose(enc.residual_map(x).mean(dim=(1, 2, 3)), pix, rtol=1e-5)


def test_encoder_checkpoint_scores_identically_without_the_gan_checkpoint(stages, data) -> None:
    ckpt = torch.load(stages["enc_ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["anomaly_model_class"] == "lightning_modules.fanogan.FAnoGAN"
    moved = stages["gan_ckpt"].with_suffix(".moved")
    os.replace(stages["gan_ckpt"], moved)
    try:
        loaded = FAnoGAN.load_from_checkpoint(stages["enc_ckpt"], map_location="cpu")
    finally:
        os.replace(moved, stages["gan_ckpt"])
    x = torch.cat([data["healthy"][:8], data["lesion"][:8]])
    assert torch.equal(loaded.score_patches(x), stages["enc"].score_patches(x))
    assert torch.equal(loaded.score_grid(x), stages["enc"].score_grid(x))


def test_configuration_errors_name_the_key_or_file(stages, tmp_path) -> None:
    with pytest.raises(ValueError, match="stage"):
        FAnoGAN(stage="wgan")
    with pytest.raises(ValueError, match="generator_ckpt"):
        FAnoGAN(stage="encoder")
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        FAnoGAN(stage="encoder", generator_ckpt=str(missing), **SMALL).setup("fit")
    with pytest.raises(ValueError, match="width=8"):
        FAnoGAN(stage="encoder", generator_ckpt=str(stages["gan_ckpt"]), width=4, latent_dim=32).setup("fit")


def test_bf16_mixed_steps_in_both_stages(data, tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    gan = FAnoGAN(stage="gan", n_critic=1, width=4, latent_dim=16)
    tr = trainer(4, precision="bf16-mixed", limit_val_batches=1)
    tr.fit(gan, loader(data["train"][:64]), loader(data["val"], shuffle=False))
    for key in ("train/loss", "train/gp", "train/g_loss", "val/loss"):
        assert math.isfinite(float(tr.callback_metrics[key])), key
    ckpt = tmp_path / "gan.ckpt"
    tr.save_checkpoint(ckpt)
    enc = FAnoGAN(stage="encoder", generator_ckpt=str(ckpt), width=4, latent_dim=16)
    tr2 = trainer(2, precision="bf16-mixed", limit_val_batches=1)
    tr2.fit(enc, loader(data["train"][:64]), loader(data["val"], shuffle=False))
    assert math.isfinite(float(tr2.callback_metrics["train/loss"]))
    assert bool(torch.isfinite(enc.score_patches(data["lesion"][:4])).all())
