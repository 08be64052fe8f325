"""What a configured data source lists: healthy images, lesion test images, lesion validation images.

The readers (`datamodules.readers`) list one folder each; this module combines them per source name
(``synthetic`` = the generated DDSM normals + CBIS-DDSM lesions), splits lesion patients into test and
validation when the source has no split of its own, drops healthy images of women with a lesion image, and
pairs each image with the other breast's of the same woman and view (`contralateral_pairs`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_info

from datamodules.patches import split_patients
from datamodules.records import DataError, ImageRecord

#: test_set name -> lesion kind of `datamodules.readers.lesion_masks`
TEST_SET_KINDS = {"mass": "mass", "calc": "calcification"}
SOURCES = ("synthetic", "cbis_ddsm", "ddsm", "mini_ddsm", "mias", "manifest")


def lesion_kind(test_set: str) -> str:
    """The lesion kind a ``test_set`` name selects (``calc`` -> ``calcification``); `DataError` otherwise."""
    if test_set not in TEST_SET_KINDS:
        raise DataError(f"data.test_set must be one of {sorted(TEST_SET_KINDS)}, got {test_set!r}")
    return TEST_SET_KINDS[test_set]


@dataclass
class SourceRecords:
    """What a data source lists: healthy images, lesion test images, lesion validation images, and the other
    breast's image of every image that has one (`contralateral_pairs` over everything listed, also the healthy
    images dropped from training and the other test set's lesion images)."""

    healthy: list[ImageRecord]
    test: list[ImageRecord]
    lesion_validation: list[ImageRecord]
    contralateral: dict[str, ImageRecord] = field(default_factory=dict)


def contralateral_pairs(records: Iterable[ImageRecord]) -> dict[str, ImageRecord]:
    """image_id -> the image of the same woman (``patient_id``) and view (``meta["view"]``) of the other breast.

    Where both sides are known (``meta["side"]``, LEFT / RIGHT or L / R), the one image of each side pairs; where
    they are not (mini-MIAS lists one MLO per breast without saying which), a woman's two images of one view pair.
    Anything else (three images of a view, two of one side, an image alone) stays unpaired: no guess is made.
    """
    groups: dict[tuple[str, str], dict[str, ImageRecord]] = defaultdict(dict)
    for record in records:
        groups[(record.patient_id, str(record.meta.get("view") or "").upper())][record.image_id] = record
    pairs: dict[str, ImageRecord] = {}
    for group in groups.values():
        if len(group) != 2:
            continue
        a, b = group.values()
        sides = {str(r.meta.get("side") or "").upper()[:1] for r in (a, b)}
        if sides == {"L", "R"} or not ({"L", "R"} & sides):  # opposite sides, or neither side known
            pairs[a.image_id], pairs[b.image_id] = b, a
    return pairs


def _split_lesion_records(
    records: list[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(test, validation) lesion records, split by patient."""
    if not records or fraction <= 0:
        return records, []
    _, val_patients = split_patients([r.patient_id for r in records], fraction, seed)
    return ([r for r in records if r.patient_id not in val_patients],
            [r for r in records if r.patient_id in val_patients])


def list_source_records(
    source: str,
    root: str | Path,
    test_set: str = "mass",
    *,
    healthy_source: str | None = None,
    healthy_root: str | Path | None = None,
    source_options: dict[str, Any] | None = None,
    healthy_options: dict[str, Any] | None = None,
    lesion_validation_fraction: float = 0.2,
    data_seed: int = 0,
    scale: str = "quick",
) -> SourceRecords:
    """Lists healthy, test and lesion-validation records of a configured source (see `MammographyDataModule`)."""
    from datamodules.readers import list_source

    if source not in SOURCES:
        raise DataError(f"data.source must be one of {list(SOURCES)}, got {source!r}")
    kind = lesion_kind(test_set)
    root = Path(root)
    opts = dict(source_options or {})
    healthy_opts = dict(healthy_options or {})
    abnormality = test_set

    def has_kind(r: ImageRecord) -> bool:
        return any(lesion.kind == kind for lesion in r.lesions)

    def in_a_test_set(r: ImageRecord) -> bool:  # of either test_set (mass or calc)
        return any(lesion.kind in TEST_SET_KINDS.values() for lesion in r.lesions)

    if source == "synthetic":
        from datamodules.synthetic import ensure_synthetic

        root = Path(ensure_synthetic(root, seed=data_seed, scale=scale))
        healthy = list_source("ddsm", root / "ddsm", diagnosis="normals")
        cbis = root / "cbis-ddsm"
        test = list_source("cbis_ddsm", cbis, abnormality=abnormality, split="test")
        val = list_source("cbis_ddsm", cbis, abnormality=abnormality, split="train")
        other = [list_source("cbis_ddsm", cbis, abnormality=a, split=sp)
                 for a in TEST_SET_KINDS if a != abnormality for sp in ("test", "train")]
        every_lesion = [r for listing in other for r in listing]
        everything = [*test, *val, *every_lesion]  # + the healthy images, below (also a healthy_root's)
    elif source == "cbis_ddsm":
        if healthy_root is None:
            raise DataError("data.source cbis_ddsm has no normal mammograms: set data.healthy_root to a DDSM "
                            "folder (with cases/normals) and data.healthy_source (default ddsm)")
        test = list_source("cbis_ddsm", root, abnormality=abnormality, split="test", **opts)
        val = list_source("cbis_ddsm", root, abnormality=abnormality, split="train", **opts)
        other = [list_source("cbis_ddsm", root, abnormality=a, split=sp, **opts)
                 for a in TEST_SET_KINDS if a != abnormality for sp in ("test", "train")]
        every_lesion = [r for listing in other for r in listing]
        everything = [*test, *val, *every_lesion]
        healthy = []
    elif source == "ddsm":
        diagnoses = opts.pop("lesion_diagnoses", ["cancers", "benigns"])
        healthy = list_source("ddsm", root, diagnosis=opts.pop("diagnosis", "normals"), **opts)
        lesion = [r for d in diagnoses for r in list_source("ddsm", root, diagnosis=d, **opts)]
        test, val = _split_lesion_records([r for r in lesion if has_kind(r)], lesion_validation_fraction, data_seed)
        every_lesion = [r for r in lesion if in_a_test_set(r)]
        everything = [*healthy, *lesion]
    else:  # mini_ddsm, mias, manifest: one listing, healthy = label 0
        listed = list_source(source, root, **opts)
        healthy = [r for r in listed if r.label == 0]
        lesion = [r for r in listed if r.label != 0 and has_kind(r)]
        test, val = _split_lesion_records(lesion, lesion_validation_fraction, data_seed)
        every_lesion = [r for r in listed if r.label != 0 and in_a_test_set(r)]
        everything = listed  # also the lesions of neither test set (MIAS ARCH, ASYM): their other breast pairs
    if healthy_root is not None:
        hsource = healthy_source or "ddsm"
        if hsource == "ddsm":
            healthy_opts.setdefault("diagnosis", "normals")
        healthy = list_source(hsource, healthy_root, **healthy_opts)
        if hsource != "ddsm":
            healthy = [r for r in healthy if r.label == 0]
    # every woman with a lesion image in a test or lesion-validation set of this source, of either test_set
    # (a calc evaluation must not meet the other breast of its women in a mass-configured training set)
    contralateral = contralateral_pairs({r.image_id: r for r in [*everything, *healthy]}.values())
    lesion_patients = {r.patient_id for r in [*test, *val, *every_lesion]}
    overlap = [r for r in healthy if r.patient_id in lesion_patients]
    if overlap:
        rank_zero_info("%d healthy images dropped: their patients have lesion images in the test/validation sets",
                 len(overlap))
        healthy = [r for r in healthy if r.patient_id not in lesion_patients]
    return SourceRecords(healthy=list(healthy), test=list(test), lesion_validation=list(val),
                         contralateral=contralateral)
