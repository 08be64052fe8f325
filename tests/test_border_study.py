"""`mammospn border-study` on the smoke profile: every border-aware variant fitted, calibrated, tested, tabled."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments import border_study, table1_stages, tools


@pytest.mark.slow
def test_border_study_runs_every_variant_on_a_smoke_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    synth = str(tmp_path / "synth")
    assert tools.main(["border-study", "--table1", str(out), "--profile", "smoke"]) == 2  # no Table 1 yet
    assert tools.main(["table1", "--profile", "smoke", "--out", str(out), "--data-root", synth]) == 0
    args = ["border-study", "--table1", str(out), "--profile", "smoke", "--data-root", synth]
    assert tools.main(args) == 0
    rows = list(csv.DictReader((out / "border_study.csv").open()))
    variants = border_study.VARIANTS + border_study.smoothing_variants([table1_stages.DEFAULT_SMOOTHING_PX])
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
    swept = [r["variant"] for r in csv.DictReader((out / "border_study.csv").open())][-2:]
    assert swept == ["mondrian+smooth8", "mondrian+smooth16"]
