"""Data modules on small PNG mammograms written by the test: batch and item formats of the contracts,
the patient split, evaluation caching and selection, predict on files, and clear config errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules import EvaluationDataModule, HealthyPatchDataModule, MammographyDataModule
from datamodules.records import DataError, ImageRecord, Lesion


def write_mammogram(path: Path, seed: int, lesion: tuple[int, int, int] | None = None,
                    h: int = 240, w: int = 160) -> None:
    """8-bit breast phantom at 0.1 mm (chest wall left), with an optional bright disc (row, col, radius)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:h, :w]
    breast = ((rr - h / 2) / (0.45 * h)) ** 2 + (cc / (0.75 * w)) ** 2 <= 1
    img = np.where(breast, 140 + 40 * np.exp(-cc / 60.0), 12) + rng.normal(0, 4, (h, w))
    if lesion is not None:
        r, c, rad = lesion
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad**2] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))


def write_mask(path: Path, lesion: tuple[int, int, int], h: int = 240, w: int = 160) -> None:
    rr, cc = np.mgrid[:h, :w]
    r, c, rad = lesion
    cv2.imwrite(str(path), (((rr - r) ** 2 + (cc - c) ** 2 <= rad**2) * 255).astype(np.uint8))


def healthy_records(root: Path, n_patients: int = 10) -> list[ImageRecord]:
    out = []
    for p in range(n_patients):
        for v, view in enumerate(("CC", "MLO")):
            path = root / f"healthy/p{p}_{view}.png"
            write_mammogram(path, seed=10 * p + v)
            out.append(ImageRecord(f"p{p}_{view}", f"p{p}", path, "image", spacing_mm=0.1,
                                   meta={"view": view, "side": "LEFT", "density": 2}))
    return out


def lesion_records(root: Path) -> list[ImageRecord]:
    """Three mass images: small (selected), huge (excluded by area), and one without geometry."""
    out = []
    for i, lesion in enumerate([(120, 60, 15), (120, 50, 80)]):
        path, mask = root / f"lesion/m{i}.png", root / f"lesion/m{i}_mask.png"
        write_mammogram(path, seed=100 + i, lesion=lesion)
        write_mask(mask, lesion)
        out.append(ImageRecord(f"m{i}", f"q{i}", path, "image", label=1, spacing_mm=0.1,
                               lesions=[Lesion("mass", "MALIGNANT", mask_path=mask)],
                               meta={"view": "CC", "density": 3, "side": "RIGHT"}))
    path = root / "lesion/m2.png"
    write_mammogram(path, seed=102, lesion=(100, 40, 10))
    out.append(ImageRecord("m2", "q2", path, "image", label=1, spacing_mm=0.1, lesions=[Lesion("mass")]))
    return out


def test_healthy_module_batches_and_patient_split(tmp_path) -> None:
    recs = healthy_records(tmp_path)
    dm = HealthyPatchDataModule(recs, tmp_path / "cache", batch_size=64, seed=0, progress=False)
    dm.setup("fit")
    assert len(dm.cache) == 20 * 120
    assert len(dm.train_dataset) == 18 * 120 and len(dm.val_dataset) == 2 * 120  # 9 / 1 patients
    train_patients = set(dm.cache.patch_patient_ids()[dm.train_dataset.indices])
    val_patients = set(dm.cache.patch_patient_ids()[dm.val_dataset.indices])
    assert not train_patients & val_patients and len(val_patients) == 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"patches", "index", "centers", "context", "patient_id", "label"}
    assert batch["patches"].shape == (64, 1, 64, 64) and batch["patches"].dtype == torch.float32
    assert 0.0 <= float(batch["patches"].min()) and float(batch["patches"].max()) <= 1.0
    assert batch["centers"].max() < 120 and (batch["label"] == 0).all()
    assert set(batch["patient_id"]) <= train_patients
    # contour patches straddle the skin line: a large share of near-black pixels; inside ones do not
    contour = dm.cache.on_contour
    images = dm.cache.memmap()
    dark_contour = (images[contour] < 20).mean()
    dark_inside = (images[~contour] < 20).mean()
    assert dark_contour > 0.2 and dark_contour > 2 * dark_inside
    # same seed -> same first batch; a second module reuses the cache (files unchanged)
    again = HealthyPatchDataModule(recs, tmp_path / "cache", batch_size=64, seed=0, progress=False)
    again.setup("fit")
    assert again.cache.path == dm.cache.path
    assert torch.equal(next(iter(again.train_dataloader()))["index"], batch["index"])


def test_evaluation_module_items_selection_and_cache(tmp_path) -> None:
    recs = lesion_records(tmp_path)
    dm = EvaluationDataModule(recs, test_set="mass", cache_dir=tmp_path / "cache", progress=False,
                              max_lesion_area_patches=0.25)
    loader = dm.test_dataloader()
    items = list(loader)
    assert len(items) == 1  # m1 larger than 0.25 patch areas (1024 px), m2 has no geometry
    item = items[0]
    assert item["image_id"] == "m0" and item["patient_id"] == "q0"
    h, w = item["scan"].shape
    assert (h, w) == (120, 80) and item["scan"].dtype == torch.float32
    assert item["breast_mask"].dtype == torch.bool and item["lesion_mask"].shape == (h, w)
    # the lesion (radius 15 px at 0.1 mm) is a disc of radius ~7.5 px at 0.2 mm
    assert abs(int(item["lesion_mask"].sum()) - np.pi * 7.5**2) < 25
    centers = item["centers"]
    assert centers.dtype == torch.int64 and (centers % 16 == 0).all()
    assert item["breast_mask"][centers[:, 0], centers[:, 1]].all()
    assert item["patches"].shape == (len(centers), 1, 64, 64)
    r, c = centers[3].tolist()
    assert item["patches"][3, 0, 32, 32] == item["scan"][r, c]
    assert item["spacing_mm"] == pytest.approx(0.2) and item["stride"] == 16
    assert item["meta"]["density"] == 3 and item["meta"]["lesion_type"] == "mass"
    assert item["meta"]["has_pixel_annotation"] is True and item["meta"]["source_path"].endswith("m0.png")
    assert dm.selection("test")["excluded_by_reason"] == {"too_large": 1, "no_annotation": 1}
    report = next((tmp_path / "cache").glob("eval-test-mass-*/selection.json"))
    assert json.loads(report.read_text())["summary"]["selected"] == 1
    # second module: cache reused (no file read), identical items
    again = EvaluationDataModule(recs, test_set="mass", cache_dir=tmp_path / "cache", progress=False,
                              max_lesion_area_patches=0.25)
    assert torch.equal(next(iter(again.test_dataloader()))["patches"], item["patches"])
    assert len(list((tmp_path / "cache").glob("eval-*"))) == 1
    # a rewritten file (new size / mtime) changes the listing fingerprint: a new cache
    write_mammogram(recs[0].path, seed=999, lesion=(120, 60, 15))
    third = EvaluationDataModule(recs, test_set="mass", cache_dir=tmp_path / "cache", progress=False,
                              max_lesion_area_patches=0.25)
    assert not torch.equal(next(iter(third.test_dataloader()))["scan"], item["scan"])
    assert len(list((tmp_path / "cache").glob("eval-*"))) == 2


def test_evaluation_calc_set_is_empty_for_mass_images(tmp_path) -> None:
    dm = EvaluationDataModule(lesion_records(tmp_path), test_set="calc", cache_dir=tmp_path / "c",
                              progress=False)
    with pytest.raises(DataError, match=r"no evaluable test images: 3 listed, 0 unreadable, 3 excluded .*selection.json"):
        dm.dataset("test")
    assert dm.selection("test")["excluded_by_reason"] == {"no_mask": 2, "no_annotation": 1}


def test_mammography_module_predict_on_files_and_errors(tmp_path) -> None:
    write_mammogram(tmp_path / "files/a.png", seed=1)
    write_mammogram(tmp_path / "files/b.png", seed=2)
    dm = MammographyDataModule(source="manifest", root=str(tmp_path / "none.csv"),
                               predict_path=str(tmp_path / "files"), cache_dir=str(tmp_path / "cache"),
                               progress=False)
    dm.setup("predict")
    items = list(dm.predict_dataloader())
    # image files carry no spacing and none was given: each is a skipped item asking for spacing_mm
    assert len(items) == 2 and {i["image_id"] for i in items} == {"a", "b"}
    assert all("spacing_mm" in i["skipped"] and len(i["patches"]) == 0 for i in items)
    told = MammographyDataModule(source="manifest", root=str(tmp_path / "none.csv"),
                                 predict_path=str(tmp_path / "files"), predict_options={"spacing_mm": 0.2},
                                 cache_dir=str(tmp_path / "cache"), progress=False)
    items = list(told.predict_dataloader())
    assert not items[0]["lesion_mask"].any() and items[0]["patches"].shape[1:] == (1, 64, 64)
    assert items[0]["scan"].shape == (240, 160)
    assert items[0]["meta"]["spacing_source"] == "configured spacing_mm"
    finer = MammographyDataModule(source="manifest", root=str(tmp_path / "none.csv"),
                                  predict_path=str(tmp_path / "files"), predict_options={"spacing_mm": 0.1},
                                  cache_dir=str(tmp_path / "cache"), progress=False)
    assert next(iter(finer.predict_dataloader()))["scan"].shape == (120, 80)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        MammographyDataModule(predict_path=str(tmp_path / "empty")).predict_dataloader()
    with pytest.raises(DataError, match="data.init_args.source"):
        MammographyDataModule(source="kaggle")
    with pytest.raises(DataError, match="data.init_args.test_set"):
        MammographyDataModule(test_set="masses")
    with pytest.raises(DataError, match="healthy_root"):
        _ = MammographyDataModule(source="cbis_ddsm", root=str(tmp_path)).records


def test_manifest_source_end_to_end(tmp_path) -> None:
    rows = ["image_path,patient_id,label,mask_path,spacing_mm,lesion_type"]
    for rec in healthy_records(tmp_path, 4):
        rows.append(f"{rec.path},{rec.patient_id},0,,0.1,")
    for i, lesion in enumerate([(120, 60, 15), (100, 40, 12), (140, 50, 10)]):
        path, mask = tmp_path / f"les/x{i}.png", tmp_path / f"les/x{i}_mask.png"
        write_mammogram(path, seed=200 + i, lesion=lesion)
        write_mask(mask, lesion)
        rows.append(f"{path},L{i},1,{mask},0.1,mass")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    dm = MammographyDataModule(source="manifest", root=str(manifest), cache_dir=str(tmp_path / "cache"),
                               lesion_validation_fraction=0.34, batch_size=32, progress=False)
    try:
        listed = dm.records
    except DataError as err:  # the manifest reader's column names are its owner's contract
        pytest.skip(f"manifest reader disagrees with this manifest: {err}")
    assert len(listed.healthy) == 8 and len(listed.test) + len(listed.lesion_validation) == 3
    assert len(listed.lesion_validation) == 1
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["patches"].shape == (32, 1, 64, 64)
    assert len(dm.val_dataloader().dataset) == 240  # 1 of 4 patients (rounded up to one), 2 views
    assert len(list(dm.test_dataloader())) == 2
    assert len(list(dm.lesion_validation_dataloader())) == 1
    # another training seed: same test images (paired comparisons), other patch sample
    other = MammographyDataModule(source="manifest", root=str(manifest), cache_dir=str(tmp_path / "cache"),
                                  lesion_validation_fraction=0.34, batch_size=32, seed=1, progress=False)
    assert [r.image_id for r in other.records.test] == [r.image_id for r in listed.test]
    other.setup("fit")
    assert other.healthy.cache.path != dm.healthy.cache.path


def test_predict_without_path_is_a_clear_error_only_when_asked(tmp_path) -> None:
    dm = EvaluationDataModule([], cache_dir=tmp_path, progress=False)
    dm.setup("predict")  # Lightning calls setup("predict") even when dataloaders are passed in
    with pytest.raises(DataError, match="predict_path"):
        dm.predict_dataloader()
    with pytest.raises(DataError, match="no test images"):
        dm.test_dataloader()


def test_synthetic_source_tiny(tmp_path) -> None:
    pytest.importorskip("datamodules.synthetic")
    root, cache = tmp_path / "synthetic", tmp_path / "cache"
    dm = MammographyDataModule(root=str(root), scale="tiny", cache_dir=str(cache), seed=0, progress=False)
    listed = dm.records
    assert (root / "DONE.json").is_file()
    healthy_patients = {r.patient_id for r in listed.healthy}
    lesion_patients = {r.patient_id for r in listed.test + listed.lesion_validation}
    assert listed.healthy and listed.test and listed.lesion_validation
    assert not healthy_patients & lesion_patients
    assert not {r.image_id for r in listed.test} & {r.image_id for r in listed.lesion_validation}
    dm.setup("fit")
    assert len(dm.healthy.cache) == 120 * len(listed.healthy)
    batch = next(iter(dm.train_dataloader()))
    assert batch["patches"].shape == (64, 1, 64, 64)
    item = next(iter(dm.test_dataloader()))
    assert item["lesion_mask"].any() and (item["lesion_mask"] & item["breast_mask"]).sum() > 0
    assert item["meta"]["lesion_type"] == "mass"
    # the breast fills a plausible share of a synthetic view and the image uses the [0, 1] range
    assert 0.2 < float(item["breast_mask"].float().mean()) < 0.95
    assert float(item["scan"][item["breast_mask"]].mean()) > 0.2
    n_val = len(list(dm.lesion_validation_dataloader()))
    assert n_val == dm.selection_summary()["lesion_validation"]["selected"] > 0
    capped = MammographyDataModule(root=str(root), scale="tiny", cache_dir=str(cache),
                                   max_lesion_validation_images=1, progress=False)
    assert len(capped.records.lesion_validation) == 1
    assert capped.records.lesion_validation[0].image_id in {r.image_id for r in listed.lesion_validation}


def test_every_data_config_builds_the_module() -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser
    from pytorch_lightning import LightningDataModule

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"synthetic", "cbis_ddsm", "ddsm", "mini_ddsm", "mias", "manifest"}
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(LightningDataModule, "data")
    for config in configs:
        module = parser.instantiate(parser.parse_args(["--config", str(config)])).data
        assert isinstance(module, MammographyDataModule), config
        assert module.source == config.stem and module.pixel_spacing_mm == 0.2 and module.batch_size == 64
        assert module.max_lesion_area_patches == 4


def test_mask_of_other_size_is_named_and_skipped(tmp_path, caplog) -> None:
    from datamodules.preprocessing import preprocess_record

    recs = lesion_records(tmp_path)[:1]
    bad_mask = tmp_path / "lesion/wrong_size_mask.png"
    write_mask(bad_mask, (50, 50, 10), h=100, w=100)
    bad = ImageRecord("m9", "q9", recs[0].path, "image", label=1, spacing_mm=0.1,
                      lesions=[Lesion("mass", mask_path=bad_mask)])
    with pytest.raises(DataError, match="wrong_size_mask.png"):
        preprocess_record(bad)
    dm = EvaluationDataModule(recs + [bad], test_set="mass", cache_dir=tmp_path / "cache", progress=False)
    with caplog.at_level("WARNING"):
        assert len(dm.dataset("test")) == 1
    assert "wrong_size_mask.png" in caplog.text and "1 of 2 test images skipped" in caplog.text
    assert dm.selection("test")["skipped_unreadable"] == 1


def test_preview_sheet_from_a_config(tmp_path) -> None:
    import argparse

    from datamodules import preview

    rows = ["image_path,patient_id,label,mask_path,spacing_mm,lesion_type"]
    for rec in healthy_records(tmp_path, 2):
        rows.append(f"{rec.path},{rec.patient_id},0,,0.1,")
    path, mask = tmp_path / "les/x.png", tmp_path / "les/x_mask.png"
    write_mammogram(path, seed=300, lesion=(120, 60, 15))
    write_mask(mask, (120, 60, 15))
    rows.append(f"{path},L0,1,{mask},0.1,mass")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  class_path: datamodules.MammographyDataModule\n  init_args:\n"
                      f"    source: manifest\n    root: {tmp_path / 'm.csv'}\n    lesion_validation_fraction: 0\n")
    parser = argparse.ArgumentParser()
    preview.configure_parser(parser)
    out = tmp_path / "sheet.png"
    args = parser.parse_args(["--data", str(config), "--out", str(out), "--patches", "8",
                              "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "progress=false"])
    assert preview.run(args) == 0
    sheet = cv2.imread(str(out))
    assert sheet is not None and sheet.shape[0] > 300 and sheet.shape[1] > 400
    red = (sheet[..., 2] > 180) & (sheet[..., 1] < 90) & (sheet[..., 0] < 90)
    cyan = (sheet[..., 0] > 180) & (sheet[..., 1] > 180) & (sheet[..., 2] < 90)
    assert red.sum() > 20 and cyan.sum() > 100  # lesion and breast outlines drawn
    bad = parser.parse_args(["--data", str(tmp_path / "missing.yaml")])
    assert preview.run(bad) == 1


def test_single_patient_warns_that_val_loss_is_missing(tmp_path) -> None:
    dm = HealthyPatchDataModule(healthy_records(tmp_path, 1), tmp_path / "cache", progress=False)
    with pytest.warns(UserWarning, match="no healthy validation patches"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 240 and len(dm.val_dataset) == 0


def test_healthy_images_exclude_women_with_a_lesion_image_of_either_test_set(tmp_path) -> None:
    """mias: woman 3 has a calcification image (mdb005) and a normal one (mdb006); a mass-configured
    training set must not take her normal image, since the calc evaluation scores her other breast."""
    from datamodules.sources import list_source_records

    info = "\n".join(["mdb001 G CIRC B 535 425 97", "mdb002 G NORM", "mdb003 D NORM", "mdb004 D NORM",
                      "mdb005 F CALC B 300 300 20", "mdb006 F NORM", "mdb007 G NORM", "mdb008 G NORM",
                      "mdb009 G ARCH B 300 300 20", "mdb010 G NORM"])  # woman 5: in no test set, kept
    (tmp_path / "Info.txt").write_text(info + "\n")
    for k in range(1, 11):
        (tmp_path / f"mdb{k:03d}.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes(16))
    for test_set in ("mass", "calc"):
        listed = list_source_records("mias", tmp_path, test_set, lesion_validation_fraction=0.0)
        assert sorted(r.image_id for r in listed.healthy) == ["mdb003", "mdb004", "mdb007", "mdb008", "mdb010"]
    assert [r.image_id for r in listed.test] == ["mdb005"]
    from datamodules.readers import list_source

    assert {r.image_id: r.meta["density"] for r in list_source("mias", tmp_path)}["mdb005"] == "F"
