"""Reliability across interruptions: checkpoints that mean what they say (last / best, damaged files in one
line, ``last`` / ``best`` aliases), kill -9 and resume bit-identical, a crash mid-test leaving the earlier
results whole. The input corpus comes from tests/test_bad_inputs.py.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from experiments import checkpoints, cli
from tests.test_bad_inputs import _lesion_corpus, _test_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ checkpoints


class _RisingLoss(pl.LightningModule):
    """val/loss rises every epoch: the case where Lightning's save_last left last.ckpt at the best epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_latest_epoch_and_best_the_best(tmp_path: Path) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 2)), batch_size=4)
    trainer = pl.Trainer(max_epochs=3, callbacks=checkpoints.checkpoint_callbacks(tmp_path), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         plugins=[checkpoints.AtomicCheckpointIO()])
    trainer.fit(_RisingLoss(), data, data)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert (best["epoch"], best["global_step"]) == (0, 2)
    assert "rng_states" not in last  # only the RNG callback adds them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporaries


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "is empty"),
        (b"not a checkpoint at all\n", "damaged or not a checkpoint"),
        ("truncate", "damaged or not a checkpoint"),
        ("tensor", "not a Lightning checkpoint"),
        (None, "not found"),
    ],
    ids=["empty", "text", "truncated", "plain-tensor", "missing"],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path: Path, content, words, capsys) -> None:
    path = tmp_path / "model.ckpt"
    if content == "truncate":
        torch.save({"state_dict": {"w": torch.rand(1000)}, "epoch": 0}, path)
        path.write_bytes(path.read_bytes()[:700])
    elif content == "tensor":
        torch.save(torch.rand(3), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError, match=words) as err:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # the CLI, without a model config (the class would come from the checkpoint): one line, exit 2
    code = cli.main(["test", "--ckpt_path", str(path)])
    assert code == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and str(path) in out[0] and "Traceback" not in out[0]


def test_checkpoint_aliases_resolve_to_the_run_folder_or_fail(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    with pytest.raises(checkpoints.CheckpointError, match=r"--ckpt_path last: no .*runs/r/checkpoints/last.ckpt"):
        checkpoints.resolve_ckpt_path("last", run, "test")
    with pytest.raises(checkpoints.CheckpointError, match="--ckpt_path best"):
        checkpoints.resolve_ckpt_path("best", run, "validate")
    assert checkpoints.resolve_ckpt_path("last", run, "fit") is None  # set-and-forget resume: start fresh
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 4, "global_step": 40}, run / "checkpoints" / "best.ckpt")
    resolved = checkpoints.resolve_ckpt_path("best", run, "test")
    assert resolved == str(run / "checkpoints" / "best.ckpt")
    info = checkpoints.checkpoint_info(resolved)
    assert info["epoch"] == 4 and info["global_step"] == 40 and len(info["sha256"]) == 64


# ------------------------------------------------------------------ kill -9 and resume

_SLOW = '''
import time
import pytorch_lightning as pl


class Slow(pl.Callback):
    """Throttles training so a kill lands mid-fit."""

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(0.15)
'''


def _fit_config(tmp_path: Path, manifest: Path) -> Path:
    config = {
        "seed_everything": 3,
        "model": {"class_path": "lightning_modules.BetaVAE", "init_args": {"lr": 1.0e-3, "latent_dim": 8}},
        "data": {"class_path": "datamodules.MammographyDataModule", "init_args": {
            "source": "manifest", "root": str(manifest), "cache_dir": str(tmp_path / "cache"),
            "patches_inside": 6, "patches_contour": 6, "batch_size": 4, "val_fraction": 0.25, "progress": False,
            "lesion_validation_fraction": 0.0}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 4, "num_sanity_val_steps": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "run": {"root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "evaluate": False},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lightning(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def _losses(run: Path) -> list[tuple[int, str, str]]:
    rows = []
    for csv_path in sorted((run / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(csv_path.open()):
            if row.get("val/loss"):
                rows.append((int(row["epoch"]), row["val/loss"], row.get("step", "")))
    return rows


@pytest.mark.slow
def test_kill_9_then_resume_from_last_is_bit_identical(tmp_path: Path) -> None:
    (tmp_path / "slowcb.py").write_text(textwrap.dedent(_SLOW))
    config = _fit_config(tmp_path, _lesion_corpus(tmp_path / "data"))
    _finish(_lightning(["fit", "--config", str(config), "--run.name", "whole"], tmp_path))

    proc = _lightning(["fit", "--config", str(config), "--run.name", "killed",
                       "--trainer.callbacks+=slowcb.Slow"], tmp_path)
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(last, weights_only=False)["epoch"]
    assert killed_at < 3, "the kill came after the last epoch: nothing left to resume"

    _finish(_lightning(["fit", "--config", str(config), "--run.name", "killed", "--ckpt_path", "last"], tmp_path))
    whole = torch.load(tmp_path / "runs" / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (whole["epoch"], whole["global_step"])
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    whole_losses = {e: v for e, v, _ in _losses(tmp_path / "runs" / "whole")}
    resumed_losses = {e: v for e, v, _ in _losses(tmp_path / "runs" / "killed")}
    assert whole_losses == resumed_losses and sorted(whole_losses) == [0, 1, 2, 3]

    results = {}
    for name in ("whole", "killed"):
        _finish(_lightning(["test", "--config", str(config), "--run.name", name, "--run.evaluate", "true",
                            "--ckpt_path", "last"], tmp_path))
        metrics = yaml.safe_load((tmp_path / "results" / name / "metrics.json").read_text())
        assert metrics["checkpoint"]["epoch"] == 3 and metrics["n_evaluated"] == 2
        results[name] = {k: v for k, v in metrics.items() if "seconds" not in k and not k.endswith("_per_s")
                         and k != "checkpoint"}
    assert results["whole"] == results["killed"]  # the test metrics too, to the last digit


# ------------------------------------------------------------------ a crash mid-test

def test_a_crash_mid_test_leaves_the_earlier_results_whole(tmp_path: Path, monkeypatch) -> None:
    from lightning_modules import CAE

    config = _test_config(tmp_path, _lesion_corpus(tmp_path / "data"))
    out = tmp_path / "results" / "t"
    assert cli.main(["test", "--config", config]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = CAE.test_step

    def crash_on_second(self, batch, batch_idx, *args):
        if batch_idx == 1:
            raise RuntimeError("killed mid-test")
        return real(self, batch, batch_idx, *args)

    monkeypatch.setattr(CAE, "test_step", crash_on_second)
    with pytest.raises(RuntimeError, match="killed mid-test"):
        cli.main(["test", "--config", config, "--model.init_args.latent_dim", "4"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # old metrics.json with its own maps/, nothing new and partial beside them
