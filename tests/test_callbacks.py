"""EvaluationCallback end to end: a real pl.Trainer test / fit on hand-made evaluation items."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from experiments import anomaly_maps, evaluation_results
from experiments.callbacks import EvaluationCallback
from experiments.figures import PANEL_HEIGHT, heatmap_panel, panel_at_height
from lightning_modules.base import AnomalyDetector

PATCH, STRIDE = 64, 16


class MeanIntensity(AnomalyDetector):
    """Score = mean patch intensity (times a parameter fixed at 1): bright lesions score high."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def score_patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) * self.scale

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return ((self.score_patches(batch["patches"]) - 0.2) ** 2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.score_patches(batch["patches"]).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def make_item(index: int, lesion: bool = True, h: int = 128, w: int = 96) -> dict:
    """A half-disc breast on a dark background with a bright disc lesion; patches by slicing."""
    rng = np.random.default_rng(index)
    rr, cc = np.mgrid[:h, :w]
    breast = np.hypot(rr - h / 2, cc) < 0.9 * w
    image = np.where(breast, 0.3 + 0.05 * rng.random((h, w)), 0.0).astype(np.float32)
    lesion_mask = np.zeros((h, w), bool)
    if lesion:
        cy, cx = 40 + 12 * index, 30 + 5 * index
        lesion_mask = np.hypot(rr - cy, cc - cx) < 9
        image[lesion_mask] = 0.95
    rows, cols = np.meshgrid(np.arange(8, h, STRIDE), np.arange(8, w, STRIDE), indexing="ij")
    centers = np.stack([rows.ravel(), cols.ravel()], 1)
    centers = centers[breast[centers[:, 0], centers[:, 1]]]
    padded = np.pad(image, PATCH // 2, mode="reflect")
    patches = np.stack([padded[r : r + PATCH, c : c + PATCH] for r, c in centers])[:, None]
    return {
        "image_id": f"img{index}",
        "patient_id": f"P{index}",
        "scan": torch.from_numpy(image),
        "breast_mask": torch.from_numpy(breast),
        "lesion_mask": torch.from_numpy(lesion_mask),
        "centers": torch.from_numpy(centers.astype(np.int64)),
        "patches": torch.from_numpy(patches.astype(np.float32)),
        "spacing_mm": 0.2,
        "stride": STRIDE,
        "meta": {"density": 2, "lesion_type": "mass" if lesion else "", "pathology": "MALIGNANT",
                 "side": "LEFT", "view": "CC", "source_path": f"/x/{index}.dcm",
                 "has_pixel_annotation": True},
    }


def expected_pixel_auc(items: list[dict]) -> float:
    """Direct computation: mean-intensity scores -> map -> pooled breast pixels -> sklearn."""
    scores, labels = [], []
    for it in items:
        if not it["lesion_mask"].any():
            continue
        s = it["patches"].mean(dim=(1, 2, 3)).numpy()
        amap = anomaly_maps.anomaly_map(s, it["centers"].numpy(), it["breast_mask"].numpy(), STRIDE)
        breast = it["breast_mask"].numpy()
        scores.append(amap[breast])
        labels.append(it["lesion_mask"].numpy()[breast])
    return roc_auc_score(np.concatenate(labels), np.concatenate(scores))


def _trainer(tmp_path, callbacks, logger=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=logger or CSVLogger(tmp_path / "logs"),
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)


def test_test_loop_writes_metrics_csv_hist_and_maps(tmp_path) -> None:
    items = [make_item(i) for i in range(3)] + [make_item(9, lesion=False)]
    out = tmp_path / "eval"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "stale_from_an_earlier_run.npz").write_bytes(b"old")
    callback = EvaluationCallback(output_dir=str(out), save_maps=2, dataset="handmade")
    trainer = _trainer(tmp_path, [callback])
    logged = trainer.test(MeanIntensity(), dataloaders=DataLoader(items, batch_size=None), verbose=False)[0]

    expected = expected_pixel_auc(items)
    assert expected > 0.9
    m = json.loads((out / "metrics.json").read_text())
    assert m["pixel_auc"] == pytest.approx(expected, abs=1e-9)
    assert logged["test/pixel_auc"] == pytest.approx(expected, abs=1e-6)
    assert m["n_images"] == 4 and m["n_evaluated"] == 3 and m["n_excluded"] == 1
    assert m["excluded_reasons"]["no_lesion_in_breast"] == 1
    assert m["threshold_rule"] == "image_percentile_99" and "NaN" in m["empty_policy"]
    assert m["dataset"] == "handmade" and m["model"].endswith("MeanIntensity")
    assert m["n_patches"] == sum(len(it["centers"]) for it in items)
    assert m["image_auc_mean"] > 0.9 and m["hausdorff_px_mean"] > 0
    assert m["hausdorff_mm_mean"] == pytest.approx(0.2 * m["hausdorff_px_mean"])
    assert logged["test/n_images"] == 4

    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["image_id"] for r in rows] == ["img0", "img1", "img2", "img9"]
    aucs = [float(r["auc"]) for r in rows[:3]]
    assert np.mean(aucs) == pytest.approx(m["image_auc_mean"])
    assert rows[0]["density"] == "2" and int(rows[0]["n_patches"]) == len(items[0]["centers"])
    assert {r["threshold_rule"] for r in rows} == {"image_percentile_99"}
    assert 0.0 <= float(rows[0]["top1_near_border_fraction"]) <= 1.0

    hist = np.load(out / "score_hist.npz")
    assert hist["bin_edges"].shape == (101,)
    assert hist["lesion"].sum() == m["n_lesion_pixels"] and hist["healthy"].sum() == m["n_healthy_pixels"]
    assert hist["lesion"].sum() == sum(int(it["lesion_mask"].sum()) for it in items)

    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert maps == ["img0.npz", "img1.npz"]
    saved = np.load(out / "maps" / "img0.npz")
    assert saved["anomaly_map"].dtype == np.float16 and saved["segmentation"].dtype == bool
    assert np.isnan(saved["anomaly_map"][~saved["breast_mask"]]).all()
    assert float(saved["hausdorff_px"]) == pytest.approx(float(rows[0]["hausdorff_px"]))
    assert str(saved["threshold_rule"]) == "image_percentile_99"


def test_default_output_dir_is_under_log_dir(tmp_path) -> None:
    callback = EvaluationCallback(save_maps=0)
    trainer = _trainer(tmp_path, [callback])
    trainer.test(MeanIntensity(), dataloaders=DataLoader([make_item(0)], batch_size=None), verbose=False)
    assert (callback.resolve_output_dir(trainer) / "metrics.json").is_file()
    assert callback.resolve_output_dir(trainer).parent == tmp_path / "logs" / "lightning_logs" / "version_0"


def test_wandb_offline_logs_table_and_uint8_images(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where W&B stages artifacts for sync
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="mammospn-test")
    logged: list[dict] = []
    real_log = logger.experiment.log

    def recording_log(data: dict, *args, **kwargs) -> None:
        logged.append(data)
        real_log(data, *args, **kwargs)

    monkeypatch.setattr(logger.experiment, "log", recording_log)
    callback = EvaluationCallback(output_dir=str(tmp_path / "eval"), save_maps=2)
    trainer = _trainer(tmp_path, [callback], logger=logger)
    items = [make_item(i) for i in range(2)] + [make_item(7, lesion=False)]
    try:
        trainer.test(MeanIntensity(), dataloaders=DataLoader(items, batch_size=None), verbose=False)
    finally:
        wandb.finish()
    payload = next(d for d in logged if "test/per_image" in d)
    table = payload["test/per_image"]
    assert isinstance(table, wandb.Table) and len(table.data) == 3
    assert table.columns[0] == "image_id" and "hausdorff_mm" in table.columns
    # the table's heatmap column holds the panel of each image that has one (the first two), else None
    assert table.columns[-1] == "heatmap"
    assert [isinstance(row[-1], wandb.Image) for row in table.data] == [True, True, False]
    assert len(payload["test/heatmaps"]) == 2
    assert all(isinstance(img, wandb.Image) for img in payload["test/heatmaps"])
    assert all(" | MeanIntensity: AUC " in caption and " px (" in caption for caption, _ in callback._panels)

    assert panel_at_height(callback._panels[0][1]).shape == (PANEL_HEIGHT, 3 * 192, 3)  # one height, same aspect
    assert isinstance(payload["test/score_distribution"], wandb.Image)
    assert isinstance(payload["test/score_histogram_lesion"], wandb.Histogram)
    assert all(panel.dtype == np.uint8 for _, panel in callback._panels)
    assert callback._panels[0][1].shape == (128, 3 * 96, 3) and callback._panels[0][1].max() > 200
    scalars = next(d for d in logged if "test/pixel_auc" in d)
    assert scalars["test/pixel_auc"] == pytest.approx(expected_pixel_auc(items), abs=1e-6)
    assert list(tmp_path.glob("wandb/offline-run-*"))
    _assert_offline_table_has_image_files(tmp_path, n_images=2)


def _assert_offline_table_has_image_files(tmp_path: Path, n_images: int) -> None:
    """Reads back what an offline run keeps of ``test/per_image``, as `wandb sync` will upload it.

    W&B writes a table twice: the run folder's ``files/media/table/*.table.json`` is a preview in which
    every media cell is only its type name ("Image"), by W&B's design; the table itself goes into a
    ``run_table`` artifact, staged under ``$WANDB_DATA_DIR/artifacts/staging`` until sync, where each
    heatmap cell references ``media/images/<file>.png`` by SHA-256. Both are checked here.
    """
    import hashlib

    [preview] = tmp_path.glob("wandb/offline-run-*/files/media/table/test/per_image_*.table.json")
    assert [row[-1] for row in json.loads(preview.read_text())["data"]] == ["Image", "Image", None]
    staged = {}
    for path in (tmp_path / "wandb-data" / "artifacts" / "staging").iterdir():
        staged[hashlib.sha256(path.read_bytes()).hexdigest()] = path
    tables = []
    for path in staged.values():
        try:
            content = json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(content, dict) and content.get("_type") == "table" and "heatmap" in content.get("columns", []):
            tables.append(content)
    [table] = tables
    cells = [row[table["columns"].index("heatmap")] for row in table["data"]]
    assert [cell["_type"] if cell else None for cell in cells] == ["image-file"] * n_images + [None]
    for cell in cells[:n_images]:
        assert cell["path"].startswith("media/images/") and cell["path"].endswith(".png")
        png = staged[cell["sha256"]].read_bytes()  # the image file itself is staged, byte for byte
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and cell["height"] == PANEL_HEIGHT


def test_heatmap_panel_is_uint8_and_marks_masks() -> None:
    item = make_item(0)
    breast, lesion = item["breast_mask"].numpy(), item["lesion_mask"].numpy()
    amap = np.where(breast, item["scan"].numpy(), np.nan).astype(np.float32)
    panel = heatmap_panel(item["scan"].numpy(), breast, lesion, amap, lesion)
    assert panel.dtype == np.uint8 and panel.shape == (128, 288, 3)
    third = panel[:, 192:]
    r, c = np.argwhere(lesion)[0]
    assert third[r, c, 1] > third[r, c, 0]  # segmentation painted green over the truth


class LesionValidationData(pl.LightningDataModule):
    """Healthy patches for train/val and hand-made items for the lesion validation set."""

    def __init__(self) -> None:
        super().__init__()
        healthy = make_item(5, lesion=False)["patches"][:8]
        self.batches = [{"patches": healthy, "label": torch.zeros(len(healthy), dtype=torch.long)}]
        self.items = [make_item(i) for i in range(2)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def lesion_validation_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=None)


def test_fit_logs_lesion_validation_curves_and_checkpoint_monitors_them(tmp_path) -> None:
    dm = LesionValidationData()
    callback = EvaluationCallback(every_n_epochs=2, threshold="healthy_percentile")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_lesion/pixel_auc", mode="max")
    trainer = _trainer(tmp_path, [callback, ckpt], max_epochs=4, num_sanity_val_steps=0,
                       limit_train_batches=1, limit_val_batches=1)
    evaluated_at: list[int] = []
    real_evaluate = callback.evaluate_lesion_validation

    def recording_evaluate(trainer_: pl.Trainer, module: pl.LightningModule) -> dict:
        evaluated_at.append(trainer_.current_epoch)
        return real_evaluate(trainer_, module)

    callback.evaluate_lesion_validation = recording_evaluate
    trainer.fit(MeanIntensity(), datamodule=dm)
    assert evaluated_at == [0, 2, 3]  # first, every 2nd validation run, and the last epoch
    expected = expected_pixel_auc(dm.items)
    assert trainer.callback_metrics["val_lesion/pixel_auc"].item() == pytest.approx(expected, abs=1e-6)
    assert callback.last_fit_summary["threshold_rule"] == "healthy_percentile_99"
    assert callback.last_fit_summary["n_images"] == 2
    assert ckpt.best_model_score.item() == pytest.approx(expected, abs=1e-6)
    metrics_csv = list((tmp_path / "logs").rglob("metrics.csv"))[0].read_text()
    assert "val_lesion/pixel_auc" in metrics_csv and "val_lesion/hausdorff_px_mean" in metrics_csv
    latest = json.loads((callback.resolve_output_dir(trainer) / "val_lesion" / "metrics.json").read_text())
    assert latest["epoch"] == 3 and latest["pixel_auc"] == pytest.approx(expected, abs=1e-9)
    assert latest["n_skipped"] == 0 and latest["skipped"] == []  # unreadable images are counted here too


def test_bad_arguments_give_clear_messages() -> None:
    with pytest.raises(ValueError, match="threshold='otsu'"):
        EvaluationCallback(threshold="otsu")
    with pytest.raises(ValueError, match="threshold_value"):
        EvaluationCallback(threshold="fixed")
    with pytest.raises(ValueError, match="percentile"):
        EvaluationCallback(percentile=100.0)


def test_distributed_gather_pools_ranks_and_drops_padding_duplicates(monkeypatch) -> None:
    """Two simulated ranks (DistributedSampler pads rank 1 with a repeat of image 0): union, no duplicate."""
    from types import SimpleNamespace

    items = [make_item(i) for i in range(3)]
    rank0 = evaluation_results.EvaluationAccumulator(keep_image_tables=True)
    rank1 = evaluation_results.EvaluationAccumulator(keep_image_tables=True)
    for it in (items[0], items[2]):
        rank0.add(it, it["patches"].mean(dim=(1, 2, 3)))
    for it in (items[1], items[0]):  # the padded repeat
        rank1.add(it, it["patches"].mean(dim=(1, 2, 3)))
    states = [rank0.state(), rank1.state()]

    def fake_all_gather_object(out: list, obj: object) -> None:
        out[:] = states

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake_all_gather_object)
    merged = EvaluationCallback()._gather(SimpleNamespace(world_size=2), rank0)
    s = merged.summary()
    assert s["n_images"] == 3 and s["n_duplicates"] == 1
    assert sorted(r.image_id for r in merged.results) == ["img0", "img1", "img2"]
    assert s["pixel_auc"] == pytest.approx(expected_pixel_auc(items), abs=1e-12)


def test_disabled_wandb_logger_does_not_break_the_test(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    callback = EvaluationCallback(output_dir=str(tmp_path / "eval"), save_maps=1)
    trainer = _trainer(tmp_path, [callback], logger=WandbLogger(save_dir=str(tmp_path)))
    trainer.test(MeanIntensity(), dataloaders=DataLoader([make_item(0)], batch_size=None), verbose=False)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 1


def test_healthy_percentile_without_datamodule_says_what_to_do(tmp_path) -> None:
    callback = EvaluationCallback(output_dir=str(tmp_path), threshold="healthy_percentile")
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match="val_dataloader"):
        trainer.test(MeanIntensity(), dataloaders=DataLoader([make_item(0)], batch_size=None), verbose=False)


def test_calibrated_rule_takes_the_models_threshold_buffer(tmp_path) -> None:
    """threshold='calibrated' segments at the model's ``threshold`` buffer and logs the localisation keys."""
    model = MeanIntensity()
    model.calibrator.fit(torch.rand(100), torch.zeros(100, 2))  # items without context: scores stay raw
    model.calibration_alpha.fill_(0.25)  # calibrated threshold -log(0.25)
    callback = EvaluationCallback(output_dir=str(tmp_path / "eval"), threshold="calibrated", save_maps=0)
    trainer = _trainer(tmp_path, [callback])
    items = [make_item(i) for i in range(3)]
    trainer.test(model, dataloaders=DataLoader(items, batch_size=None), verbose=False)
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["threshold_rule"] == f"calibrated_{-math.log(0.25):g}"
    assert {"test/lesion_hit_rate", "test/sensitivity_at_1_fp", "test/interior_pixel_auc"} <= set(
        trainer.callback_metrics)
    rows = list(csv.DictReader((tmp_path / "eval" / "per_image.csv").open()))
    assert [float(r["threshold"]) for r in rows] == pytest.approx([-math.log(0.25)] * 3)
    assert all(r["lesion_hit"] != "" and r["density_group"] == "1-2" for r in rows)
