"""bf16 scoring: `lightning test --trainer.precision bf16-mixed` scores in bf16 autocast (channels-last on a CPU)
where the hardware has fast bf16, and the smoke set's pixel AUCs stay within 0.002 of fp32."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from experiments import table1_runs, table1_stages
from lightning_modules import CAE
from lightning_modules.base import bf16_supported

#: the rows compared: a conv autoencoder, and its RAT-SPN stage (encoder in bf16, the circuit in fp32)
ROWS = ("CAE", "CAE-RATSPN")
TOLERANCE = 0.002


def test_score_grid_is_fp32_without_a_bf16_trainer_and_leaves_the_weights_contiguous() -> None:
    torch.manual_seed(0)
    model = CAE()
    x = torch.rand(12, 1, 64, 64)
    assert model.scoring_precision() == "fp32"  # no trainer: plain fp32, bit for bit the network's own forward
    with torch.no_grad():
        expected = model.eval().score_patches(x)
    torch.testing.assert_close(model.score_grid(x), expected, rtol=0, atol=0)
    model.score_channels_last = True  # channels-last while scoring only; the weights come back contiguous
    scores = model.score_grid(x)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.slow
def test_smoke_test_stage_in_bf16_keeps_pixel_aucs_within_0_002_of_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    stages = table1_stages.build_stages("smoke", data_root=str(tmp_path / "synth"))
    fits = [s for s in stages if s.kind == "fit" and s.name in ("cae", "cae_spn")]
    tests = [s for s in stages if s.kind == "test" and s.test_set == "mass" and s.model in ROWS]
    runs = [*fits]
    for precision in ("32-true", "bf16-mixed"):
        runs += [dataclasses.replace(s, name=f"{s.name}-{precision}", overrides=[*s.overrides, "--trainer.precision",
                                                                                precision]) for s in tests]
    table1_runs.run_stages(runs, tmp_path, "precision", log=lambda _: None)
    expected = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"  # no fast bf16: scored in fp32
    for stage in tests:
        fp32 = json.loads((tmp_path / "eval" / f"{stage.name}-32-true" / "metrics.json").read_text())
        bf16 = json.loads((tmp_path / "eval" / f"{stage.name}-bf16-mixed" / "metrics.json").read_text())
        assert fp32["scoring_precision"] == "fp32" and bf16["scoring_precision"] == expected
        assert fp32["n_evaluated"] == bf16["n_evaluated"] >= 1
        assert 0.0 < fp32["pixel_auc"] < 1.0
        assert abs(bf16["pixel_auc"] - fp32["pixel_auc"]) <= TOLERANCE, stage.model
