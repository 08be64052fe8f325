"""Healthy patches: seeded sampling, the memory-mapped cache (reuse, rebuild, no half caches), the split,
and the batch format served through a DataLoader."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datamodules.patches as patches_mod
from datamodules.patches import (
    PatchCache,
    PatchDataset,
    build_patch_cache,
    collate_patch_batch,
    contour_mask,
    sample_centers,
    split_patients,
)
from datamodules.preprocessing import PreprocessedImage
from datamodules.records import DataError, ImageRecord


def disk_mask(h: int = 120, w: int = 90) -> np.ndarray:
    rr, cc = np.mgrid[:h, :w]
    return ((rr - h / 2) / (0.4 * h)) ** 2 + (cc / (0.8 * w)) ** 2 <= 1


def fake_preprocess(record: ImageRecord) -> PreprocessedImage:
    """Deterministic image per record (no file reading): gradient + id-dependent offset; 'bad' ids fail."""
    if "bad" in record.image_id:
        raise DataError(f"{record.path}: cannot decode")
    mask = disk_mask()
    rr, cc = np.mgrid[: mask.shape[0], : mask.shape[1]]
    image = ((rr + cc + int(record.image_id[-1])) % 200 / 255.0 * mask).astype(np.float32)
    return PreprocessedImage(record.image_id, record.patient_id, image, mask, {}, 0.2)


def records(n_patients: int = 5, views: int = 2, bad: int = 0) -> list[ImageRecord]:
    out = [ImageRecord(f"p{p}_v{v}", f"p{p}", f"/x/p{p}_{v}.png", "image", spacing_mm=0.2)
           for p in range(n_patients) for v in range(views)]
    out += [ImageRecord(f"bad{i}", "pbad", f"/x/bad{i}.png", "image") for i in range(bad)]
    return out


def test_sample_centers_inside_and_on_contour_seeded() -> None:
    mask = disk_mask()
    centers, on_contour = sample_centers(mask, 60, 60, np.random.default_rng(1))
    again, _ = sample_centers(mask, 60, 60, np.random.default_rng(1))
    other, _ = sample_centers(mask, 60, 60, np.random.default_rng(2))
    assert centers.shape == (120, 2) and on_contour.sum() == 60 and not on_contour[:60].any()
    np.testing.assert_array_equal(centers, again)
    assert not np.array_equal(centers, other)
    contour = contour_mask(mask)
    assert contour[tuple(centers[60:].T)].all()
    assert mask[tuple(centers[:60].T)].all() and not contour[tuple(centers[:60].T)].any()
    assert len({tuple(c) for c in centers[:60]}) == 60  # without replacement
    assert contour[:, 0].sum() <= 4 < mask[:, 0].sum()  # the chest-wall image edge is no skin line


def test_sample_centers_contour_band_covers_every_offset() -> None:
    """Band sampling draws contour centres at every distance below the band (the grid's offsets), line
    sampling at distance 0 only; the inside centres are the same either way."""
    mask = disk_mask(200, 150)
    line, _ = sample_centers(mask, 30, 200, np.random.default_rng(3))
    band, flags = sample_centers(mask, 30, 200, np.random.default_rng(3), contour_band_px=12)
    np.testing.assert_array_equal(band[:30], line[:30])
    contour = contour_mask(mask)
    rr, cc = np.nonzero(contour)
    dist = np.array([np.hypot(rr - r, cc - c).min() for r, c in band[flags]])  # brute force
    assert mask[tuple(band.T)].all() and dist.max() < 12
    assert (dist == 0).mean() < 0.3 and len(np.unique(np.floor(dist))) >= 10
    assert contour[tuple(line[30:].T)].all()


def test_split_patients_disjoint_seeded() -> None:
    patients = [f"p{i}" for i in range(20)]
    train, val = split_patients(patients, 0.1, seed=0)
    assert len(val) == 2 and train | val == set(patients) and not train & val
    assert split_patients(patients, 0.1, seed=0) == (train, val)
    assert split_patients(patients, 0.1, seed=1)[1] != val
    assert len(split_patients(["a", "b"], 0.1)[1]) == 1


def test_cache_build_reuse_rebuild_and_skip(tmp_path, caplog) -> None:
    recs = records(bad=1)
    with caplog.at_level(logging.WARNING):
        cache = build_patch_cache(recs, tmp_path, n_inside=6, n_contour=4, progress=False,
                                  preprocess=fake_preprocess)
    assert len(cache) == 10 * 10 and cache.memmap().shape == (100, 64, 64)
    assert "bad0.png" in caplog.text and "1 of 11 images skipped" in caplog.text
    assert cache.info["skipped"][0]["path"].endswith("bad0.png")
    assert cache.patients == [f"p{i}" for i in range(5)]
    # the cached bytes are the patches of the preprocessed image, quantised to uint8
    pre = fake_preprocess(recs[3])
    r, c = cache.centers[30]
    expected = np.pad(pre.image, 32, mode="reflect")[r : r + 64, c : c + 64]
    np.testing.assert_array_equal(cache.memmap()[30], np.rint(expected * 255).astype(np.uint8))
    # reuse: same folder, nothing rebuilt
    calls = []

    def counting(rec):
        calls.append(rec)
        return fake_preprocess(rec)

    again = build_patch_cache(recs, tmp_path, n_inside=6, n_contour=4, progress=False, preprocess=counting)
    assert again.path == cache.path and not calls
    # a changed parameter rebuilds under another key
    other = build_patch_cache(recs, tmp_path, n_inside=6, n_contour=4, seed=1, progress=False,
                              preprocess=fake_preprocess)
    assert other.path != cache.path and not np.array_equal(other.centers, cache.centers)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_interrupted_build_leaves_no_complete_cache(tmp_path, monkeypatch) -> None:
    def boom(rec):
        if rec.image_id == "p3_v0":
            raise KeyboardInterrupt
        return fake_preprocess(rec)

    with pytest.raises(KeyboardInterrupt):
        build_patch_cache(records(), tmp_path, n_inside=2, n_contour=2, progress=False, preprocess=boom)
    assert list(tmp_path.iterdir()) == []
    # a build killed outright leaves its temp folder: the next build of that key removes it
    killed = tmp_path / ".patches-0123456789abcdef.tmp-999999999"
    killed.mkdir()
    (killed / "patches.u8").write_bytes(b"x" * 10)
    assert patches_mod.remove_stale_builds(tmp_path, "patches-0123456789abcdef") == 1
    assert not killed.exists()
    half = tmp_path / "patches-deadbeef"
    half.mkdir()
    with pytest.raises(DataError, match="DONE.json"):
        PatchCache.open(half)


def test_all_unreadable_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="none of the 2 healthy images"):
        build_patch_cache(records(0, bad=2), tmp_path, progress=False, preprocess=fake_preprocess)


def test_dataset_batches_through_dataloader(tmp_path) -> None:
    cache = build_patch_cache(records(), tmp_path, n_inside=6, n_contour=4, progress=False,
                              preprocess=fake_preprocess)
    subset = np.arange(20, 80)
    ds = PatchDataset(cache, subset)
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate_patch_batch,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 12]
    b = batches[0]
    assert b["patches"].shape == (16, 1, 64, 64) and b["patches"].dtype == torch.float32
    assert b["index"].dtype == torch.int64 and b["centers"].shape == (16, 2) and b["label"].dtype == torch.int64
    assert float(b["patches"].min()) >= 0.0 and float(b["patches"].max()) <= 1.0
    seen = torch.cat([x["index"] for x in batches]).numpy()
    assert sorted(seen.tolist()) == subset.tolist()
    i = int(b["index"][0])
    torch.testing.assert_close(b["patches"][0, 0], torch.from_numpy(cache.memmap()[i].astype(np.float32) / 255))
    assert b["patient_id"][0] == cache.patients[cache.patient_index[i]]
    single = ds[0]
    assert single["patches"].shape == (1, 64, 64) and int(single["index"]) == 20
    # picklable for worker processes: the memmap is reopened there
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None and torch.equal(clone[5]["patches"], ds[5]["patches"])


def test_cache_format_version_is_in_key(tmp_path, monkeypatch) -> None:
    a = build_patch_cache(records(2, 1), tmp_path, n_inside=1, n_contour=1, progress=False,
                          preprocess=fake_preprocess)
    monkeypatch.setattr(patches_mod, "CACHE_FORMAT", 999)
    b = build_patch_cache(records(2, 1), tmp_path, n_inside=1, n_contour=1, progress=False,
                          preprocess=fake_preprocess)
    assert a.path != b.path
    assert json.loads((b.path / "DONE.json").read_text())["params"]["format"] == 999


def test_progress_is_plain_lines_off_a_terminal() -> None:
    import io

    from datamodules.patches import with_progress

    stream = io.StringIO()
    assert list(with_progress(range(3), 3, "healthy patches", every_s=0.0, stream=stream)) == [0, 1, 2]
    lines = stream.getvalue().splitlines()
    assert lines[:3] == [f"healthy patches: {k}/3 (0 s)" for k in (1, 2, 3)] and lines[3].startswith(
        "healthy patches: 3/3 done")
    assert "\r" not in stream.getvalue()
    assert list(with_progress(range(2), 2, "x", enabled=False)) == [0, 1]
