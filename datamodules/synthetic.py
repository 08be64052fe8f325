"""Synthetic mammograms written in the real DDSM and CBIS-DDSM formats (the project's embedded default data).

`ensure_synthetic(root, seed, scale)` builds, once and atomically, a healthy DDSM-style set
(``ddsm/cases/normals/<volume>/case<NNNN>/`` with ``.ics`` headers and byte-swapped lossless-JPEG
``.LJPEG`` views in digitiser grey levels) and CBIS-DDSM-style lesion sets (``cbis-ddsm/csv/*.csv`` with
the real columns and quirks, ``cbis-ddsm/CBIS-DDSM/<case folder>/<uid>/<uid>/00000N.dcm``), so the real
readers load them unchanged. CBIS "test" = the test sets, CBIS "train" = the lesion validation sets.
``mammospn synth`` is the command-line face of this module (`configure_parser` / `run`).

Images are drawn at 0.1 mm (`NATIVE_SPACING_MM`; readers resample to 0.2 mm). Difficulty is calibrated
against real data: the smoothed intensity used as an anomaly score (`baseline_arrays`, pooled pixel AUC
over the evaluated mass test images) lands in [0.6, 0.8], as on real masses (~0.77); the figure is stored
in ``DONE.json`` (``intensity_baseline.pixel_auc_mass_test``) and printed. `healthy_case` redraws any
healthy patient exactly as written, for checks against ground truth (true breast mask, optical density).

This module holds the generator (what is drawn, in which order, with which seeds) and its entry points
(`generate`, `ensure_synthetic`, `read_summary`, `generator_fingerprint`, the CLI). The drawing is in
`synthetic_anatomy`, the file writers and value conversions in `synthetic_formats`, the difficulty
yardstick in `synthetic_difficulty` and the preview sheet in `synthetic_preview`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules import synthetic_anatomy, synthetic_difficulty, synthetic_formats
from datamodules.fileio import swap_directory, write_json
from datamodules.records import DataError
from datamodules.synthetic_anatomy import BreastImage, add_calcification_cluster, add_mass, breast_view
from datamodules.synthetic_difficulty import (
    BASELINE_SIGMA_PX,
    MAX_LESION_AREA_PX,
    area_eval_px,
    baseline_arrays,
    pixel_auc,
)
from datamodules.synthetic_formats import (
    CASE_PREFIX,
    DIGITISERS,
    NATIVE_SPACING_MM,
    dicom_values,
    grey_levels,
    new_uid,
    write_case_csv,
    write_dicom,
    write_ics,
    write_ljpeg,
    write_roi,
)
from datamodules.synthetic_preview import write_preview

FORMAT_VERSION = 1
GENERATOR = "datamodules.synthetic"
#: The modules whose code decides what a set holds, hashed by `generator_fingerprint`.
GENERATOR_MODULES = (__file__, synthetic_anatomy.__file__, synthetic_formats.__file__, synthetic_difficulty.__file__)


@dataclass(frozen=True)
class Scale:
    """How much to generate: patients / images per set and the native image height range (px)."""

    healthy_patients: int
    mass_test: int
    calc_test: int
    mass_val: int
    calc_val: int
    rows: tuple[int, int]


SCALES: dict[str, Scale] = {
    "tiny": Scale(healthy_patients=4, mass_test=10, calc_test=3, mass_val=2, calc_val=2, rows=(640, 720)),
    "quick": Scale(healthy_patients=40, mass_test=40, calc_test=25, mass_val=15, calc_val=10, rows=(900, 1100)),
    "full": Scale(healthy_patients=300, mass_test=160, calc_test=110, mass_val=60, calc_val=40, rows=(1300, 1700)),
}

LESION_SETS = (("mass", "test"), ("calc", "test"), ("mass", "train"), ("calc", "train"))
_DENSITY_P = [0.15, 0.4, 0.3, 0.15]


def _set_key(kind: str, split: str) -> str:
    return f"{kind}_{'test' if split == 'test' else 'val'}"


def _rng(seed: int, *path: int) -> np.random.Generator:
    """An independent generator for one item, so each image depends only on (seed, set, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _image_shape(rng: np.random.Generator, scale: Scale) -> tuple[int, int]:
    rows = int(rng.integers(scale.rows[0], scale.rows[1] + 1))
    return rows, int(rows * rng.uniform(0.58, 0.7))


# ----------------------------------------------------------------------------------------- healthy set
@dataclass
class HealthyCase:
    """One healthy DDSM-style patient: case number, scanning site letter, header facts and four views."""

    number: int
    letter: str
    density: int
    age: int
    study_date: str
    views: dict[str, BreastImage]


def healthy_case(seed: int, scale: str | Scale, k: int) -> HealthyCase:
    """The k-th healthy patient of a set, drawn exactly as `generate` draws it (ground truth for checks)."""
    spec = SCALES[scale] if isinstance(scale, str) else scale
    rng = _rng(seed, 0, k)
    letter = "ABCD"[int(rng.choice(4, p=[0.35, 0.3, 0.15, 0.2]))]
    density = int(rng.choice(4, p=_DENSITY_P)) + 1
    views: dict[str, BreastImage] = {}
    for side in ("LEFT", "RIGHT"):
        for view in ("CC", "MLO"):
            views[f"{side}_{view}"] = breast_view(_image_shape(rng, spec), side, view, density, NATIVE_SPACING_MM, rng)
    age = int(rng.integers(38, 75))
    study_date = f"{int(rng.integers(1, 29))} {int(rng.integers(1, 13))} {int(rng.integers(1993, 1998))}"
    return HealthyCase(k + 1, letter, density, age, study_date, views)


def _write_healthy(out: Path, seed: int, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """DDSM normals: four views per patient, ``.ics`` + byte-swapped LJPEG in digitiser grey levels."""
    normals = out / "ddsm" / "cases" / "normals"
    n_images = 0
    for k in range(scale.healthy_patients):
        case = healthy_case(seed, scale, k)
        name = f"{case.letter}-{case.number:04d}-1"
        case_dir = normals / f"normal_{k // 25 + 1:02d}" / f"case{case.number:04d}"
        case_dir.mkdir(parents=True, exist_ok=True)
        for view_name, image in case.views.items():
            write_ljpeg(case_dir / f"{case.letter}_{case.number:04d}_1.{view_name}.LJPEG",
                         grey_levels(image.brightness, case.letter))
            n_images += 1
        shapes = {view_name: image.brightness.shape for view_name, image in case.views.items()}
        write_ics(case_dir / f"{name}.ics", name, case.density, DIGITISERS[case.letter][0], case.age,
                   case.study_date, shapes)
        log(f"  healthy: patient {k + 1}/{scale.healthy_patients} ({n_images} images written)")
    return {"patients": scale.healthy_patients, "images": n_images, "folder": "ddsm/cases/normals",
            "case_numbers": [1, scale.healthy_patients]}


# ----------------------------------------------------------------------------------------- lesion sets
def _lesion_image(rng: np.random.Generator, scale: Scale, kind: str, side: str, view: str, density: int) -> BreastImage:
    image = breast_view(_image_shape(rng, scale), side, view, density, NATIVE_SPACING_MM, rng)
    n_lesions = 2 if rng.random() < (0.12 if kind == "mass" else 0.15) else 1
    for _ in range(n_lesions):
        if kind == "mass":
            add_mass(image, rng, NATIVE_SPACING_MM)
        else:
            add_calcification_cluster(image, rng, NATIVE_SPACING_MM)
    return image


def _write_lesion_set(out: Path, seed: int, scale: Scale, kind: str, split: str, first_patient: int,
                      log: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """One CBIS-DDSM set: full-image, ROI-mask and crop DICOMs plus its description CSV with the quirks."""
    set_index = LESION_SETS.index((kind, split)) + 1
    n_target = getattr(scale, _set_key(kind, split))
    prefix = CASE_PREFIX[(kind, split)]
    root = out / "cbis-ddsm" / "CBIS-DDSM"
    rows: list[list[str]] = []
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    scores_all: list[np.ndarray] = []
    labels_all: list[np.ndarray] = []
    patient_number = first_patient
    n_images = n_abnormalities = n_pass = 0
    patients = 0
    k = 0
    while n_images < n_target:
        rng = _rng(seed, set_index, k)
        k += 1
        patient_number += int(rng.integers(1, 4))
        patient = f"P_{patient_number:05d}"
        patients += 1
        side = str(rng.choice(["LEFT", "RIGHT"]))
        views = ["CC", "MLO"] if rng.random() < 0.6 else [str(rng.choice(["CC", "MLO"]))]
        density = int(rng.choice(4, p=_DENSITY_P)) + 1
        for view in views[: n_target - n_images]:
            image = _lesion_image(rng, scale, kind, side, view, density)
            pixels = dicom_values(image.brightness)
            case = f"{prefix}_{patient}_{side}_{view}"
            study, series = new_uid(rng), new_uid(rng)
            full_rel = f"{case}/{study}/{series}/000000.dcm"
            write_dicom(root / full_rel, pixels, patient=case, study_uid=study, series_uid=series,
                        sop_uid=new_uid(rng), description="full mammogram images", side=side, view=view, instance=1)
            union = np.zeros(pixels.shape, bool)
            pathology = str(rng.choice(["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"],
                                       p=[0.45, 0.4, 0.15] if kind == "mass" else [0.4, 0.35, 0.25]))
            for abn_id, lesion in enumerate(image.lesions, start=1):
                crop_rel, mask_rel = write_roi(root, f"{case}_{abn_id}", pixels, lesion.mask, kind, side, view, rng)
                union |= lesion.mask
                n_pass += area_eval_px(lesion.mask) < MAX_LESION_AREA_PX
                descriptors = [lesion.descriptors["mass shape"], lesion.descriptors["mass margins"]] if kind == "mass" \
                    else [lesion.descriptors["calc type"], lesion.descriptors["calc distribution"]]
                assessment = str(rng.choice(["3", "4", "4", "5"] if pathology == "MALIGNANT" else ["2", "3", "4", "0"]))
                row = [patient, str(density), side, view, str(abn_id), "mass" if kind == "mass" else "calcification",
                       *descriptors, assessment, pathology, str(int(rng.integers(1, 6))), full_rel, crop_rel, mask_rel]
                # the real CSVs: one path field per row ends in a newline inside its quotes
                row[13 if kind == "mass" else 12] += "\n"
                rows.append(row)
                n_abnormalities += 1
            s, lab = baseline_arrays(pixels, image.breast_mask, union)
            # the difficulty figure uses the images that the evaluation selects (every lesion passes the rule)
            if all(area_eval_px(lesion.mask) < MAX_LESION_AREA_PX for lesion in image.lesions):
                scores.append(s)
                labels.append(lab)
            scores_all.append(s)
            labels_all.append(lab)
            n_images += 1
            log(f"  {kind} {split}: image {n_images}/{n_target} ({case})")
    csv_dir = out / "cbis-ddsm" / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    csv_path = csv_dir / f"{kind}_case_description_{split}_set.csv"
    write_case_csv(csv_path, kind, rows)
    auc = pixel_auc(np.concatenate(scores), np.concatenate(labels)) if scores else float("nan")
    auc_all = pixel_auc(np.concatenate(scores_all), np.concatenate(labels_all)) if scores_all else float("nan")
    summary = {"csv": str(csv_path.relative_to(out)), "patients": patients, "images": n_images,
               "abnormalities": n_abnormalities, "abnormalities_below_area_rule": int(n_pass),
               "images_selected_by_area_rule": len(scores),
               "intensity_baseline_pixel_auc": round(auc, 4),
               "intensity_baseline_pixel_auc_all_images": round(auc_all, 4)}
    return summary, patient_number


# ----------------------------------------------------------------------------------------- entry points
def _check_arguments(seed: object, scale: object) -> None:
    if scale not in SCALES:
        raise DataError(f"unknown synthetic scale {scale!r}: choose one of {', '.join(SCALES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic seed must be a non-negative integer, got {seed!r}")


def generate(out: Path, seed: int, scale: str, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write a complete synthetic set into ``out`` (non-atomic; `ensure_synthetic` is the safe entry) and
    return its summary, which is also written last to ``out/DONE.json``."""
    _check_arguments(seed, scale)
    log = log or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SCALES[scale]
    started = time.perf_counter()
    healthy = _write_healthy(out, seed, spec, log)
    lesion_sets: dict[str, Any] = {}
    # lesion patients are numbered after the healthy cases, so no id is shared with the healthy set
    next_patient = spec.healthy_patients + 100
    for kind, split in LESION_SETS:
        summary, next_patient = _write_lesion_set(out, seed, spec, kind, split, next_patient, log)
        lesion_sets[_set_key(kind, split)] = summary
        log(f"  {kind} {split}: {summary['images']} images, pixel AUC of smoothed intensity "
            f"{summary['intensity_baseline_pixel_auc']:.3f}")
    summary = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "generator_fingerprint": generator_fingerprint(),
        "seed": int(seed),
        "scale": scale,
        "native_spacing_mm": NATIVE_SPACING_MM,
        "healthy": healthy,
        "lesion_sets": lesion_sets,
        "splits": {"cbis_ddsm test": "test sets", "cbis_ddsm train": "lesion validation sets"},
        "intensity_baseline": {
            "description": "image at 0.2 mm scaled to [0,1], Gaussian-smoothed, score = intensity, pooled over "
                           "breast pixels of the images of a set whose lesions all pass the 4-patch area rule "
                           "(the evaluated images), label = lesion mask",
            "sigma_px_at_0.2mm": BASELINE_SIGMA_PX,
            "pixel_auc_mass_test": lesion_sets["mass_test"]["intensity_baseline_pixel_auc"],
        },
        "generation_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "DONE.json", summary)
    return summary


def read_summary(root: str | Path) -> dict[str, Any] | None:
    """The DONE.json summary of a complete synthetic set at ``root``, or None when there is none."""
    path = Path(root) / "DONE.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("generator") == GENERATOR else None


@functools.cache
def generator_fingerprint() -> str:
    """sha256 (16 hex digits) of the generator's source: every module in `GENERATOR_MODULES`.

    Those are the modules whose code changes what a set holds: this one (what is drawn, in which order,
    the summary), `synthetic_anatomy` (the drawing), `synthetic_formats` (the file writers and value
    conversions) and `synthetic_difficulty` (the area rule and the baseline figures in DONE.json).
    `synthetic_preview` is left out: it only reads a finished set. Stored in DONE.json: a set written by
    other generator code (an older checkout, say) is regenerated instead of silently reused, since any
    edit there may change pixels, lesions or which images pass the area rule. FORMAT_VERSION alone
    relied on remembering to bump it, and was not bumped.
    """
    digest = hashlib.sha256()
    for module_file in GENERATOR_MODULES:
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


def _matches(summary: dict[str, Any] | None, seed: int, scale: str) -> bool:
    return (summary is not None and summary.get("seed") == seed and summary.get("scale") == scale
            and summary.get("format_version") == FORMAT_VERSION
            and summary.get("generator_fingerprint") == generator_fingerprint())


#: A temporary build folder untouched for this long belongs to a killed process and is removed.
STALE_BUILD_SECONDS = 6 * 3600


def _remove_stale_builds(root: Path) -> None:
    """Delete leftovers of killed builds (``.<name>.building-*`` / ``.<name>.old-*`` beside ``root``)."""
    now = time.time()
    for pattern in (f".{root.name}.building-*", f".{root.name}.old-*"):
        for leftover in root.parent.glob(pattern):
            try:
                if leftover.is_dir() and now - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue


def ensure_synthetic(root: str | Path, seed: int = 0, scale: str = "quick",
                     log: Callable[[str], None] | None = None) -> Path:
    """Return ``root`` holding the synthetic set for (seed, scale), generating it once if needed.

    The set is built in a temporary folder beside ``root`` and renamed into place after DONE.json is
    written, so an interrupted build never looks complete. A set with another seed/scale is replaced; a
    non-empty folder that is not a synthetic set is refused rather than overwritten.
    """
    _check_arguments(seed, scale)
    root = Path(root).expanduser().absolute()
    if _matches(read_summary(root), seed, scale):
        return root
    if root.exists() and (not root.is_dir() or (read_summary(root) is None and any(root.iterdir()))):
        raise DataError(f"{root} exists and is not a synthetic mammogram set (no DONE.json from {GENERATOR}); "
                        f"choose an empty or new folder for the synthetic data")
    if log is None:
        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    log(f"generating the synthetic mammogram set (seed {seed}, scale {scale}) in {root}; this happens once")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        generate(tmp, seed, scale, log)
        if _matches(read_summary(root), seed, scale):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        try:
            swap_directory(tmp, root)
        except OSError:
            if _matches(read_summary(root), seed, scale):
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ----------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mammospn synth``."""
    parser.add_argument("--out", required=True, type=Path, help="folder of the synthetic set (created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical data)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick", help="how much data to generate")
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG of a few lesion images with masks")


def run(args: argparse.Namespace) -> int:
    """``mammospn synth``: generate (or reuse) a set, print what it holds and the intensity-baseline AUC."""
    def log(message: str) -> None:
        print(message, flush=True)

    existing = _matches(read_summary(args.out), args.seed, args.scale)
    try:
        root = ensure_synthetic(args.out, seed=args.seed, scale=args.scale, log=log)
    except DataError as err:
        print(f"mammospn synth: {err}", file=sys.stderr)
        return 2
    summary = read_summary(root)
    assert summary is not None
    print(f"{'reused' if existing else 'wrote'} synthetic set (seed {args.seed}, scale {args.scale}) in {root}")
    healthy = summary["healthy"]
    print(f"  healthy DDSM normals: {healthy['patients']} patients, {healthy['images']} images "
          f"in {root / healthy['folder']}")
    for key, item in summary["lesion_sets"].items():
        print(f"  {key}: {item['images']} images, {item['abnormalities']} abnormalities "
              f"({item['abnormalities_below_area_rule']} below the 4-patch area rule), "
              f"pixel AUC of smoothed intensity {item['intensity_baseline_pixel_auc']:.3f} ({item['csv']})")
    print(f"intensity-baseline pixel AUC on the mass test set: "
          f"{summary['intensity_baseline']['pixel_auc_mass_test']:.3f} (real masses at 0.2 mm: about 0.77)")
    if args.preview is not None:
        print(f"preview: {write_preview(root, args.preview)}")
    return 0
