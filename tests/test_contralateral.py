"""Bilateral asymmetry (`lightning_modules.contralateral`): registration, the reference against a brute-force
reference, the pairing of records, the item that carries its other breast, and the scoring and calibration path."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from datamodules.evaluation_set import EvaluationDataset
from datamodules.grids import extract_patches, grid_centers, patch_context
from datamodules.records import ImageRecord
from datamodules.sources import contralateral_pairs
from experiments.calibration import ConformalCalibration
from lightning_modules.base import AnomalyDetector
from lightning_modules.contralateral import contralateral_reference, register_mirrored


def _breast(height: int = 120, width: int = 96, top: int = 20, left: int = 0) -> torch.Tensor:
    """A half-ellipse breast cut straight at column ``left`` (the chest wall), rows ``top``.. ``top`` + 80."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (((yy - top - 40) ** 2 / 40**2 + (xx - left) ** 2 / 70**2) < 1) & (xx >= left)


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (16, 0), (-24, 8), (8, -16)])
def test_register_mirrored_finds_the_shift_of_the_mirrored_other_breast(dy: int, dx: int) -> None:
    mask = _breast(top=30, left=16)  # a film cut beside black padding: a shift crops nothing
    # the other breast: this one moved by (-dy, -dx) and mirrored, so mirroring it back and moving by (dy, dx)
    # lands on this one
    moved = torch.zeros_like(mask)
    h, w = mask.shape
    moved[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)] = mask[max(dy, 0):h + min(dy, 0),
                                                                           max(dx, 0):w + min(dx, 0)]
    assert register_mirrored(mask, moved.flip(-1)) == (dy, dx)
    assert register_mirrored(mask, torch.zeros_like(mask)) == (0, 0)  # nothing to register: no shift


def _brute_reference(centers, other_centers, other_scores, width, shift, radius, reference, centre):
    out = []
    for r, c in centers.tolist():
        near = [float(s) for (orow, ocol), s in zip(other_centers.tolist(), other_scores.tolist())
                if abs(orow + shift[0] - r) <= radius and abs((width - 1 - ocol) + shift[1] - c) <= radius]
        if not near:
            out.append(float(np.median(other_scores.numpy())) if other_scores.numel() % 2 else
                       float(torch.median(other_scores)))
        else:
            out.append(sum(near) / len(near) if reference == "mean" else max(near))
    out = torch.tensor(out, dtype=torch.float64)
    return (out - out.median() if centre else out).float()


@pytest.mark.parametrize("reference", ["mean", "max"])
@pytest.mark.parametrize("radius", [0.0, 16.0, 40.0])
@pytest.mark.parametrize("centre", [True, False])
def test_contralateral_reference_matches_brute_force(reference: str, radius: float, centre: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    centers = torch.randint(0, 12, (40, 2), generator=gen) * 8
    other_centers = torch.randint(0, 12, (33, 2), generator=gen) * 8
    other_scores = torch.randn(33, generator=gen)
    got = contralateral_reference(torch.randn(40), centers, other_scores, other_centers, 96, (8, -16), radius,
                                  reference, centre, chunk=7)
    want = _brute_reference(centers, other_centers, other_scores, 96, (8, -16), radius, reference, centre)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32


def test_contralateral_reference_refuses_bad_options() -> None:
    c = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="must be one of"):
        contralateral_reference(torch.zeros(3), c, torch.zeros(3), c, 10, (0, 0), 8.0, "median")
    with pytest.raises(ValueError, match=">= 0 px"):
        contralateral_reference(torch.zeros(3), c, torch.zeros(3), c, 10, (0, 0), -1.0)
    with pytest.raises(ValueError, match="2 contralateral scores for 3 grid centres"):
        contralateral_reference(torch.zeros(3), c, torch.zeros(2), c, 10, (0, 0), 8.0)


def _record(image_id: str, patient: str, side: str | None = None, view: str = "MLO", path: Path = Path("x")):
    meta = {"view": view, **({"side": side} if side else {})}
    return ImageRecord(image_id=image_id, patient_id=patient, path=path, reader="image", spacing_mm=0.2, meta=meta)


def test_contralateral_pairs_pairs_the_other_breast_of_the_same_view_and_guesses_nothing() -> None:
    records = [_record("a_l_cc", "a", "LEFT", "CC"), _record("a_r_cc", "a", "RIGHT", "CC"),
               _record("a_l_mlo", "a", "LEFT", "MLO"), _record("a_r_mlo", "a", "RIGHT", "MLO"),
               _record("b1", "b"), _record("b2", "b"),  # mini-MIAS: two MLOs, sides not listed
               _record("c_l", "c", "L"), _record("c_l2", "c", "L"),  # the same side twice
               _record("d1", "d"), _record("d2", "d"), _record("d3", "d"),  # three of one view
               _record("e", "e")]
    pairs = {k: v.image_id for k, v in contralateral_pairs(records).items()}
    assert pairs == {"a_l_cc": "a_r_cc", "a_r_cc": "a_l_cc", "a_l_mlo": "a_r_mlo", "a_r_mlo": "a_l_mlo",
                     "b1": "b2", "b2": "b1"}


def test_mias_listing_pairs_each_woman_beyond_the_training_set(tmp_path) -> None:
    """The other breast of a lesion image pairs even where it is dropped from training (mdb006) or is a lesion of
    neither test set (mdb009, ARCH)."""
    from datamodules.sources import list_source_records

    info = ["mdb001 G CIRC B 535 425 97", "mdb002 G NORM", "mdb003 D NORM", "mdb004 D NORM",
            "mdb005 F CALC B 300 300 20", "mdb006 F NORM", "mdb009 G ARCH B 300 300 20", "mdb010 G NORM"]
    (tmp_path / "Info.txt").write_text("\n".join(info) + "\n")
    for row in info:
        (tmp_path / f"{row[:6]}.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes(16))
    listed = list_source_records("mias", tmp_path, "mass", lesion_validation_fraction=0.0)
    pairs = {k: v.image_id for k, v in listed.contralateral.items()}
    assert pairs["mdb001"] == "mdb002" and pairs["mdb005"] == "mdb006" and pairs["mdb010"] == "mdb009"
    assert pairs["mdb003"] == "mdb004" and len(pairs) == 8


def _write_pgm(path: Path, mask: torch.Tensor) -> Path:
    image = np.where(mask.numpy(), 170, 8).astype(np.uint8)
    path.write_bytes(f"P5\n{image.shape[1]} {image.shape[0]}\n255\n".encode() + image.tobytes())
    return path


def test_an_evaluation_item_carries_its_other_breast_and_an_unreadable_one_is_reported(tmp_path, caplog) -> None:
    left = _write_pgm(tmp_path / "mdb001.pgm", _breast(160, 128, 30))
    right = _write_pgm(tmp_path / "mdb002.pgm", _breast(160, 128, 50).flip(-1))
    a, b = (_record(p.stem, "w1", path=p) for p in (left, right))
    common = dict(kind=None, stride=16, patch_size=32, spacing_mm=0.2)
    item = EvaluationDataset([a], contralateral={"mdb001": b}, **common)[0]
    other = item["contralateral"]
    assert other["image_id"] == "mdb002" and not bool(other["lesion_mask"].any())
    assert other["patches"].shape[1:] == (1, 32, 32) and other["centers"].shape[0] == other["patches"].shape[0]
    assert "contralateral" not in EvaluationDataset([a], **common)[0]  # nothing paired: nothing read
    missing = _record("mdb002", "w1", path=tmp_path / "gone.pgm")
    with caplog.at_level(logging.WARNING):
        alone = EvaluationDataset([a], contralateral={"mdb001": missing}, **common)[0]
    assert "contralateral" not in alone
    assert any("mdb001: its other breast mdb002 is unreadable, so it is scored alone" in r.getMessage()
               for r in caplog.records)


class Brightness(AnomalyDetector):
    """Mean patch brightness as the raw score: what a lesion and dense tissue share (a density would too)."""

    def __init__(self, contralateral: str = "mean", contralateral_radius_px: float = 16.0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def score_patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))


def _scan(mask: torch.Tensor, seed: int, blobs: list[tuple[int, int]] = (), image_id: str = "x") -> dict:
    """A noisy breast with bright 16-px blobs at ``blobs`` (row, column), as an evaluation item (patch 16)."""
    rng = np.random.default_rng(seed)
    image = np.where(mask.numpy(), 0.35 + 0.1 * rng.random(mask.shape), 0.0).astype(np.float32)
    for r, c in blobs:
        image[r - 8:r + 8, c - 8:c + 8] = 0.95
    breast = mask.numpy()
    centers = grid_centers(breast, 8)
    return {"image_id": image_id, "patient_id": image_id, "breast_mask": mask, "stride": 8,
            "centers": torch.from_numpy(centers), "context": torch.from_numpy(patch_context(breast, centers)),
            "patches": torch.from_numpy(extract_patches(image, centers, 16)).unsqueeze(1),
            "lesion_mask": torch.zeros_like(mask), "scan": torch.from_numpy(image), "spacing_mm": 0.2, "meta": {}}


def _pair(seed: int, here: list, there: list, shift: int = 0) -> dict:
    """This breast (chest wall left) with its other breast (chest wall right, ``shift`` px lower), whose blobs
    ``there`` are given in this breast's coordinates (mirrored and moved onto the other image)."""
    mask = _breast(120, 96, 20)
    other_mask = _breast(120, 96, 20 + shift).flip(-1)
    item = _scan(mask, seed, here, f"w{seed}a")
    item["contralateral"] = _scan(other_mask, seed + 1000, [(r + shift, 95 - c) for r, c in there], f"w{seed}b")
    return item


def test_bilateral_scoring_ranks_a_one_sided_blob_above_tissue_both_breasts_share(tmp_path) -> None:
    """Healthy women have a bright blob at the same place in both breasts (like the pectoral corner) or none; the
    test woman has that shared blob and a second one in this breast only. One-sided, the two blobs score alike;
    bilateral, the one-sided blob outranks the shared one, both stay p-values, and the callback's path and the
    model's agree (the calibrator fitted on healthy pairs, checked by cross-fitting)."""
    shared, lesion = (40, 24), (80, 40)
    pairs = [_pair(s, [shared] if s % 2 else [], [shared] if s % 2 else [], shift=8 * (s % 3)) for s in range(16)]
    # each healthy woman's two images are both validation items, each carrying the other (as the datamodule gives)
    women = [[a, {**a["contralateral"], "contralateral": {k: v for k, v in a.items() if k != "contralateral"}}]
             for a in pairs]
    halves = {"fit": [i for w in women[0::2] for i in w], "check": [i for w in women[1::2] for i in w]}
    dm = SimpleNamespace(calibration_dataloader=lambda part: halves[part])
    model = Brightness()
    calls = []
    score_grid = model.score_grid
    model.score_grid = lambda x, *a: calls.append(len(x)) or score_grid(x, *a)
    saved = {}
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, datamodule=dm,
                              ckpt_path=str(tmp_path / "best.ckpt"), save_checkpoint=lambda p: saved.setdefault("p", p))
    ConformalCalibration(alpha=0.05, bins_px=[8.0], min_count=20).on_validation_end(trainer, model)
    assert model.calibrator.fitted and model.bilateral_calibrator.fitted and saved["p"] == tmp_path / "calibrated.ckpt"
    report = __import__("json").loads((tmp_path / "calibrated.calibration.json").read_text())
    assert report["contralateral"] == "mean" and report["paired_fit_images"] == 32
    # both curves of the cross-fit check: the bilateral p-values and the one-sided ones (calcification rows)
    for curve in (report["pixel_rate"], report["one_sided_pixel_rate"]):
        assert len(curve) == len(report["alphas"]) and curve == sorted(curve) and 0.0 < curve[-1] < 0.5
    assert report["one_sided_pixel_rate"] != report["pixel_rate"]
    assert len(calls) == 32  # every image scored once, not again as its partner's other breast (nor for the curves)
    del model.score_grid

    test = _pair(99, [shared, lesion], [shared], shift=8)
    index = {tuple(c): i for i, c in enumerate(test["centers"].tolist())}
    at_shared, at_lesion = index[shared], index[lesion]
    one_sided = model.one_sided_scores(test)
    assert abs(float(one_sided[at_lesion] - one_sided[at_shared])) < 0.5  # alone, the two blobs look alike
    scores = model.score_item(test)
    assert float(scores[at_lesion]) > float(scores[at_shared]) + 1.0
    assert float(scores.min()) >= 0.0  # still -log p
    expected = model.bilateral_calibrator(
        model.bilateral_input(one_sided, test, model.one_sided_scores(test["contralateral"]), test["contralateral"]),
        test["context"])
    torch.testing.assert_close(scores, expected)
    alone = {k: v for k, v in test.items() if k != "contralateral"}
    torch.testing.assert_close(model.score_item(alone), one_sided)  # no pair: the one-sided score
    model.hparams.contralateral = "none"
    torch.testing.assert_close(model.score_item(test), one_sided)  # option off: the pair is ignored


def test_predict_files_pair_among_themselves_by_their_names(tmp_path) -> None:
    """``lightning predict`` on a folder: files named like DDSM's (patient, side, view) pair with the other breast's
    file of the same view; with ``with_contralateral`` off, nothing extra is read."""
    from datamodules.datamodules import MammographyDataModule

    folder = tmp_path / "scans"
    folder.mkdir()
    for name, mask in (("A_0007_1.LEFT_MLO", _breast(160, 128, 30)), ("A_0007_1.RIGHT_MLO", _breast(160, 128, 50).flip(-1)),
                       ("A_0007_1.LEFT_CC", _breast(160, 128, 40))):
        cv2.imwrite(str(folder / f"{name}.png"), np.where(mask.numpy(), 170, 8).astype(np.uint8))

    def items(with_contralateral: bool) -> dict:
        dm = MammographyDataModule(source="manifest", root=str(tmp_path / "none.csv"), predict_path=str(folder),
                                   predict_options={"spacing_mm": 0.2}, cache_dir=str(tmp_path / "cache"),
                                   patch_size=32, progress=False, with_contralateral=with_contralateral)
        dataset = dm.prediction.dataset("predict")
        return {dataset[i]["image_id"]: dataset[i] for i in range(len(dataset))}

    paired = items(True)
    assert paired["A_0007_1.LEFT_MLO"]["contralateral"]["image_id"] == "A_0007_1.RIGHT_MLO"
    assert paired["A_0007_1.RIGHT_MLO"]["contralateral"]["image_id"] == "A_0007_1.LEFT_MLO"
    assert "contralateral" not in paired["A_0007_1.LEFT_CC"]  # no right CC among the files
    assert not any("contralateral" in item for item in items(False).values())


def test_the_model_options_are_checked_in_one_line_naming_the_key() -> None:
    from lightning_modules.rat_spn_stage import RatSpnStage

    with pytest.raises(ValueError, match=r"^model.init_args.contralateral must be one of \('none', 'mean', 'max'\)"):
        RatSpnStage(autoencoder_ckpt="x.ckpt", contralateral="median")
    with pytest.raises(ValueError, match=r"^model.init_args.contralateral_radius_px must be >= 0, got -4"):
        RatSpnStage(autoencoder_ckpt="x.ckpt", contralateral="mean", contralateral_radius_px=-4.0)
    assert RatSpnStage(autoencoder_ckpt="x.ckpt").contralateral_reference is None  # off unless asked
