"""W&B plus a local CSV log for every run, working with and without a W&B account or network.

Mode: ``WANDB_MODE`` when set (``online`` / ``offline`` / ``disabled``); otherwise ``online`` when an
API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host), else ``offline``.
Offline runs land in ``<run folder>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

_MODES = ("online", "offline", "disabled")


def _has_wandb_credentials() -> bool:
    """True when W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """The W&B mode a run will use: ``WANDB_MODE`` if valid, else online with credentials, offline without."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "dryrun":
        return "offline"
    if mode in _MODES:
        return mode
    if mode:
        raise ValueError(f"WANDB_MODE={mode!r} is not one of {_MODES}; unset it or pick one of those")
    return "online" if _has_wandb_credentials() else "offline"


#: File in the run folder holding the W&B id of the fit, so a resumed fit continues that W&B run.
FIT_RUN_ID_FILE = "wandb_fit_run_id"


class _DropTips(logging.Filter):
    """Drops Lightning's advertisement lines ("💡 Tip: ... install litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_irrelevant_messages() -> None:
    """Silences what every command printed that says nothing about the run and is not ours to fix:
    Lightning's litlogger / litmodels tips; its own use of a torch pytree API that torch deprecates; and,
    on machines with more than two cores, its hint that a loader with ``num_workers < 2`` may be a
    bottleneck: this project's loaders read a memory-mapped patch cache, fastest in the main process,
    so the data configs choose 0 on purpose (configs/data/*.yaml)."""
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in target.filters):
            target.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*is deprecated.*")
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers which may be a bottleneck",
                            category=PossibleUserWarning)


def stage_name(subcommand: str | None, test_set: str | None = None, stage: str | None = None) -> str:
    """The stage a run's W&B name ends with: ``fit``, ``test-mass``, ``predict`` (or the configured ``stage``)."""
    if stage:
        return stage
    if subcommand == "test" and test_set:
        return f"test-{test_set}"
    return subcommand or "fit"


def stage_run_name(name: str, stage: str) -> str:
    """``<model>-<data>-s<seed>-<stage>``: the W&B name says which stage a run is (no suffix twice)."""
    return name if name.endswith(f"-{stage}") else f"{name}-{stage}"


def fit_run_id(run_dir: Path, resume: bool) -> tuple[str, str | None]:
    """The W&B id of a fit and its resume mode: the saved id when resuming (``allow``), else a new one, saved."""
    path = Path(run_dir) / FIT_RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip(), "allow"
    import secrets

    from datamodules.fileio import atomic_write

    run_id = secrets.token_hex(4)  # W&B ids: up to 64 characters of [a-z0-9]

    atomic_write(path, run_id + "\n")
    return run_id, None


def build_loggers(
    run_dir: str | Path,
    name: str,
    project: str = "mammospn",
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
) -> list[Logger]:
    """CSV logger (``<run_dir>/logs/version_N/metrics.csv``) plus, unless disabled, a W&B logger in ``run_dir``.

    The W&B run is called ``<name>-<job_type>`` (`stage_run_name`). A fit saves its W&B id in the run folder;
    a fit that resumes from a checkpoint (``resume``) continues that W&B run instead of starting another.
    W&B never uploads checkpoints (``log_model=False``): offline mode forbids it and checkpoints stay local.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs")]
    mode = wandb_mode()
    if mode == "disabled":
        return loggers
    from pytorch_lightning.loggers import WandbLogger

    # unique-ish tags, W&B limits each to 64 characters
    clean_tags = list(dict.fromkeys(str(t)[:64] for t in (tags or []) if t))

    stage = job_type or "fit"
    ids: dict[str, Any] = {}
    if stage == "fit" or stage.startswith("fit"):
        ids["id"], resume_mode = fit_run_id(run_dir, resume)
        if resume_mode:
            ids["resume"] = resume_mode

    def make(offline: bool) -> WandbLogger:
        logger = WandbLogger(
            name=stage_run_name(name, stage),
            **ids,
            save_dir=str(run_dir),
            project=project,
            group=group,
            job_type=job_type,
            tags=clean_tags,
            offline=offline,
            log_model=False,
            config=config or {},
            settings=_wandb_settings(),
        )
        # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run
        if logger._wandb_init.get("anonymous", "unset") is None:
            logger._wandb_init.pop("anonymous")
        return logger

    wandb_logger = make(mode == "offline")
    if mode == "online":
        try:
            wandb_logger.experiment  # noqa: B018 - start the run now, so a dead network shows here
        except Exception as err:  # noqa: BLE001 - any failure to reach W&B: keep the run, log offline
            warnings.warn(f"W&B online run failed ({err}); logging offline to {run_dir}/wandb instead "
                          "(upload later with `wandb sync`)", stacklevel=2)
            finish_wandb(exit_code=1)
            wandb_logger = make(True)
    return [wandb_logger, *loggers]


def _wandb_settings() -> Any:
    """Quiet, network-tolerant W&B settings (no console capture, which fights with progress bars)."""
    import wandb

    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", "30"))
    return wandb.Settings(console="off", silent=True, init_timeout=timeout)


def finish_wandb(exit_code: int = 0) -> None:
    """Closes the active W&B run and flushes it to disk, so the next in-process run starts its own.

    ``wandb.finish`` returns before the W&B service has written an offline run; ``teardown`` waits for it.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    offline_dir = None
    if wandb.run is not None:
        if getattr(wandb.run.settings, "_offline", False) or wandb_mode() == "offline":
            offline_dir = Path(wandb.run.dir).parent.resolve()
        wandb.finish(exit_code=exit_code)
    wandb.teardown()
    if offline_dir is not None:
        print(sync_hint(offline_dir), file=sys.stderr, flush=True)


def sync_hint(offline_dir: str | Path) -> str:
    """Where an offline W&B run lies and the command that uploads it."""
    return f"W&B offline run: {offline_dir}; upload it with: wandb sync {offline_dir}"


def wandb_logger(trainer: Any) -> Any | None:
    """The trainer's WandbLogger, or None when W&B is disabled for the run."""
    from pytorch_lightning.loggers import WandbLogger

    return next((lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)), None)


def same_size(images: list[np.ndarray], fill: int = 0) -> list[np.ndarray]:
    """``images`` (H x W x C uint8) padded at the bottom and right with ``fill`` to the largest height and width.

    W&B shows a list of images as one strip and expects one size (it warns "Images sizes do not match"
    and lays them out wrongly otherwise); padding keeps every image at its own scale, unlike resizing.
    """
    if not images:
        return []
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    out = []
    for image in images:
        pad = [(0, height - image.shape[0]), (0, width - image.shape[1])] + [(0, 0)] * (image.ndim - 2)
        out.append(np.pad(image, pad, constant_values=fill) if any(p[1] for p in pad) else image)
    return out


def _read_rgb(path: Path) -> np.ndarray:
    """A PNG written by this project as an RGB uint8 array (OpenCV reads BGR)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def log_predictions(trainer: Any, rows: list[dict[str, Any]], overlays: list[tuple[str, Path]]) -> bool:
    """`lightning predict` to W&B: a ``predict/predictions`` table (every predictions.csv column, plus the
    overlay as an image column for the first ``len(overlays)`` images) and the overlays as media.

    Logs nothing (returns False) when the run has no W&B logger.
    """
    logger = wandb_logger(trainer)
    if logger is None or not rows:
        return False
    import wandb

    # overlays of differently shaped scans differ in size: one canvas (white, the figures' background)
    pixels = same_size([_read_rgb(path) for _, path in overlays], fill=255)
    images = {image_id: wandb.Image(rgb, caption=image_id) for (image_id, _), rgb in zip(overlays, pixels)}
    columns = [*rows[0].keys(), "overlay_image"]
    table = wandb.Table(columns=columns)
    for row in rows:
        table.add_data(*[row[c] if not isinstance(row[c], float) or row[c] == row[c] else None
                         for c in rows[0]], images.get(row["image_id"]))
    media = list(images.values())
    logger.experiment.log({"predict/predictions": table, "predict/overlays": media})
    return True


def log_table1(out_dir: str | Path, group: str, figures: list[Path] | None = None, project: str = "mammospn",
               csv_name: str = "table1.csv") -> Path | None:
    """`mammospn table1` to W&B: one ``<group>-table1`` run in the reproduction's group with ``table1``
    (a wandb.Table of every column of table1.csv, Wilcoxon p-values included) and the figures as images.

    Returns the offline run folder (None when online, or when W&B is disabled: then nothing is logged).
    """
    import csv

    mode = wandb_mode()
    out_dir = Path(out_dir)
    csv_path = out_dir / csv_name
    if mode == "disabled" or not csv_path.is_file():
        return None
    import wandb

    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = [[_cell(row[c]) for c in columns] for row in reader]
    run = wandb.init(project=project, group=group, job_type="table1", name=f"{group}-table1", dir=str(out_dir),
                     mode=mode, settings=_wandb_settings(), reinit="finish_previous")
    try:
        payload: dict[str, Any] = {"table1": wandb.Table(columns=columns, data=rows)}
        for path in figures or []:
            if Path(path).suffix.lower() == ".png" and Path(path).is_file():
                payload[f"figures/{Path(path).stem}"] = wandb.Image(str(path), caption=Path(path).stem)
        run.log(payload)
        offline = Path(run.dir).parent.resolve() if mode == "offline" else None
    finally:
        finish_wandb()
    return offline


def _cell(text: str) -> Any:
    """A table1.csv cell as a number when it is one (empty = None), else the text."""
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


class PlainProgress(ProgressBar):
    """Progress as plain lines every ``every_s`` seconds (and at each epoch's end), for logs and pipes:
    a tqdm bar written to a file is one long line of carriage returns. Used when stdout is not a terminal."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = float(every_s)
        self._enabled = True
        self._last = -math.inf

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _line(self, trainer: Any, pl_module: Any, stage: str, done: int, total: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or not trainer.is_global_zero or (not force and now - self._last < self.every_s):
            return
        self._last = now
        of = f"/{int(total)}" if isinstance(total, int | float) and math.isfinite(total) else ""
        epoch = f" epoch {trainer.current_epoch + 1}/{trainer.max_epochs}" if stage in ("train", "val") else ""
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if "loss" in k and getattr(v, "numel", lambda: 1)() == 1}
        values = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
        print(f"{stage}{epoch}: batch {done}{of}" + (f", {values}" if values else ""), flush=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._train_done = batch_idx + 1
        self._line(trainer, pl_module, "train", batch_idx + 1, self.total_train_batches)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._line(trainer, pl_module, "train", getattr(self, "_train_done", 0), self.total_train_batches,
                   force=True)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._line(trainer, pl_module, "val", batch_idx + 1, _total(trainer.num_val_batches, dataloader_idx))

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._line(trainer, pl_module, "test", batch_idx + 1, _total(trainer.num_test_batches, dataloader_idx))

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._line(trainer, pl_module, "predict", batch_idx + 1, _total(trainer.num_predict_batches, dataloader_idx))


def _total(counts: Any, index: int) -> Any:
    """The batch count of one dataloader (inf when unknown)."""
    try:
        return counts[index]
    except (IndexError, TypeError):
        return math.inf


def progress_callback(trainer_cfg: Any, callbacks: list[Any], stream: Any = None) -> Any | None:
    """`PlainProgress` when progress is on, none is configured and ``stream`` (stdout) is not a terminal."""
    stream = stream if stream is not None else sys.stdout
    if (trainer_cfg.get("enable_progress_bar", True) is False or any(isinstance(c, ProgressBar) for c in callbacks)
            or (hasattr(stream, "isatty") and stream.isatty())):
        return None
    return PlainProgress()
