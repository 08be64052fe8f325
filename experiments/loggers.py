"""W&B plus a local CSV log for every run, working with and without a W&B account or network.

Mode: ``WANDB_MODE`` when set (``online`` / ``offline`` / ``disabled``); otherwise ``online`` when an
API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host), else ``offline``.
Offline runs land in ``<run folder>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


def build_loggers(
    run_dir: str | Path,
    name: str,
    project: str = "mammospn",
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> list[Logger]:
    """CSV logger (``<run_dir>/logs/version_N/metrics.csv``) plus, unless disabled, a W&B logger in ``run_dir``.

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

    def make(offline: bool) -> WandbLogger:
        return WandbLogger(
            name=name,
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
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
    wandb.teardown()


def wandb_logger(trainer: Any) -> Any | None:
    """The trainer's WandbLogger, or None when W&B is disabled for the run."""
    from pytorch_lightning.loggers import WandbLogger

    return next((lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)), None)


def log_predictions(trainer: Any, rows: list[dict[str, Any]], overlays: list[tuple[str, Path]]) -> bool:
    """`lightning predict` to W&B: a ``predict/predictions`` table (every predictions.csv column, plus the
    overlay as an image column for the first ``len(overlays)`` images) and the overlays as media.

    Logs nothing (returns False) when the run has no W&B logger.
    """
    logger = wandb_logger(trainer)
    if logger is None or not rows:
        return False
    import wandb

    images = {image_id: wandb.Image(str(path), caption=image_id) for image_id, path in overlays}
    columns = [*rows[0].keys(), "overlay_image"]
    table = wandb.Table(columns=columns)
    for row in rows:
        table.add_data(*[row[c] if not isinstance(row[c], float) or row[c] == row[c] else None
                         for c in rows[0]], images.get(row["image_id"]))
    logger.experiment.log({"predict/predictions": table, "predict/overlays": list(images.values())})
    return True
