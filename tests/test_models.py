"""The three autoencoders through Lightning: defaults, training, scoring, AUC on synthetic lesions,
checkpoint round trips, VQ-VAE codebook health, bf16-mixed steps."""

from __future__ import annotations

import importlib
import math

import pytest
import pytorch_lightning as pl
import torch
from test_models_helpers import auc, healthy_patches, loader, trainer, with_blobs

from lightning_modules import CAE, VQVAE, AnomalyDetector, BetaVAE, FAnoGAN

FAST = {
    "cae": lambda: CAE(lr=1e-3),
    "bvae": lambda: BetaVAE(lr=1e-3),
    "vqvae": lambda: VQVAE(lr=1e-3, num_embeddings=64, revive_every=10, usage_decay=0.8),
}
TAGS = {"cae": "lightning_modules.cae.CAE", "bvae": "lightning_modules.beta_vae.BetaVAE", "vqvae": "lightning_modules.vqvae.VQVAE"}
STEPS = 40


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    healthy_test = healthy_patches(64, seed=1)
    return {
        "train": healthy_patches(256, seed=0),
        "val": healthy_patches(64, seed=4),
        "healthy": healthy_test,
        "lesion": with_blobs(healthy_patches(64, seed=2), seed=3),
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict[str, dict]:
    """Each autoencoder trained once for 40 steps (lr 1e-3) on healthy patches; shared by the tests below."""
    out = {}
    for name, make in FAST.items():
        pl.seed_everything(0, verbose=False)
        model = make()
        before = float(model.score_patches(data["train"][:64]).mean())
        tr = trainer(STEPS)
        tr.fit(model, loader(data["train"]), loader(data["val"], shuffle=False))
        ckpt = tmp_path_factory.mktemp(name) / "model.ckpt"
        tr.save_checkpoint(ckpt)
        out[name] = {
            "model": model,
            "before": before,
            "after": float(model.score_patches(data["train"][:64]).mean()),
            "metrics": {k: float(v) for k, v in tr.callback_metrics.items()},
            "ckpt": ckpt,
        }
    return out


def test_paper_defaults_construct_without_arguments() -> None:
    cae, bvae, vq, gan = CAE(), BetaVAE(), VQVAE(), FAnoGAN()
    assert all(isinstance(m, AnomalyDetector) for m in (cae, bvae, vq, gan))
    assert cae.hparams.lr == 1e-5 and bvae.hparams.lr == 1e-5 and bvae.hparams.beta == 0.1
    assert vq.hparams.lr == 1e-4 and vq.num_embeddings == 512 and vq.hparams.commitment == 0.25
    assert vq.hparams.num_residual_blocks == 6 and vq.net.quantizer.embedding.weight.shape == (512, 64)
    hp = gan.hparams
    assert (hp.stage, hp.lr, hp.beta1, hp.beta2, hp.n_critic, hp.gp_weight, hp.kappa) == ("gan", 1e-4, 0.0, 0.9, 5, 10.0, 1.0)
    x = torch.rand(3, 1, 64, 64)
    assert cae.encode(x).shape == bvae.encode(x).shape == (3, 64)
    assert vq.encode_codes(x).shape == (3, 64) and vq.encode_codes(x).dtype == torch.long
    for m in (cae, bvae, vq, gan):
        s = m.score_patches(x)
        assert s.shape == (3,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
        assert m.residual_map(x).shape == (3, 1, 64, 64)
        assert m.training  # scoring restores the mode it found


def test_cae_score_is_per_patch_mse_and_residual_map_its_pixels() -> None:
    torch.manual_seed(0)
    m = CAE()
    x = torch.rand(4, 1, 64, 64)
    m.eval()
    with torch.no_grad():
        recon = m.net(x)[0]
    assert torch.allclose(m.score_patches(x), ((x - recon) ** 2).mean(dim=(1, 2, 3)), atol=1e-7)
    assert torch.allclose(m.residual_map(x).mean(dim=(1, 2, 3)), m.score_patches(x), atol=1e-7)
    # per patch: scoring one patch alone equals scoring it in a batch
    assert torch.allclose(m.score_patches(x[1:2]), m.score_patches(x)[1:2], atol=1e-7)


def test_beta_vae_score_is_the_beta_elbo_loss() -> None:
    torch.manual_seed(0)
    m = BetaVAE()
    x = torch.rand(2, 1, 64, 64)
    m.eval()
    with torch.no_grad():
        mu, logvar = m.net.encode(x)
        recon = m.net.decode(mu)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    expected = ((x - recon) ** 2).mean(dim=(1, 2, 3)) + 0.1 * kl / 4096
    assert torch.allclose(m.score_patches(x), expected, rtol=1e-5)
    assert torch.allclose(m.encode(x), mu)
    # training draws z: two training-mode losses differ, scores never do
    m.train()
    assert not torch.equal(m.per_sample_loss(x)[0], m.per_sample_loss(x)[0])
    assert torch.equal(m.score_patches(x), m.score_patches(x))


@pytest.mark.parametrize("name", list(FAST))
def test_training_loss_falls_and_lesions_score_higher(name, trained, data) -> None:
    t = trained[name]
    assert t["after"] < 0.6 * t["before"], t
    assert "val/loss" in t["metrics"] and "train/loss" in t["metrics"]
    assert math.isfinite(t["metrics"]["val/loss"]) and t["metrics"]["val/loss"] < t["before"]
    model = t["model"]
    a = auc(model.score_patches(data["healthy"]), model.score_patches(data["lesion"]))
    assert a > 0.7, f"{name}: AUC {a:.3f}"


@pytest.mark.parametrize("name", list(FAST))
def test_checkpoint_round_trip_gives_identical_scores(name, trained, data) -> None:
    t = trained[name]
    ckpt = torch.load(t["ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["anomaly_model_class"] == TAGS[name]
    module_name, cls_name = ckpt["anomaly_model_class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    loaded = cls.load_from_checkpoint(t["ckpt"], map_location="cpu")
    assert dict(loaded.hparams) == dict(t["model"].hparams)
    x = torch.cat([data["healthy"][:8], data["lesion"][:8]])
    assert torch.equal(loaded.score_patches(x), t["model"].score_patches(x))
    assert torch.equal(loaded.score_grid(x), t["model"].score_grid(x))
    if name == "vqvae":
        assert torch.equal(loaded.encode_codes(x), t["model"].encode_codes(x))
        assert torch.equal(loaded.net.quantizer.usage, t["model"].net.quantizer.usage)
        assert bool(loaded.net.quantizer.initialized)
    else:
        assert torch.equal(loaded.encode(x), t["model"].encode(x))


def test_vqvae_codes_in_range_and_codebook_usage_logged(trained, data) -> None:
    t = trained["vqvae"]
    model = t["model"]
    codes = model.encode_codes(data["lesion"])
    assert codes.shape == (64, 64) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < model.num_embeddings == 64
    for key in ("train/perplexity", "train/dead_codes", "train/vq_loss", "val/perplexity"):
        assert key in t["metrics"], key
    assert 1.0 <= t["metrics"]["train/perplexity"] <= 64.0
    assert 0.0 <= t["metrics"]["train/dead_codes"] <= 64.0
    usage = model.codebook_usage(data["healthy"])
    assert usage["perplexity"] >= 1.0 and 0 <= usage["unused_codes"] < 64


def test_vqvae_revives_a_collapsed_codebook(data) -> None:
    pl.seed_everything(0, verbose=False)
    model = VQVAE(lr=1e-3, num_embeddings=32, revive_every=4, usage_decay=0.5)
    q = model.net.quantizer
    with torch.no_grad():  # collapse by hand: one code at the origin, 31 codes far away from any output
        q.embedding.weight.fill_(50.0)
        q.embedding.weight[0].zero_()
        q.initialized.fill_(True)
    assert model.codebook_usage(data["train"][:64])["unused_codes"] == 31
    tr = trainer(8)
    tr.fit(model, loader(data["train"]))
    assert tr.callback_metrics["train/revived_codes"] > 0
    assert float(q.embedding.weight.detach().abs().max()) < 50.0  # every far code was re-seeded from encoder outputs
    assert model.codebook_usage(data["train"][:64])["unused_codes"] < 31


def test_vqvae_first_batch_seeds_the_codebook(data) -> None:
    pl.seed_everything(0, verbose=False)
    model = VQVAE(num_embeddings=16)
    assert not bool(model.net.quantizer.initialized)
    batch = {"patches": data["train"][:32]}
    model.on_train_batch_start(batch, 0)
    assert bool(model.net.quantizer.initialized)
    with torch.no_grad():
        z = model.net.encode(batch["patches"]).permute(0, 2, 3, 1).reshape(-1, 64)
    nearest = torch.cdist(model.net.quantizer.embedding.weight.detach(), z).min(1).values
    assert float(nearest.max()) < 0.05 * float(z.norm(dim=1).mean())


@pytest.mark.parametrize("name", list(FAST))
def test_bf16_mixed_training_step(name, data) -> None:
    pl.seed_everything(0, verbose=False)
    model = FAST[name]()
    tr = trainer(2, precision="bf16-mixed", limit_val_batches=1)
    tr.fit(model, loader(data["train"][:64]), loader(data["val"][:32], shuffle=False))
    assert math.isfinite(float(tr.callback_metrics["train/loss"]))
    assert math.isfinite(float(tr.callback_metrics["val/loss"]))
    assert next(model.parameters()).dtype == torch.float32  # mixed: weights stay fp32
    assert bool(torch.isfinite(model.score_patches(data["lesion"][:8])).all())


@pytest.mark.parametrize("name", ["cae", "bvae"])
def test_lr_plateau_cuts_the_rate_when_val_loss_stalls(name, data) -> None:
    """``lr_plateau_patience``: the rate falls by ``lr_plateau_factor`` once val/loss stops improving (here
    a rate too small to move it: the loss stalls from the first epoch); 0 keeps plain Adam."""
    make = {"cae": CAE, "bvae": BetaVAE}[name]
    assert isinstance(make(lr=1e-3).configure_optimizers(), torch.optim.Adam)
    pl.seed_everything(0, verbose=False)
    model = make(lr=1e-12, lr_plateau_patience=1)
    tr = trainer(-1, max_epochs=5)
    tr.fit(model, loader(data["train"][:64]), loader(data["val"][:32], shuffle=False))
    lr = tr.optimizers[0].param_groups[0]["lr"]
    # epochs 1-5 without improvement: cuts after epochs 3 and 5 (patience 1, the first epoch sets the best)
    assert lr == pytest.approx(1e-12 * model.lr_plateau_factor ** 2, rel=1e-6)
