"""Checkpoints that mean what they say: ``last.ckpt`` = end of the latest epoch, ``best.ckpt`` = best ``val/loss``,
written atomically, carrying every RNG state so a killed run resumes bit-identically, and checked before use.

- `checkpoint_callbacks`: two ModelCheckpoints. Lightning 2.6's ``save_last=True`` beside ``save_top_k=1`` only
  rewrites ``last.ckpt`` when the monitored value improves, so "last" is a separate, unmonitored callback.
- `AtomicCheckpointIO`: checkpoints go through `datamodules.fileio.atomic_write`; a kill mid-save leaves
  the previous file, never a truncated one.
- `RngStateCallback`: torch / CUDA / numpy / random states in the checkpoint, put back when the resumed
  run's first epoch starts (after the sanity check, which draws from them too).
- `resolve_ckpt_path`, `load_checkpoint`, `checkpoint_info`: ``last`` / ``best`` -> the run folder's file or
  one line; a damaged file -> one line naming it; what ``metrics.json`` records about the weights it scored.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from datamodules.fileio import atomic_write, file_sha256

#: the names `--ckpt_path` accepts besides a file: the run folder's checkpoints
CHECKPOINT_ALIASES = ("last", "best")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, truncated, empty, not a checkpoint); names the file."""


def checkpoint_callbacks(dirpath: str | Path, monitor: str = "val/loss", mode: str = "min") -> list[ModelCheckpoint]:
    """``best.ckpt`` (top-1 by ``monitor``) and ``last.ckpt`` (rewritten at the end of every epoch) in ``dirpath``."""
    common = {"dirpath": str(dirpath), "enable_version_counter": False, "auto_insert_metric_name": False,
              "save_last": False}
    best = ModelCheckpoint(filename="best", monitor=monitor, mode=mode, save_top_k=1, **common)
    last = ModelCheckpoint(filename="last", monitor=None, save_top_k=1, every_n_epochs=1, **common)
    return [best, last]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints written to a temporary name, fsync'ed and renamed (Lightning's own writes in place)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(Path(path), buffer.getvalue())


def rng_states() -> dict[str, Any]:
    """Every global random state a training step may draw from, as tensors, ints and tuples only (what
    Lightning's ``weights_only`` checkpoint loading accepts)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Puts back what `rng_states` took."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RngStateCallback(Callback):
    """Saves the global RNG states in every checkpoint and restores them when a resumed fit starts its first epoch.

    Restoring at load time would be too early: the resumed run's sanity check and validation loader draw
    from the same generators before training goes on, which the uninterrupted run did not do at that point.
    """

    KEY = "rng_states"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = rng_states()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.KEY)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (CPU, memory-mapped); `CheckpointError` naming the file if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; give an existing .ckpt file, or 'last' / 'best' "
                              f"of a run folder after `lightning fit`")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); delete it and train again or use another")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling / zip error means the same to a user
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint (truncated?): "
                              f"{type(err).__name__}: {detail[:160]}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return state


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path, subcommand: str | None) -> str | None:
    """``last`` / ``best`` -> ``<run_dir>/checkpoints/<name>.ckpt``; any file is checked with `load_checkpoint`.

    ``fit --ckpt_path last`` before the first checkpoint starts from scratch (set-and-forget resume); every
    other missing or damaged checkpoint raises `CheckpointError`, so a test never scores untrained weights.
    """
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if str(ckpt_path) in CHECKPOINT_ALIASES:
        path = Path(run_dir) / "checkpoints" / f"{ckpt_path}.ckpt"
        if not path.exists():
            if subcommand in (None, "fit") and ckpt_path == "last":
                return None
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no {path} (run `lightning fit` with the same config "
                                  f"and run.name first, or give a .ckpt file)")
    load_checkpoint(path)
    return str(path)


def checkpoint_info(path: str | Path | None) -> dict[str, Any] | None:
    """What a result records about the weights that produced it: path, epoch, global step, SHA-256; None if none."""
    if not path:
        return None
    state = load_checkpoint(path)
    return {"path": str(Path(path).resolve()), "epoch": state.get("epoch"), "global_step": state.get("global_step"),
            "sha256": file_sha256(path)}
