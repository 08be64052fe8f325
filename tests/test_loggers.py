"""W&B as users compare runs: stage names, a resumed fit continuing its run, predict's table, the sync hint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from experiments import cli, loggers
from tests.test_cli import BASE, _write


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    yield tmp_path
    loggers.finish_wandb()


def _records(run_dir: Path) -> dict[str, bytes]:
    return {p.name: b"".join(f.read_bytes() for f in p.glob("*.wandb"))
            for p in sorted((run_dir / "wandb").glob("offline-run-*"))}


def test_stage_names() -> None:
    assert loggers.stage_name("fit") == "fit" and loggers.stage_name("predict") == "predict"
    assert loggers.stage_name("test", "mass") == "test-mass" and loggers.stage_name("test", "mass", "x") == "x"
    assert loggers.stage_run_name("cae-synthetic-mass-s0", "fit") == "cae-synthetic-mass-s0-fit"
    assert loggers.stage_run_name("a-fit", "fit") == "a-fit"


def test_a_resumed_fit_continues_its_wandb_run_and_predict_logs_its_table(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(workdir / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "r"])
    run_dir = workdir / "runs" / "r"
    run_id = (run_dir / loggers.FIT_RUN_ID_FILE).read_text().strip()
    [first] = _records(run_dir)
    assert first.endswith(run_id)
    assert f"upload it with: wandb sync {run_dir / 'wandb' / first}" in capsys.readouterr().err
    cli.run_cli(["fit", "--config", config, "--run.name", "r", "--trainer.max_epochs", "2",
                 "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    records = _records(run_dir)
    # one W&B run, resumed (offline, each session gets a folder offline-run-<time>-<id>; a second session in
    # the same second gets offline-run-<time>-<id>-1, wandb's sync-dir suffix)
    assert {re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(-\d+)?", name).group(1) for name in records} == {run_id}
    assert all(b"r-fit" in data for data in records.values())
    cli.run_cli(["fit", "--config", config, "--run.name", "r"])  # a fresh fit is a new W&B run
    assert (run_dir / loggers.FIT_RUN_ID_FILE).read_text().strip() != run_id

    cli.run_cli(["predict", "--config", config, "--run.name", "r", "--ckpt_path",
                 str(run_dir / "checkpoints" / "last.ckpt")])
    assert sum(b"r-predict" in data for data in _records(run_dir).values()) == 1
    [table_file] = (run_dir / "wandb").glob("offline-run-*/files/media/table/predict/predictions_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[table["columns"].index("image_id")] for row in table["data"]] == ["img0", "img1"]
    assert {"image_score", "threshold", "n_regions", "overlay_image"} <= set(table["columns"])
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/predict/*.png"))
    assert len(media) == 2  # the two overlays


def test_predict_table_has_the_overlay_as_an_image_column_or_logs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2
    import numpy as np
    import wandb

    class Trainer:
        loggers: list = []

    assert loggers.log_predictions(Trainer(), [{"image_id": "a"}], []) is False
    logged: list[dict] = []

    class Experiment:
        def log(self, payload: dict) -> None:
            logged.append(payload)

    class Logger:
        experiment = Experiment()

    monkeypatch.setattr(loggers, "wandb_logger", lambda trainer: Logger())
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    rows = [{"image_id": "a", "image_score": 2.0}, {"image_id": "b", "image_score": float("nan")}]
    assert loggers.log_predictions(Trainer(), rows, [("a", tmp_path / "a.png")]) is True
    table = logged[0]["predict/predictions"]
    assert table.columns == ["image_id", "image_score", "overlay_image"]
    assert isinstance(table.data[0][2], wandb.Image) and table.data[1] == ["b", None, None]
    assert len(logged[0]["predict/overlays"]) == 1


def test_table1_goes_to_wandb_as_a_table_with_every_column_and_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2
    import numpy as np

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "table1.csv").write_text(
        "test_set,model,pixel_auc,pair,wilcoxon_p\nmass,CAE,0.53,CAE-RATSPN,0.004\nmass,CAE-RATSPN,0.88,CAE,\n")
    cv2.imwrite(str(tmp_path / "fig2_mass.png"), np.zeros((8, 8, 3), np.uint8))
    offline = loggers.log_table1(tmp_path, "table1-smoke-synthetic-s0", [tmp_path / "fig2_mass.png"])
    assert offline is not None and offline.parent == (tmp_path / "wandb").resolve()
    [table_file] = offline.glob("files/media/table/table1_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["test_set", "model", "pixel_auc", "pair", "wilcoxon_p"]
    assert table["data"] == [["mass", "CAE", 0.53, "CAE-RATSPN", 0.004], ["mass", "CAE-RATSPN", 0.88, "CAE", None]]
    assert len(list(offline.glob("files/media/images/figures/fig2_mass_*.png"))) == 1
    record = b"".join(p.read_bytes() for p in offline.glob("*.wandb"))
    assert b"table1-smoke-synthetic-s0" in record and b"table1" in record
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.log_table1(tmp_path, "g") is None


def test_predict_prints_no_irrelevant_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = _write(tmp_path / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "w"])
    ckpt = str(tmp_path / "runs" / "w" / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.run_cli(["predict", "--config", config, "--run.name", "w", "--ckpt_path", ckpt])
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "infer the batch indices" in m or "LeafSpec" in m], messages
    assert "Tip" not in caplog.text


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert loggers.progress_callback({}, [], stream=Terminal()) is None
    assert loggers.progress_callback({"enable_progress_bar": False}, [], stream=io.StringIO()) is None
    assert isinstance(loggers.progress_callback({}, [], stream=io.StringIO()), loggers.PlainProgress)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(loggers.PlainProgress, "__init__", lambda self, every_s=0.0: (
        loggers.ProgressBar.__init__(self), setattr(self, "every_s", 0.0), setattr(self, "_enabled", True),
        setattr(self, "_last", float("-inf")))[0])
    config = _write(tmp_path / "a.yaml", BASE)
    cli.run_cli(["fit", "--config", config, "--run.name", "p", "--trainer.enable_progress_bar", "true"])
    out = capsys.readouterr().out
    assert "train epoch 1/1: batch 3/3, train/loss" in out and "\r" not in out
    assert "val epoch 1/1: batch 1/1" in out


def test_same_size_pads_to_the_largest_height_and_width_with_the_fill() -> None:
    from experiments.loggers import same_size

    small, wide = np.full((2, 3, 3), 7, np.uint8), np.full((1, 5, 3), 9, np.uint8)
    out = same_size([small, wide], fill=255)
    assert [o.shape for o in out] == [(2, 5, 3), (2, 5, 3)]
    assert (out[0][:2, :3] == 7).all() and (out[0][:, 3:] == 255).all()
    assert (out[1][:1] == 9).all() and (out[1][1:] == 255).all()
    assert same_size([]) == [] and same_size([small])[0] is small


def test_the_few_workers_hint_is_quiet_but_other_loader_warnings_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with more cores Lightning hints at more workers for every loader; the configs choose
    0 on purpose (memory-mapped cache), so `quiet_irrelevant_messages` drops exactly that hint."""
    import warnings

    import torch
    from pytorch_lightning.trainer.connectors import data_connector
    from torch.utils.data import DataLoader

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)
    trainer = type("T", (), {"num_devices": 1})()
    loader = DataLoader(torch.zeros(4, 1))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        data_connector._worker_check(trainer, loader, "train_dataloader")
        assert ["does not have many workers" in str(w.message) for w in shown] == [True]  # what users saw
        loggers.quiet_irrelevant_messages()
        data_connector._worker_check(trainer, loader, "train_dataloader")
        warnings.warn("The 'train_dataloader' is something else", UserWarning, stacklevel=1)
    assert len(shown) == 2 and "something else" in str(shown[1].message)
