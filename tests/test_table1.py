"""`mammospn table1`: table and markdown writer on fabricated results, stage plan, reuse, and the smoke run."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from experiments import evaluation_results, table1, table1_report, table1_runs, table1_stages, tools
from lightning_modules import IntensityBaseline


def _result(test_set: str, model: str, aucs: dict[str, float], pixel: float = 0.7) -> table1_report.ModelResult:
    values = np.array(list(aucs.values()))
    summary = {
        "pixel_auc": pixel, "image_auc_mean": float(values.mean()), "image_auc_std": float(values.std()),
        "hausdorff_px_mean": 30.5, "hausdorff_px_std": 4.25, "hausdorff_mm_mean": 6.1, "hausdorff_mm_std": 0.85,
        "n_images": len(aucs) + 1, "n_evaluated": len(aucs), "threshold_rule": "image_percentile_99",
        "lesion_hit_rate": 0.4, "sensitivity_at_0.5_fp": 0.2, "sensitivity_at_1_fp": 0.5, "sensitivity_at_2_fp": 0.7,
        "top1_near_border_fraction_mean": 0.95, "border_area_fraction_mean": 0.4, "interior_pixel_auc": 0.61,
        "hausdorff_cells_mean": 31.2, "hausdorff_cells_std": 5.0, "lesion_hit_rate_near_border": 0.25,
        "lesion_hit_rate_interior": 0.6, "sensitivity_at_1_fp_near_border": 0.45, "sensitivity_at_1_fp_interior": 0.55,
        "density_groups": {"1-2": {"pixel_auc": 0.72, "n_images": 15}, "3-4": {"pixel_auc": 0.64, "n_images": 5}},
    }
    return table1_report.ModelResult(test_set, model, summary, aucs)


@pytest.fixture
def fabricated() -> list[table1_report.ModelResult]:
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(20)]
    base = dict(zip(ids, rng.uniform(0.4, 0.7, 20)))
    results = []
    for test_set in ("mass", "calc"):
        # CAE-RATSPN beats CAE on every one of 20 images: exact two-sided p = 2 / 2**20
        results.append(_result(test_set, "CAE", base))
        results.append(_result(test_set, "CAE-RATSPN", {i: v + 0.1 + 0.001 * k for k, (i, v) in enumerate(base.items())}))
        # bVAE vs bVAE-RATSPN: alternating +-, no significant difference
        results.append(_result(test_set, "bVAE", base))
        results.append(_result(test_set, "bVAE-RATSPN", {i: v + (0.01 if k % 2 else -0.012) * (k + 1)
                                                        for k, (i, v) in enumerate(base.items())}))
        # VQVAE better than its SPN on every image: the AE row is the bold one
        results.append(_result(test_set, "VQVAE", {i: v + 0.2 + 0.001 * k for k, (i, v) in enumerate(base.items())}))
        results.append(_result(test_set, "VQVAE-RATSPN", base))
        results.append(_result(test_set, "f-AnoGAN", base))
        results.append(_result(test_set, "Intensity", base, pixel=0.65))
    return results


def test_build_table_marks_significant_pairs_with_known_p_values(fabricated: list[table1_report.ModelResult]) -> None:
    rows = table1_report.build_table(fabricated)
    assert [r["model"] for r in rows[:8]] == list(table1_stages.MODEL_ORDER)
    assert [r["test_set"] for r in rows] == ["mass"] * 8 + ["calc"] * 8
    by = {(r["test_set"], r["model"]): r for r in rows}
    exact = 2 * 0.5**20
    assert by[("mass", "CAE")]["wilcoxon_p"] == pytest.approx(exact, rel=1e-9)
    assert by[("mass", "CAE-RATSPN")]["wilcoxon_p"] == pytest.approx(exact, rel=1e-9)
    assert by[("mass", "CAE-RATSPN")]["better"] and not by[("mass", "CAE")]["better"]
    b = [r for r in fabricated if r.test_set == "mass" and r.model.startswith("bVAE")]
    ids = sorted(b[0].per_image_auc)
    expected = stats.wilcoxon([b[1].per_image_auc[i] for i in ids], [b[0].per_image_auc[i] for i in ids]).pvalue
    assert by[("mass", "bVAE")]["wilcoxon_p"] == pytest.approx(expected)
    assert expected > 0.01
    assert not by[("mass", "bVAE")]["better"] and not by[("mass", "bVAE-RATSPN")]["better"]
    assert by[("calc", "VQVAE")]["better"] and not by[("calc", "VQVAE-RATSPN")]["better"]
    assert by[("mass", "VQVAE")]["pair"] == "VQVAE-RATSPN" and by[("mass", "VQVAE")]["wilcoxon_n"] == 20
    assert math.isnan(by[("mass", "f-AnoGAN")]["wilcoxon_p"]) and by[("mass", "Intensity")]["pair"] == ""


def test_markdown_and_csv_layout(fabricated: list[table1_report.ModelResult], tmp_path: Path) -> None:
    rows = table1_report.build_table(fabricated)
    md_path = table1_report.write_table1(rows, tmp_path, "Table 1 (test)", ["a note"])
    md = md_path.read_text()
    main, rest = md.split("## Localisation")
    lines = [line for line in main.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 16
    local, density = rest.split("## Pixel AUC per breast-density group")
    local_lines = [line for line in local.splitlines() if line.startswith("| ")]
    assert len(local_lines) == 1 + 16 and "Sens@1" in local_lines[0]
    assert local_lines[1] == ("| masses | CAE | 0.40 | 0.20 | 0.50 | 0.70 | 0.95 (0.40) | 0.61 | 31.2 ± 5.0 "
                              "| 0.25 / 0.60 | 0.45 / 0.55 |")
    density_lines = [line for line in density.splitlines() if line.startswith("| ")]
    assert density_lines[0] == "| Test data | Model | 1-2 | 3-4 |" and density_lines[1].endswith("| 0.72 (15) | 0.64 (5) |")
    assert "stride-16 score grid" in md
    assert "image_percentile_99" in md and "p < 0.01" in md and "a note" in md
    cae_spn = next(line for line in lines if "| **CAE-RATSPN** |" in line and "masses" in line)
    cae_p = f"{2 * 0.5**20:.1e}"
    assert f"{cae_p} (CAE)" in cae_spn
    assert "**" not in next(line for line in lines if line.startswith("| masses | CAE |"))
    assert "**0.70**" in cae_spn  # pixel AUC in bold on the better row
    bvae = next(line for line in lines if "| bVAE |" in line)
    assert "**" not in bvae and "30.50 ± 4.25" in bvae and "20/21" in bvae
    with (tmp_path / "table1.csv").open() as handle:
        parsed = list(csv.DictReader(handle))
    assert len(parsed) == 16 and tuple(parsed[0]) == table1_report.CSV_COLUMNS
    assert float(parsed[1]["wilcoxon_p"]) == pytest.approx(2 * 0.5**20)
    assert parsed[1]["better"] == "True" and parsed[6]["wilcoxon_p"] == ""
    assert float(parsed[0]["hausdorff_mm_mean"]) == pytest.approx(6.1)
    assert not list(tmp_path.glob(".*tmp"))


def test_reads_the_evaluation_callbacks_files(tmp_path: Path) -> None:
    folder = tmp_path / "test-mass-cae"
    acc = evaluation_results.EvaluationAccumulator()
    rng = np.random.default_rng(1)
    for k in range(3):
        h, w = 64, 64
        breast = np.ones((h, w), dtype=bool)
        lesion = np.zeros((h, w), dtype=bool)
        lesion[20:40, 20:40] = True
        centers = np.array([(r, c) for r in range(0, h, 16) for c in range(0, w, 16)])
        scores = rng.random(len(centers)) + np.array([1.0 if 20 <= r < 40 and 20 <= c < 40 else 0.0
                                                      for r, c in centers]) * k
        item = {"image_id": f"i{k}", "patient_id": "p", "scan": np.zeros((h, w), np.float32),
                "breast_mask": breast, "lesion_mask": lesion, "centers": centers, "spacing_mm": 0.2,
                "stride": 16, "meta": {}}
        acc.add(item, scores)
    evaluation_results.write_metrics_json(folder / "metrics.json", acc.summary())
    evaluation_results.write_per_image_csv(folder / "per_image.csv", acc.results)
    result = table1_report.read_model_result(folder, "mass", "CAE")
    assert set(result.per_image_auc) == {"i0", "i1", "i2"}
    assert result.per_image_auc["i2"] > result.per_image_auc["i0"]
    assert result.summary["image_auc_mean"] == pytest.approx(np.mean(list(result.per_image_auc.values())))
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        table1_report.read_model_result(tmp_path / "nothing", "mass", "CAE")


def test_stage_plan_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = table1_stages.build_stages("quick", "synthetic", str(tmp_path / "data"), seed=3)
    assert len(stages) == 8 + 3 + 16  # fits, the RAT-SPN calibrations (default scoring: mondrian), tests
    assert [s.name for s in stages[:8]] == ["cae", "bvae", "vqvae", "cae_spn", "bvae_spn", "vqvae_spn",
                                            "fanogan_gan", "fanogan"]
    tests = [s for s in stages if s.kind == "test"]
    assert {s.model for s in tests} == set(table1_stages.MODEL_ORDER) and {s.test_set for s in tests} == {"mass", "calc"}
    spn_args = table1_stages.stage_args(stages[3], tmp_path / "runs", tmp_path / "eval", "g")
    assert spn_args[spn_args.index("--model.init_args.autoencoder_ckpt") + 1] == str(
        tmp_path / "runs" / "cae" / "checkpoints" / "best.ckpt")
    enc_args = table1_stages.stage_args(stages[7], tmp_path / "runs", tmp_path / "eval", "g")
    assert enc_args[enc_args.index("--model.init_args.generator_ckpt") + 1].endswith("fanogan_gan/checkpoints/last.ckpt")
    intensity = next(s for s in tests if s.model == "Intensity")
    args = table1_stages.stage_args(intensity, tmp_path / "runs", tmp_path / "eval", "g")
    assert "lightning_modules.IntensityBaseline" in args and "--ckpt_path" not in args
    assert args[args.index("--data.init_args.seed") + 1] == "3"
    # models with a seed of their own get the stage's seed (Lightning refuses differing logged seeds)
    assert spn_args[spn_args.index("--model.init_args.seed") + 1] == "3"
    assert "--model.init_args.seed" not in table1_stages.stage_args(stages[0], tmp_path / "runs", tmp_path / "eval", "g")
    assert tools.main(["table1", "--profile", "smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 27 and out[0].startswith("[ 1/27] lightning fit --config")
    assert tools.main(["table1", "--data", "cbis_ddsm", "--data-root", "/d/cbis", "--healthy-root", "/d/ddsm", "--dry-run"]) == 0
    cbis = capsys.readouterr().out.splitlines()
    assert len(cbis) == 27 and all("configs/data/cbis_ddsm.yaml" in line and "/d/ddsm" in line for line in cbis)


def test_intensity_baseline_scores_mean_patch_intensity() -> None:
    x = torch.stack([torch.full((1, 64, 64), 0.25), torch.linspace(0, 1, 64 * 64).view(1, 64, 64)])
    scores = IntensityBaseline().score_grid(x)
    assert scores.tolist() == pytest.approx([0.25, 0.5])


@pytest.mark.slow
def test_smoke_profile_runs_the_whole_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    code = tools.main(["table1", "--profile", "smoke", "--out", str(out), "--data-root", str(tmp_path / "synth")])
    assert code == 0
    with (out / "table1.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16
    assert [r["model"] for r in rows[:8]] == list(table1_stages.MODEL_ORDER)
    for r in rows:
        assert 0.0 <= float(r["pixel_auc"]) <= 1.0
        assert 0.0 <= float(r["image_auc_mean"]) <= 1.0 and float(r["image_auc_std"]) >= 0.0
        assert math.isfinite(float(r["hausdorff_px_mean"])) and float(r["hausdorff_px_mean"]) >= 0.0
        assert int(r["n_evaluated"]) >= 1
    for r in rows:
        if r["pair"]:
            assert 0.0 < float(r["wilcoxon_p"]) <= 1.0
    md = (out / "table1.md").read_text()
    assert md.split("## Localisation")[0].count("\n| ") == 17
    for r in rows:
        assert 0.0 <= float(r["lesion_hit_rate"]) <= 1.0 and 0.0 <= float(r["sensitivity_at_1_fp"]) <= 1.0
        assert float(r["hausdorff_cells_mean"]) == pytest.approx(float(r["hausdorff_px_mean"]) / 16, rel=1e-6)
    assert (out / "froc_mass.png").is_file() and (out / "froc_calc.png").is_file()
    assert "## Training" in md and (out / "val_loss.png").is_file()
    assert (out / "fig2_mass.png").is_file() and (out / "fig3_cae.png").is_file()
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings["stages"]) == 27  # 8 fits, 3 calibrations, 16 tests


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_every_stage_parses_with_the_real_configs(
    profile: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from experiments import cli

    for stage in table1_stages.build_stages(profile, seed=2):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli([*table1_stages.stage_args(stage, tmp_path / "runs", tmp_path / "eval", "g"), "--print_config"])
        assert exit_info.value.code in (0, None), stage.name
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["run"]["name"] == stage.name and config["run"]["group"] == "g"
        assert config["seed_everything"] == 2
        assert config["data"]["init_args"]["test_set"] == (stage.test_set or "mass")
        if profile == "quick":
            assert config["trainer"]["max_epochs"] == 3 and config["trainer"]["accelerator"] == "cpu"
        else:
            assert config["trainer"]["precision"] == "bf16-mixed"
            assert stage.kind == "test" or config["trainer"]["max_epochs"] >= 20  # the paper's epochs
        if stage.name == "fanogan_gan":
            assert config["model"]["init_args"]["stage"] == "gan"
        if stage.kind == "fit" and stage.name.endswith("_spn"):  # EM steps of 64 in either profile
            assert config["model"]["init_args"]["em_batch_size"] == 64
            assert config["data"]["init_args"]["batch_size"] == (64 if profile == "quick" else 1024)
        if stage.model == "Intensity":
            assert config["model"]["class_path"] == "lightning_modules.IntensityBaseline"


@pytest.mark.parametrize("data", table1_stages.DATA_CHOICES)
def test_every_source_and_the_real_profile_parse(data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mammospn table1 --profile real --data NAME`: the source wins over the profile's synthetic settings,
    autoencoders stop early on val/loss under a time cap, the WGAN has a fixed budget."""
    import yaml

    from experiments import cli

    healthy = "/d/ddsm" if data == "cbis_ddsm" else None
    stages = {s.name: s for s in table1_stages.build_stages("real", data, "/d/root", seed=1, healthy_root=healthy)}
    for name in ("cae", "cae_spn", "fanogan_gan", "test-calc-vqvae_ratspn", "test-mass-intensity"):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli([*table1_stages.stage_args(stages[name], tmp_path / "runs", tmp_path / "eval", "g"), "--print_config"])
        assert exit_info.value.code in (0, None), name
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["data"]["init_args"]["source"] == data and config["data"]["init_args"]["root"] == "/d/root"
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"] or []]
        if name in ("cae", "cae_spn"):
            assert callbacks == ["pytorch_lightning.callbacks.EarlyStopping"] and config["trainer"]["max_time"]
            assert config["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/loss"
        if name == "fanogan_gan":
            assert callbacks == [] and config["trainer"]["max_time"] == "00:00:07:00"
    path_stages = table1_stages.build_stages("quick", str(table1_stages.CONFIG_DIR / "data" / f"{data}.yaml"), "/d/root")
    assert str(table1_stages.CONFIG_DIR / "data" / f"{data}.yaml") in path_stages[0].configs
    with pytest.raises(ValueError, match="--data must be one of"):
        table1_stages.build_stages("quick", "nosuchsource")


def test_aggregate_seeds_mean_sd_and_bold_only_when_every_seed_agrees(fabricated: list[table1_report.ModelResult]) -> None:
    rows0 = table1_report.build_table(fabricated)
    shifted = [table1_report.ModelResult(r.test_set, r.model, {**r.summary, "pixel_auc": r.summary["pixel_auc"] + 0.1,
                                                        "lesion_hit_rate": 0.6}, r.per_image_auc)
               for r in fabricated if r.model != "VQVAE"]  # seed 1: VQVAE missing, so its pair has no p
    rows1 = table1_report.build_table(shifted)
    agg = table1.aggregate_seeds({0: rows0, 1: rows1})
    assert [(r["test_set"], r["model"]) for r in agg] == [(r["test_set"], r["model"]) for r in rows0]
    cae = next(r for r in agg if r["model"] == "CAE" and r["test_set"] == "mass")
    assert cae["pixel_auc"] == pytest.approx(0.75) and cae["pixel_auc_sd"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert cae["lesion_hit_rate"] == pytest.approx(0.5) and cae["n_seeds"] == 2 and cae["seeds"] == "0 1"
    spn = next(r for r in agg if r["model"] == "CAE-RATSPN" and r["test_set"] == "mass")
    assert spn["better"] and spn["wilcoxon_p"] == pytest.approx(2 * 0.5**20)
    vq = next(r for r in agg if r["model"] == "VQVAE" and r["test_set"] == "mass")
    assert vq["n_seeds"] == 1 and math.isnan(vq["pixel_auc_sd"])
    vq_spn = next(r for r in agg if r["model"] == "VQVAE-RATSPN" and r["test_set"] == "mass")
    assert not vq_spn["better"]  # no longer better in seed 1, where its pair is missing
    md = table1_report.format_markdown(agg)
    assert "| masses | CAE | 0.75 ± 0.07 |" in md and "mean ± sd (ddof 1) over seeds" in md
    parsed = list(csv.DictReader(io.StringIO(table1_report.format_csv(agg))))
    assert parsed[0]["n_seeds"] == "2" and float(parsed[0]["pixel_auc_sd"]) == pytest.approx(0.0707, abs=1e-4)


def test_seeds_run_per_seed_folders_and_a_mean_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import cli

    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> None:
        calls.append(args)
        name = args[args.index("--run.name") + 1]
        seed = int(args[args.index("--seed_everything") + 1])
        run_dir = Path(args[args.index("--run.root") + 1]) / name
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / ("config.yaml" if args[0] == "fit" else f"config-{args[0]}.yaml")).write_text("x: 1\n")
        if args[0] == "fit":
            (run_dir / "checkpoints" / "best.ckpt").write_text("ckpt")
        else:
            evaluation_results.write_metrics_json(Path(args[args.index("--run.results_dir") + 1]) / name / "metrics.json",
                                          {"pixel_auc": 0.6 + 0.1 * seed, "threshold_rule": "image_percentile_99"})

    monkeypatch.setattr(cli, "run_cli", fake_main)
    out = tmp_path / "out"
    code = tools.main(["table1", "--profile", "smoke", "--out", str(out), "--seeds", "0", "1", "2",
                       "--seed-models", "pairs", "--scoring", "raw"])
    assert code == 0
    assert len(calls) == 24 + 2 * (6 + 12)  # seeds 1 and 2: the 6 AE / RAT-SPN fits and their 12 tests
    assert all((out / f"seed-{s}" / "table1.md").is_file() for s in (0, 1, 2))
    rows = list(csv.DictReader((out / "table1.csv").open()))
    cae = next(r for r in rows if r["model"] == "CAE")
    assert float(cae["pixel_auc"]) == pytest.approx(0.7) and float(cae["pixel_auc_sd"]) == pytest.approx(0.1)
    assert cae["n_seeds"] == "3" and next(r for r in rows if r["model"] == "f-AnoGAN")["n_seeds"] == "1"
    assert "seeds 0 1 2" in (out / "table1.md").read_text()


def test_calibrated_threshold_rule_for_the_ratspn_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from experiments import cli

    stages = table1_stages.build_stages("smoke", threshold_rule="calibrated", scoring="mondrian")
    tests = {s.name: s for s in stages if s.kind == "test"}
    assert "test-mass-cae_ratspn-calibrated" in tests and "test-mass-cae" in tests
    assert {s.threshold_rule for s in tests.values() if s.model.endswith("-RATSPN")} == {"calibrated"}
    assert {s.threshold_rule for s in tests.values() if not s.model.endswith("-RATSPN")} == {"image_percentile"}
    stage = tests["test-calc-vqvae_ratspn-calibrated"]
    with pytest.raises(SystemExit):
        cli.run_cli([*table1_stages.stage_args(stage, tmp_path / "runs", tmp_path / "eval", "g"), "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    evaluation_cb = [c for c in callbacks if c["class_path"].endswith("EvaluationCallback")]
    assert len(evaluation_cb) == 1 and evaluation_cb[0]["init_args"]["threshold"] == "calibrated"
    assert evaluation_cb[0]["init_args"]["output_dir"] == str(tmp_path / "eval" / stage.name)
    with pytest.raises(ValueError, match="--threshold-rule"):
        table1_stages.build_stages("smoke", threshold_rule="otsu")
    with pytest.raises(ValueError, match="needs calibrated RAT-SPN rows"):
        table1_stages.build_stages("smoke", threshold_rule="calibrated", scoring="raw")


@pytest.mark.parametrize("scoring", ["mondrian", "context+mondrian"])
def test_scoring_adds_a_calibration_stage_per_ratspn(scoring: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Calibrated scoring: a `lightning validate` stage per RAT-SPN fit writes <fit>/checkpoints/calibrated.ckpt,
    after the fits and before the tests; the RAT-SPN rows test that checkpoint; the context variant fits
    conditional RAT-SPNs. Raw scoring (the paper) has neither."""
    import yaml

    from experiments import cli

    runs, evals = tmp_path / "runs", tmp_path / "eval"
    stages = table1_stages.build_stages("smoke", scoring=scoring)
    kinds = [s.kind for s in stages]
    assert kinds == ["fit"] * 8 + ["validate"] * 3 + ["test"] * 16
    calibrate = {s.name: s for s in stages if s.kind == "validate"}
    assert set(calibrate) == {"cae_spn_calibrate", "bvae_spn_calibrate", "vqvae_spn_calibrate"}
    args = table1_stages.stage_args(calibrate["cae_spn_calibrate"], runs, evals, "g")
    assert args[0] == "validate" and "--trainer.callbacks+=experiments.calibration.ConformalCalibration" in args
    assert args[args.index("--ckpt_path") + 1] == str(runs / "cae_spn" / "checkpoints" / "best.ckpt")
    assert args[args.index("--trainer.callbacks.output") + 1] == str(runs / "cae_spn" / "checkpoints" / "calibrated.ckpt")
    assert args[args.index("--model.init_args.autoencoder_ckpt") + 1] == str(runs / "cae" / "checkpoints" / "best.ckpt")
    for stage in stages:
        if stage.kind != "test" or stage.checkpoint_from is None:
            continue
        ckpt = table1_stages.stage_args(stage, runs, evals, "g")
        ckpt = ckpt[ckpt.index("--ckpt_path") + 1]
        assert ckpt.endswith("calibrated.ckpt") == stage.model.endswith("-RATSPN"), stage.name
    spn_fit = next(s for s in stages if s.name == "cae_spn")
    with pytest.raises(SystemExit):
        cli.run_cli([*table1_stages.stage_args(spn_fit, runs, evals, "g"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["context"] == scoring.startswith("context")
    assert not table1_runs.stage_done(calibrate["cae_spn_calibrate"], runs, evals)
    raw = table1_stages.build_stages("smoke", scoring="raw")
    assert "validate" not in {s.kind for s in raw}
    assert all("calibrated" not in " ".join(table1_stages.stage_args(s, runs, evals, "g")) for s in raw)


def test_contralateral_scores_the_ratspn_rows_against_the_other_breast(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--contralateral mean``: every RAT-SPN stage (fit, calibration, tests) gets the model option and the radius,
    the calibration and the mass tests ``data.with_contralateral``, which the CLI accepts; no other row does, nor
    raw rows; a bad value is refused."""
    import yaml

    from experiments import cli

    runs, evals = tmp_path / "runs", tmp_path / "eval"
    stages = table1_stages.build_stages("smoke", contralateral="mean", contralateral_radius_px=48.0)
    for stage in stages:
        ratspn = stage.model.endswith("-RATSPN")
        assert ("--model.init_args.contralateral" in stage.overrides) == ratspn, stage.name
        if ratspn:
            o = stage.overrides
            assert o[o.index("--model.init_args.contralateral") + 1] == "mean"
            assert o[o.index("--model.init_args.contralateral_radius_px") + 1] == "48"
        # the other breast is read where the bilateral score is fitted and used: the calibration and the mass tests
        # (calcifications are scored one-sided by the same checkpoint, chosen on lesion validation)
        paired = "--data.init_args.with_contralateral" in stage.overrides
        assert paired == (ratspn and (stage.kind == "validate" or stage.test_set in table1_stages.CONTRALATERAL_TEST_SETS))
    assert table1_stages.CONTRALATERAL_TEST_SETS == ("mass",)
    from lightning_modules import contralateral

    assert table1_stages.CONTRALATERAL == contralateral.OPTIONS  # the flag's choices are the model option's values
    calibrate = next(s for s in stages if s.name == "cae_spn_calibrate")
    with pytest.raises(SystemExit):
        cli.run_cli([*table1_stages.stage_args(calibrate, runs, evals, "g"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["contralateral"] == "mean" and config["data"]["init_args"]["with_contralateral"]
    for one_sided in (table1_stages.build_stages("smoke", contralateral="none"),
                      table1_stages.build_stages("smoke", scoring="raw")):  # the paper's raw rows: each breast alone
        assert all("contralateral" not in " ".join(s.overrides) for s in one_sided)
    default = {s.name: s for s in table1_stages.build_stages("smoke")}
    assert "--data.init_args.with_contralateral" in default["test-mass-cae_ratspn"].overrides  # bilateral by default
    with pytest.raises(ValueError, match="--contralateral must be one of"):
        table1_stages.build_stages("smoke", contralateral="min")
    with pytest.raises(ValueError, match="--contralateral-radius-px must be >= 0"):
        table1_stages.build_stages("smoke", contralateral="max", contralateral_radius_px=-1.0)


def test_training_summary_reads_the_val_loss_curves_of_resumed_fits(tmp_path: Path) -> None:
    logs = tmp_path / "runs" / "cae" / "logs"
    (logs / "version_0").mkdir(parents=True)
    (logs / "version_1").mkdir()
    (logs / "version_0" / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,9,0.5,\n0,9,,0.30\n1,19,,0.20\n")
    (logs / "version_1" / "metrics.csv").write_text("epoch,step,val/loss\n1,19,0.25\n2,29,0.10\n3,39,0.12\n")
    assert table1_report.training_curve(tmp_path / "runs" / "cae") == {0: 0.30, 1: 0.25, 2: 0.10, 3: 0.12}
    stages = [s for s in table1_stages.build_stages("smoke") if s.name in ("cae", "bvae")]
    rows = table1_report.training_summary(stages, tmp_path / "runs")
    assert len(rows) == 1 and rows[0]["fit"] == "cae"  # bvae has no logs
    assert (rows[0]["epochs"], rows[0]["best_epoch"], rows[0]["epochs_since_best"]) == (4, 2, 1)
    lines = table1_report.format_training(rows)
    assert "## Training" in lines and "| cae | 4 | 0.1 (2) | 0.12 | 1 |" in lines
    from experiments import figures

    path = figures.val_loss_figure({"cae": rows[0]["curve"], "bvae": {}}, tmp_path / "val_loss.png")
    assert path is not None and path.stat().st_size > 1000
    assert figures.val_loss_figure({"bvae": {}}, tmp_path / "none.png") is None


def test_models_keeps_the_rows_asked_for_and_the_stages_they_load() -> None:
    stages = table1_stages.build_stages("smoke", scoring="mondrian")
    kept = table1_stages.select_models(stages, ["CAE-RATSPN", "Intensity"])
    names = [s.name for s in kept]
    # the RAT-SPN row loads the calibrated checkpoint, which loads the RAT-SPN fit, which loads the CAE
    assert names[:3] == ["cae", "cae_spn", "cae_spn_calibrate"]
    assert {s.model for s in kept if s.kind == "test"} == {"CAE-RATSPN", "Intensity"}
    assert len(kept) == 3 + 2 * len(table1_stages.TEST_SETS)
    assert names == [s.name for s in stages if s.name in set(names)]  # run order kept
    with pytest.raises(ValueError, match=r"--models: unknown row 'CAE-SPN'; rows are CAE, CAE-RATSPN"):
        table1_stages.select_models(stages, ["CAE-SPN"])


def test_models_flag_runs_only_those_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = tools.main(["table1", "--profile", "smoke", "--out", str(tmp_path), "--dry-run", "--models", "CAE"])
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(printed) == 1 + len(table1_stages.TEST_SETS)  # the CAE fit and its tests
    assert tools.main(["table1", "--profile", "smoke", "--out", str(tmp_path), "--models", "Nope"]) == 2
    assert "--models: unknown row 'Nope'" in capsys.readouterr().err
    assert tools.main(["table1", "--profile", "smoke", "--out", str(tmp_path), "--score-smoothing-px", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mammospn table1: --score-smoothing-px must be >= 0, got -1"]
