"""`strategy: ddp` for every model: one epoch on 2 CPU processes (gloo); both ranks must end with the same
weights (gradients all-reduced, VQ codebook revivals broadcast, f-AnoGAN's two optimisers in sync, the
RAT-SPN stage's data-driven initialisation broadcast and its EM statistics summed over ranks).

Run as a script, this file is the training job itself: Lightning's DDP launcher starts rank 1 by running
the same command line again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODELS = ("cae", "bvae", "vqvae", "fanogan", "spn")


def _job(out: Path, names: list[str]) -> None:
    import pytorch_lightning as pl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_models_helpers import healthy_patches, loader, trainer

    import lightning_modules as lm

    torch.set_num_threads(1)
    makers = {
        "cae": lambda: lm.CAE(lr=1e-3),
        "bvae": lambda: lm.BetaVAE(lr=1e-3),
        "vqvae": lambda: lm.VQVAE(lr=1e-3, num_embeddings=32, revive_every=2, usage_decay=0.3),
        "fanogan": lambda: lm.FAnoGAN(width=4, latent_dim=16, n_critic=2),
        # EM steps of 4 on loader batches of 8; the frozen CAE checkpoint is written by the test
        "spn": lambda: lm.RatSpnStage(str(out / "cae.ckpt"), num_repetitions=4, num_input_distributions=5,
                                      step_size=0.05, init_batches=2, em_batch_size=4),
    }
    x = healthy_patches(64, seed=0)
    for name in names:
        pl.seed_everything(0, verbose=False)
        model = makers[name]()
        tr = trainer(-1, devices=2, strategy="ddp", max_epochs=1, limit_val_batches=1)
        tr.fit(model, loader(x, batch_size=8), loader(x[:16], batch_size=8, shuffle=False))
        metrics = {k: float(v) for k, v in tr.callback_metrics.items()}
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "world": tr.world_size, "metrics": metrics}, out / f"{name}_rank{tr.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path) -> None:
    from test_models_helpers import trainer

    from lightning_modules import CAE

    torch.manual_seed(0)
    writer = trainer(0)  # an untrained CAE saved by Lightning itself, with the model's own checkpoint hook
    writer.strategy.connect(CAE())
    writer.save_checkpoint(tmp_path / "cae.ckpt")
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tmp_path), ",".join(MODELS)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in MODELS:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert ranks[0]["world"] == ranks[1]["world"] == 2
        a, b = ranks[0]["state"], ranks[1]["state"]
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: ranks differ in {different[:5]}"
        assert ranks[0]["metrics"]["val/loss"] == pytest.approx(ranks[1]["metrics"]["val/loss"])  # sync_dist
    spn = torch.load(tmp_path / "spn_rank0.pt", weights_only=False)
    assert spn["metrics"]["em/weight_distance_from_init"] > 0  # EM moved the (identical) RAT-SPNs
    vq = torch.load(tmp_path / "vqvae_rank0.pt", weights_only=False)
    assert vq["metrics"]["train/revived_codes"] > 0 and "train/perplexity" in vq["metrics"]  # revived, then broadcast


if __name__ == "__main__":
    _job(Path(sys.argv[1]), sys.argv[2].split(","))
