"""Model throughput at batch 64: Lightning (Trainer.fit / Trainer.predict over a DataLoader) beside a plain
PyTorch step over the same network and batch, interleaved step by step in one run (medians), plus achieved FLOP/s
(torch.utils.flop_counter) against a plain fp32 matmul; scoring through Trainer.predict in fp32 / bf16-mixed,
plain / channels-last (the ratios side by side); and the bf16 / channels-last variants of the CAE's plain loop.

`python -m benchmarks models`; `BENCH_MODELS=cae,vqvae` picks models, `BENCH_SECONDS` the time per
measurement (default 3)."""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules import CAE, VQVAE, BetaVAE, FAnoGAN
from lightning_modules.beta_vae import gaussian_kl
from lightning_modules.networks import gradient_penalty

BATCH = 64
N_PATCHES = 64 * 24
WARMUP = 3


class InMemoryPatches(Dataset):
    """Patches in memory served like the patch cache: one ``__getitems__`` slice per batch, contract dict."""

    def __init__(self, x: Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: Sequence[int]) -> dict[str, Any]:
        i = torch.as_tensor(idx)
        return {
            "patches": self.x[i],
            "index": i,
            "centers": torch.stack([i, i], 1),
            "patient_id": [f"p{int(k) % 50}" for k in i],
            "label": torch.zeros(len(i), dtype=torch.long),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _identity(batch: Any) -> Any:
    return batch


class EvalItems(Dataset):
    """Evaluation items (one image per item) whose ``patches`` are in-memory chunks."""

    def __init__(self, x: Tensor, per_item: int):
        self.chunks = x.split(per_item)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image_id": f"img{i}", "patches": self.chunks[i]}


class _Interleaved(pl.Callback):
    """Times each Lightning step (batch start to next batch start, DataLoader fetch included) and, between
    them, one plain-PyTorch step on the same batch: both see the same machine load at the same moment."""

    def __init__(self, plain_fn: Callable[[Tensor], Any]) -> None:
        self.plain_fn = plain_fn
        self.last: float | None = None
        self.lightning: list[float] = []
        self.plain: list[float] = []

    def _tick(self, x: Tensor, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.lightning.append(now - self.last)
        self.last = None
        if batch_idx >= WARMUP:
            start = time.perf_counter()
            self.plain_fn(x)
            self.plain.append(time.perf_counter() - start)
            self.last = time.perf_counter()

    def _end(self) -> None:
        if self.last is not None:
            self.lightning.append(time.perf_counter() - self.last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._tick(batch["patches"], batch_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._tick(batch["patches"], batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        self._end()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._end()

    def rates(self, n: int) -> tuple[float, float]:
        """(Lightning, plain) items/s from the median step times, ``n`` items per step."""
        return n / statistics.median(self.lightning), n / statistics.median(self.plain)


def _trainer(steps: int, clock: pl.Callback, precision: str = "32-true") -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=10_000, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[clock], precision=precision,
    )


def patches(n: int, seed: int = 0) -> Tensor:
    """Smooth random patches in [0, 1] (content does not matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(n, 1, 68, 68, generator=g), 5, 1).clamp(0, 1)


# ----- plain PyTorch steps over the very same networks --------------------------------------------
def plain_train_step(
    model: pl.LightningModule, opts: list[torch.optim.Optimizer], step: int, with_gp: bool = True
) -> Callable[[Tensor], None]:
    """A bare training step for ``model``'s network: same loss maths, no Lightning (``with_gp=False`` drops
    f-AnoGAN's gradient penalty, only for FLOP counting, which cannot trace autograd.grad)."""
    if isinstance(model, CAE):
        net, opt = model.net, opts[0]

        def run(x: Tensor) -> None:
            loss = (net(x)[0] - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif isinstance(model, BetaVAE):
        net, opt, beta = model.net, opts[0], model.hparams.beta

        def run(x: Tensor) -> None:
            recon, mu, logvar = net(x, sample=True)
            loss = ((recon - x).pow(2).mean((1, 2, 3)) + beta * gaussian_kl(mu, logvar) / 4096).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif isinstance(model, VQVAE):
        net, opt = model.net, opts[0]

        def run(x: Tensor) -> None:
            recon, vq_loss, idx, _ = net(x)
            loss = ((recon - x).pow(2).mean((1, 2, 3)) + vq_loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            net.quantizer.update_usage(idx)
    else:
        g, d, (opt_d, opt_g) = model.generator, model.critic, opts
        counter = [0]

        def run(x: Tensor) -> None:
            with torch.no_grad():
                fake = g(torch.randn(x.shape[0], model.hparams.latent_dim))
            loss_d = d(fake).mean() - d(x).mean()
            if with_gp:
                loss_d = loss_d + 10.0 * gradient_penalty(d, x, fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            counter[0] += 1
            if counter[0] % model.hparams.n_critic == 0:
                loss_g = -d(g(torch.randn(x.shape[0], model.hparams.latent_dim))).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
    return run


def plain_score(model: pl.LightningModule) -> Callable[[Tensor], Tensor]:
    """A bare scoring forward (the same score maths) for ``model``'s network."""
    if isinstance(model, CAE):
        return lambda x: (model.net(x)[0] - x).pow(2).mean((1, 2, 3))
    if isinstance(model, BetaVAE):
        def bvae(x: Tensor) -> Tensor:
            recon, mu, logvar = model.net(x)
            return (recon - x).pow(2).mean((1, 2, 3)) + model.hparams.beta * gaussian_kl(mu, logvar) / 4096
        return bvae
    if isinstance(model, VQVAE):
        return lambda x: (model.net(x)[0] - x).pow(2).mean((1, 2, 3))

    def gan(x: Tensor) -> Tensor:
        recon = model.generator(model.encoder(x))
        feat = (model.critic.features(x) - model.critic.features(recon)).pow(2).mean(1)
        return (recon - x).pow(2).mean((1, 2, 3)) + feat
    return gan


def _timed_loop(fn: Callable[[Tensor], Any], x: Tensor, steps: int, ctx: Callable[[], Any] = nullcontext) -> float:
    """Patches/s of ``fn`` over consecutive batches of ``x`` (after WARMUP batches)."""
    batches = x.split(BATCH)
    with ctx():
        for i in range(WARMUP):
            fn(batches[i % len(batches)])
        start = time.perf_counter()
        for i in range(steps):
            fn(batches[i % len(batches)])
        elapsed = time.perf_counter() - start
    return steps * BATCH / elapsed


def _steps_for(seconds: float, fn: Callable[[Tensor], Any], x: Tensor, ctx: Callable[[], Any] = nullcontext) -> int:
    """How many batches of ``fn`` fill about ``seconds`` on this machine now (timed on two batches)."""
    with ctx():
        fn(x[:BATCH])
        start = time.perf_counter()
        fn(x[:BATCH])
        fn(x[BATCH : 2 * BATCH])
        per_batch = (time.perf_counter() - start) / 2
    return max(5, int(seconds / per_batch))


def train_rates(model: pl.LightningModule, plain_fn: Callable[[Tensor], Any], x: Tensor, steps: int) -> tuple[float, float]:
    """(Lightning, plain) training patches/s: Trainer.fit over a DataLoader, a plain step interleaved."""
    clock = _Interleaved(plain_fn)
    loader = DataLoader(InMemoryPatches(x), batch_size=BATCH, shuffle=True, collate_fn=_identity,
                        generator=torch.Generator().manual_seed(0))
    _trainer(steps + WARMUP, clock).fit(model, loader)
    return clock.rates(BATCH)


def score_rates(model: pl.LightningModule, x: Tensor, per_item: int = 4 * BATCH) -> tuple[float, float]:
    """(Lightning, plain) scoring patches/s: Trainer.predict over evaluation items (chunks of BATCH) vs a
    plain inference-mode loop over the same item's patches in chunks of BATCH."""
    model.score_batch_size = BATCH
    score = plain_score(model)

    def plain(p: Tensor) -> None:
        was = model.training
        model.eval()
        with torch.inference_mode():
            for chunk in p.split(BATCH):
                score(chunk)
        model.train(was)

    clock = _Interleaved(plain)
    _trainer(1, clock).predict(model, DataLoader(EvalItems(x, per_item), batch_size=None), return_predictions=False)
    return clock.rates(per_item)


def flops_per_batch(fn: Callable[[Tensor], Any], x: Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(x[:BATCH])
    return counter.get_total_flops()


def matmul_flops(seconds: float = 1.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _fresh(name: str) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    return {"cae": CAE, "bvae": BetaVAE, "vqvae": VQVAE, "fanogan": FAnoGAN}[name]()


def _optimizers(model: pl.LightningModule) -> list[torch.optim.Optimizer]:
    opts = model.configure_optimizers()
    return list(opts) if isinstance(opts, list | tuple) else [opts]


def bench_model(name: str, seconds: float, peak: float) -> dict[str, float]:
    x = patches(N_PATCHES)
    plain_model = _fresh(name)
    run = plain_train_step(plain_model, _optimizers(plain_model), 0)
    steps = min(_steps_for(seconds, run, x), 4 * len(x) // BATCH)
    light_train, plain_train = train_rates(_fresh(name), run, x, steps)
    if isinstance(plain_model, FAnoGAN):  # FlopCounterMode cannot trace autograd.grad: count without the GP
        train_flops = flops_per_batch(plain_train_step(plain_model, _optimizers(plain_model), 0, with_gp=False), x)
    else:
        train_flops = flops_per_batch(run, x)
    model = _fresh(name)
    n_items = max(WARMUP + 4, min(4 * WARMUP, _steps_for(seconds, plain_score(model), x, torch.inference_mode) // 4))
    light_sc, plain_sc = score_rates(model, patches(n_items * 4 * BATCH, seed=1))
    model.eval()
    with torch.inference_mode():
        score_flops = flops_per_batch(plain_score(model), x)
    return {
        "plain_train": plain_train, "lightning_train": light_train, "train_ratio": light_train / plain_train,
        "plain_score": plain_sc, "lightning_score": light_sc, "score_ratio": light_sc / plain_sc,
        "train_gflops": train_flops / BATCH * light_train / 1e9, "score_gflops": score_flops / BATCH * light_sc / 1e9,
        "train_frac_peak": train_flops / BATCH * light_train / peak, "score_frac_peak": score_flops / BATCH * light_sc / peak,
    }


def precision_variants(seconds: float) -> list[tuple[str, float, float]]:
    """CAE plain loop in fp32, bf16 autocast and channels-last: (variant, train patches/s, score patches/s)."""
    x = patches(N_PATCHES)
    rows = []
    variants = [
        ("fp32", False, False),
        ("bf16 autocast", True, False),
        ("channels_last", False, True),
        ("bf16 + channels_last", True, True),
    ]
    for label, bf16, cl in variants:
        model = _fresh("cae")
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        if cl:
            model.net.to(memory_format=torch.channels_last)

        def ctx(bf16: bool = bf16) -> Any:
            return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

        run = plain_train_step(model, _optimizers(model), 0)
        train = _timed_loop(run, xin, _steps_for(seconds, run, xin, ctx), ctx)
        model.eval()
        score_fn = plain_score(model)

        def score_ctx(bf16: bool = bf16) -> ExitStack:
            stack = ExitStack()
            stack.enter_context(torch.inference_mode())
            stack.enter_context(ctx(bf16))
            return stack

        score = _timed_loop(score_fn, xin, _steps_for(seconds, score_fn, xin, score_ctx), score_ctx)
        rows.append((label, train, score))
    return rows


class _BatchTimes(pl.Callback):
    """Seconds of each predict batch (one evaluation item), batch start to batch end."""

    def __init__(self) -> None:
        self.start = 0.0
        self.times: list[float] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.times.append(time.perf_counter() - self.start)


#: the scoring variants of `lightning predict` / `test`: (trainer precision, AnomalyDetector.score_channels_last)
SCORING_VARIANTS = {
    "fp32": ("32-true", False),
    "fp32 + channels_last": ("32-true", True),
    "bf16": ("bf16-mixed", False),
    "bf16 + channels_last": ("bf16-mixed", True),
}


def scoring_variants(name: str, seconds: float, rounds: int = 3, per_item: int = 4 * BATCH) -> dict[str, float]:
    """Patches/s of ``Trainer.predict`` over evaluation items (the real `score_grid` path: precision context,
    autocast, channels-last) per `SCORING_VARIANTS`, the variants alternated ``rounds`` times (medians)."""
    model = _fresh(name)
    model.score_batch_size = BATCH
    n_items = WARMUP + max(3, int(seconds * 800 / per_item))  # ~``seconds`` at fp32 speed
    items = EvalItems(patches(n_items * per_item, seed=2), per_item)
    rates: dict[str, list[float]] = {label: [] for label in SCORING_VARIANTS}
    for _ in range(rounds):
        for label, (precision, channels_last) in SCORING_VARIANTS.items():
            model.score_channels_last = channels_last
            clock = _BatchTimes()
            pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, precision=precision, callbacks=[clock]).predict(
                model, DataLoader(items, batch_size=None), return_predictions=False)
            rates[label].append(per_item / statistics.median(clock.times[WARMUP:]))
    return {label: statistics.median(r) for label, r in rates.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    seconds = float(os.environ.get("BENCH_SECONDS", "3"))
    names = os.environ.get("BENCH_MODELS", "cae,bvae,vqvae,fanogan").split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    peak = matmul_flops()
    print(f"plain fp32 matmul 1024^3: {peak / 1e9:.1f} GFLOP/s (the reference for 'of matmul')")
    header = (f"{'model':8} {'train plain':>11} {'train PL':>9} {'ratio':>6} {'score plain':>11} {'score PL':>9} "
              f"{'ratio':>6} {'train GFLOP/s':>13} {'score GFLOP/s':>13}")
    print("patches/s; PL = Lightning Trainer.fit / Trainer.predict over a DataLoader")
    print(header)
    for name in names:
        r = bench_model(name, seconds, peak)
        print(f"{name:8} {r['plain_train']:11.0f} {r['lightning_train']:9.0f} {r['train_ratio']:6.2f} "
              f"{r['plain_score']:11.0f} {r['lightning_score']:9.0f} {r['score_ratio']:6.2f} "
              f"{r['train_gflops']:7.1f} ({r['train_frac_peak']:4.0%}) {r['score_gflops']:7.1f} ({r['score_frac_peak']:4.0%})",
              flush=True)
    if "fanogan" in names:
        print("f-AnoGAN training FLOPs exclude the gradient penalty (not traceable by FlopCounterMode): a lower bound")
    from lightning_modules.base import bf16_supported

    fast_bf16 = bf16_supported(torch.device("cpu"))
    print(f"\nScoring through Trainer.predict (score_grid), patches/s, medians of 3 alternating rounds; "
          f"fast bf16 on this CPU: {fast_bf16}{'' if fast_bf16 else ' (bf16-mixed then scores in fp32)'}")
    print(f"{'model':8} {'fp32':>7} {'fp32+CL':>8} {'bf16':>7} {'bf16+CL':>8}   {'bf16/fp32':>9} "
          f"{'CL/plain fp32':>13} {'CL/plain bf16':>13} {'bf16+CL/fp32':>12}")
    for name in [n for n in names if n != "fanogan"]:
        r = scoring_variants(name, seconds)
        fp32, fp32_cl, bf16, bf16_cl = (r[k] for k in SCORING_VARIANTS)
        print(f"{name:8} {fp32:7.0f} {fp32_cl:8.0f} {bf16:7.0f} {bf16_cl:8.0f}   {bf16 / fp32:9.2f} "
              f"{fp32_cl / fp32:13.2f} {bf16_cl / bf16:13.2f} {bf16_cl / fp32:12.2f}", flush=True)
    print("\nCAE plain loop, precision / memory-format variants (patches/s):")
    for label, train, score in precision_variants(seconds):
        print(f"  {label:22} train {train:7.0f}   score {score:7.0f}", flush=True)


if __name__ == "__main__":
    main()
