"""Tiny seeded patch generators and training helpers shared by the model tests (holds no tests itself)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset


def healthy_patches(n: int, seed: int) -> torch.Tensor:
    """Smooth textured patches: four random low-frequency gratings around 0.4 plus blurred noise, N x 1 x 64 x 64."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    out = torch.empty(n, 1, 64, 64)
    for i in range(n):
        freq = 1 + 3 * torch.rand(4, generator=g)
        phase = 2 * math.pi * torch.rand(4, generator=g)
        angle = math.pi * torch.rand(4, generator=g)
        img = torch.full((64, 64), 0.4)
        for k in range(4):
            img += 0.05 * torch.sin(2 * math.pi * freq[k] * (xx * torch.cos(angle[k]) + yy * torch.sin(angle[k])) + phase[k])
        img += 0.05 * F.avg_pool2d(torch.randn(1, 1, 68, 68, generator=g), 5, 1)[0, 0]
        out[i, 0] = img
    return out.clamp(0, 1)


def with_blobs(x: torch.Tensor, seed: int, amplitude: float = 0.45) -> torch.Tensor:
    """The same patches with one bright Gaussian blob (radius 4-8 px) near the centre: synthetic lesions."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    out = x.clone()
    for i in range(len(x)):
        cy, cx = (20 + 24 * torch.rand(2, generator=g)).tolist()
        r = 4 + 4 * float(torch.rand(1, generator=g))
        out[i, 0] += amplitude * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return out.clamp(0, 1)


class PatchDataset(Dataset):
    """In-memory patches served as the data contract's training batch dicts."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {
            "patches": self.x[i],
            "index": torch.tensor(i),
            "centers": torch.tensor([i, i]),
            "patient_id": f"p{i % 7}",
            "label": torch.tensor(0),
        }


def loader(x: torch.Tensor, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(PatchDataset(x), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    """A quiet single-process CPU trainer."""
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return pl.Trainer(**opts)


def auc(healthy_scores: torch.Tensor, lesion_scores: torch.Tensor) -> float:
    y = [0] * len(healthy_scores) + [1] * len(lesion_scores)
    return float(roc_auc_score(y, torch.cat([healthy_scores, lesion_scores]).numpy()))
