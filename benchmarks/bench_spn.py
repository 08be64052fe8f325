"""RAT-SPN speed and memory in the paper setting, beside a straightforward log-space implementation.

Paper setting: 64 variables, D = 1, R = 50, I = 45, C = 1; Gaussian leaves and categorical leaves
over K = 512 codes; batch 64 (training) and 4096 (scoring). Measured per case in a fresh process
(so peak RSS belongs to that case): forward samples/s (no gradient), EM-step samples/s (statistics
+ M-step, step 1e-4) and peak resident memory. The reference evaluates the same network the
obvious way: per-variable leaf log-densities N x V x R x I, region sums, all R x I x I products,
one logsumexp; its EM statistics come from backward() into dense parameters and a dense M-step
(in chunks of 256 rows; at batch 4096 it is timed on 512 rows and scaled, its cost being linear).
Both run with one torch thread, then again with two (the machine's cores). Medians of repeated runs.
The 50-epoch figures are extrapolated (300,000 cached latents / 64 per step x 50 epochs) from the bare EM
step and, end to end, from ``RatSpnStage`` in ``Trainer.fit`` over the real patch dataset: its cached
epochs, per EM step of 64, with loader batches of 64 (one EM step each) and of 1024 (em_batch_size 64).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import resource
import statistics
import time

NUM_VARS, DEPTH, REPS, INPUTS, K = 64, 1, 50, 45, 512
CONTEXT = 2  # Gaussian context variables of the composite case
EPOCH_LATENTS, EPOCHS = 300_000, 50
STEP = 1e-4  # the paper's online-EM step size
CHUNK = 256  # the reference processes large batches in chunks of this many rows (else it needs ~10 GB)
REFERENCE_ROWS = 512  # its cost is linear in chunks: at batch 4096 it is timed on 2 chunks, per sample


def _median_seconds(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (one thread: CPU time ~ the wall
    time on an idle machine, which a shared 2-core machine rarely is)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


class _Reference:
    """The same D = 1 network written the straightforward way, with exact EM (for the ratio only)."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.leaf = model.leaf
        if self.leaf == "gaussian":
            mean, var = model.gaussian_leaves()  # V x R x I
            self.mean = mean.detach().clone().requires_grad_()
            self.log_std = (0.5 * var.log()).detach().clone().requires_grad_()
            self.bias = torch.zeros_like(self.mean, requires_grad=True)  # its gradient = expected counts
        else:
            table = model.leaf_log_table.view(REPS, NUM_VARS, K, INPUTS) + model.leaf_log_scale[:, :, None, :]
            self.table = table.permute(1, 0, 3, 2).contiguous().requires_grad_()  # V x R x I x K
        self.w = torch.softmax(model.log_weights[0].detach().reshape(REPS, -1), -1).requires_grad_()
        self.mix = torch.softmax(model.log_mix.detach().reshape(REPS), -1).requires_grad_()
        self.mask = model.assignment.detach()  # V x R x 2

    def log_likelihood(self, x):
        torch = self.torch
        if self.leaf == "gaussian":
            z = (x[:, :, None, None] - self.mean) / self.log_std.exp()
            leaf = -0.5 * z * z - self.log_std - 0.5 * math.log(2 * math.pi) + self.bias  # N x V x R x I
        else:
            v = torch.arange(NUM_VARS)[None, :, None, None]
            r = torch.arange(REPS)[None, None, :, None]
            i = torch.arange(INPUTS)[None, None, None, :]
            leaf = self.table[v, r, i, x[:, :, None, None]]  # N x V x R x I
        left = (leaf * self.mask[None, :, :, 0, None]).sum(1)  # N x R x I
        right = (leaf * self.mask[None, :, :, 1, None]).sum(1)
        log_w = self.w.log().view(REPS, INPUTS, INPUTS)
        products = left[:, :, :, None] + right[:, :, None, :] + log_w + self.mix.log()[:, None, None]
        return torch.logsumexp(products.reshape(x.shape[0], -1), -1)

    def em_step(self, x, step):
        """backward() into dense parameters, then the exact online M-step, dense over every parameter."""
        torch = self.torch
        params = [self.w, self.mix] + ([self.mean, self.log_std, self.bias] if self.leaf == "gaussian" else [self.table])
        for p in params:
            p.grad = None
        for chunk in x.split(CHUNK):
            self.log_likelihood(chunk).sum().backward()
        with torch.no_grad():
            for p in (self.w, self.mix):
                counts = p * p.grad
                p.mul_(1 - step).add_(step * counts / counts.sum(-1, keepdim=True).clamp_min(1e-12))
            if self.leaf == "gaussian":
                n = self.bias.grad.clamp_min(1e-12)
                var = self.log_std.exp().pow(2)
                shift = var * self.mean.grad / n  # batch mean - mean
                batch_var = (var * (self.log_std.grad + n) / n - shift * shift).clamp_min(1e-3)
                new_var = (1 - step) * var + step * batch_var + step * (1 - step) * shift * shift
                self.mean.add_(step * shift)
                self.log_std.copy_(0.5 * new_var.log())
            else:
                probs = self.table.exp()
                counts = self.table.grad
                new = (1 - step) * probs + step * counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
                self.table.copy_(new.clamp_min(1e-30).log())


def _case(leaf: str, batch: int, impl: str, repeats: int, threads: int = 1, tuned: bool = False) -> dict:
    """Runs in a fresh process: timings and peak RSS of one (leaf, batch, implementation); ``tuned``: with
    the allocator setting of the ``lightning`` / ``mammospn`` entry points (experiments.memory)."""
    import torch

    from spn import RatSpn

    if tuned:
        from experiments.memory import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    kwargs = {"leaf": "categorical", "num_categories": K} if leaf == "categorical" else {}
    num_vars = NUM_VARS
    if leaf == "gaussian_context":  # CAE / bVAE latents plus CONTEXT context variables, all Gaussian
        num_vars = NUM_VARS + CONTEXT
    if leaf == "composite":  # the codes plus CONTEXT Gaussian context variables (issue 9's p(z | context))
        num_vars = NUM_VARS + CONTEXT
        kwargs = {"leaf": [("categorical", range(NUM_VARS)), ("gaussian", range(NUM_VARS, num_vars))], "num_categories": K}
    model = RatSpn(num_vars, DEPTH, REPS, INPUTS, seed=0, **kwargs)
    if leaf == "categorical":
        data = torch.randint(0, K, (4096, NUM_VARS), generator=gen)
    elif leaf == "composite":
        data = torch.cat([torch.randint(0, K, (4096, NUM_VARS), generator=gen).float(), torch.randn(4096, CONTEXT, generator=gen)], 1)
    else:
        data = torch.randn(4096, num_vars, generator=gen)
    model.init_from_data(data)
    x = data[: min(batch, REFERENCE_ROWS)] if impl == "reference" else data[:batch]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if impl == "ours":
        conditional = leaf in ("gaussian_context", "composite")
        latents = torch.zeros_like(x, dtype=torch.bool)
        latents[:, :NUM_VARS] = True

        def forward():  # a conditional model scores -(log p(z, c) - log p(c)): two passes
            with torch.no_grad():
                model.log_likelihood(x)
                if conditional:
                    model.log_likelihood(x, missing=latents)

        def em():
            model.em_update(x, step_size=1e-4)

    else:
        ref = _Reference(model)

        def forward():
            with torch.no_grad():
                for chunk in x.split(CHUNK):
                    ref.log_likelihood(chunk)

        def em():
            ref.em_step(x, 1e-4)

    fwd, fwd_cpu = _median_seconds(forward, repeats)
    step, step_cpu = _median_seconds(em, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"forward_s": fwd, "em_s": step, "forward_cpu_s": fwd_cpu, "em_cpu_s": step_cpu, "peak_mb": peak, "model_mb": base_rss}


def _patch_dataset(folder, n: int):
    """The project's ``PatchDataset`` over a real uint8 memory-mapped patch file of ``n`` random 64 x 64
    patches (what the healthy-patch data module serves; only the patch content is random)."""
    import numpy as np

    from datamodules.patches import PatchCache, PatchDataset

    rng = np.random.default_rng(0)
    data = np.memmap(folder / "patches.u8", dtype=np.uint8, mode="w+", shape=(n, 64, 64))
    data[:] = rng.integers(40, 200, size=data.shape, dtype=np.uint8)
    data.flush()
    info = {"params": {"patch_size": 64}, "num_patches": n, "patients": [f"p{i}" for i in range(50)]}
    cache = PatchCache(folder, info, np.zeros(n, np.int64), np.arange(n) % 50, np.full((n, 2), 32), np.zeros(n, np.int64),
                       np.zeros(n, bool), np.full((n, 2), 32.0, np.float32))
    return PatchDataset(cache)


def _stage_case(threads: int, loader_batch: int, em_batch: int, loader_batches: int, epochs: int) -> dict:
    """Runs in a fresh process: ``RatSpnStage`` fitted by ``Trainer.fit`` (paper setting, an untrained CAE
    as the frozen first stage, the real patch dataset over a memory-mapped file, a CSV logger), loader
    batches of ``loader_batch`` split into EM steps of ``em_batch``. The epochs after the first use cached
    latents; each of their loader batches is timed from batch start to the next batch start (DataLoader
    fetch, latent look-up, standardisation, the EM steps, Lightning's loop and logging). Right after the
    fit, a bare loop of ``RatSpn.em_update`` over the same cached latents in steps of ``em_batch`` is
    timed on a copy of the model. Returns the median seconds per EM step of both. (DataLoader workers
    would hide the patch fetch, ~1 ms per EM step, but cost more here: each 16 MB float batch crosses
    shared memory, 21 ms per EM step with one worker.)"""
    import copy
    import tempfile
    import warnings
    from pathlib import Path

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from datamodules.patches import collate_patch_batch
    from experiments.memory import keep_freed_memory
    from lightning_modules import CAE, RatSpnStage

    keep_freed_memory()  # as the `lightning` command does
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.lightning: list[float] = []

        def on_train_batch_start(self, trainer, stage, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.last is not None:
                self.lightning.append(now - self.last)
            self.last = now if trainer.current_epoch >= 1 else None  # every latent is cached from epoch 2 on

        def on_train_epoch_end(self, trainer, stage) -> None:
            if self.last is not None:  # the last batch of the epoch ends with the epoch's own bookkeeping
                self.lightning.append(time.perf_counter() - self.last)
            self.last = None

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "cae.ckpt"
        writer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        writer.strategy.connect(CAE())  # saved untrained by Lightning, with the model's own checkpoint hook
        writer.save_checkpoint(ckpt)
        stage = RatSpnStage(str(ckpt), step_size=STEP, em_batch_size=em_batch, init_batches=max(1, 3200 // loader_batch))
        loader = DataLoader(_patch_dataset(Path(tmp), loader_batch * loader_batches), batch_size=loader_batch, shuffle=True,
                            collate_fn=collate_patch_batch, generator=torch.Generator().manual_seed(0))
        clock = Clock()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, logger=pl.loggers.CSVLogger(tmp), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[clock],
        )
        trainer.fit(stage, loader)
    # the same EM steps without Lightning: a bare loop over the cached, standardised latents
    latents = stage._standardise(stage._cache[stage._cached]).split(em_batch)
    bare, spn = [], copy.deepcopy(stage.spn)
    for z in latents:
        start = time.perf_counter()
        spn.em_update(z, step_size=STEP)
        bare.append(time.perf_counter() - start)
    per_batch = loader_batch // em_batch
    return {"lightning_s": statistics.median(clock.lightning) / per_batch, "bare_s": statistics.median(bare)}


def _run_case(args: tuple, fn=_case) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    print(__doc__.strip().splitlines()[0])
    print(f"setting: V={NUM_VARS} D={DEPTH} R={REPS} I={INPUTS}; categorical K={K}; 1 torch thread; medians")
    print("wall = elapsed time (shared machine); cpu = this process's CPU time (~ wall time when idle)")
    header = (
        f"{'leaf':<12}{'batch':>6}  {'impl':<10}{'fwd samp/s':>12}{'EM ms/step':>12}{'EM samp/s':>11}"
        f"{'cpu fwd/s':>11}{'cpu EM ms':>11}{'peak MB':>9}"
    )
    results: dict[tuple, dict] = {}
    for leaf in ("gaussian", "categorical"):
        print("\n" + header)
        for batch in (64, 4096):
            for impl in ("ours", "reference"):
                repeats = 3 if impl == "reference" or batch > 64 else 15
                r = _run_case((leaf, batch, impl, repeats))
                if impl == "reference" and batch > REFERENCE_ROWS:  # timed on REFERENCE_ROWS rows, per sample
                    for key in ("forward_s", "em_s", "forward_cpu_s", "em_cpu_s"):
                        r[key] *= batch / REFERENCE_ROWS
                results[(leaf, batch, impl)] = r
                print(
                    f"{leaf:<12}{batch:>6}  {impl:<10}{batch / r['forward_s']:>12,.0f}{1000 * r['em_s']:>12.2f}"
                    f"{batch / r['em_s']:>11,.0f}{batch / r['forward_cpu_s']:>11,.0f}{1000 * r['em_cpu_s']:>11.2f}"
                    f"{r['peak_mb']:>9,.0f}",
                    flush=True,
                )
            ours, ref = results[(leaf, batch, "ours")], results[(leaf, batch, "reference")]
            print(
                f"{'':<12}{batch:>6}  ratio     forward x{ref['forward_s'] / ours['forward_s']:.1f}, "
                f"EM step x{ref['em_s'] / ours['em_s']:.1f} faster than the reference "
                f"(cpu time: x{ref['forward_cpu_s'] / ours['forward_cpu_s']:.1f}, x{ref['em_cpu_s'] / ours['em_cpu_s']:.1f})"
            )
    g64 = results[("gaussian", 64, "ours")]
    c64 = results[("categorical", 64, "ours")]
    print("\nbatch 64 with 2 torch threads (this machine's 2 cores), wall time:")
    two = {}
    for leaf in ("gaussian", "categorical"):
        for impl in ("ours", "reference"):
            two[(leaf, impl)] = r = _run_case((leaf, 64, impl, 3 if impl == "reference" else 15, 2))
            print(f"  {leaf:<12}{impl:<10} EM step {1000 * r['em_s']:8.2f} ms", flush=True)
        print(f"  {'':<12}ratio     EM step x{two[(leaf, 'reference')]['em_s'] / two[(leaf, 'ours')]['em_s']:.1f} faster")

    print(f"\ncomposite leaves: {NUM_VARS} categorical codes + {CONTEXT} Gaussian context variables, 1 thread, wall time:")
    for batch in (64, 4096):
        comp = _run_case(("composite", batch, "ours", 15 if batch == 64 else 3))
        cat = results[("categorical", batch, "ours")]
        print(f"  batch {batch:>4}: forward {batch / comp['forward_s']:>9,.0f} samp/s, EM step {1000 * comp['em_s']:8.2f} ms; "
              f"cost vs categorical alone: forward x{comp['forward_s'] / cat['forward_s']:.2f}, "
              f"EM step x{comp['em_s'] / cat['em_s']:.2f}", flush=True)

    print(f"\nconditional RAT-SPN (RatSpnStage context=True): {NUM_VARS} + {CONTEXT} Gaussian variables, scoring "
          "= joint + context marginal, 1 thread, next to the plain Gaussian model, run alternately:")
    for batch in (64, 4096):
        pairs = [(_run_case(("gaussian", batch, "ours", 15 if batch == 64 else 3)),
                  _run_case(("gaussian_context", batch, "ours", 15 if batch == 64 else 3))) for _ in range(3)]
        plain = sorted(pairs, key=lambda p: p[0]["em_s"])[1]
        print(f"  batch {batch:>4}: EM step x{sorted(c['em_s'] / p['em_s'] for p, c in pairs)[1]:.2f}, "
              f"scoring x{sorted(c['forward_s'] / p['forward_s'] for p, c in pairs)[1]:.2f} the plain model's "
              f"({1000 * plain[0]['em_s']:.2f} ms / {batch / plain[0]['forward_s']:,.0f} samp/s)", flush=True)

    print("\nbatch 64 with the entry points' allocator setting (freed memory kept, no page faults):")
    tuned = {}
    for leaf in ("gaussian", "categorical"):
        for threads in (1, 2):
            tuned[(leaf, threads)] = r = _run_case((leaf, 64, "ours", 15, threads, True))
            default = results[(leaf, 64, "ours")] if threads == 1 else two[(leaf, "ours")]
            print(f"  {leaf:<12}{threads} thread(s): EM step {1000 * r['em_s']:7.2f} ms (default allocator: "
                  f"{1000 * default['em_s']:.2f} ms)", flush=True)

    print("\nRatSpnStage in Trainer.fit, cached epochs (Gaussian, paper setting), seconds per EM step of 64:")
    stage = {}
    for threads, loader_batch, batches in ((1, 64, 60), (1, 1024, 8), (2, 1024, 8)):
        r = _run_case((threads, loader_batch, 64, batches, 3), _stage_case)
        stage[(threads, loader_batch)] = r
        print(
            f"  {threads} thread(s), loader batch {loader_batch:>4}: {1000 * r['lightning_s']:6.2f} ms in Trainer.fit, "
            f"bare em_update loop over the cache {1000 * r['bare_s']:6.2f} ms (bare / fit {r['bare_s'] / r['lightning_s']:.2f})",
            flush=True,
        )

    print("\ntargets (2-core CPU, medians):")
    steps = EPOCHS * EPOCH_LATENTS / 64
    for name, value, target, unit in (
        ("Gaussian EM step, batch 64, 1 thread (wall)", 1000 * g64["em_s"], 5.0, "ms"),
        ("Gaussian EM step, batch 64, 1 thread (cpu)", 1000 * g64["em_cpu_s"], 5.0, "ms"),
        ("Gaussian EM step, batch 64, 2 threads (wall)", 1000 * two[("gaussian", "ours")]["em_s"], 5.0, "ms"),
        ("Gaussian EM step, batch 64, 1 thread, entry-point allocator (wall)", 1000 * tuned[("gaussian", 1)]["em_s"], 5.0, "ms"),
        ("Gaussian EM step, batch 64, 2 threads, entry-point allocator (wall)", 1000 * tuned[("gaussian", 2)]["em_s"], 5.0,
         "ms"),
        ("categorical EM step, batch 64, 1 thread (wall)", 1000 * c64["em_s"], 100.0, "ms"),
        ("categorical EM step, batch 64, 2 threads (wall)", 1000 * two[("categorical", "ours")]["em_s"], 100.0, "ms"),
        ("categorical EM step, batch 64, 1 thread, entry-point allocator (wall)", 1000 * tuned[("categorical", 1)]["em_s"],
         100.0, "ms"),
        ("categorical peak memory, batch 64", c64["peak_mb"] / 1024, 2.0, "GB"),
        ("50 EM epochs x 300k latents, bare EM steps, 1 thread (extrapolated, wall)", steps * g64["em_s"] / 60, None, "min"),
        ("50 EM epochs x 300k latents, Trainer.fit, 1 thread (extrapolated)", steps * stage[(1, 1024)]["lightning_s"] / 60,
         20.0, "min"),
        ("50 EM epochs x 300k latents, Trainer.fit, 2 threads (extrapolated)", steps * stage[(2, 1024)]["lightning_s"] / 60,
         20.0, "min"),
        ("50 EM epochs x 300k latents, categorical bare EM steps, 1 thread (extrapolated, cpu)", steps * c64["em_cpu_s"] / 60,
         None, "min"),
    ):
        verdict = "" if target is None else ("  ok" if value < target else f"  MISSES target < {target:g} {unit}")
        print(f"  {name}: {value:.2f} {unit}{verdict}")


if __name__ == "__main__":
    main()
