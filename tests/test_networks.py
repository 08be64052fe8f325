"""Plain-torch networks: shapes, the VQ codebook maths, the per-sample WGAN-GP penalty by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.beta_vae import gaussian_kl
from lightning_modules.networks import (
    ConvDecoder,
    ConvEncoder,
    Critic,
    DenseAutoencoder,
    GanEncoder,
    Generator,
    ResidualBlock,
    VectorQuantizer,
    VQAutoencoder,
    gradient_penalty,
    perplexity,
)


def test_encoder_decoder_shapes_and_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 1, 64, 64)
    enc, dec = ConvEncoder(), ConvDecoder()
    h = enc(x)
    assert h.shape == (3, 128, 8, 8)
    convs = [m for m in enc.net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    y = dec(h).detach()
    assert y.shape == (3, 1, 64, 64)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert [m.out_channels for m in dec.net if isinstance(m, nn.ConvTranspose2d)] == [64, 32, 1]


def test_dense_autoencoder_latent_and_reparameterisation() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 64, 64)
    ae = DenseAutoencoder(variational=False)
    recon, mu, logvar = ae(x)
    assert recon.shape == x.shape and mu.shape == (5, 64) and logvar is None
    vae = DenseAutoencoder(variational=True)
    r0, mu, logvar = vae(x, sample=False)
    assert mu.shape == logvar.shape == (5, 64)
    # the mean path is deterministic; sampling changes the reconstruction
    assert torch.equal(r0, vae(x, sample=False)[0])
    assert not torch.equal(r0, vae(x, sample=True)[0])


def test_gaussian_kl_matches_closed_form_and_torch_distributions() -> None:
    mu = torch.tensor([[0.0, 1.0], [0.5, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    # hand: 0.5 * (mu^2 + var - 1 - log var) summed
    hand = torch.tensor(
        [0.5 * (0 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4.0)), 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) + 0.5 * 4.0]
    )
    assert torch.allclose(gaussian_kl(mu, logvar), hand, atol=1e-6)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1), atol=1e-6)


def test_vector_quantizer_nearest_code_loss_and_straight_through() -> None:
    vq = VectorQuantizer(num_embeddings=3, embedding_dim=2, commitment=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    # N=1, D=2, H=1, W=3 positions: (0.9, 0.1) -> code 1, (0.1, 1.6) -> code 2, (0.2, -0.1) -> code 0
    z = torch.tensor([[[[0.9, 0.1, 0.2]], [[0.1, 1.6, -0.1]]]], requires_grad=True)
    q, loss, idx = vq(z)
    assert idx.tolist() == [[[1, 2, 0]]]
    expected_q = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]]])
    assert torch.allclose(q, expected_q)
    sq = ((z.detach() - expected_q) ** 2).mean()
    assert torch.allclose(loss, (1 + 0.25) * sq.unsqueeze(0), atol=1e-6)
    # straight-through: d(sum q)/dz = 1 everywhere
    (q.sum()).backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_vector_quantizer_usage_and_revival_are_seeded() -> None:
    vq = VectorQuantizer(num_embeddings=8, embedding_dim=4)
    idx = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    hist = vq.update_usage(idx, decay=0.0)
    assert torch.allclose(hist[:3], torch.tensor([0.25, 0.5, 0.25])) and float(hist[3:].sum()) == 0.0
    assert torch.allclose(vq.usage[:3], torch.tensor([2.0, 4.0, 2.0]))
    assert float(perplexity(hist)) == pytest.approx(math.exp(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))))
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    before = vq.embedding.weight.detach().clone()
    revived = vq.revive(z, threshold=0.03, generator=torch.Generator().manual_seed(5))
    assert revived == 5
    assert torch.equal(vq.embedding.weight[:3], before[:3])
    # every revived code sits near one of the encoder outputs
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(vq.embedding.weight[3:].detach(), flat).min(1).values
    assert float(d.max()) < 0.1
    assert torch.all(vq.usage[3:] == 1.0)
    vq2 = VectorQuantizer(num_embeddings=8, embedding_dim=4)
    vq2.embedding.weight.data.copy_(before)
    vq2.update_usage(idx, decay=0.0)
    vq2.revive(z, threshold=0.03, generator=torch.Generator().manual_seed(5))
    assert torch.equal(vq2.embedding.weight, vq.embedding.weight)


def test_vq_autoencoder_shapes_and_codes_range() -> None:
    torch.manual_seed(0)
    net = VQAutoencoder(num_embeddings=16, num_residual_blocks=6)
    assert sum(isinstance(m, ResidualBlock) for m in net.modules()) == 6
    x = torch.rand(2, 1, 64, 64)
    recon, vq_loss, idx, z = net(x)
    assert recon.shape == x.shape and vq_loss.shape == (2,) and idx.shape == (2, 8, 8) and z.shape == (2, 64, 8, 8)
    codes = net.encode_codes(x)
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert torch.equal(codes, idx.flatten(1))


def test_gan_networks_shapes_and_width() -> None:
    torch.manual_seed(0)
    g, c, e = Generator(latent_dim=16, width=8), Critic(width=8), GanEncoder(latent_dim=16, width=8)
    x = g(torch.randn(3, 16)).detach()
    assert x.shape == (3, 1, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert c(x).shape == (3,) and c.features(x).shape == (3, 8 * 8 * 16)
    assert e(x).shape == (3, 16)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.LayerNorm)) for m in c.modules())


class _QuadraticCritic(nn.Module):
    """critic(x) = 0.5 * c * ||x||^2 per sample, so grad = c * x and the penalty is known by hand."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.c * x.flatten(1).pow(2).sum(1)


def test_gradient_penalty_per_sample_matches_hand_calculation() -> None:
    real = torch.zeros(2, 1, 2, 2)
    real[0, 0, 0, 0] = 1.0
    real[1] = 1.0
    fake = torch.zeros(2, 1, 2, 2)
    alpha = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    gp = gradient_penalty(_QuadraticCritic(2.0), real, fake, alpha)
    # grad = c * x_hat. x_hat0 = 0.5 at one pixel: norm = 2 * 0.5 = 1 -> (1 - 1)^2 = 0;
    # x_hat1 = 0.25 at four pixels: norm = 2 * sqrt(4 * 0.0625) = 1 -> 0
    assert gp.shape == (2,)
    assert torch.allclose(gp, torch.tensor([0.0, 0.0]), atol=1e-6)
    gp3 = gradient_penalty(_QuadraticCritic(3.0), real, fake, alpha)
    # norms: 3 * 0.5 = 1.5 and 3 * sqrt(4 * 0.0625) = 1.5 -> 0.25 each; a batch-wide norm would give
    # (3 * sqrt(0.25 + 0.25) - 1)^2 = 1.257..., so this pins the per-sample definition
    assert torch.allclose(gp3, torch.tensor([0.25, 0.25]), atol=1e-6)
    real[1] = 2.0
    gp4 = gradient_penalty(_QuadraticCritic(3.0), real, fake, alpha)
    # second sample: x_hat = 0.5 at four pixels -> norm = 3 * sqrt(4 * 0.25) = 3 -> (3 - 1)^2 = 4
    assert torch.allclose(gp4, torch.tensor([0.25, 4.0]), atol=1e-6)


def test_gradient_penalty_of_real_critic_is_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    critic = Critic(width=4)
    real, fake = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    alpha = torch.rand(3, 1, 1, 1)
    together = gradient_penalty(critic, real, fake, alpha)
    alone = torch.cat([gradient_penalty(critic, real[i : i + 1], fake[i : i + 1], alpha[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert together.requires_grad  # the penalty is differentiable w.r.t. the critic (create_graph)
    together.sum().backward()
    assert critic.fc.weight.grad is not None and float(critic.fc.weight.grad.abs().sum()) > 0


def test_networks_take_their_patch_size_and_refuse_one_they_cannot() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    dense = DenseAutoencoder(patch_size=32)
    assert dense.encoder.out_size == 4 and dense(x)[0].shape == x.shape
    assert VQAutoencoder(num_embeddings=8, num_residual_blocks=0, patch_size=32).encode_codes(x).shape == (2, 16)
    assert Generator(latent_dim=8, width=4, patch_size=32)(torch.randn(2, 8)).shape == x.shape
    assert Critic(width=4, patch_size=32)(x).shape == (2,)
    assert GanEncoder(latent_dim=8, width=4, patch_size=32)(x).shape == (2, 8)
    with pytest.raises(ValueError, match=r"model.init_args.patch_size must be a positive multiple of 8 .* got 60"):
        ConvEncoder(patch_size=60)
    with pytest.raises(ValueError, match=r"multiple of 16 for the f-AnoGAN critic .* got 40"):
        Critic(patch_size=40)


@pytest.mark.parametrize("name", ["CAE", "BetaVAE", "VQVAE", "FAnoGAN", "IntensityBaseline"])
def test_score_patches_checks_the_models_own_patch_size(name: str) -> None:
    import lightning_modules

    small = {"FAnoGAN": {"width": 4, "latent_dim": 8}, "VQVAE": {"num_embeddings": 8}}.get(name, {})
    model = getattr(lightning_modules, name)(patch_size=32, **small)
    assert model.patch_size == 32 and model.hparams.patch_size == 32
    assert model.score_patches(torch.rand(3, 1, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match=rf"^{name} scores patches of N x 1 x 32 x 32 \(its patch_size\), got "
                                         r"\(3, 1, 64, 64\); set data.init_args.patch_size"):
        model.score_patches(torch.rand(3, 1, 64, 64))
    assert getattr(lightning_modules, name)(**small).patch_size == 64  # the default, also of older checkpoints
