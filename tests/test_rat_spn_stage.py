"""RatSpnStage on small stand-in autoencoders: EM fitting, latent cache, scoring, checkpoints without the AE."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import AnomalyDetector
from lightning_modules.rat_spn_stage import RatSpnStage
from spn import em_step_size


def _tag(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class TinyAE(AnomalyDetector):
    """Stand-in for CAE / BetaVAE: a fixed seeded projection of 8 x 8 average-pooled pixels to `latent_dim`."""

    def __init__(self, latent_dim: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(64, latent_dim, generator=gen) / 8)
        self.encode_calls = 0

    def encode(self, x: Tensor) -> Tensor:
        self.encode_calls += x.shape[0]
        return nn.functional.avg_pool2d(x, 8).flatten(1) @ self.proj * 10

    def score_patches(self, x: Tensor) -> Tensor:
        return self.encode(x).pow(2).sum(1)

    def training_step(self, batch, batch_idx):
        return self.encode(batch["patches"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["anomaly_model_class"] = _tag(self)


class TinyVQ(AnomalyDetector):
    """Stand-in for the VQ-VAE: codes = nearest of `num_embeddings` levels of 16 pooled pixels."""

    def __init__(self, num_embeddings: int = 6, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.proj = nn.Parameter(torch.zeros(1))
        self.encode_calls = 0
        self.num_embeddings = num_embeddings

    def training_step(self, batch, batch_idx):
        return self.proj.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["anomaly_model_class"] = _tag(self)

    def encode_codes(self, x: Tensor) -> Tensor:
        self.encode_calls += x.shape[0]
        pooled = nn.functional.avg_pool2d(x, 16).flatten(1)  # N x 16 in [0, 1]
        return (pooled * self.num_embeddings).long().clamp(0, self.num_embeddings - 1)


def _images(n: int, seed: int, anomalous: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = 0.3 + 0.1 * torch.rand(n, 1, 1, 1, generator=gen)
    x = base + 0.05 * torch.randn(n, 1, 64, 64, generator=gen)
    if anomalous:
        x[:, :, 16:48, 16:48] += 0.5
    return x.clamp(0, 1)


class PatchSet(Dataset):
    """Training-batch contract: image, stable global index, center, patient_id, label."""

    def __init__(self, images: Tensor, offset: int = 0):
        self.images, self.offset = images, offset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "patches": self.images[i],
            "index": torch.tensor(self.offset + i),
            "centers": torch.tensor([32, 32]),
            "patient_id": f"p{i % 7}",
            "label": torch.tensor(0),
        }


def _loaders(n_train: int = 256, n_val: int = 64) -> tuple[DataLoader, DataLoader]:
    train = PatchSet(_images(n_train, seed=1))
    val = PatchSet(_images(n_val, seed=2), offset=n_train)
    return DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)), DataLoader(val, batch_size=32)


def _trainer(tmp_path: Path, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _save_autoencoder(model: TinyAE, tmp_path: Path, name: str) -> Path:
    train, _ = _loaders(64, 1)
    trainer = _trainer(tmp_path / name, 1, max_steps=1, enable_checkpointing=False)
    trainer.fit(model, train)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_missing_autoencoder_checkpoint_names_file_and_training_command(tmp_path):
    stage = RatSpnStage(autoencoder_ckpt=str(tmp_path / "runs/cae/checkpoints/last.ckpt"), autoencoder_class="lightning_modules.CAE")
    train, val = _loaders(32, 32)
    with pytest.raises(FileNotFoundError, match=r"runs/cae/checkpoints/last\.ckpt.*lightning fit --config configs/cae\.yaml"):
        _trainer(tmp_path, 1).fit(stage, train, val)


def test_gaussian_stage_fits_by_em_caches_latents_and_scores_anomalies_higher(tmp_path):
    ae_path = _save_autoencoder(TinyAE(), tmp_path, "ae")
    stage = RatSpnStage(str(ae_path), num_repetitions=4, num_input_distributions=5, step_size=0.05, init_batches=4, seed=3)
    assert stage.spn is None and stage.autoencoder is None  # nothing read from disk before setup()
    stage.setup("fit")
    [em_step] = stage.configure_optimizers()
    assert stage.leaf == "gaussian" and em_step.step(lambda: 7) == 7 and not em_step.state
    assert not any(p.requires_grad for p in stage.autoencoder.parameters())
    train, val = _loaders()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    trainer = _trainer(tmp_path, 3, callbacks=[checkpoint])
    calls_before = stage.autoencoder.encode_calls  # the construction probe
    trainer.fit(stage, train, val)
    # each of the 256 + 64 patches was encoded exactly once across 3 epochs
    assert stage.autoencoder.encode_calls - calls_before == 320
    # every EM update counts as a step, so best/last checkpoints by val/loss are written each epoch
    assert trainer.global_step == 3 * 8
    assert Path(checkpoint.best_model_path).is_file() and checkpoint.best_model_score is not None
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and float(metrics["val/loss"]) == pytest.approx(-float(metrics["val/log_likelihood"]))
    assert float(metrics["em/weight_distance_from_init"]) > 0 and float(metrics["em/leaf_mean_distance_from_init"]) > 0
    # standardisation buffers: statistics of the first init_batches x 32 = 128 training latents
    assert stage.latent_mean.shape == (8,) and (stage.latent_std > 0).all()
    z = stage._standardise(stage.encode(_images(256, seed=1)))
    assert float(z.mean(0).abs().max()) < 0.5 and float((z.std(0) - 1).abs().max()) < 0.5

    healthy, anomalous = _images(64, seed=9), _images(64, seed=10, anomalous=True)
    s_healthy, s_anomalous = stage.score_grid(healthy), stage.score_grid(anomalous)
    assert s_healthy.shape == (64,)
    assert float(s_anomalous.min()) > float(s_healthy.max())
    expected = -stage.spn.log_likelihood((stage.autoencoder.encode(healthy) - stage.latent_mean) / stage.latent_std)[:, 0]
    torch.testing.assert_close(s_healthy, expected.detach())

    # the checkpoint carries SPN, standardisation and autoencoder: it loads after the AE file is gone
    ckpt = Path(checkpoint.last_model_path)
    assert torch.load(ckpt, weights_only=False)["anomaly_model_class"] == "lightning_modules.rat_spn_stage.RatSpnStage"
    # a checkpoint from before the autoencoder's class was saved in it loads through the autoencoder file
    legacy = torch.load(ckpt, weights_only=False)
    del legacy["autoencoder_class"], legacy["autoencoder_hparams"]
    torch.save(legacy, tmp_path / "legacy.ckpt")
    torch.testing.assert_close(RatSpnStage.load_from_checkpoint(tmp_path / "legacy.ckpt").score_grid(healthy), s_healthy)
    ae_path.unlink()
    restored = RatSpnStage.load_from_checkpoint(ckpt)
    torch.testing.assert_close(restored.score_grid(healthy), s_healthy)
    # `lightning test --ckpt_path` path: a fresh stage whose autoencoder file is missing
    fresh = RatSpnStage(str(ae_path), num_repetitions=4, num_input_distributions=5)
    items = [{"patches": healthy[:10]}, {"patches": anomalous[:10]}]
    outputs = _trainer(tmp_path, 1).predict(fresh, DataLoader(items, batch_size=None), ckpt_path=str(ckpt))
    torch.testing.assert_close(outputs[0]["scores"], s_healthy[:10])


def test_train_log_likelihood_rises_over_epochs(tmp_path):
    ae_path = _save_autoencoder(TinyAE(seed=1), tmp_path, "ae")
    stage = RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, step_size=0.02, init_batches=2)
    train, val = _loaders(192, 32)
    history = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            history.append(float(trainer.callback_metrics["train/log_likelihood"]))

    _trainer(tmp_path, 4, callbacks=[Record()], enable_checkpointing=False).fit(stage, train, val)
    assert len(history) == 4 and history[-1] > history[0]


def test_em_batch_size_splits_loader_batches_into_the_same_em_steps(tmp_path):
    """Loader batches of 32 split into EM steps of 16 take exactly the steps of a loader of batch 16
    (same order): same parameters, and global_step counts EM steps (max_steps stops mid-batch)."""
    ae_path = _save_autoencoder(TinyAE(seed=2), tmp_path, "ae")
    images = _images(96, seed=4)
    fitted = []
    for loader_batch, em_batch, init_batches in ((32, 16, 2), (16, None, 4)):
        stage = RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, step_size=0.05,
                            init_batches=init_batches, em_batch_size=em_batch)
        trainer = _trainer(tmp_path / f"b{loader_batch}", 2, enable_checkpointing=False)
        trainer.fit(stage, DataLoader(PatchSet(images), batch_size=loader_batch))
        assert trainer.global_step == 2 * 6
        fitted.append(stage.spn.state_dict())
    for key, value in fitted[1].items():
        torch.testing.assert_close(fitted[0][key], value, rtol=0, atol=0, msg=key)

    stage = RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, init_batches=1, em_batch_size=8)
    trainer = _trainer(tmp_path / "max", 5, max_steps=7, enable_checkpointing=False)
    trainer.fit(stage, DataLoader(PatchSet(images), batch_size=32))
    assert trainer.global_step == 7
    with pytest.raises(ValueError, match="em_batch_size"):
        RatSpnStage(str(ae_path), em_batch_size=0)


def test_vq_stage_uses_categorical_leaves_over_the_codebook(tmp_path):
    ae_path = _save_autoencoder(TinyVQ(num_embeddings=6), tmp_path, "vq")
    stage = RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, step_size=0.05, init_batches=2)
    stage.setup("fit")
    assert stage.leaf == "categorical" and stage.spn.num_categories == 6 and stage.spn.num_vars == 16
    train, val = _loaders(128, 32)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 2, callbacks=[checkpoint]).fit(stage, train, val)
    healthy, anomalous = _images(32, seed=5), _images(32, seed=6, anomalous=True)
    scores = stage.score_grid(torch.cat([healthy, anomalous]))
    assert torch.isfinite(scores).all()
    assert float(scores[32:].mean()) > float(scores[:32].mean())
    codes = stage.autoencoder.encode_codes(healthy)
    torch.testing.assert_close(scores[:32], -stage.spn.log_likelihood(codes)[:, 0].detach())
    ae_path.unlink()
    restored = RatSpnStage.load_from_checkpoint(checkpoint.last_model_path)
    torch.testing.assert_close(restored.score_grid(healthy), scores[:32])


@pytest.mark.parametrize("decay_steps", [0.0, 4.0])
def test_resumed_em_fit_continues_at_the_same_step_with_the_same_parameters(tmp_path, decay_steps):
    """A fit stopped after epoch 1 and resumed from its last.ckpt ends where an uninterrupted fit ends: the EM
    steps are counted by Lightning (global_step, saved with the loop state), the circuit is restored exactly,
    and a decaying EM step continues its schedule from the restored count."""
    ae_path = _save_autoencoder(TinyAE(seed=4), tmp_path, "ae")
    loader = DataLoader(PatchSet(_images(96, seed=7)), batch_size=32)  # a fixed order: the same batches on resume

    def stage() -> RatSpnStage:
        return RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, step_size=0.05,
                           init_batches=2, em_batch_size=16, step_decay_steps=decay_steps)

    whole = stage()
    trainer = _trainer(tmp_path / "whole", 2, enable_checkpointing=False)
    trainer.fit(whole, loader)
    assert trainer.global_step == 2 * 6
    first = _trainer(tmp_path / "cut", 1, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "cut", save_last=True)])
    first.fit(stage(), loader)
    assert first.global_step == 6
    resumed = stage()
    again = _trainer(tmp_path / "cut", 2, enable_checkpointing=False)
    again.fit(resumed, loader, ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert again.global_step == trainer.global_step
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_em_steps_follow_the_decay_schedule_and_bad_settings_name_their_key(tmp_path):
    """Each EM update gets `em_step_size(step_size, EM steps so far, decay)`: constant without decay (the paper),
    shrinking with it; the epoch's last step is logged as em/step_size."""
    ae_path = _save_autoencoder(TinyAE(seed=5), tmp_path, "ae")
    loader = DataLoader(PatchSet(_images(64, seed=8)), batch_size=32)
    for decay in (0.0, 3.0):
        stage = RatSpnStage(str(ae_path), num_repetitions=3, num_input_distributions=4, step_size=0.2,
                            init_batches=1, em_batch_size=8, step_decay_steps=decay, step_decay_power=0.75)
        stage.setup("fit")
        used = []
        update = stage.spn.em_update

        def recording(x, step_size, used=used, update=update, **kw):
            used.append(step_size)
            return update(x, step_size=step_size, **kw)

        stage.spn.em_update = recording
        trainer = _trainer(tmp_path / f"d{decay}", 2, enable_checkpointing=False)
        trainer.fit(stage, loader)
        expected = [em_step_size(0.2, t, decay, 0.75) for t in range(16)]
        assert used == pytest.approx(expected, rel=1e-12)
        assert float(trainer.callback_metrics["em/step_size"]) == pytest.approx(em_step_size(0.2, 16, decay, 0.75))
    assert used[0] == pytest.approx(0.2) and used[-1] == pytest.approx(0.2 * (1 + 15 / 3) ** -0.75)
    for kwargs, key in (({"step_size": 0.0}, "step_size"), ({"step_decay_steps": -1.0}, "step_decay_steps"),
                        ({"step_decay_steps": 10.0, "step_decay_power": 0.5}, "step_decay_power")):
        with pytest.raises(ValueError, match=f"model.init_args.{key} "):
            RatSpnStage(str(ae_path), **kwargs)
