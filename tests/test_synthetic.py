"""Synthetic mammograms: formats the real readers expect, determinism, difficulty band, atomic reuse."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import time
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pydicom
import pytest

from datamodules import synthetic, synthetic_difficulty, synthetic_formats, synthetic_preview
from datamodules.records import DataError
from datamodules.synthetic_anatomy import add_calcification_cluster, add_mass, breast_view, power_law_noise

SEED = 0


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny set (seed 0) shared by the tests of this module; its progress lines go to PROGRESS."""
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synth") / "tiny", seed=SEED, scale="tiny",
                                      log=PROGRESS.append)


def test_generation_reports_progress_per_patient_and_per_lesion_image(tiny: Path) -> None:
    spec = synthetic.SCALES["tiny"]
    healthy = [line for line in PROGRESS if line.startswith("  healthy: patient")]
    assert len(healthy) == spec.healthy_patients and healthy[-1].startswith(
        f"  healthy: patient {spec.healthy_patients}/{spec.healthy_patients}")
    mass_test = [line for line in PROGRESS if line.startswith("  mass test: image")]
    assert len(mass_test) == spec.mass_test and mass_test[-1].startswith(f"  mass test: image {spec.mass_test}/")


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "DONE.json"}


def _csv_rows(root: Path, kind: str, split: str) -> list[dict[str, str]]:
    with open(root / "cbis-ddsm" / "csv" / f"{kind}_case_description_{split}_set.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ summary
def test_summary_counts_and_auc_band(tiny: Path) -> None:
    summary = json.loads((tiny / "DONE.json").read_text())
    spec = synthetic.SCALES["tiny"]
    assert summary["seed"] == SEED and summary["scale"] == "tiny"
    assert summary["healthy"] == {"patients": spec.healthy_patients, "images": 4 * spec.healthy_patients,
                                  "folder": "ddsm/cases/normals", "case_numbers": [1, spec.healthy_patients]}
    sets = summary["lesion_sets"]
    assert [sets[k]["images"] for k in ("mass_test", "calc_test", "mass_val", "calc_val")] == \
        [spec.mass_test, spec.calc_test, spec.mass_val, spec.calc_val]
    # "as hard as real data": smoothed intensity as anomaly score, pixel AUC in [0.6, 0.8] (real: ~0.77)
    auc = summary["intensity_baseline"]["pixel_auc_mass_test"]
    assert 0.6 <= auc <= 0.8, auc
    assert auc == sets["mass_test"]["intensity_baseline_pixel_auc"]
    # most masses pass the 4-patch area rule
    assert sets["mass_test"]["abnormalities_below_area_rule"] >= 0.8 * sets["mass_test"]["abnormalities"]


def test_pixel_auc_is_exact() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=500), 1)  # many ties
    labels = rng.random(500) < 0.3
    scores[labels] += 0.5
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert synthetic_difficulty.pixel_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert synthetic_difficulty.pixel_auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
    assert np.isnan(synthetic_difficulty.pixel_auc(np.arange(3.0), np.zeros(3, bool)))


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    summary = synthetic.generate(again, seed=SEED, scale="tiny")
    assert _digest_tree(again) == _digest_tree(tiny)
    first = json.loads((tiny / "DONE.json").read_text())
    first.pop("generation_seconds"), summary.pop("generation_seconds")
    assert first == summary


def test_anatomy_is_deterministic_and_seed_dependent() -> None:
    def draw(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        image = breast_view((300, 200), "LEFT", "MLO", 3, 0.2, rng)
        add_mass(image, rng, 0.2)
        add_calcification_cluster(image, rng, 0.2)
        return image.brightness

    assert np.array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


def test_power_law_noise_spectrum_slope() -> None:
    noise = power_law_noise((256, 256), 3.0, np.random.default_rng(0), f_min=1.0, downsample=1)
    assert noise.mean() == pytest.approx(0.0, abs=1e-5) and noise.std() == pytest.approx(1.0, abs=1e-4)
    power = np.abs(np.fft.fft2(noise)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(256) * 256, np.fft.fftfreq(256) * 256, indexing="ij")
    f = np.hypot(fx, fy)
    bands = [(4, 8), (8, 16), (16, 32), (32, 64)]
    centres = np.array([np.sqrt(a * b) for a, b in bands])
    mean_power = np.array([power[(f >= a) & (f < b)].mean() for a, b in bands])
    slope = np.polyfit(np.log(centres), np.log(mean_power), 1)[0]
    assert slope == pytest.approx(-3.0, abs=0.25)


def test_lesions_are_denser_than_their_surroundings() -> None:
    rng = np.random.default_rng(11)
    contrasts, texture_before, texture_after = [], [], []
    for _ in range(6):
        image = breast_view((900, 600), "RIGHT", "CC", 2, 0.1, rng)
        before = image.brightness.copy()
        lesion = add_mass(image, rng, 0.1)
        contrasts.append(float((image.brightness - before)[lesion.mask].mean()))
        texture_before.append(float(before[lesion.mask].std()))
        texture_after.append(float(image.brightness[lesion.mask].std()))
        assert 6.0 <= lesion.diameter_mm <= 38.0
    assert min(contrasts) > 0.03 and max(contrasts) < 0.3
    # a mass displaces the tissue it lies in: a homogeneous density of its own, not a brighter copy of the
    # fibroglandular texture (which is what made it invisible to a density of the latents; README "Synthetic data")
    assert np.mean(texture_after) < 0.8 * np.mean(texture_before)
    image = breast_view((900, 600), "RIGHT", "CC", 2, 0.1, rng)
    before = image.brightness.copy()
    calc = add_calcification_cluster(image, rng, 0.1)
    delta = image.brightness - before
    assert delta[calc.mask].max() > 0.1  # bright specks
    assert (delta > 0.05).sum() < 0.25 * calc.mask.sum()  # specks, not a blob
    assert not (delta[~calc.mask] > 0.01).any()


# ------------------------------------------------------------------------------------------ DDSM format
def test_ics_header_and_ljpeg_format(tiny: Path) -> None:
    cases = sorted((tiny / "ddsm" / "cases" / "normals").glob("normal_*/case*"))
    assert len(cases) == synthetic.SCALES["tiny"].healthy_patients
    view_line = re.compile(r"^(LEFT|RIGHT)_(CC|MLO) LINES (\d+) PIXELS_PER_LINE (\d+) BITS_PER_PIXEL 12 "
                           r"RESOLUTION 100 NON_OVERLAY$")
    for case in cases:
        number = case.name[4:]
        (ics,) = case.glob("*.ics")
        letter = ics.name[0]
        assert ics.name == f"{letter}-{number}-1.ics" and letter in "ABCD"
        lines = ics.read_text().split("\n")
        assert lines[0] == " " and lines[1] == "ics_version 1.0" and lines[2] == f"filename {letter}-{number}-1"
        assert re.fullmatch(r"DENSITY [1-4]", next(x for x in lines if x.startswith("DENSITY")))
        assert next(x for x in lines if x.startswith("DIGITIZER")) == f"DIGITIZER {synthetic_formats.DIGITISERS[letter][0]}"
        views = [view_line.match(x) for x in lines if view_line.match(x)]
        assert [f"{m[1]}_{m[2]}" for m in views] == ["LEFT_CC", "LEFT_MLO", "RIGHT_CC", "RIGHT_MLO"]
        for m in views:
            raw = imagecodecs.ljpeg_decode((case / f"{letter}_{number}_1.{m[1]}_{m[2]}.LJPEG").read_bytes())
            assert raw.shape == (int(m[3]), int(m[4])) and raw.dtype == np.uint16
            grey = raw.byteswap()
            assert grey.max() < 4096 and raw.max() >= 4096  # 12-bit levels, stored byte-swapped
            assert grey.max() - grey.min() > 2500


def test_grey_levels_invert_each_digitiser_formula() -> None:
    brightness = np.linspace(0.0, 1.0, 101)
    od = synthetic_formats.od_from_brightness(brightness)
    formulas = {
        "A": lambda gl: 3.789 - 0.00094568 * gl,
        "B": lambda gl: (gl - 4096.99) / -1009.01,
        "C": lambda gl: (gl - 4096.99) / -1009.01,
        "D": lambda gl: 3.96604095240593 - 0.00099055807612 * gl,
    }
    for letter, od_of_gl in formulas.items():
        gl = synthetic_formats.grey_levels(brightness, letter).astype(np.float64)
        assert np.abs(od_of_gl(gl) - od).max() < 0.001  # one grey level is ~0.001 OD
    assert od[0] == pytest.approx(synthetic_formats.OD_BACKGROUND) and od[-1] == pytest.approx(synthetic_formats.OD_DENSEST)


# ------------------------------------------------------------------------------------------ CBIS-DDSM format
def test_csv_columns_and_quirks(tiny: Path) -> None:
    summary = json.loads((tiny / "DONE.json").read_text())
    for kind, split in synthetic.LESION_SETS:
        path = tiny / "cbis-ddsm" / "csv" / f"{kind}_case_description_{split}_set.csv"
        raw = path.read_bytes()
        header = raw.split(b"\r\n", 1)[0].decode()
        assert header.split(",") == synthetic_formats.CSV_COLUMNS[kind]
        assert ("breast_density" in header) == (kind == "mass") and ("breast density" in header) == (kind == "calc")
        rows = _csv_rows(tiny, kind, split)
        assert len(rows) == summary["lesion_sets"][synthetic._set_key(kind, split)]["abnormalities"]
        assert raw.count(b"\r\n") == len(rows) + 1  # CRLF records
        quirk = "ROI mask file path" if kind == "mass" else "cropped image file path"
        # the quoted path field with its newline, as in the real files
        assert raw.count(b'.dcm\n"\r\n' if kind == "mass" else b'.dcm\n",') == len(rows)
        prefix = synthetic_formats.CASE_PREFIX[(kind, split)]
        for row in rows:
            assert row[quirk].endswith("\n")
            assert not row["image file path"].endswith("\n")
            case = f"{prefix}_{row['patient_id']}_{row['left or right breast']}_{row['image view']}"
            assert row["image file path"].startswith(case + "/")
            for field in ("cropped image file path", "ROI mask file path"):
                assert row[field].strip().startswith(f"{case}_{row['abnormality id']}/")
                assert (tiny / "cbis-ddsm" / "CBIS-DDSM" / row[field].strip()).is_file()
            assert row["abnormality type"] == ("mass" if kind == "mass" else "calcification")
            assert row["pathology"] in {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}


def test_dicom_tags_masks_and_crops(tiny: Path) -> None:
    base = tiny / "cbis-ddsm" / "CBIS-DDSM"
    swapped = 0
    for kind, split in synthetic.LESION_SETS:
        for row in _csv_rows(tiny, kind, split):
            full = pydicom.dcmread(base / row["image file path"])
            assert full.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
            assert full.PhotometricInterpretation == "MONOCHROME2" and full.BitsStored == 16
            assert [float(v) for v in full.PixelSpacing] == [0.1, 0.1]
            assert full.PatientID == row["image file path"].split("/")[0]
            assert full.Laterality == row["left or right breast"][0] and full.PatientOrientation == row["image view"]
            pixels = full.pixel_array
            assert pixels.dtype == np.uint16 and pixels.shape == (full.Rows, full.Columns)
            files = sorted((base / row["ROI mask file path"].strip()).parent.parent.parent.rglob("*.dcm"))
            arrays = [pydicom.dcmread(p).pixel_array for p in files]
            masks = [a for a in arrays if a.shape == pixels.shape and set(np.unique(a).tolist()) == {0, 255}]
            crops = [a for a in arrays if a.shape != pixels.shape]
            assert len(files) == 2 and len(masks) == 1 and len(crops) == 1
            mask = masks[0] > 0
            # the crop is the full image around the mask's bounding box
            assert crops[0].shape[0] > np.ptp(np.nonzero(mask)[0]) and crops[0].shape[0] < pixels.shape[0]
            named_mask = pydicom.dcmread(base / row["ROI mask file path"].strip()).pixel_array
            swapped += named_mask.shape != pixels.shape
    assert swapped >= 1  # names do not reliably tell crop from mask, as in CBIS-DDSM


def test_patients_disjoint(tiny: Path) -> None:
    healthy = {int(p.name[4:]) for p in (tiny / "ddsm" / "cases" / "normals").glob("*/case*")}
    lesion: dict[tuple[str, str], set[int]] = {}
    for kind, split in synthetic.LESION_SETS:
        lesion[(kind, split)] = {int(r["patient_id"][2:]) for r in _csv_rows(tiny, kind, split)}
    all_sets = [healthy, *lesion.values()]
    for i, a in enumerate(all_sets):
        for b in all_sets[i + 1 :]:
            assert not a & b


# ------------------------------------------------------------------------------------------ ensure_synthetic
def test_ensure_reuses_a_complete_set(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (tiny / "DONE.json").stat().st_mtime_ns

    def must_not_run(*args: object, **kwargs: object) -> dict:
        raise AssertionError("regenerated a complete set")

    monkeypatch.setattr(synthetic, "generate", must_not_run)
    assert synthetic.ensure_synthetic(tiny, seed=SEED, scale="tiny") == tiny
    assert (tiny / "DONE.json").stat().st_mtime_ns == stamp


def _fake_generate(out: Path, seed: int, scale: str, log: object = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "payload.txt").write_text(f"{seed} {scale}")
    summary = {"generator": synthetic.GENERATOR, "format_version": synthetic.FORMAT_VERSION, "seed": seed,
               "scale": scale, "generator_fingerprint": synthetic.generator_fingerprint()}
    (out / "DONE.json").write_text(json.dumps(summary))
    return summary


def test_ensure_is_atomic_and_replaces_other_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data" / "synthetic"

    def interrupted(out: Path, seed: int, scale: str, log: object = None) -> dict:
        (out / "ddsm").mkdir(parents=True)
        (out / "ddsm" / "half.LJPEG").write_bytes(b"\xff\xd8")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(root, seed=1, scale="tiny")
    assert not root.exists() and list((tmp_path / "data").iterdir()) == []  # nothing half-built is left

    monkeypatch.setattr(synthetic, "generate", _fake_generate)
    assert synthetic.ensure_synthetic(root, seed=1, scale="tiny") == root.absolute()
    assert (root / "payload.txt").read_text() == "1 tiny"
    synthetic.ensure_synthetic(root, seed=2, scale="tiny")  # other parameters: rebuilt and swapped in
    assert (root / "payload.txt").read_text() == "2 tiny"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synthetic"]


def test_ensure_regenerates_a_set_written_by_other_generator_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "synthetic"
    monkeypatch.setattr(synthetic, "generate", _fake_generate)
    synthetic.ensure_synthetic(root, seed=3, scale="tiny")
    assert json.loads((root / "DONE.json").read_text())["generator_fingerprint"] == synthetic.generator_fingerprint()
    (root / "payload.txt").write_text("from an older checkout")
    monkeypatch.setattr(synthetic, "generator_fingerprint", lambda: "another-version")  # the code changed since
    synthetic.ensure_synthetic(root, seed=3, scale="tiny")
    assert (root / "payload.txt").read_text() == "3 tiny"  # rebuilt, not reused


def test_fingerprint_hashes_every_generator_module_but_the_preview() -> None:
    """A new synthetic_*.py module (a split, say) must join the fingerprint unless, like the preview, it
    only reads a finished set; otherwise edits there would leave stale sets in use."""
    hashed = sorted(Path(f).name for f in synthetic.GENERATOR_MODULES)
    modules = sorted(p.name for p in Path(synthetic.__file__).parent.glob("synthetic*.py"))
    assert hashed == [name for name in modules if name != "synthetic_preview.py"]


def test_ensure_removes_only_stale_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / ".synthetic.building-dead"
    fresh = tmp_path / ".synthetic.building-alive"
    for folder in (stale, fresh):
        (folder / "ddsm").mkdir(parents=True)
    old = time.time() - synthetic.STALE_BUILD_SECONDS - 60
    os.utime(stale, (old, old))
    monkeypatch.setattr(synthetic, "generate", _fake_generate)
    synthetic.ensure_synthetic(tmp_path / "synthetic", seed=0, scale="tiny")
    assert not stale.exists() and fresh.exists()  # a concurrent build in progress is left alone


def test_ensure_refuses_foreign_folder_and_bad_scale(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic mammogram set"):
        synthetic.ensure_synthetic(tmp_path / "mine", seed=0, scale="tiny")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    with pytest.raises(DataError, match="unknown synthetic scale 'huge'"):
        synthetic.ensure_synthetic(tmp_path / "x", seed=0, scale="huge")
    with pytest.raises(DataError, match="non-negative integer, got -1"):
        synthetic.generate(tmp_path / "x", seed=-1, scale="tiny")
    with pytest.raises(DataError, match="is not a synthetic set"):
        synthetic_preview.write_preview(tmp_path / "mine", tmp_path / "p.png")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_prints_auc_and_writes_preview(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    synthetic.configure_parser(parser)
    args = parser.parse_args(["--out", str(tiny), "--seed", str(SEED), "--scale", "tiny",
                              "--preview", str(tmp_path / "sheet.png")])
    assert synthetic.run(args) == 0
    out = capsys.readouterr().out
    auc = json.loads((tiny / "DONE.json").read_text())["intensity_baseline"]["pixel_auc_mass_test"]
    assert f"intensity-baseline pixel AUC on the mass test set: {auc:.3f}" in out and "reused" in out
    sheet = cv2.imread(str(tmp_path / "sheet.png"))
    assert sheet is not None and sheet.shape[0] > 200 and sheet.shape[1] > 300
    # red outlines of the lesion masks are drawn
    red = (sheet[..., 2] == 255) & (sheet[..., 1] == 0) & (sheet[..., 0] == 0)
    assert red.sum() > 50


# ------------------------------------------------------------------------------------------ real readers
readers = pytest.importorskip("datamodules.readers")


def test_ddsm_reader_round_trip_with_od_calibration(tmp_path: Path) -> None:
    """A brightness ramp written for each digitiser site reads back as the same optical densities."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (40, 1))
    normals = tmp_path / "ddsm" / "cases" / "normals" / "normal_01"
    for number, letter in enumerate("ABCD", start=1):
        case = normals / f"case{number:04d}"
        case.mkdir(parents=True)
        views = {}
        for side in ("LEFT", "RIGHT"):
            for view in ("CC", "MLO"):
                synthetic_formats.write_ljpeg(case / f"{letter}_{number:04d}_1.{side}_{view}.LJPEG",
                                              synthetic_formats.grey_levels(ramp, letter))
                views[f"{side}_{view}"] = ramp.shape
        synthetic_formats.write_ics(case / f"{letter}-{number:04d}-1.ics", f"{letter}-{number:04d}-1", 2,
                                    synthetic_formats.DIGITISERS[letter][0], 50, "1 2 1995", views)
    records = readers.list_source("ddsm", tmp_path / "ddsm", diagnosis="normals")
    assert len(records) == 16 and {r.meta["site"] for r in records} == set("ABCD")
    od = synthetic_formats.od_from_brightness(ramp)
    decoded = []
    for record in records:
        image = readers.read_image(record)
        assert image.pixels.shape == ramp.shape and image.spacing_mm == pytest.approx(0.1)
        slope, offset = np.polyfit(od.ravel(), image.pixels.astype(np.float64).ravel(), 1)
        assert slope == pytest.approx(-1.0, abs=2e-3)  # bright = dense, in OD units
        assert np.abs(image.pixels - (offset - od)).max() < 2e-3  # within one grey level
        decoded.append(image.pixels)
    spread = np.ptp(np.stack(decoded), axis=0).max()
    assert spread < 3e-3  # every scanner lands on the same physical scale


def test_tiny_set_round_trips_through_real_readers(tiny: Path) -> None:
    summary = json.loads((tiny / "DONE.json").read_text())
    healthy = readers.list_source("ddsm", tiny / "ddsm", diagnosis="normals")
    assert len(healthy) == summary["healthy"]["images"] and all(r.label == 0 for r in healthy)
    for record in healthy[:4]:
        image = readers.read_image(record)
        assert image.spacing_mm == pytest.approx(0.1) and image.pixels.dtype == np.float32
        # background near OD 3.5, densest tissue near OD 0.15, read as OD_REF - OD
        lo, hi = float(image.pixels.min()), float(image.pixels.max())
        ref = image.meta["value_range"][1]
        assert ref - hi > synthetic_formats.OD_DENSEST - 0.01 and ref - lo < synthetic_formats.OD_BACKGROUND + 0.15
    patients_healthy = {r.patient_id for r in healthy}
    base = tiny / "cbis-ddsm" / "CBIS-DDSM"
    patients_lesion: set[str] = set()
    visible = []
    for kind, split in synthetic.LESION_SETS:
        records = readers.list_source("cbis_ddsm", tiny / "cbis-ddsm", abnormality=kind, split=split)
        key = synthetic._set_key(kind, split)
        assert len(records) == summary["lesion_sets"][key]["images"]
        assert sum(len(r.lesions) for r in records) == summary["lesion_sets"][key]["abnormalities"]
        for record in records:
            assert record.label == 1 and record.has_pixel_annotation
            image = readers.read_image(record)
            full = pydicom.dcmread(record.path).pixel_array
            assert np.array_equal(image.pixels, full) and image.spacing_mm == pytest.approx(0.1)
            masks = readers.lesion_masks(record, image.shape)
            lesion_kind = "mass" if kind == "mass" else "calcification"
            assert set(masks) == {lesion_kind}
            # the reader's union equals the union of the ROI masks told apart by content
            expected = np.zeros(image.shape, bool)
            case = record.path.relative_to(base).parts[0]
            for lesion in record.lesions:
                folder = base / f"{case}_{lesion.meta['abnormality_id']}"
                found = synthetic_preview._find_cbis_files(folder, image.shape)
                assert found is not None
                expected |= found
            assert np.array_equal(masks[lesion_kind], expected)
            if kind == "mass":
                ring = cv2.dilate(expected.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=25).astype(bool)
                ring &= ~expected & (image.pixels > 0.2 * 65535)
                visible.append(float(image.pixels[expected].mean()) > float(image.pixels[ring].mean()))
        patients_lesion |= {r.patient_id for r in records}
    assert not patients_healthy & patients_lesion
    assert np.mean(visible) >= 0.7  # masses are denser than the tissue around them


def test_healthy_views_read_back_as_their_optical_density(tiny: Path) -> None:
    """Every pixel of a written view comes back through the DDSM reader as OD_REF - OD (one grey level)."""
    records = {r.image_id: r for r in readers.list_source("ddsm", tiny / "ddsm", diagnosis="normals")}
    for k in range(2):
        case = synthetic.healthy_case(SEED, "tiny", k)
        assert f"{case.letter}-{case.number:04d}-1.ics" in {p.name for p in tiny.rglob("*.ics")}
        for view_name, view in case.views.items():
            record = records[f"{case.letter}_{case.number:04d}_1.{view_name}"]
            assert record.meta["density"] == case.density and record.meta["site"] == case.letter
            image = readers.read_image(record)
            expected = image.meta["value_range"][1] - synthetic_formats.od_from_brightness(view.brightness)
            assert np.abs(image.pixels - expected).max() < 1.2e-3
            # bright = dense: the breast is brighter than the film background
            assert image.pixels[view.breast_mask].mean() > image.pixels[~view.breast_mask].mean() + 0.5
