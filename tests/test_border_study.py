"""`mammospn border-study` on the smoke profile: every border-aware variant fitted, calibrated, tested, tabled."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments import border_study, calibration, score_study, table1_stages, tools


@pytest.fixture(scope="module")
def smoke_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One smoke Table 1 (its CAE and CAE-RATSPN fits) for the studies that read it: (out folder, data root)."""
    root = tmp_path_factory.mktemp("studies")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        patch.chdir(root)
        out = root / "results"
        assert tools.main(["border-study", "--table1", str(out), "--profile", "smoke"]) == 2  # no Table 1 yet
        assert tools.main(["score-study", "--table1", str(out), "--profile", "smoke"]) == 2
        assert tools.main(["table1", "--profile", "smoke", "--out", str(out), "--data-root", str(root / "synth")]) == 0
    return out, str(root / "synth")


@pytest.mark.slow
def test_border_study_runs_every_variant_on_a_smoke_table(
    smoke_table: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out, synth = smoke_table
    monkeypatch.chdir(out.parent)
    args = ["border-study", "--table1", str(out), "--profile", "smoke", "--data-root", synth]
    assert tools.main(args) == 0
    rows = list(csv.DictReader((out / "border_study.csv").open()))
    variants = (border_study.VARIANTS + border_study.smoothing_variants([table1_stages.DEFAULT_SMOOTHING_PX])
                + border_study.bilateral_variants(table1_stages.DEFAULT_SMOOTHING_PX, [32.0]))
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    for r in rows:
        assert 0.0 <= float(r["pixel_auc"]) <= 1.0 and 0.0 <= float(r["lesion_hit_rate"]) <= 1.0
    calibrated = {v.name for v in variants if v.calibration is not None}
    assert all((r["healthy p<0.05"] != "") == (r["variant"] in calibrated) for r in rows)
    # Table 1's CAE-RATSPN row (default: mondrian, smoothed) is the study's mondrian+smooth row: the same best
    # checkpoint, smoothed and calibrated with the same strata; the mondrian row scores the same fit unsmoothed
    table = {r["model"]: r for r in csv.DictReader((out / "table1.csv").open()) if r["test_set"] == "mass"}
    smooth = next(r for r in rows if r["variant"] == "mondrian+smooth16")
    assert float(smooth["pixel_auc"]) == pytest.approx(float(table["CAE-RATSPN"]["pixel_auc"]), abs=1e-6)
    import torch

    checkpoints = out / "runs" / "cae_spn" / "checkpoints"
    sigma = {name: torch.load(checkpoints / f"calibrated-{name}.ckpt", map_location="cpu",
                              weights_only=False)["hyper_parameters"]["score_smoothing_px"]
             for name in ("mondrian", "mondrian_smooth16")}
    assert sigma == {"mondrian": 0.0, "mondrian_smooth16": table1_stages.DEFAULT_SMOOTHING_PX}
    assert (out / "runs" / "cae_spn" / "checkpoints" / "calibrated-mondrian.calibration.png").is_file()
    # two-fold cross-fit: every validation image checked by a calibrator that never saw it, all of them kept
    report = json.loads((out / "runs" / "cae_spn" / "checkpoints" / "calibrated-mondrian.calibration.json").read_text())
    assert report["check"] == "two-fold cross-fit" and report["check_images"] == report["fit_images"] >= 2
    assert all(0.0 <= r <= 1.0 for r in report["pixel_rate"]) and report["pixel_rate"] == sorted(report["pixel_rate"])
    md = (out / "border_study.md").read_text()
    assert md.count("\n| ") == 1 + len(variants)
    # suppression really applied: fewer of the top pixels by the border than the same checkpoint unsuppressed
    assert float(rows[2]["top1_near_border_fraction_mean"]) < float(rows[1]["top1_near_border_fraction_mean"])
    # a second run reuses every step and also scores the lesion validation set
    assert tools.main([*args, "--split", "lesion_validation", "--smoothing-px", "8", "16"]) == 0
    assert (out / "border-eval" / "mondrian-lesion_validation" / "metrics.json").is_file()
    swept = [r["variant"] for r in csv.DictReader((out / "border_study.csv").open())][-4:]
    assert swept == ["mondrian+smooth8", "mondrian+smooth16", *(v.name for v in variants[-2:])]
    # the synthetic lesion images (CBIS-DDSM-shaped) have no other breast listed, so the bilateral rows score them
    # one-sided, exactly the mondrian+smooth16 row; the healthy validation women (DDSM-shaped) are all pairs
    by_name = {r["variant"]: r for r in rows}
    for bilateral in variants[-2:]:
        assert by_name[bilateral.name]["pixel_auc"] == smooth["pixel_auc"]
        report = json.loads(calibration.report_path(checkpoints / f"calibrated-{border_study._slug(bilateral.name)}.ckpt")
                            .read_text())
        assert report["contralateral"] == bilateral.name.rpartition("-")[2].rstrip("0123456789")
        assert report["paired_fit_images"] == report["fit_images"] >= 2
    # what the steps came from: the digests of Table 1's checkpoints, so a refit is not silently reused
    from datamodules.fileio import file_sha256

    inputs = json.loads((out / "border-eval" / "INPUTS.json").read_text())
    assert inputs == {name: file_sha256(table1_stages.checkpoint_path(out / "runs", name)) for name in ("cae", "cae_spn")}


@pytest.mark.slow
def test_score_study_reproduces_table1_rows_from_saved_scores(
    smoke_table: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out, synth = smoke_table
    monkeypatch.chdir(out.parent)
    args = ["score-study", "--table1", str(out), "--profile", "smoke", "--data-root", synth, "--split", "test",
            "--test-sets", "mass"]
    assert tools.main(args) == 0
    rows = {r["rule"]: r for r in json.loads((out / "score_study-test.json").read_text())["rows"]}
    assert list(rows) == list(score_study.RULES)
    # the saved terms, scored outside Lightning, give Table 1's rows: the CAE alone (its own score), the
    # default RAT-SPN row (smoothed, Mondrian-calibrated on the same healthy images)
    table = {r["model"]: r for r in csv.DictReader((out / "table1.csv").open()) if r["test_set"] == "mass"}
    default = score_study.DEFAULT_NAME
    assert rows[default]["pixel_auc"] == pytest.approx(float(table["CAE-RATSPN"]["pixel_auc"]), abs=1e-5)
    assert rows["reconstruction raw (CAE)"]["pixel_auc"] == pytest.approx(float(table["CAE"]["pixel_auc"]), abs=1e-5)
    assert rows["intensity raw"]["pixel_auc"] == pytest.approx(float(table["Intensity"]["pixel_auc"]), abs=1e-5)
    for name, row in rows.items():
        assert 0.0 <= row["pixel_auc"] <= 1.0
        assert ("healthy p<0.05" in row) == score_study.RULES[name][1]
        if "healthy p<0.05" in row:
            assert 0.0 <= row["healthy p<0.05"] <= 0.5
    assert (out / "score_study-test.md").read_text().count("\n| mass | ") == len(score_study.RULES)
    # a second run reuses the saved scores (same checkpoints)
    saved = sorted((out / "score-study").glob("scores-*.pt"))
    assert [p.name for p in saved] == ["scores-healthy.pt", "scores-mass-test.pt"]
    stamps = [p.stat().st_mtime_ns for p in saved]
    assert tools.main(args) == 0
    assert [p.stat().st_mtime_ns for p in saved] == stamps


def test_study_outputs_are_moved_aside_when_table1_checkpoints_change(tmp_path: Path) -> None:
    out = tmp_path / "results"
    first = {"cae": "a" * 64, "cae_spn": "b" * 64}
    assert border_study.retire_stale(out, first, log=lambda _: None) == []  # nothing yet
    eval_dir = out / "border-eval"
    assert json.loads((eval_dir / "INPUTS.json").read_text()) == first
    (eval_dir / "mondrian-test").mkdir(parents=True)
    (eval_dir / "mondrian-test" / "metrics.json").write_text("{}")
    context = out / "runs" / "border_cae_spn_context" / "checkpoints"
    context.mkdir(parents=True)
    (context / "last.ckpt").write_bytes(b"old")
    spn = out / "runs" / "cae_spn" / "checkpoints"
    spn.mkdir(parents=True)
    # a sweep's copies (smooth8: from an earlier --smoothing-px) too, whatever the next run's variants
    for name in ("mondrian.ckpt", "calibrated-mondrian.ckpt", "calibrated-mondrian.calibration.json", "best.ckpt",
                 "calibrated.ckpt", "calibrated.calibration.json", "mondrian_smooth8.ckpt",
                 "calibrated-mondrian_smooth8.ckpt"):
        (spn / name).write_bytes(b"x")
    # the same checkpoints: everything is reused
    assert border_study.retire_stale(out, dict(first), log=lambda _: None) == []
    assert (eval_dir / "mondrian-test" / "metrics.json").is_file()
    # a refit: the study's own outputs go aside (kept), Table 1's files stay where they are
    said: list[str] = []
    second = {"cae": "a" * 64, "cae_spn": "c" * 64}
    moved = border_study.retire_stale(out, second, log=said.append)
    assert {p.name.split(".replaced-")[0] for p in moved} == {
        "border-eval", "border_cae_spn_context", "mondrian.ckpt", "calibrated-mondrian.ckpt",
        "calibrated-mondrian.calibration.json", "mondrian_smooth8.ckpt", "calibrated-mondrian_smooth8.ckpt"}
    assert all(p.exists() for p in moved) and len(said) == 1 and "moved aside" in said[0]
    assert not (out / "runs" / "border_cae_spn_context").exists() and not (spn / "mondrian.ckpt").exists()
    assert all((spn / n).is_file() for n in ("best.ckpt", "calibrated.ckpt", "calibrated.calibration.json"))
    assert json.loads((eval_dir / "INPUTS.json").read_text()) == second
    assert sorted(p.name for p in eval_dir.iterdir()) == ["INPUTS.json"]
    # a second refit moves the new outputs only, not the ones already moved aside
    (spn / "calibrated-mondrian.ckpt").write_bytes(b"new")
    again = border_study.retire_stale(out, first, log=lambda _: None)
    assert [p.name.split(".replaced-")[0] for p in again] == ["border-eval", "calibrated-mondrian.ckpt"]
