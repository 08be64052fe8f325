"""Second stage of the method: a RAT-SPN fitted by stochastic EM on the latents of a frozen autoencoder.

Score = -log p(z) (exact), z = the autoencoder's 64 latent units: the posterior mean / code of CAE and
beta-VAE (Gaussian leaves, standardised with training statistics kept in buffers) or the 8 x 8 code
indices of the VQ-VAE (categorical leaves over its K codes). Latents are encoded once and cached by
the batch's stable patch ``index``, so later epochs cost only the EM step.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor

from lightning_modules.base import AnomalyDetector, batch_patches, class_tag
from lightning_modules.contralateral import OPTIONS as CONTRALATERAL_OPTIONS
from spn import RatSpn, broadcast_module, em_step_size, is_distributed

#: extra RAT-SPN variables of the conditional model (``context=True``): skin-line and chest-wall distance features
CONTEXT_VARS = 2

_TRAINING_COMMANDS = {
    "CAE": "lightning fit --config configs/cae.yaml",
    "BetaVAE": "lightning fit --config configs/bvae.yaml",
    "VQVAE": "lightning fit --config configs/vqvae.yaml",
}


def _import_class(path: str) -> type:
    """``"package.module.ClassName"`` -> the class; a clear error naming the path otherwise."""
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"autoencoder class {path!r} cannot be imported: {err}") from err


class EMStep(torch.optim.Optimizer):
    """The optimizer of a gradient-free learner: ``step(closure)`` runs the closure (one EM update) and returns
    its result. Lightning counts optimizer steps (global_step: checkpoints, max_steps, step logging), so each EM
    update taken through it is counted, with no private loop counters touched. No parameters, no state."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {})  # torch refuses an empty parameter list; this one is never used

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None


class RatSpnStage(AnomalyDetector):
    """RAT-SPN on frozen autoencoder latents (paper section 2.2), trained by online EM.

    Args:
        autoencoder_ckpt: checkpoint of the trained first stage (CAE, BetaVAE or VQVAE).
        autoencoder_class: ``"module.Class"`` of the autoencoder; default = the checkpoint's
            ``anomaly_model_class`` entry.
        depth, num_repetitions, num_input_distributions, num_sums, num_roots: RAT-SPN structure
            (paper: D = 1, R = 50, I = 45, C = 1).
        step_size: online-EM step (paper 1e-4). ``pseudo_count``: smoothing of each batch M-step
            towards the current parameters (protects components with ~zero responsibility).
        step_decay_steps, step_decay_power: the step after t EM steps is
            ``step_size * (1 + t / step_decay_steps) ** -step_decay_power`` (`spn.em_schedule`: fast early
            progress, then parameters that settle instead of jittering on a noisy plateau); 0 = constant (paper).
            Read from Lightning's EM-step count, so a resumed fit continues the schedule exactly.
        min_var, max_var: Gaussian leaf variance range (latents are standardised first).
        init_batches: training batches whose latents give the standardisation statistics and the
            data-driven leaf initialisation (all of them if the loader is shorter).
        seed: structure, initialisation and sampling seed.
        em_batch_size: latents per EM step; each training batch is split into consecutive chunks of
            this size, one EM step each (the loader shuffles, so these are random mini-batches as with a
            loader of this batch size). Lightning's per-batch cost (fetch, hooks, ~2 ms) is then paid once
            per loader batch instead of once per EM step: the paper configs load 1024 patches and take
            EM steps of 64. None = one EM step per loader batch.
        context: model the patch's position jointly with its latents: two extra Gaussian leaf variables,
            log(1 + d / ``context_scale_px``) of the centre's distance d to the skin line and to the
            chest wall (`datamodules.grids.patch_context`), standardised like the latents. The score is then the
            conditional -log p(z | context) = -(log p(z, context) - log p(context)), both terms exact (the
            context marginal integrates the latents out): a patch is compared with healthy patches at the
            same place in the breast, not with the interior (issue: the border trap). With a VQ-VAE the
            codes keep categorical leaves and the context gets Gaussian ones (`spn.leaves` composite).
        border_suppression_px: the naive border fix, kept as a comparison row: patches whose centre lies
            closer than this to the skin line or the chest wall get the image's lowest score. 0 = off.
        score_smoothing_px: scoring option: each grid patch's raw score becomes the Gaussian-weighted mean
            (sigma in px) of the raw scores of its neighbouring grid patches (`grid_smoothing.smooth_grid`),
            before the calibration, which then ranks smoothed against smoothed healthy scores. 0 = off.
        smooth_calibrated: scoring option: smooth the -log p of a first Mondrian calibration of the raw scores
            instead of the raw scores, and calibrate the smoothed values again (`AnomalyDetector.calibration_input`;
            both calibrators fitted by `experiments.calibration.ConformalCalibration`).
        contralateral: scoring option, bilateral asymmetry (`lightning_modules.contralateral`): "none" (default),
            or "mean" / "max": each calibrated grid score minus the mean / maximum calibrated score of the woman's
            other breast (mirrored and registered by the breast masks) within ``contralateral_radius_px``,
            calibrated again on healthy women's pairs (a third calibrator). Needs ``data.with_contralateral: true``;
            an image without a pair keeps its one-sided calibrated score.
        contralateral_radius_px: half the side of the square around a patch's mirrored place whose contralateral
            scores form its reference (px at evaluation spacing).
    """

    def __init__(
        self,
        autoencoder_ckpt: str,
        autoencoder_class: str | None = None,
        depth: int = 1,
        num_repetitions: int = 50,
        num_input_distributions: int = 45,
        num_sums: int = 10,
        num_roots: int = 1,
        step_size: float = 1e-4,
        step_decay_steps: float = 0.0,
        step_decay_power: float = 0.6,
        pseudo_count: float = 0.1,
        min_var: float = 1e-3,
        max_var: float = 100.0,
        init_batches: int = 50,
        seed: int = 0,
        em_batch_size: int | None = None,
        context: bool = False,
        context_scale_px: float = 16.0,
        border_suppression_px: float = 0.0,
        score_smoothing_px: float = 0.0,
        smooth_calibrated: bool = False,
        contralateral: str = "none",
        contralateral_radius_px: float = 32.0,
    ) -> None:
        super().__init__()
        if contralateral not in CONTRALATERAL_OPTIONS:
            raise ValueError(f"model.init_args.contralateral must be one of {CONTRALATERAL_OPTIONS}, got {contralateral!r}")
        if not contralateral_radius_px >= 0:
            raise ValueError(f"model.init_args.contralateral_radius_px must be >= 0, got {contralateral_radius_px}")
        if not 0 < step_size <= 1:
            raise ValueError(f"model.init_args.step_size must be in (0, 1], got {step_size}")
        if step_decay_steps < 0:
            raise ValueError(f"model.init_args.step_decay_steps must be >= 0 (0 = constant step), got {step_decay_steps}")
        if step_decay_steps > 0 and not 0.5 < step_decay_power <= 1:
            raise ValueError("model.init_args.step_decay_power must be in (0.5, 1] (online EM's convergence "
                             f"conditions), got {step_decay_power}")
        if score_smoothing_px < 0:
            raise ValueError(f"model.init_args.score_smoothing_px must be >= 0, got {score_smoothing_px}")
        if context_scale_px <= 0:
            raise ValueError(f"model.init_args.context_scale_px must be > 0, got {context_scale_px}")
        if em_batch_size is not None and em_batch_size < 1:
            raise ValueError(f"model.init_args.em_batch_size must be >= 1 (or null), got {em_batch_size}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.autoencoder: torch.nn.Module | None = None
        self.spn: RatSpn | None = None
        self._discrete_latents = False  # a VQ-VAE's codes (set by _build)
        self.register_buffer("latent_mean", torch.zeros(0))
        self.register_buffer("latent_std", torch.ones(0))
        self.register_buffer("initialized", torch.tensor(False))
        self._cache: Tensor | None = None
        self._cached: Tensor | None = None
        self._init_snapshot: dict[str, Tensor] = {}
        # Nothing is read from disk here: `setup` loads the autoencoder checkpoint (fit / test / predict), and a
        # RatSpnStage checkpoint rebuilds the autoencoder from its own contents (`on_load_checkpoint`).

    # ------------------------------------------------------------------ construction
    def setup(self, stage: str) -> None:
        """Builds the frozen autoencoder (from ``autoencoder_ckpt``) and the RAT-SPN, once.

        Lightning calls it before it restores a ``--ckpt_path``, so the checkpoint's weights load into the built
        modules. When the autoencoder file is gone the stage is rebuilt from a RatSpnStage checkpoint instead
        (`on_load_checkpoint`); with neither, the first hook that needs the model names the file and the fix.
        """
        path = Path(self.hparams.autoencoder_ckpt)
        if self.spn is None and path.is_file():
            self._build(self._load_autoencoder(path, self.hparams.autoencoder_class))

    def _missing_autoencoder_message(self) -> str:
        path = self.hparams.autoencoder_ckpt
        cls = (self.hparams.autoencoder_class or "").rpartition(".")[2]
        command = _TRAINING_COMMANDS.get(cls, "lightning fit --config configs/cae.yaml (or bvae.yaml / vqvae.yaml)")
        return (
            f"autoencoder checkpoint not found: {path}. Train the first stage first, e.g. `{command}`, "
            f"and point model.init_args.autoencoder_ckpt at its checkpoints/best.ckpt or last.ckpt"
        )

    @staticmethod
    def _load_autoencoder(path: Path, class_path: str | None) -> torch.nn.Module:
        if class_path is None:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            class_path = checkpoint.get("anomaly_model_class")
            if class_path is None:
                raise ValueError(
                    f"{path} has no 'anomaly_model_class' entry; pass model.init_args.autoencoder_class "
                    "(e.g. lightning_modules.CAE)"
                )
        cls = _import_class(class_path)
        return cls.load_from_checkpoint(str(path), map_location="cpu")

    def _build(self, autoencoder: torch.nn.Module, spn_state: dict[str, Tensor] | None = None) -> None:
        """Freezes the autoencoder and creates the RAT-SPN with the leaves its latents need."""
        autoencoder.eval()
        autoencoder.requires_grad_(False)
        self.autoencoder = autoencoder
        hp = self.hparams
        if hasattr(autoencoder, "encode_codes"):
            leaf, categories = "categorical", int(autoencoder.num_embeddings)
        elif hasattr(autoencoder, "encode"):
            leaf, categories = "gaussian", None
        else:
            raise ValueError(f"{class_tag(autoencoder)} serves neither encode(x) nor encode_codes(x)")
        latent_dim = self._latent_dim(autoencoder)
        num_vars = latent_dim + (CONTEXT_VARS if hp.context else 0)
        self._discrete_latents = leaf == "categorical"
        if hp.context and self._discrete_latents:  # codes: categorical leaves; the context: Gaussian ones
            leaf = [("categorical", list(range(latent_dim))), ("gaussian", list(range(latent_dim, num_vars)))]
        self.spn = RatSpn(
            num_vars,
            depth=hp.depth,
            num_repetitions=hp.num_repetitions,
            num_input_distributions=hp.num_input_distributions,
            num_sums=hp.num_sums,
            num_roots=hp.num_roots,
            leaf=leaf,
            num_categories=categories,
            seed=hp.seed,
            min_var=hp.min_var,
            max_var=hp.max_var,
            pseudo_count=hp.pseudo_count,
        )
        if self._first_continuous() < num_vars:
            self.latent_mean = torch.zeros(num_vars)
            self.latent_std = torch.ones(num_vars)

    def _first_continuous(self) -> int:
        """Index of the first standardised RAT-SPN variable: 0 for continuous latents, after the codes otherwise
        (a VQ-VAE's codes are categorical; only a conditional model's context columns are standardised)."""
        spn = self._require()
        if not self._discrete_latents:
            return 0
        return spn.num_vars - (CONTEXT_VARS if self.uses_context else 0)

    @staticmethod
    def _latent_dim(autoencoder: torch.nn.Module) -> int:
        probe = torch.zeros(2, 1, 64, 64)
        with torch.no_grad():
            out = autoencoder.encode_codes(probe) if hasattr(autoencoder, "encode_codes") else autoencoder.encode(probe)
        return int(out.shape[1])

    @property
    def uses_context(self) -> bool:  # type: ignore[override]
        return bool(self.hparams.context)

    def _context_features(self, context: Tensor | None) -> Tensor:
        """log(1 + d / scale) of the (skin, chest-wall) distances, float N x 2; an error when the batch has none."""
        if context is None:
            raise ValueError("model.init_args.context is set but the batch has no 'context' (patch distances to "
                             "the skin line and chest wall): rebuild the patch cache with this version")
        return torch.log1p(context.float().clamp_min(0) / float(self.hparams.context_scale_px))

    def _inputs(self, z: Tensor, context: Tensor | None) -> Tensor:
        """The RAT-SPN's variables: the latents, then (conditional RAT-SPN) the context features."""
        if self.uses_context:
            z = torch.cat([z.float(), self._context_features(context).to(z.device)], dim=1)
        return z

    def _batch_inputs(self, batch: dict) -> Tensor:
        """Standardised RAT-SPN variables of a training / validation batch (latents cached by index)."""
        context = batch.get("context") if isinstance(batch, dict) else None
        return self._standardise(self._inputs(self.cached_latents(batch), context))

    @property
    def leaf(self) -> str:
        return self._require().leaf

    def _require(self) -> RatSpn:
        if self.spn is None:
            raise FileNotFoundError(self._missing_autoencoder_message())
        return self.spn

    def train(self, mode: bool = True) -> RatSpnStage:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: BatchNorm / dropout always in inference mode
        return self

    def _check_built(self) -> None:
        self._require()

    # A checkpoint given to fit/test/predict is restored after setup(), so the check waits until then.
    on_test_start = on_predict_start = on_validation_start = _check_built

    def on_fit_start(self) -> None:
        """The start check; and the frozen autoencoder's modules, in eval mode by design (`train`), are exactly
        those Lightning's "Found N module(s) in eval mode" warning would count, so that message (with that N,
        so any other module left in eval mode is still reported) is ignored."""
        self._check_built()
        frozen = sum(1 for _ in self.autoencoder.modules())
        warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of training")

    # ------------------------------------------------------------------ latents
    @property
    def patch_size(self) -> int:
        """Its autoencoder's patch side (64 until the autoencoder is built)."""
        ae = self.autoencoder
        return ae.patch_size if isinstance(ae, AnomalyDetector) else super().patch_size

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Raw latents of the frozen autoencoder: float N x D, or LongTensor N x 64 codes (VQ-VAE)."""
        self._require()
        ae = self.autoencoder
        if self._discrete_latents:
            return ae.encode_codes(x).long()
        return ae.encode(x).float()

    def _standardise(self, z: Tensor) -> Tensor:
        start = self._first_continuous()
        if start >= z.shape[1]:
            return z
        if start == 0:
            return (z - self.latent_mean) / self.latent_std
        return torch.cat([z[:, :start], (z[:, start:] - self.latent_mean[start:]) / self.latent_std[start:]], dim=1)

    @torch.no_grad()
    def cached_latents(self, batch: dict) -> Tensor:
        """Latents of a training/validation batch, encoded on first sight and then looked up by ``index``."""
        x = batch_patches(batch)
        index = batch.get("index") if isinstance(batch, dict) else None
        if index is None:
            return self.encode(x)
        index = index.to("cpu", torch.long)
        needed = int(index.max()) + 1 if index.numel() else 0
        if self._cache is None or self._cache.shape[0] < needed:
            capacity = max(needed, 2 * (0 if self._cache is None else self._cache.shape[0]), 1024)
            dtype = torch.int32 if self._discrete_latents else torch.float32
            width = self._require().num_vars - (CONTEXT_VARS if self.uses_context else 0)
            cache = torch.zeros(capacity, width, dtype=dtype)
            cached = torch.zeros(capacity, dtype=torch.bool)
            if self._cache is not None:
                cache[: self._cache.shape[0]] = self._cache
                cached[: self._cached.shape[0]] = self._cached
            self._cache, self._cached = cache, cached
        new = ~self._cached[index]
        if bool(new.any()):
            fresh = self.encode(x[new.to(x.device)])
            self._cache[index[new]] = fresh.to("cpu", self._cache.dtype)
            self._cached[index[new]] = True
        z = self._cache[index].to(self.device)
        return z.long() if self._discrete_latents else z

    def _all_reduce(self, t: Tensor) -> Tensor:
        if is_distributed():
            t = t.clone()
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def initialise(self, batches: list[Tensor]) -> None:
        """Standardisation statistics (summed over processes) and data-driven leaves, broadcast from rank 0."""
        spn = self._require()
        z = torch.cat(batches).to(self.device)
        start = self._first_continuous()
        if start < z.shape[1]:
            zf = z.double()
            sums = self._all_reduce(torch.stack([zf.new_full(zf.shape[1:], zf.shape[0]), zf.sum(0), (zf * zf).sum(0)]))
            count, total, squares = sums
            mean = total / count
            std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
            mean[:start], std[:start] = 0.0, 1.0  # the codes stay codes
            self.latent_mean = mean.float()
            self.latent_std = std.float().clamp_min(1e-6)
        spn.init_from_data(self._standardise(z), seed=self.hparams.seed + 1)
        if is_distributed():
            broadcast_module(spn, src=0)
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """EM needs no gradient optimizer: one `EMStep`, whose ``step(closure)`` runs each EM update in
        `training_step`, so that Lightning counts the EM steps (``None`` would read as a forgotten optimizer)."""
        return [EMStep()]

    def on_train_start(self) -> None:
        spn = self._require()
        if not bool(self.initialized):
            loader = self.trainer.train_dataloader
            batches = []
            for i, batch in enumerate(loader):
                if i >= self.hparams.init_batches:
                    break
                batch = move_data_to_device(batch, self.device)
                context = batch.get("context") if isinstance(batch, dict) else None
                batches.append(self._inputs(self.cached_latents(batch), context))
            if not batches:
                raise RuntimeError("the training dataloader is empty: nothing to fit the RAT-SPN on")
            self.initialise(batches)
        self._init_snapshot = {"weights": self._sum_weights(), "leaves": spn.leaves.snapshot()}

    def _sum_weights(self) -> Tensor:
        """Every sum weight of the RAT-SPN (all levels and the mixing over repetitions) as a flat probability vector."""
        spn = self._require()
        return torch.cat([w.detach().reshape(-1) for w in spn.log_weights] + [spn.log_mix.detach().reshape(-1)]).exp()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        z = self._batch_inputs(batch)
        spn, max_steps = self._require(), self.trainer.max_steps
        em_step = self.optimizers()  # the `EMStep` of configure_optimizers
        total, count = 0.0, 0
        for chunk in z.split(self.hparams.em_batch_size or z.shape[0]):
            if 0 <= max_steps <= self.trainer.global_step:
                break
            # Each EM update is one manual-optimisation step (public `LightningOptimizer.step(closure)`), so
            # Lightning counts it in global_step, which checkpointing (best/last), max_steps and step-based
            # logging read, and saves the count with its loop state: a resumed fit continues exactly.
            step = self.em_step_size()
            info = em_step.step(closure=lambda chunk=chunk, step=step: spn.em_update(chunk, step_size=step))
            total, count = total + info["log_likelihood"] * chunk.shape[0], count + chunk.shape[0]
        if count:
            self.log("train/log_likelihood", total / count, on_step=False, on_epoch=True, prog_bar=True, batch_size=count)

    def em_step_size(self) -> float:
        """The online-EM step for the next update: ``step_size``, decayed by the EM steps taken so far when
        ``step_decay_steps`` > 0 (`spn.em_schedule.em_step_size`)."""
        hp = self.hparams
        return em_step_size(hp.step_size, self.trainer.global_step, hp.get("step_decay_steps", 0.0),
                            hp.get("step_decay_power", 0.6))

    def on_train_epoch_end(self) -> None:
        spn = self._require()
        self.log("em/step_size", self.em_step_size())
        if not self._init_snapshot:
            return
        self.log("em/weight_distance_from_init", (self._sum_weights() - self._init_snapshot["weights"]).abs().mean())
        for name, value in spn.leaves.distance_from(self._init_snapshot["leaves"]).items():
            self.log(f"em/{name}", value)  # e.g. leaf_mean_distance_from_init, leaf_mass_replaced

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        z = self._batch_inputs(batch)
        with torch.no_grad():
            ll = self._require().log_likelihood(z)[:, 0]
        n = z.shape[0]
        self.log("val/log_likelihood", ll.mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/loss", -ll.mean(), sync_dist=True, batch_size=n)
        return -ll.mean()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_patches(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """-log p(z(x)) per patch, or -log p(z(x) | context) for the conditional RAT-SPN (exact; higher = more
        anomalous). ``context``: N x 2 px distances of the patch centres (`datamodules.grids.patch_context`)."""
        spn = self._require()
        self.check_patches(x)
        latents = self.encode(x)  # the autoencoder under the caller's autocast (bf16 scoring), if any
        # the RAT-SPN's log-einsum-exp in fp32 always: its batched matmuls would round log-likelihoods in bf16
        with torch.autocast(latents.device.type, enabled=False):
            z = self._standardise(self._inputs(latents, context))
            joint = spn.log_likelihood(z)[:, 0]
            if not self.uses_context:
                return -joint.float()
            hidden = torch.zeros_like(z, dtype=torch.bool)
            hidden[:, : z.shape[1] - CONTEXT_VARS] = True  # integrate the latents out: log p(context)
            return -(joint - spn.log_likelihood(z, missing=hidden)[:, 0]).float()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.autoencoder is not None:
            checkpoint["autoencoder_class"] = class_tag(self.autoencoder)
            checkpoint["autoencoder_hparams"] = dict(getattr(self.autoencoder, "hparams", {}))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuilds autoencoder and SPN from the checkpoint alone when `setup` has not built them
        (`load_from_checkpoint`, or the autoencoder file is gone)."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        class_path = checkpoint.get("autoencoder_class")
        if self.spn is None and class_path is None:
            self.setup("load")  # an older checkpoint without the autoencoder's class: its file, if still there
        if self.spn is None:
            if class_path is None:
                raise FileNotFoundError(self._missing_autoencoder_message())
            cls = _import_class(class_path)
            accepted = inspect.signature(cls.__init__).parameters
            hparams = {k: v for k, v in checkpoint.get("autoencoder_hparams", {}).items() if k in accepted}
            autoencoder = cls(**hparams)  # e.g. LightningCLI adds "_class_path", not an __init__ argument
            saved = checkpoint.get("hyper_parameters", {})
            self.hparams.update({k: v for k, v in saved.items() if k not in ("autoencoder_ckpt", "autoencoder_class")})
            self._build(autoencoder)
        for name in ("latent_mean", "latent_std"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))
        self.restore_calibrators(state)  # the autoencoder just built has calibrators too

    def extra_repr(self) -> str:
        spn = self.spn
        if spn is None:
            return f"autoencoder_ckpt={self.hparams.autoencoder_ckpt!r} (not loaded)"
        return f"leaf={spn.leaf}, vars={spn.num_vars}, parameters={spn.num_parameters:,}, step={self.hparams.step_size}"


__all__ = ["RatSpnStage"]
