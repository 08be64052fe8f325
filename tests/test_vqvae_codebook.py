"""The VQ-VAE codebook stays in use through early training (issue 9: the quick fit collapsed to a
perplexity of ~2 within 25 steps), and the old gradient-trained setting shows the collapse this guards."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_models_helpers import healthy_patches, loader, trainer

from lightning_modules import VQVAE
from lightning_modules.networks import VectorQuantizer

STEPS = 30


class PerplexityTrace(pl.Callback):
    """``train/perplexity`` after every training step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self.values.append(float(trainer.callback_metrics["train/perplexity"]))


def _trace(**kwargs) -> tuple[list[float], VQVAE]:
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = VQVAE(lr=3e-4, **kwargs)  # the quick profile's learning rate, K = 512
    trace = PerplexityTrace()
    trainer(STEPS, callbacks=[trace], max_epochs=-1).fit(model, loader(healthy_patches(128, seed=0), batch_size=32))
    return trace.values, model


@pytest.fixture(scope="module")
def traces() -> dict[str, tuple[list[float], VQVAE]]:
    return {
        "default": _trace(),
        "old": _trace(codebook_ema_decay=0.0, revive_every=100, usage_decay=0.99, standardize_latents=False),  # before
    }


def test_default_codebook_does_not_collapse_in_early_training(traces) -> None:
    values, model = traces["default"]
    assert len(values) == STEPS
    assert min(values[10:]) > 50.0, values  # of 512 codes; 32 x 64 positions per batch
    assert values[-1] > 100.0, values
    assert not model.net.quantizer.embedding.weight.requires_grad  # EMA codebook: no gradient, no optimiser


def test_old_gradient_codebook_collapses_so_the_check_has_teeth(traces) -> None:
    values, _ = traces["old"]
    assert min(values[10:]) < 10.0, values


def test_ema_update_moves_assigned_codes_to_their_mean_and_keeps_unassigned_ones() -> None:
    vq = VectorQuantizer(num_embeddings=3, embedding_dim=2, ema_decay=0.5)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]))
    z = torch.tensor([[[[0.2, 0.4, 1.2]], [[0.0, 0.2, 0.0]]]])  # N=1, D=2, 1 x 3 positions: codes 0, 0, 1
    _, loss, idx = vq(z)
    assert idx.tolist() == [[[0, 0, 1]]]
    counts, sums = vq.assignment_statistics(z, idx)
    vq.ema_update(counts, sums)  # ema_count 0: a plain k-means step
    torch.testing.assert_close(vq.embedding.weight, torch.tensor([[0.3, 0.1], [1.2, 0.0], [0.0, 5.0]]))
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.0, 0.5, 0.0]))
    vq.ema_update(torch.tensor([2.0, 0.0, 0.0]), torch.tensor([[1.3, 0.1], [0.0, 0.0], [0.0, 0.0]]))
    # code 0: (0.5 * 1.0 * (0.3, 0.1) + 0.5 * (1.3, 0.1)) / (0.5 * 1.0 + 0.5 * 2.0); codes 1, 2 unassigned: unchanged
    torch.testing.assert_close(vq.embedding.weight, torch.tensor([[0.8 / 1.5, 0.1 / 1.5], [1.2, 0.0], [0.0, 5.0]]))
    # the loss is the commitment term alone (the codebook does not learn by gradient)
    q = torch.tensor([[[[0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]]])
    torch.testing.assert_close(loss, 0.25 * (z - q).pow(2).mean().reshape(1))


def test_checkpoint_from_before_the_ema_codebook_and_standardisation_loads_as_the_same_model() -> None:
    torch.manual_seed(0)
    old = VQVAE(num_embeddings=16, standardize_latents=False, codebook_ema_decay=0.0)
    state = old.state_dict()
    del state["net.quantizer.ema_count"]  # what a checkpoint from before issue 9's fix holds
    del state["net.latent_norm.active"]
    assert not any("latent_norm" in key for key in state)
    model = VQVAE(num_embeddings=16)
    model.load_state_dict(state)
    assert torch.equal(model.net.quantizer.ema_count, torch.zeros(16))
    x = healthy_patches(8, seed=3)
    assert torch.equal(model.encode_codes(x), old.encode_codes(x))  # no standardisation: exactly the old model


def test_latent_standardizer_standardises_each_vector_the_same_in_training_and_eval() -> None:
    from lightning_modules.networks import LatentStandardizer

    norm = LatentStandardizer()
    z = 5.0 + 2.0 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    out = norm(z)
    torch.testing.assert_close(out.mean(1), torch.zeros(4, 5, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(4, 5, 5), atol=1e-3, rtol=0)
    expected = (z - z.mean(1, keepdim=True)) / (z.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norm.eval()(z), expected)
    norm.active.fill_(False)
    assert torch.equal(norm(z), z)
