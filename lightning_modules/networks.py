"""Plain torch networks behind every model: the shared conv encoder/decoder, residual blocks, the
VQ codebook, and the f-AnoGAN generator / critic / encoder. No Lightning here (anomalib's
torch_model split), so the networks can be benchmarked and reused on their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the default patch side (px): every network takes ``patch_size`` and every model keeps it as a
#: hyper-parameter (`AnomalyDetector.patch_size`); this is the one place its default is written
PATCH_SIZE = 64
LATENT_DIM = 64
ENCODER_WIDTHS = (32, 64, 128)


def downsampled_size(patch_size: int, halvings: int, what: str) -> int:
    """``patch_size / 2**halvings``; a `ValueError` naming ``model.init_args.patch_size`` unless it divides."""
    if patch_size < 1 or patch_size % 2**halvings:
        raise ValueError(f"model.init_args.patch_size must be a positive multiple of {2**halvings} for the {what} "
                         f"({halvings} stride-2 layers), got {patch_size!r}")
    return patch_size // 2**halvings


class ConvEncoder(nn.Module):
    """Conv 32-64-128, 5 x 5 kernels, stride 2, ReLU: 1 x 64 x 64 -> widths[-1] x 8 x 8 (the paper's trunk);
    ``patch_size`` P gives widths[-1] x P/8 x P/8."""

    def __init__(self, widths: Sequence[int] = ENCODER_WIDTHS, kernel_size: int = 5, in_channels: int = 1,
                 patch_size: int = PATCH_SIZE):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, kernel_size, stride=2, padding=kernel_size // 2), nn.ReLU(inplace=True)]
            channels = width
        self.net = nn.Sequential(*layers)
        self.out_channels = channels
        self.out_size = downsampled_size(patch_size, len(widths), "conv encoder")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Transposed convs mirroring `ConvEncoder`: widths[-1] x 8 x 8 -> 1 x 64 x 64 in [0, 1] (sigmoid)."""

    def __init__(self, widths: Sequence[int] = ENCODER_WIDTHS, kernel_size: int = 5, out_channels: int = 1):
        super().__init__()
        rev = list(widths)[::-1] + [out_channels]
        layers: list[nn.Module] = []
        pad = kernel_size // 2
        for i, (c_in, c_out) in enumerate(zip(rev[:-1], rev[1:])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=2, padding=pad, output_padding=1))
            if i < len(rev) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.in_channels = rev[0]

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.net(h))


class DenseAutoencoder(nn.Module):
    """Conv trunk + linear bottleneck of ``latent_dim`` units; ``variational`` adds a log-variance head.

    Shared by the CAE (deterministic) and the beta-VAE (Gaussian posterior, reparameterised)."""

    def __init__(
        self,
        latent_dim: int = LATENT_DIM,
        widths: Sequence[int] = ENCODER_WIDTHS,
        kernel_size: int = 5,
        variational: bool = False,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        self.encoder = ConvEncoder(widths, kernel_size, patch_size=patch_size)
        self.decoder = ConvDecoder(widths, kernel_size)
        self.latent_dim = latent_dim
        self.variational = variational
        c, s = self.encoder.out_channels, self.encoder.out_size
        self._feature_shape = (c, s, s)
        self.to_latent = nn.Linear(c * s * s, latent_dim * (2 if variational else 1))
        self.from_latent = nn.Linear(latent_dim, c * s * s)
        if variational:
            # start with a narrow posterior (var ~ e^-4): early training behaves like the plain AE instead
            # of decoding prior noise, and the KL term widens it where the data allows
            with torch.no_grad():
                self.to_latent.bias[latent_dim:].fill_(-4.0)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns (mean, log-variance); log-variance is None for the deterministic AE."""
        h = self.to_latent(self.encoder(x).flatten(1))
        if self.variational:
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar.clamp(-30.0, 20.0)
        return h, None

    def decode(self, z: Tensor) -> Tensor:
        h = F.relu(self.from_latent(z)).view(z.shape[0], *self._feature_shape)
        return self.decoder(h)

    def forward(self, x: Tensor, sample: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Returns (reconstruction, mean, log-variance); ``sample`` draws z by reparameterisation."""
        mu, logvar = self.encode(x)
        z = mu
        if sample and logvar is not None:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


class ResidualBlock(nn.Module):
    """ReLU-Conv3x3-ReLU-Conv1x1 residual block keeping ``channels`` (VQ-VAE, van den Oord et al.)."""

    def __init__(self, channels: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class VectorQuantizer(nn.Module):
    """Codebook of K x D vectors: nearest-code lookup, codebook + commitment loss (eq. 2), straight-through.

    Distances are computed in fp32 even under autocast, so the argmin does not depend on precision.
    ``usage`` is an exponential moving average of how often each code is picked (for dead-code revival).

    ``ema_decay`` > 0: the codebook is not learnt by gradient but follows the encoder outputs as an
    exponential moving average of each code's assigned vectors (van den Oord et al. 2017, appendix A.1;
    online k-means), and the loss is the commitment term alone. A gradient-trained codebook moves by about
    the learning rate per step while the encoder's outputs can move much faster; the codes are then left
    behind and everything maps to a few of them (the collapse of issue 9). ``ema_count`` is the moving
    count per code; a code with (near) zero count keeps its vector."""

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = LATENT_DIM, commitment: float = 0.25, ema_decay: float = 0.0):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment = commitment
        self.ema_decay = ema_decay
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        if ema_decay > 0:
            self.embedding.weight.requires_grad_(False)
        self.register_buffer("usage", torch.ones(num_embeddings))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ema_count", torch.zeros(num_embeddings))
        self.register_load_state_dict_pre_hook(VectorQuantizer._add_missing_ema_count)

    @staticmethod
    def _add_missing_ema_count(module: VectorQuantizer, state_dict: dict, prefix: str, *args: object) -> None:
        """Checkpoints from before the EMA codebook have no ``ema_count``: start it at zero."""
        state_dict.setdefault(f"{prefix}ema_count", torch.zeros_like(module.ema_count))

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code index per position: N x D x H x W -> LongTensor N x H x W."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
            w = self.embedding.weight.float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ w.t() + w.pow(2).sum(1)[None, :]
            idx = dist.argmin(1)
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (quantised z with straight-through gradient, codebook+commitment loss per sample, codes)."""
        idx = self.codes(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            q = self.embedding(idx).permute(0, 3, 1, 2)
            commit = (zf - q.detach()).pow(2).mean(dim=(1, 2, 3))
            loss = self.commitment * commit
            if self.ema_decay == 0:  # eq. 2's codebook term (an EMA codebook is updated by ema_update instead)
                loss = loss + (q - zf.detach()).pow(2).mean(dim=(1, 2, 3))
            q_st = zf + (q - zf).detach()
        return q_st.to(z.dtype), loss, idx

    @torch.no_grad()
    def update_usage(self, idx: Tensor, decay: float = 0.99) -> Tensor:
        """Folds a batch's code counts into ``usage``; returns the batch's normalised code histogram."""
        counts = torch.bincount(idx.flatten(), minlength=self.num_embeddings).float()
        self.usage.mul_(decay).add_(counts / max(idx.numel(), 1) * self.num_embeddings, alpha=1 - decay)
        return counts / counts.sum().clamp_min(1.0)

    @torch.no_grad()
    def init_from(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent start: every code becomes a randomly picked encoder output of ``z`` (plus 1% noise),
        so training does not begin with all positions mapped to the one code nearest the origin."""
        self.usage.fill_(0.0)
        self.revive(z, threshold=1.0, generator=generator)
        self.ema_count.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def revive(self, z: Tensor, threshold: float = 0.03, generator: torch.Generator | None = None) -> int:
        """Re-seeds codes whose usage fell below ``threshold`` (x uniform) with random encoder outputs of ``z``."""
        dead = (self.usage < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator, device="cpu").to(flat.device)
        noise = torch.randn(dead.numel(), self.embedding_dim, generator=generator, device="cpu").to(flat.device)
        self.embedding.weight.data[dead] = flat[pick] + 0.01 * flat.std() * noise
        self.usage[dead] = 1.0
        self.ema_count[dead] = 0.0  # the next EMA update moves a revived code straight to what it is given
        return int(dead.numel())

    @torch.no_grad()
    def assignment_statistics(self, z: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Per code: how many encoder outputs of ``z`` it was assigned (K,) and their sum (K x D)."""
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        counts = torch.bincount(idx.flatten(), minlength=self.num_embeddings).to(flat.dtype)
        sums = flat.new_zeros(self.num_embeddings, self.embedding_dim).index_add_(0, idx.flatten(), flat)
        return counts, sums

    @torch.no_grad()
    def ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """One EMA step of the codebook from (possibly all-reduced) :meth:`assignment_statistics`:
        count' = d count + (1 - d) n, code' = (d count code + (1 - d) sum) / count'."""
        d = self.ema_decay
        weight = self.embedding.weight.data
        new_count = self.ema_count * d + counts * (1 - d)
        moving = new_count > 1e-6
        total = weight * (self.ema_count * d)[:, None] + sums * (1 - d)
        weight[moving] = total[moving] / new_count[moving][:, None]
        self.ema_count.copy_(new_count)


def perplexity(histogram: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: the effective number of codes in use."""
    p = histogram[histogram > 0]
    return torch.exp(-(p * p.log()).sum())


class LatentStandardizer(nn.Module):
    """Standardises every encoder output vector over its channels (a layer norm without affine
    parameters) before the codebook; the same in training and evaluation, nothing to synchronise.

    Why: early in training one optimiser step moves all encoder outputs together by more than their
    spread, so every position lands on the one code at the leading edge and the rest go dead (issue 9:
    perplexity 372 -> 2 within 25 steps). Per-vector standardisation takes that common drift in offset
    and scale out. (A batch norm does too in training, but its running statistics lag the encoder and
    mapped every evaluation patch to one code.) ``active`` is False for checkpoints from before it."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("active", torch.ones((), dtype=torch.bool))

    def forward(self, z: Tensor) -> Tensor:
        if not bool(self.active):
            return z
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = F.layer_norm(z.float().movedim(1, -1), z.shape[1:2], eps=self.eps).movedim(-1, 1)
        return out.to(z.dtype)


class VQAutoencoder(nn.Module):
    """VQ-VAE: conv trunk + residual blocks, 1x1 to the 64-dim embedding, 8 x 8 codebook lookup, mirrored decoder.

    ``num_residual_blocks`` (paper: 6 of 128 filters) are split evenly between encoder and decoder."""

    def __init__(
        self,
        num_embeddings: int = 512,
        embedding_dim: int = LATENT_DIM,
        widths: Sequence[int] = ENCODER_WIDTHS,
        num_residual_blocks: int = 6,
        commitment: float = 0.25,
        ema_decay: float = 0.0,
        standardize_latents: bool = False,
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        c = widths[-1]
        n_enc = (num_residual_blocks + 1) // 2
        n_dec = num_residual_blocks - n_enc
        self.encoder = nn.Sequential(
            ConvEncoder(widths, patch_size=patch_size),
            *[ResidualBlock(c) for _ in range(n_enc)],
            nn.ReLU(),
            nn.Conv2d(c, embedding_dim, 1),
        )
        self.latent_norm = LatentStandardizer()
        self.latent_norm.active.fill_(standardize_latents)
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, commitment, ema_decay)
        self.register_load_state_dict_pre_hook(VQAutoencoder._without_standardizer_if_absent)
        self.post_quant = nn.Sequential(nn.Conv2d(embedding_dim, c, 1), *[ResidualBlock(c) for _ in range(n_dec)], nn.ReLU())
        self.decoder = ConvDecoder(widths)

    @staticmethod
    def _without_standardizer_if_absent(module: VQAutoencoder, state_dict: dict, prefix: str, *args: object) -> None:
        """A checkpoint from before the latent standardisation: the model it holds had none (exactly)."""
        state_dict.setdefault(f"{prefix}latent_norm.active", torch.zeros((), dtype=torch.bool))

    def encode(self, x: Tensor) -> Tensor:
        """Pre-quantisation latents N x D x 8 x 8 (standardised when so configured)."""
        return self.latent_norm(self.encoder(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (reconstruction, vq loss per sample, code indices N x 8 x 8, pre-quantisation z)."""
        z = self.encode(x)
        q, vq_loss, idx = self.quantizer(z)
        return self.decoder(self.post_quant(q)), vq_loss, idx, z

    def encode_codes(self, x: Tensor) -> Tensor:
        """Code indices flattened row-major: LongTensor N x 64."""
        return self.quantizer.codes(self.encode(x)).flatten(1)


class Generator(nn.Module):
    """DCGAN generator z -> 1 x 64 x 64 in [0, 1]: linear to 4 x 4 x 8w, four transposed convs with BatchNorm
    (``patch_size`` P: P/16 x P/16 x 8w -> 1 x P x P)."""

    def __init__(self, latent_dim: int = 128, width: int = 64, patch_size: int = PATCH_SIZE):
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.base = downsampled_size(patch_size, 4, "f-AnoGAN generator")
        self.fc = nn.Linear(latent_dim, 8 * width * self.base * self.base)
        chans = [8 * width, 4 * width, 2 * width, width]
        layers: list[nn.Module] = [nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(self.fc(z).view(z.shape[0], 8 * self.width, self.base, self.base)))


class Critic(nn.Module):
    """WGAN-GP critic: four stride-2 convs with LeakyReLU (no BatchNorm, no dropout), then a linear score.

    ``features(x)`` is the last conv layer flattened: the f in f-AnoGAN's izi_f loss and score."""

    def __init__(self, width: int = 64, patch_size: int = PATCH_SIZE):
        super().__init__()
        base = downsampled_size(patch_size, 4, "f-AnoGAN critic")
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * width * base * base, 1)

    def features(self, x: Tensor) -> Tensor:
        return self.conv(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)).squeeze(1)


class GanEncoder(nn.Module):
    """f-AnoGAN encoder x -> z: the critic's conv layout followed by a linear map to the generator's latent."""

    def __init__(self, latent_dim: int = 128, width: int = 64, patch_size: int = PATCH_SIZE):
        super().__init__()
        critic = Critic(width, patch_size)
        self.conv = critic.conv
        self.fc = nn.Linear(critic.fc.in_features, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, alpha: Tensor | None = None) -> Tensor:
    """WGAN-GP penalty per sample: (||grad_x critic(x_hat)||_2 - 1)^2 at x_hat = alpha real + (1 - alpha) fake.

    ``alpha`` (N x 1 x 1 x 1, one mixing weight per sample) is drawn uniformly when not given."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.float().flatten(1).norm(2, dim=1) - 1.0).pow(2)
