"""EM under Lightning DDP (2 CPU processes, gloo): statistics are summed over ranks before every update."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from spn import RatSpn

BATCH = 8  # per rank
STEPS = 3


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2 * BATCH * STEPS, 6, generator=gen) * 2 + 1


def _codes(x: torch.Tensor) -> torch.Tensor:
    return (x + 3).long().clamp(0, 6)


def _models() -> tuple[RatSpn, RatSpn]:
    x = _data()
    gaussian = RatSpn(6, 1, 2, 3, seed=0)
    gaussian.init_from_data(x)
    categorical = RatSpn(6, 1, 2, 3, leaf="categorical", num_categories=7, seed=0)
    categorical.init_from_data(_codes(x))
    return gaussian, categorical


class Rows(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class EmModule(pl.LightningModule):
    """Two RAT-SPNs fitted by EM with manual optimisation; each rank saves its final parameters."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.automatic_optimization = False
        self.gaussian, self.categorical = _models()
        self.out_dir = out_dir
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        torch.set_num_threads(1)
        self.seen.append(batch.clone())
        self.gaussian.em_update(batch, step_size=0.3)
        self.categorical.em_update(_codes(batch), step_size=0.3)

    def configure_optimizers(self):
        return None

    def on_train_end(self) -> None:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state["seen"] = torch.stack(self.seen)
        torch.save(state, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def _single_process(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    gaussian, categorical = _models()
    for batch in batches:
        gaussian.em_update(batch, step_size=0.3)
        categorical.em_update(_codes(batch), step_size=0.3)
    state = {f"gaussian.{k}": v for k, v in gaussian.state_dict().items()}
    state.update({f"categorical.{k}": v for k, v in categorical.state_dict().items()})
    return state


@pytest.mark.slow  # two spawned processes: ~20 s on an idle 2-core machine
def test_em_statistics_are_summed_across_ddp_ranks(tmp_path):
    x = _data()
    trainer = pl.Trainer(
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo", broadcast_buffers=False),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(EmModule(str(tmp_path)), DataLoader(Rows(x), batch_size=BATCH, shuffle=False))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    seen0, seen1 = rank0.pop("seen"), rank1.pop("seen")
    assert seen0.shape == seen1.shape == (STEPS, BATCH, 6)
    # the two ranks saw disjoint halves of the data
    assert torch.equal(torch.cat([seen0, seen1]).reshape(-1, 6).sort(0).values, x.sort(0).values)
    union = _single_process([torch.cat([a, b]) for a, b in zip(seen0, seen1)])
    alone = _single_process(list(seen0))
    assert set(rank0) == set(union)
    for key in union:
        assert torch.equal(rank0[key], rank1[key]), key  # replicas never drift apart
        torch.testing.assert_close(rank0[key], union[key], atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # and the check has teeth: rank 0's own batches alone give different parameters
    assert not torch.allclose(rank0["gaussian.leaves.mean"], alone["gaussian.leaves.mean"], atol=1e-4)
    assert not torch.allclose(rank0["categorical.leaves.table"], alone["categorical.leaves.table"], atol=1e-4)
