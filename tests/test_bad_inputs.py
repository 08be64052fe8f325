"""Reliability against bad inputs: a corpus of bad files built in a temp dir, each case with its asserted
outcome (processed, skipped with its reason, or a one-line error naming the file or key); skips counted in
the results; damaged caches detected and rebuilt; config mistakes caught before any work.

Every case is one entry of a table below, so the counts of the issue's audit can be read off the test ids.
The corpus helpers `_lesion_corpus` and `_test_config` also serve tests/test_checkpoints_resume.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from experiments import cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ a tiny manifest corpus


def breast_png(path: Path, seed: int, shape: tuple[int, int] = (200, 160)) -> Path:
    """A mammogram-like 8-bit PNG: a bright textured half-ellipse on a dark background, chest wall at the left."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    image = np.where(inside, 150 + 40 * rng.random(shape), 5 + 3 * rng.random(shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image.astype(np.uint8))
    return path


def write_manifest(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    """A manifest CSV in ``folder`` (columns: the union of the rows' keys)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = folder / name
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def healthy_manifest(folder: Path, n: int = 4) -> Path:
    rows = [{"image_path": breast_png(folder / f"h{i}.png", i).name, "patient_id": f"P{i}", "label": 0,
             "spacing_mm": 0.2} for i in range(n)]
    return write_manifest(folder, rows)


# ------------------------------------------------------------------ bad images among good ones

def _mask_png(path: Path, shape: tuple[int, int] = (200, 160), box=(90, 30, 110, 50)) -> Path:
    mask = np.zeros(shape, np.uint8)
    r0, c0, r1, c1 = box
    mask[r0:r1, c0:c1] = 255
    cv2.imwrite(str(path), mask)
    return path


def _bad_image(folder: Path, case: str) -> Path:
    """One bad file of each kind a user hit; returns its path."""
    path = folder / f"bad_{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not an image\n" * 20)
    elif case == "truncated":
        breast_png(path, 99)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "tiny":
        breast_png(path, 98, shape=(20, 20))
    elif case == "blank":
        cv2.imwrite(str(path), np.zeros((200, 160), np.uint8))
    elif case == "nan":
        path = folder / "bad_nan.tiff"
        image = np.full((200, 160), 0.5, np.float32)
        image[10:20, 10:20] = np.nan
        cv2.imwrite(str(path), image)
    return path


#: bad healthy file -> words of the reason it is skipped with
BAD_IMAGES = {
    "empty": "cannot decode",
    "garbage": "cannot decode",
    "truncated": "cannot decode",
    "tiny": "too small for one 64 x 64 px patch",
    "blank": "breast mask is empty",
    "nan": "contains NaN",
}


def _module(manifest: Path, cache: Path, **kwargs):
    from datamodules import MammographyDataModule

    return MammographyDataModule(source="manifest", root=str(manifest), cache_dir=str(cache), patches_inside=4,
                                 patches_contour=4, batch_size=8, val_fraction=0.25, progress=False, **kwargs)


def test_each_bad_healthy_image_is_skipped_with_its_reason_and_the_rest_processed(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    rows = [{"image_path": breast_png(folder / f"h{i}.png", i).name, "patient_id": f"P{i}", "label": "healthy",
             "spacing_mm": 0.2} for i in range(3)]
    for k, case in enumerate(BAD_IMAGES):
        rows.append({"image_path": _bad_image(folder, case).name, "patient_id": f"B{k}", "label": 0,
                     "spacing_mm": 0.2})
    module = _module(write_manifest(folder, rows), tmp_path / "cache")
    module.setup("fit")
    cache = module.healthy.cache
    assert cache.info["images"] == ["h0", "h1", "h2"] and len(cache) == 3 * 8  # processed: every good image
    reasons = {Path(s["path"]).stem.removeprefix("bad_"): s["error"] for s in cache.info["skipped"]}
    assert sorted(reasons) == sorted(BAD_IMAGES)  # skipped: every bad one, none silently
    for case, words in BAD_IMAGES.items():
        assert words in reasons[case], (case, reasons[case])
        assert "bad_" in reasons[case] and "\n" not in reasons[case]  # names the file, one line


def test_manifest_label_words_merged_rows_and_reported_rows(tmp_path: Path, recwarn) -> None:
    from datamodules.readers import list_source

    folder = tmp_path / "data"
    breast_png(folder / "a.png", 1)
    breast_png(folder / "b.png", 2)
    breast_png(folder / "c.png", 3)
    _mask_png(folder / "a_m1.png")
    _mask_png(folder / "a_m2.png", box=(60, 20, 70, 30))
    rows = [
        {"image_path": "a.png", "patient_id": "P1", "label": "lesion", "mask_path": "a_m1.png", "spacing_mm": 0.2},
        {"image_path": "a.png", "patient_id": "P1", "label": "abnormal", "mask_path": "a_m2.png", "spacing_mm": 0.2},
        {"image_path": "b.png", "patient_id": "P2", "label": "Normal", "mask_path": "", "spacing_mm": 0.2},
        {"image_path": "c.png", "patient_id": "P3", "label": "1", "mask_path": "", "spacing_mm": 0.2},
        {"image_path": "gone.png", "patient_id": "P4", "label": "0", "mask_path": "", "spacing_mm": 0.2},
    ]
    records = list_source("manifest", write_manifest(folder, rows))
    by_id = {r.image_id: r for r in records}
    assert sorted(by_id) == ["a", "b"]
    assert by_id["a"].label == 1 and len(by_id["a"].lesions) == 2  # two rows, one image, both lesions
    assert by_id["b"].label == 0
    warned = " ".join(str(w.message) for w in recwarn)
    assert "c.png: line 5 is a lesion row without a mask_path" in warned  # reported, not dropped silently
    assert "gone.png: image of line 6 missing" in warned
    assert "skipped 2 item(s)" in warned


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([{"image_path": "a.png", "patient_id": "P", "label": "maybe"}], r"manifest.csv line 2: label 'maybe'"),
        ([{"image_path": "a.png", "patient_id": "P"}], r"manifest.csv lacks the column\(s\) label"),
        ([{"image_path": "a.png", "patient_id": "P", "label": 0}, {"image_path": "a.png", "patient_id": "Q",
          "label": 0}], r"manifest.csv line 3: image_id 'a' appears again with another patient_id"),
    ],
    ids=["label-word", "missing-column", "conflicting-rows"],
)
def test_manifest_mistakes_are_one_line_naming_file_and_line(tmp_path: Path, rows, words) -> None:
    from datamodules.readers import list_source
    from datamodules.records import DataError

    breast_png(tmp_path / "a.png", 1)
    with pytest.raises(DataError, match=words) as err:
        list_source("manifest", write_manifest(tmp_path, rows))
    assert "\n" not in str(err.value)


def test_preview_skips_and_reports_bad_files(tmp_path: Path, capsys) -> None:
    import argparse

    from datamodules import preview

    folder = tmp_path / "data"
    manifest = healthy_manifest(folder, n=3)
    with open(manifest, "a") as handle:
        handle.write(f"{_bad_image(folder, 'garbage').name},PB,0,0.2\n")
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"source": "manifest", "root": str(manifest),
                                                             "cache_dir": str(tmp_path / "cache"), "progress": False,
                                                             "patches_inside": 4, "patches_contour": 4}}}))
    args = argparse.Namespace(data=str(config), set=[], out=str(tmp_path / "sheet.png"), images=2, healthy=4,
                              patches=8, seed=0)
    assert preview.run(args) == 0
    out = capsys.readouterr().out
    assert "preview: skipped" in out and "bad_garbage.png" in out and "cannot decode" in out
    assert "1 unreadable image(s) skipped" in out and (tmp_path / "sheet.png").is_file()


# ------------------------------------------------------------------ a test run: skips counted, results one unit

def _lesion_corpus(folder: Path) -> Path:
    """Healthy images, two good lesion images, one unreadable and one with a mask of another size."""
    rows = [{"image_path": breast_png(folder / f"h{i}.png", i).name, "patient_id": f"H{i}", "label": 0,
             "spacing_mm": 0.2} for i in range(3)]
    for i in range(2):
        rows.append({"image_path": breast_png(folder / f"l{i}.png", 10 + i).name, "patient_id": f"L{i}",
                     "label": "lesion", "mask_path": _mask_png(folder / f"l{i}_mask.png").name, "spacing_mm": 0.2})
    rows.append({"image_path": _bad_image(folder, "garbage").name, "patient_id": "LB", "label": 1,
                 "mask_path": _mask_png(folder / "lb_mask.png").name, "spacing_mm": 0.2})
    breast_png(folder / "lw.png", 20)
    rows.append({"image_path": "lw.png", "patient_id": "LW", "label": 1,
                 "mask_path": _mask_png(folder / "lw_mask.png", shape=(100, 100), box=(10, 10, 20, 20)).name,
                 "spacing_mm": 0.2})
    return write_manifest(folder, rows)


def _test_config(tmp_path: Path, manifest: Path) -> str:
    config = {
        "model": {"class_path": "lightning_modules.CAE", "init_args": {"latent_dim": 8}},
        "data": {"class_path": "datamodules.MammographyDataModule", "init_args": {
            "source": "manifest", "root": str(manifest), "cache_dir": str(tmp_path / "cache"),
            "lesion_validation_fraction": 0.0, "progress": False}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "run": {"name": "t", "root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")},
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_skips_are_counted_in_results_also_from_reused_caches(tmp_path: Path, capsys) -> None:
    config = _test_config(tmp_path, _lesion_corpus(tmp_path / "data"))
    out = tmp_path / "results" / "t"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "stale_image.npz").write_bytes(b"from an earlier test")
    for attempt in ("built", "reused"):
        assert cli.main(["test", "--config", config]) == 0, attempt
        metrics = yaml.safe_load((out / "metrics.json").read_text())
        assert metrics["n_images"] == 2 and metrics["n_skipped"] == 2, attempt  # 2 processed, 2 skipped
        reasons = {Path(s["path"]).name: s["error"] for s in metrics["skipped"]}
        assert "cannot decode" in reasons["bad_garbage.png"]
        assert "lw_mask.png is 100x100 but its image is 200x160" in reasons["lw.png"]
        selection = yaml.safe_load(next((tmp_path / "cache").glob("eval-test-mass-*/selection.json")).read_text())
        assert selection["summary"]["skipped_unreadable"] == 2 and len(selection["summary"]["skipped"]) == 2
        assert metrics["checkpoint"] is None  # untrained weights: said so, not hidden
        assert sorted(p.name for p in (out / "maps").iterdir()) == ["l0.npz", "l1.npz"]  # this test's maps only
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
        assert oct((out / "metrics.json").stat().st_mode & 0o777) == "0o644"


def test_zero_evaluable_images_exit_non_zero_and_retire_earlier_results(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data"
    rows = [{"image_path": breast_png(folder / f"h{i}.png", i).name, "patient_id": f"H{i}", "label": 0,
             "spacing_mm": 0.2} for i in range(2)]
    rows.append({"image_path": _bad_image(folder, "garbage").name, "patient_id": "LB", "label": 1,
                 "mask_path": _mask_png(folder / "lb_mask.png").name, "spacing_mm": 0.2})
    config = _test_config(tmp_path, write_manifest(folder, rows))
    out = tmp_path / "results" / "t"
    (out / "maps").mkdir(parents=True)
    (out / "metrics.json").write_text('{"pixel_auc": 0.9}')
    assert cli.main(["test", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "lightning: no evaluable test images: 1 listed, 1 unreadable" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (out / "maps").exists()  # nothing looks current
    stale = next(out.glob("stale-*"))
    assert (stale / "metrics.json").read_text() == '{"pixel_auc": 0.9}'  # ... and nothing is lost
    assert "no evaluable test images" in (stale / "reason.txt").read_text()


# ------------------------------------------------------------------ damaged caches: named, rebuilt

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwrite":  # same size, other bytes: only the checksum sees it
        path.write_bytes(bytes(255 - b for b in data[:64]) + data[64:])
    elif how == "garbage":
        path.write_bytes(b"{not json or zip")


@pytest.mark.parametrize(
    ("name", "how", "words"),
    [
        ("patches.u8", "truncate", "bytes, expected"),
        ("patches.u8", "overwrite", "checksum differs"),
        ("index.npz", "garbage", "damaged patch cache index"),
        ("DONE.json", "garbage", "damaged JSON file"),
    ],
    ids=["patches-truncated", "patches-overwritten", "index-garbage", "done-garbage"],
)
def test_damaged_patch_cache_is_named_and_rebuilt(tmp_path: Path, name: str, how: str, words: str) -> None:
    manifest = healthy_manifest(tmp_path / "data", n=3)
    first = _module(manifest, tmp_path / "cache")
    first.setup("fit")
    original = first.healthy.cache
    expected = np.array(original.memmap())
    _damage(original.path / name, how)
    again = _module(manifest, tmp_path / "cache")
    with pytest.warns(UserWarning, match=rf"patch cache damaged, rebuilding it: {original.path / name}.*{words}"):
        again.setup("fit")
    np.testing.assert_array_equal(np.array(again.healthy.cache.memmap()), expected)  # rebuilt, same patches
    assert again.healthy.cache.path == original.path
    batch = next(iter(again.train_dataloader()))
    assert batch["patches"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_evaluation_cache_is_named_and_rebuilt(tmp_path: Path, how: str) -> None:
    manifest = _lesion_corpus(tmp_path / "data")
    first = _module(manifest, tmp_path / "cache", lesion_validation_fraction=0.0)
    files = list(first.evaluation.dataset("test").items)
    expected = first.evaluation.dataset("test")[0]["scan"]
    _damage(files[0], how)
    again = _module(manifest, tmp_path / "cache", lesion_validation_fraction=0.0)
    with pytest.warns(UserWarning, match=rf"evaluation cache damaged, rebuilding it: {files[0]}: checksum differs"):
        dataset = again.evaluation.dataset("test")
    assert len(dataset) == 2 and torch.equal(dataset[0]["scan"], expected)
    assert again.selection_summary()["test"]["skipped_unreadable"] == 2  # the skips survive the rebuild


def test_a_sound_cache_published_first_by_another_process_is_kept(tmp_path: Path) -> None:
    from datamodules.patches import PatchCache, publish_cache

    module = _module(healthy_manifest(tmp_path / "data", n=3), tmp_path / "cache")
    module.setup("fit")
    final = module.healthy.cache.path
    before = (final / "patches.u8").stat().st_ino
    ours = tmp_path / "cache" / ".ours"
    ours.mkdir()
    publish_cache(ours, final, PatchCache.open)  # e.g. a second DDP rank that built the same cache
    assert (final / "patches.u8").stat().st_ino == before and not ours.exists()


# ------------------------------------------------------------------ config mistakes: one line naming the key

@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--data.init_args.patch_size", "63"], "data.init_args.patch_size must be 64"),
        (["--data.init_args.batch_size", "0"], "data.init_args.batch_size must be an integer >= 1"),
        (["--model.init_args.lr", "0"], "model.init_args.lr must be > 0"),
        (["--model.init_args.latent_dim", "0"], "model.init_args.latent_dim must be > 0"),
        (["--data.init_args.val_fraction", "0"], "data.init_args.val_fraction must be in (0, 1)"),
        (["--data.init_args.val_fraction", "1.5"], "data.init_args.val_fraction must be in (0, 1)"),
        (["--data.init_args.test_set", "masses"], "data.init_args.test_set must be one of mass, calc"),
        (["--data.init_args.source", "kaggle"], "data.init_args.source must be one of synthetic"),
    ],
    ids=["patch_size", "batch_size", "lr", "latent_dim", "val_fraction-0", "val_fraction-1.5", "test_set", "source"],
)
def test_config_mistake_is_one_line_naming_the_key_before_any_work(
    tmp_path: Path, monkeypatch, capsys, override: list[str], key: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["fit", "--config", str(ROOT / "configs" / "cae.yaml"), *override])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning:")]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data generated, no cache, no run folder
