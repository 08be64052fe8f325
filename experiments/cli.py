"""The `lightning` command: a LightningCLI over every model and data module of the project.

`lightning fit|validate|test|predict --config configs/<model>.yaml [--config profile.yaml] [--a.b c]`.
Each run lives in one folder ``<run.root>/<run.name>/`` (resolved ``config.yaml``, ``checkpoints/``
with ``last.ckpt`` and ``best.ckpt`` by ``val/loss``, CSV logs, offline W&B runs); evaluation outputs
go to ``<run.results_dir>/<run.name>/``. See docs/cli.md.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules.fileio import atomic_write
from datamodules.records import DataError
from experiments.checkpoints import (
    CHECKPOINT_ALIASES,
    AtomicCheckpointIO,
    CheckpointError,
    RngStateCallback,
    checkpoint_callbacks,
    load_checkpoint,
    resolve_ckpt_path,
)
from experiments.configs import CONFIG_DIR, resolve_config_args
from experiments.loggers import (
    build_loggers,
    finish_wandb,
    progress_callback,
    quiet_irrelevant_messages,
    stage_name,
    wandb_mode,
)
from experiments.memory import keep_freed_memory
from experiments.predict import PredictionOptions, PredictionWriter
from lightning_modules.base import AnomalyDetector, bf16_supported

#: monitored by the default checkpoint callback; every model logs it in validation
MONITOR_KEY = "val/loss"


def _import_optional(module_name: str) -> Any | None:
    """Imports a module other engineers provide, or returns None while it does not exist yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            return None
        raise


# Importing the packages registers their classes as subclasses, so `class_path: CAE` resolves.
for _package in ("lightning_modules", "datamodules"):
    _import_optional(_package)


@dataclass
class RunOptions:
    """Where a run writes and how W&B names it (the `run` section of a config)."""

    name: str | None = None
    """Run folder name; default ``<model>-<data>-s<seed>``."""
    root: str = "runs"
    """Folder holding every run folder (config, checkpoints, logs)."""
    results_dir: str = "results"
    """Evaluation outputs (metrics.json, per_image.csv, maps, predictions) go to ``<results_dir>/<name>/``."""
    project: str = "mammospn"
    """W&B project."""
    group: str | None = None
    """W&B group (e.g. one per Table 1 reproduction); default ``<model>-<data>``."""
    stage: str | None = None
    """W&B job_type; default the subcommand (fit, test, ...)."""
    tags: list[str] = field(default_factory=list)
    """Extra W&B tags (model, data, stage and seed are always added)."""
    evaluate: bool = True
    """Add the evaluation callback (full-image metrics in test, lesion-validation curves in fit)."""
    eval_every_n_epochs: int = 0
    """During fit, score the lesion validation set every N epochs (0 = never) for AUC / Hausdorff curves."""


class ConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``<run folder>/config.yaml``, atomically, overwriting an earlier run's."""

    def __init__(self, parser: LightningArgumentParser, config: Any, run_dir: str | Path = ".", **kwargs: Any):
        kwargs["save_to_log_dir"] = False
        kwargs.setdefault("overwrite", True)
        super().__init__(parser, config, **kwargs)
        self.run_dir = Path(run_dir)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        atomic_write(self.run_dir / self.config_filename, self.parser.dump(self.config, skip_none=False))


def _model_name(config: Any) -> str:
    """Short model name for run folders: the class name, or ``<autoencoder>_spn`` for a second stage.

    A second stage names its autoencoder checkpoint ``<runs>/<ae run>/checkpoints/*.ckpt``; its run is
    called after that autoencoder so the three RAT-SPN stages never share a folder.
    """
    model = config.get("model") or {}
    class_path = str(model.get("class_path") or "model")
    init_args = model.get("init_args") or {}
    ae_ckpt = init_args.get("autoencoder_ckpt") if hasattr(init_args, "get") else None
    if ae_ckpt:
        path = Path(str(ae_ckpt))
        ae_run = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        return f"{ae_run.split('-')[0]}_spn"
    return class_path.rsplit(".", 1)[-1].lower()


def _data_name(config: Any) -> str:
    data = config.get("data") or {}
    init_args = data.get("init_args") or {}
    source = init_args.get("source") if hasattr(init_args, "get") else None
    if source:
        test_set = init_args.get("test_set")
        return f"{source}-{test_set}" if test_set else str(source)
    class_path = str(data.get("class_path") or "data")
    return class_path.rsplit(".", 1)[-1].lower()


def _evaluation_callback(output_dir: Path, every_n_epochs: int = 0) -> Callback | None:
    """The evaluation engineer's EvaluationCallback writing to ``output_dir``, or None while it is absent."""
    module = _import_optional("experiments.callbacks")
    if module is None or not hasattr(module, "EvaluationCallback"):
        warnings.warn("experiments.callbacks.EvaluationCallback not available: no full-image metrics", stacklevel=2)
        return None
    return module.EvaluationCallback(output_dir=str(output_dir), every_n_epochs=int(every_n_epochs))


class ConfigError(ValueError):
    """A model or data module refused a configured value; the message names the key (``model.init_args.x``)."""


#: model values that must be positive, wherever a model has them
POSITIVE_MODEL_KEYS = ("lr", "latent_dim", "step_size", "num_embeddings", "embedding_dim", "num_repetitions",
                       "num_input_distributions")


def check_config_values(config: Any) -> None:
    """Refuses, before any data is read or cache built, a value that cannot work: one `ConfigError` naming the key.

    The data module checks its own ranges; what only the whole config knows is checked here: the patch
    size the data cuts must be the model's (``model.init_args.patch_size``; a RatSpnStage takes its
    autoencoder's, checked by ``score_patches`` when the first patches arrive).
    """
    model_args = (config.get("model") or {}).get("init_args") or {}
    for key in POSITIVE_MODEL_KEYS:
        value = model_args.get(key) if hasattr(model_args, "get") else None
        if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
            raise ConfigError(f"model.init_args.{key} must be > 0, got {value!r}")
    data_args = (config.get("data") or {}).get("init_args") or {}
    patch_size = data_args.get("patch_size") if hasattr(data_args, "get") else None
    model_patch = model_args.get("patch_size") if hasattr(model_args, "get") else None
    if patch_size is not None and model_patch is not None and patch_size != model_patch:
        raise ConfigError(f"data.init_args.patch_size must be {model_patch}, the model's model.init_args.patch_size, "
                          f"got {patch_size!r}")


#: trainer precisions that compute in bf16 (Lightning's names)
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def fallback_precision(config: Any) -> str | None:
    """A bf16 ``trainer.precision`` on a CPU without fast bf16 kernels becomes ``32-true``, said in one warning.

    Profiles ask for bf16 autocast because it trains the conv networks 2-3x faster on a CPU with oneDNN bf16
    kernels (AVX512-BF16 / AMX); on one without them (e.g. AVX2 only) bf16 is emulated and a CAE training
    step measured 12.6x slower than fp32 (7.9 s vs 0.62 s, batch 64, one thread), which would turn the quick
    Table 1 into hours. Scoring makes the same choice (`AnomalyDetector.scoring_precision`). Returns the
    precision replaced, or None.
    """
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if trainer is None:
        return None
    precision = str(trainer.get("precision") or "32-true")
    accelerator = str(trainer.get("accelerator") or "auto")
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision not in BF16_PRECISIONS or not on_cpu or bf16_supported(torch.device("cpu")):
        return None
    trainer["precision"] = "32-true"
    warnings.warn(f"trainer.precision {precision} -> 32-true: this CPU has no fast bf16 kernels (oneDNN "
                  "AVX512-BF16 / AMX), where bf16 is emulated and ~10x slower than fp32", stacklevel=1)
    return precision


class MammoCLI(LightningCLI):
    """LightningCLI with one run folder per run, W&B + CSV loggers, checkpoints and the evaluation callback."""

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but a constructor's ValueError that names its ``*.init_args.*`` key (the convention of
        this project's checks) becomes a `ConfigError` with that message, not jsonargparse's union report."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause: BaseException = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, ValueError) and ".init_args." in str(cause):
                raise ConfigError(str(cause)) from err
            raise
        self._warn_untrained()

    def _warn_untrained(self) -> None:
        """Evaluating without ``--ckpt_path`` scores initial weights: said once, unless the model has no weights
        to train (the intensity baseline)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if (self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path") is None
                and next(self.model.parameters(), None) is not None):
            warnings.warn(f"lightning {self.subcommand} without --ckpt_path scores the model's initial weights "
                          f"(metrics.json records checkpoint: null); pass --ckpt_path best|last|FILE", stacklevel=1)

    def _run_subcommand(self, subcommand: str) -> None:
        """As LightningCLI's; a test that fails on its data (e.g. no evaluable image) retires the earlier results
        of this run to ``stale-<time>/``, so none are left that look current."""
        try:
            super()._run_subcommand(subcommand)
        except DataError as err:
            if subcommand == "test":
                from experiments.evaluation_results import retire_results

                stale = retire_results(self.results_dir, f"lightning test failed: {err}")
                if stale is not None:
                    print(f"lightning: the earlier results of {self.results_dir} were moved to {stale}", file=sys.stderr)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunOptions, "run", fail_untyped=False)
        parser.add_class_arguments(PredictionOptions, "prediction", fail_untyped=False)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config_values(config)
        run = config["run"]
        seed = config.get("seed_everything")
        self.model_name = _model_name(config)
        self.data_name = _data_name(config)
        if not run.name:
            run.name = f"{self.model_name}-{self.data_name}-s{seed}"
        self.run_dir = Path(run.root) / run.name
        self.results_dir = Path(run.results_dir) / run.name
        # fit owns config.yaml; test / validate / predict in the same folder never overwrite it
        filename = "config.yaml" if self.subcommand in (None, "fit") else f"config-{self.subcommand}.yaml"
        self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": self.run_dir, "config_filename": filename}
        if "ckpt_path" in config:
            config["ckpt_path"] = resolve_ckpt_path(config["ckpt_path"], self.run_dir, self.subcommand)
        fallback_precision(config)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run = config["run"]
        trainer_cfg = config.get("trainer") or {}
        seed = config.get("seed_everything")
        if trainer_cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_dir)
        if trainer_cfg.get("logger") is None:
            test_set = getattr(getattr(self, "datamodule", None), "test_set", None)
            kwargs["logger"] = build_loggers(
                self.run_dir,
                name=run.name,
                project=run.project,
                group=run.group or f"{self.model_name}-{self.data_name}",
                job_type=stage_name(self.subcommand, test_set, run.stage),
                tags=[self.model_name, self.data_name, f"seed{seed}", *(run.tags or [])],
                config=self._flat_config(),
                resume=self.subcommand in (None, "fit") and bool(config.get("ckpt_path")),
            )
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if self.subcommand in (None, "fit") and trainer_cfg.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.extend(checkpoint_callbacks(self.run_dir / "checkpoints", MONITOR_KEY))
        if self.subcommand in (None, "fit") and not any(isinstance(c, RngStateCallback) for c in callbacks):
            callbacks.append(RngStateCallback())
        if trainer_cfg.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if self.subcommand == "predict":
            if not any(isinstance(c, BasePredictionWriter | PredictionWriter) for c in callbacks):
                options = config.get("prediction") or {}
                callbacks.append(PredictionWriter(self.results_dir / "predictions", **dict(vars(options)
                                                  if not isinstance(options, dict) else options)))
        elif (
            run.evaluate
            and self.subcommand in (None, "fit", "validate", "test")
            and not any(type(c).__name__ == "EvaluationCallback" for c in callbacks)
        ):
            callback = _evaluation_callback(self.results_dir, run.eval_every_n_epochs)
            if callback is not None:
                callbacks.append(callback)
        progress = progress_callback(trainer_cfg, callbacks)
        if progress is not None:
            callbacks.append(progress)
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _flat_config(self) -> dict[str, Any]:
        """The resolved config as plain data, for the W&B run's config panel."""
        try:
            config = self.config[self.subcommand] if self.subcommand else self.config
            return config.clone().as_dict()
        except Exception:  # noqa: BLE001 - a config that does not serialise only loses the W&B panel
            return {}


def _config_sections(args: list[str]) -> list[dict | None]:
    """The parsed ``--config`` files among ``args`` (None for a file that does not parse: the CLI reports it)."""
    parsed: list[dict | None] = []
    for i, a in enumerate(args):
        path = args[i + 1] if a in ("--config", "-c") and i + 1 < len(args) else None
        path = a.split("=", 1)[1] if a.startswith("--config=") else path
        if path and Path(path).is_file():
            try:
                data = yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError:
                parsed.append(None)
                continue
            parsed.append(data if isinstance(data, dict) else {})
    return parsed


def _configs_name_a_model(args: list[str]) -> bool:
    """True when a ``--config`` file among ``args`` has a ``model`` section."""
    for data in _config_sections(args):
        if data is None or "model" in data or any(isinstance(v, dict) and "model" in v for v in data.values()):
            return True
    return False


#: the data config merged first when none is given (model YAMLs hold no data block)
DEFAULT_DATA_CONFIG = CONFIG_DIR / "data" / "synthetic.yaml"


def _default_data_args(args: list[str]) -> list[str]:
    """Merges `DEFAULT_DATA_CONFIG` first unless the first ``--config`` file with a ``data`` section names the
    data class (a model YAML's or profile's ``data.init_args`` refine a class; they do not choose one), or an
    argument names it."""
    if args and args[0] in ("fit", "validate", "test", "predict"):
        head, rest = args[:1], args[1:]
    elif args and args[0].startswith("--config"):  # `run_cli([...], run=False)`: no subcommand
        head, rest = [], args
    else:
        return args
    if any(a in ("--data", "--data.class_path") or a.startswith(("--data=", "--data.class_path=")) for a in args):
        return args
    for data in _config_sections(args):
        if data is None:
            return args  # let the CLI report the broken file
        if "data" in data:
            if isinstance(data["data"], dict) and "class_path" in data["data"]:
                return args
            break
    return [*head, "--config", str(DEFAULT_DATA_CONFIG), *rest]


def _checkpoint_model_args(args: list[str]) -> list[str]:
    """`lightning test --ckpt_path X` without a model: take the model class from the checkpoint."""
    if not args or args[0] not in ("validate", "test", "predict"):
        return args
    if any(a.startswith("--model") for a in args) or _configs_name_a_model(args):
        return args
    ckpt = None
    for i, a in enumerate(args):
        if a == "--ckpt_path" and i + 1 < len(args):
            ckpt = args[i + 1]
        elif a.startswith("--ckpt_path="):
            ckpt = a.split("=", 1)[1]
    if not ckpt:
        return args
    if ckpt in CHECKPOINT_ALIASES:  # the run folder (and so the file) is known only from a config naming the model
        raise CheckpointError(f"--ckpt_path {ckpt} needs a --config naming the model (its run folder holds the "
                              f"checkpoint), or give the .ckpt file itself")
    state = load_checkpoint(ckpt)  # a missing or damaged file: one line naming it, not "required: test.model"
    class_path = state.get("anomaly_model_class") or (state.get("hyper_parameters") or {}).get("_class_path")
    return [*args, "--model", class_path] if class_path else args


def main(args: list[str] | None = None) -> int:
    """Entry point of `lightning` (console script): runs the command, returns the exit code.

    User-fixable problems (a missing checkpoint or data file, a data error, a value a constructor refuses)
    end in one line, no traceback.
    """
    keep_freed_memory()
    try:
        run_cli(args)
    except (FileNotFoundError, DataError, ConfigError, CheckpointError) as err:
        print(f"lightning: {err}", file=sys.stderr)
        return 2
    except SIGTERMException:  # a SystemExit without a code: Python would exit 0, as if the run had finished
        print(f"lightning: {STOPPED_BY_SIGTERM}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


#: Lightning raises `SIGTERMException` (a `SystemExit` with no code) when a run receives SIGTERM
STOPPED_BY_SIGTERM = "stopped by SIGTERM before it finished (a fit resumes from its last.ckpt with --ckpt_path last)"


def run_cli(args: list[str] | None = None, run: bool = True) -> MammoCLI:
    """Runs `lightning <args>` in this process; returns the CLI so callers (Table 1, tests) can read it."""
    argv = list(sys.argv[1:] if args is None else args)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    argv = _default_data_args(_checkpoint_model_args(resolve_config_args(argv)))
    quiet_irrelevant_messages()
    if wandb_mode() != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
    exit_code = 1
    try:
        cli = MammoCLI(
            model_class=AnomalyDetector,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=ConfigSaver,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=argv,
            run=run,
        )
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    return cli


if __name__ == "__main__":
    sys.exit(main())
