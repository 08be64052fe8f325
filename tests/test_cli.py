"""The `lightning` CLI on tiny stand-ins: help, config merging, overrides, run folders, resume, W&B modes, predict."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from experiments import cli, loggers
from lightning_modules.base import AnomalyDetector


class TinyDetector(AnomalyDetector):
    """A linear autoencoder on 64 x 64 patches; score = per-patch MSE."""

    def __init__(self, hidden: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Linear(64 * 64, hidden)
        self.decoder = nn.Linear(hidden, 64 * 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x.flatten(1))).view_as(x)

    def _loss(self, x: Tensor) -> Tensor:
        return ((self(x) - x) ** 2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch["patches"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch["patches"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def score_patches(self, x: Tensor) -> Tensor:
        return ((self(x) - x) ** 2).flatten(1).mean(1)


class _Patches(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 64, 64, generator=g) * 0.2 + 0.4

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "patches": self.images[i],
            "index": torch.tensor(i),
            "centers": torch.tensor([32, 32]),
            "patient_id": f"p{i % 4}",
            "label": torch.tensor(0),
        }


def _evaluation_item(k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + k)
    h, w = 96, 80
    image = (rng.random((h, w)) * 0.2 + 0.4).astype(np.float32)
    breast = np.zeros((h, w), dtype=bool)
    breast[:, : w - 16] = True
    centers = np.array([(r, c) for r in range(0, h, 16) for c in range(0, w, 16) if breast[r, c]], dtype=np.int64)
    padded = np.pad(image, 32, mode="reflect")
    patches = np.stack([padded[r : r + 64, c : c + 64] for r, c in centers])[:, None]
    lesion = np.zeros((h, w), dtype=bool)
    lesion[40:56, 20:36] = True  # a lesion inside the breast: the image is evaluable
    return {
        "image_id": f"img{k}",
        "patient_id": f"q{k}",
        "scan": torch.from_numpy(image),
        "breast_mask": torch.from_numpy(breast),
        "lesion_mask": torch.from_numpy(lesion),
        "centers": torch.from_numpy(centers),
        "patches": torch.from_numpy(patches.astype(np.float32)),
        "spacing_mm": 0.2,
        "stride": 16,
        "meta": {"density": 2},
    }


class TinyData(pl.LightningDataModule):
    """Healthy patch batches and evaluation items in the contract's format."""

    def __init__(self, n: int = 48, batch_size: int = 16, seed: int = 0, source: str = "tiny") -> None:
        super().__init__()
        self.n, self.batch_size, self.seed, self.source = n, batch_size, seed, source

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Patches(self.n, self.seed), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Patches(self.batch_size, self.seed + 1), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader([_evaluation_item(k, self.seed) for k in range(2)], batch_size=None)

    predict_dataloader = test_dataloader


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {
    "model": {"class_path": f"{__name__}.TinyDetector", "init_args": {"hidden": 4}},
    "data": {"class_path": f"{__name__}.TinyData"},
    "trainer": {
        "max_epochs": 1,
        "accelerator": "cpu",
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "log_every_n_steps": 1,
    },
    "run": {"evaluate": False},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_configs_merge_in_order_and_dotted_overrides_win(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    first = _write(workdir / "a.yaml", {**BASE, "trainer": {**BASE["trainer"], "max_epochs": 7}})
    second = _write(workdir / "b.yaml", {"trainer": {"max_epochs": 2, "limit_train_batches": 3}})
    with pytest.raises(SystemExit):
        cli.run_cli(["fit", "--config", first, "--config", second, "--model.init_args.hidden", "9", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 2
    assert printed["trainer"]["limit_train_batches"] == 3
    assert printed["model"]["init_args"]["hidden"] == 9
    assert printed["model"]["class_path"].endswith("TinyDetector")
    assert printed["seed_everything"] == 0
    assert printed["run"]["root"] == "runs"


def test_config_typo_names_the_key(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(workdir / "a.yaml", BASE)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(["fit", "--config", config, "--model.init_args.hiden", "9"])
    assert exit_info.value.code != 0
    assert "hiden" in capsys.readouterr().err


def test_fit_writes_run_folder_and_resumes_from_last(workdir: Path) -> None:
    config = _write(workdir / "a.yaml", BASE)
    run = cli.run_cli(["fit", "--config", config, "--run.name", "tiny"])
    run_dir = workdir / "runs" / "tiny"
    assert run.run_dir == Path("runs/tiny")
    assert (run_dir / "config.yaml").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["hidden"] == 4 and saved["run"]["name"] == "tiny"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    rows = list(csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open()))
    assert any(r.get("val/loss") for r in rows)
    assert run.trainer.global_step == 3  # 48 patches / batch 16

    # interrupted after epoch 1 of 3: resume from last continues at epoch 1 and step 3
    resumed = cli.run_cli(
        ["fit", "--config", config, "--run.name", "tiny", "--trainer.max_epochs", "3", "--ckpt_path", "last"]
    )
    assert resumed.trainer.current_epoch == 3
    assert resumed.trainer.global_step == 9
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_epochs"] == 3
    assert (run_dir / "logs" / "version_1" / "metrics.csv").is_file()

    # a fresh run in the same folder neither fails on config.yaml nor leaves temporary files
    cli.run_cli(["fit", "--config", config, "--run.name", "tiny"])
    assert not list(run_dir.glob(".*tmp*"))


def test_ckpt_path_restores_hyperparameters_and_test_runs(workdir: Path) -> None:
    config = _write(workdir / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "h", "--model.init_args.hidden", "6"])
    ckpt = str(workdir / "runs" / "h" / "checkpoints" / "best.ckpt")
    tested = cli.run_cli(["test", "--config", config, "--run.name", "h", "--ckpt_path", ckpt])
    assert tested.model.hparams.hidden == 6
    # the test's resolved config sits beside the fit's, which it does not overwrite
    saved = yaml.safe_load((workdir / "runs" / "h" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["hidden"] == 6 and saved.get("ckpt_path") is None
    assert yaml.safe_load((workdir / "runs" / "h" / "config-test.yaml").read_text())["ckpt_path"] == ckpt
    assert tested.model.encoder.out_features == 6


def test_default_run_name_from_model_data_and_seed(workdir: Path) -> None:
    config = _write(workdir / "a.yaml", BASE)
    run = cli.run_cli(["--config", config, "--seed_everything", "3", "--trainer.max_epochs", "1"], run=False)
    assert run.run_dir == Path("runs/tinydetector-tiny-s3")


def test_predict_writes_map_overlay_mask_and_predictions_csv(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(workdir / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "p"])
    ckpt = str(workdir / "runs" / "p" / "checkpoints" / "best.ckpt")
    cli.run_cli(["predict", "--config", config, "--run.name", "p", "--ckpt_path", ckpt,
                 "--prediction.percentile", "98"])
    out = workdir / "results" / "p" / "predictions"
    for k in range(2):
        amap = np.load(out / f"img{k}_map.npy")
        assert amap.shape == (96, 80) and amap.dtype == np.float32
        assert np.isnan(amap[:, 64:]).all() and np.isfinite(amap[:, :64]).all()
        overlay = cv2.imread(str(out / f"img{k}_overlay.png"))
        assert overlay.shape[1] > 80 and overlay.shape[2] == 3  # a figure: scan plus colorbar and labels
        mask = cv2.imread(str(out / f"img{k}_mask.png"), cv2.IMREAD_GRAYSCALE)
        # the mask is exactly the in-breast pixels above the image's 98th percentile (the option given)
        # (or, when the top is a plateau with nothing strictly above, the plateau)
        level = np.percentile(amap[:, :64], 98.0)
        scores = np.nan_to_num(amap, nan=-np.inf)
        expected = scores > level if (scores > level).any() else scores >= level
        assert np.array_equal(mask > 0, expected)
        assert (mask > 0).any() and not (mask[:, 64:] > 0).any()
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image_id"] for r in rows] == ["img0", "img1"]
    for k, row in enumerate(rows):
        amap = np.load(out / f"img{k}_map.npy")
        assert float(row["image_score"]) == pytest.approx(float(np.nanmax(amap)), rel=1e-6)
        assert row["threshold_rule"] == "image 98th percentile" and row["model"] == "TinyDetector"
    assert "predict: scored 2, skipped 0" in capsys.readouterr().out


def test_wandb_offline_run_records_keys_and_disabled_writes_nothing(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(workdir / "a.yaml", BASE)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli.run_cli(["fit", "--config", config, "--run.name", "off"])
    assert not (workdir / "runs" / "off" / "wandb").exists()

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workdir / "runs" / "on"))
    cli.run_cli(["fit", "--config", config, "--run.name", "on", "--run.group", "g1", "--run.stage", "fit-ae"])
    loggers.finish_wandb()
    runs = list((workdir / "runs" / "on" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"val/loss", b"train/loss", b"g1", b"fit-ae", b"tinydetector"):
        assert key in record, key


def test_wandb_mode_follows_env_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert loggers.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        loggers.wandb_mode()


def test_test_without_model_config_reads_the_class_from_the_checkpoint(workdir: Path) -> None:
    config = _write(workdir / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "c", "--model.init_args.hidden", "5"])
    data_only = _write(workdir / "d.yaml", {k: v for k, v in BASE.items() if k != "model"})
    ckpt = str(workdir / "runs" / "c" / "checkpoints" / "best.ckpt")
    tested = cli.run_cli(["test", "--config", data_only, "--run.name", "c-test", "--ckpt_path", ckpt])
    assert type(tested.model).__name__ == "TinyDetector" and tested.model.hparams.hidden == 5


def test_missing_checkpoint_is_one_clear_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(workdir / "a.yaml", BASE)
    code = cli.main(["test", "--config", config, "--ckpt_path", str(workdir / "nope.ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lightning:" in err and "nope.ckpt" in err and "Traceback" not in err


def test_a_value_a_constructor_refuses_is_one_clear_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "bvae_spn.yaml")
    code = cli.main(["fit", "--config", config, "--model.init_args.em_batch_size", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lightning: model.init_args.em_batch_size must be >= 1" in err and "Traceback" not in err


def test_run_names_keep_second_stages_apart() -> None:
    from jsonargparse import Namespace

    def config(**init_args: str) -> Namespace:
        return Namespace(model=Namespace(class_path="lightning_modules.RatSpnStage", init_args=Namespace(**init_args)),
                         data=Namespace(class_path="x.Data", init_args=Namespace(source="synthetic", test_set="calc")))

    assert cli._model_name(config(autoencoder_ckpt="runs/betavae-synthetic-mass-s0/checkpoints/best.ckpt")) == (
        "betavae_spn")
    assert cli._model_name(config(autoencoder_ckpt="cae.ckpt")) == "cae_spn"
    assert cli._model_name(config()) == "ratspnstage"
    assert cli._data_name(config()) == "synthetic-calc"


def test_test_ckpt_path_last_resolves_and_metrics_record_the_checkpoint(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(workdir / "a.yaml", {**BASE, "run": {"evaluate": True}})
    # before any fit: one line naming the missing file, exit 2, nothing scored or written
    assert cli.main(["test", "--config", config, "--run.name", "k", "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no runs/k/checkpoints/last.ckpt" in err and "Traceback" not in err
    assert not (workdir / "results" / "k" / "metrics.json").exists()
    cli.run_cli(["fit", "--config", config, "--run.name", "k", "--trainer.max_epochs", "2"])
    cli.run_cli(["test", "--config", config, "--run.name", "k", "--ckpt_path", "last"])
    metrics = json.loads((workdir / "results" / "k" / "metrics.json").read_text())
    ckpt = workdir / "runs" / "k" / "checkpoints" / "last.ckpt"
    assert metrics["checkpoint"]["path"] == str(ckpt.resolve())
    assert (metrics["checkpoint"]["epoch"], metrics["checkpoint"]["global_step"]) == (1, 6)
    assert metrics["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    cli.run_cli(["test", "--config", config, "--run.name", "k", "--ckpt_path", "best"])
    metrics = json.loads((workdir / "results" / "k" / "metrics.json").read_text())
    assert metrics["checkpoint"]["path"] == str((workdir / "runs" / "k" / "checkpoints" / "best.ckpt").resolve())
    # an alias without a config naming the model cannot know the run folder: one line, not "required: test.model"
    assert cli.main(["test", "--ckpt_path", "last"]) == 2
    assert "--ckpt_path last needs a --config naming the model" in capsys.readouterr().err


def test_test_without_a_checkpoint_says_it_scores_initial_weights(workdir: Path) -> None:
    config = _write(workdir / "a.yaml", BASE)
    with pytest.warns(UserWarning, match="without --ckpt_path scores the model's initial weights"):
        cli.run_cli(["test", "--config", config, "--run.name", "w"])


def test_data_patch_size_is_checked_against_the_models_own() -> None:
    config = {"model": {"init_args": {"patch_size": 32}}, "data": {"init_args": {"patch_size": 32}}}
    cli.check_config_values(config)  # a 32-px model on 32-px patches
    config["data"]["init_args"]["patch_size"] = 64
    with pytest.raises(cli.ConfigError, match=r"data.init_args.patch_size must be 32, the model's "
                                             r"model.init_args.patch_size, got 64"):
        cli.check_config_values(config)
    cli.check_config_values({"model": {"init_args": {}}, "data": {"init_args": {"patch_size": 32}}})  # RatSpnStage


@pytest.mark.parametrize(("fast_bf16", "accelerator", "expected"), [
    (False, "cpu", "32-true"),  # emulated bf16 (~12x slower here): fp32, said in a warning
    (False, "auto", "32-true"),  # no GPU in the test machine: auto is the CPU
    (True, "cpu", "bf16-mixed"),  # oneDNN bf16 kernels: what the profile asked for
])
def test_bf16_precision_falls_back_to_fp32_only_on_a_cpu_without_fast_bf16(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, fast_bf16: bool, accelerator: str, expected: str
) -> None:
    if torch.cuda.is_available() and accelerator == "auto":
        pytest.skip("auto picks the GPU on this machine")
    monkeypatch.setattr(cli, "bf16_supported", lambda device: fast_bf16)
    config = _write(workdir / "a.yaml", BASE)
    args = ["--config", config, "--trainer.precision", "bf16-mixed", "--trainer.accelerator", accelerator]
    if fast_bf16:
        run = cli.run_cli(args, run=False)
    else:
        with pytest.warns(UserWarning, match="bf16-mixed -> 32-true"):
            run = cli.run_cli(args, run=False)
    assert run.trainer.precision == expected
    # an fp32 request and a GPU's bf16 are never touched
    assert cli.fallback_precision({"trainer": {"precision": "32-true", "accelerator": "cpu"}}) is None
    gpu = {"trainer": {"precision": "bf16-mixed", "accelerator": "gpu"}}
    assert cli.fallback_precision(gpu) is None and gpu["trainer"]["precision"] == "bf16-mixed"
