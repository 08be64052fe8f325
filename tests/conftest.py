"""Shared test fixtures: where the real data lives, and small CPU settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped, with the reason, where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """Closes a W&B run a test left open (a `WandbLogger` it built itself): wandb keeps one run per process, and
    the next test in the same worker would otherwise log into it instead of its own (a flaky, order-dependent
    failure under xdist)."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        from experiments.loggers import finish_wandb

        finish_wandb()

