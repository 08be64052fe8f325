"""`table1_runs`: stages reused when done, resumed after a crash, rerun when their settings change, one-line failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import evaluation_results, table1_runs, table1_stages, tools


def test_run_stages_reuses_finished_stages_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import cli

    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> None:
        calls.append(args)
        name = args[args.index("--run.name") + 1]
        run_dir = Path(args[args.index("--run.root") + 1]) / name
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / ("config.yaml" if args[0] == "fit" else f"config-{args[0]}.yaml")).write_text("x: 1\n")
        if args[0] == "fit":
            if name == "vqvae" and len([c for c in calls if "vqvae" in c]) == 1:
                (run_dir / "checkpoints" / "last.ckpt").write_text("partial")
                raise SystemExit(1)  # crash mid-fit, leaving last.ckpt
            for f in ("best.ckpt", "last.ckpt"):
                (run_dir / "checkpoints" / f).write_text("ckpt")
        else:
            eval_dir = Path(args[args.index("--run.results_dir") + 1]) / name
            eval_dir.mkdir(parents=True, exist_ok=True)
            (eval_dir / "metrics.json").write_text("{}")

    monkeypatch.setattr(cli, "run_cli", fake_main)
    stages = table1_stages.build_stages("smoke", scoring="raw")
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="vqvae"):
        table1_runs.run_stages(stages, tmp_path, "g", log=lines.append)
    assert len(calls) == 3 and "ETA" in lines[0]
    table1_runs.run_stages(stages, tmp_path, "g", log=lines.append)
    assert len(calls) == 3 + 22  # vqvae again, then the 21 others not yet done
    resumed = calls[3]
    assert resumed[resumed.index("--run.name") + 1] == "vqvae"
    assert resumed[resumed.index("--ckpt_path") + 1] == "last"
    assert sum("reused" in line for line in lines) == 2
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert len(timings["stages"]) == 24 and timings["total_seconds"] >= 0 and timings["total_cpu_seconds"] >= 0
    assert all("cpu_seconds" in t and not t["reused"] for t in timings["stages"].values())
    table1_runs.run_stages(stages, tmp_path, "g", log=lines.append)
    assert len(calls) == 25  # everything reused


def test_a_refused_value_in_a_stage_ends_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from experiments import cli

    def refuse(args: list[str]) -> None:
        raise ValueError("threshold rule 'calibrated': RatSpnStage has no `threshold` buffer")

    monkeypatch.setattr(cli, "run_cli", refuse)
    assert tools.main(["table1", "--profile", "smoke", "--out", str(tmp_path), "--threshold-rule", "calibrated",
                       "--scoring", "mondrian"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage cae failed: threshold rule 'calibrated'" in err[0] and "finished stages" in err[0]
    # a refused flag combination ends in one line before any stage runs
    assert tools.main(["table1", "--profile", "smoke", "--out", str(tmp_path), "--threshold-rule", "calibrated",
                       "--scoring", "raw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs calibrated RAT-SPN rows" in err[0]


def test_stages_rerun_when_their_settings_change_and_keep_the_old_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import cli

    calls: list[str] = []

    def fake_main(args: list[str]) -> None:
        name, run_dir = _fake_run_folder(args, calls)
        if args[0] == "fit":
            (run_dir / "checkpoints" / "best.ckpt").write_text(" ".join(args))
        elif args[0] == "validate":
            Path(args[args.index("--trainer.callbacks.output") + 1]).write_text("calibrated")
        else:
            evaluation_results.write_metrics_json(Path(args[args.index("--run.results_dir") + 1]) / name / "metrics.json",
                                                  {"pixel_auc": 0.7, "threshold_rule": "image_percentile_99"})

    monkeypatch.setattr(cli, "run_cli", fake_main)
    out = tmp_path / "out"
    base = ["table1", "--profile", "smoke", "--out", str(out), "--models", "CAE-RATSPN"]
    assert tools.main(base) == 0
    first = list(calls)
    assert first[:3] == ["cae", "cae_spn", "cae_spn_calibrate"] and len(first) == 3 + len(table1_stages.TEST_SETS)
    calls.clear()
    assert tools.main(base) == 0 and calls == []  # same settings: every stage reused
    # another smoothing changes the RAT-SPN fit, hence its calibration and tests; the CAE fit stays
    assert tools.main([*base, "--score-smoothing-px", "8"]) == 0
    assert calls == first[1:]
    replaced = sorted(p.name for p in (out / "runs").iterdir() if ".replaced-" in p.name)
    assert [p.split(".replaced-")[0] for p in replaced] == sorted(first[1:])  # kept beside, nothing deleted
    assert "score_smoothing_px 8" in (out / "runs" / "cae_spn" / "checkpoints" / "best.ckpt").read_text()
    calls.clear()
    assert tools.main([*base, "--score-smoothing-px", "8", "--force"]) == 0 and calls == first


def test_a_stage_stopped_by_sigterm_is_not_marked_done_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning answers SIGTERM with `SIGTERMException`, a SystemExit without a code: the runner took it for a
    finished stage (a RAT-SPN fit stopped after 9 of its epochs was reused as finished) and went on. Now the stage
    is not marked done, nothing after it runs, and the same command resumes it; `lightning` exits 143."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from experiments import cli

    calls: list[str] = []

    def fake_main(args: list[str]) -> None:
        name, run_dir = _fake_run_folder(args, calls)
        for f in ("best.ckpt", "last.ckpt"):
            (run_dir / "checkpoints" / f).write_text("ckpt")
        if name == "bvae" and calls.count("bvae") == 1:
            raise SIGTERMException

    monkeypatch.setattr(cli, "run_cli", fake_main)
    stages = [s for s in table1_stages.build_stages("smoke", scoring="raw") if s.kind == "fit"]
    with pytest.raises(RuntimeError, match="stage bvae stopped by SIGTERM"):
        table1_runs.run_stages(stages, tmp_path, "g", log=lambda _: None)
    assert calls == ["cae", "bvae"] and not (tmp_path / "runs" / "bvae" / "DONE.json").exists()
    table1_runs.run_stages(stages, tmp_path, "g", log=lambda _: None)
    assert calls[2] == "bvae" and (tmp_path / "runs" / "bvae" / "DONE.json").is_file()
    # `lightning fit` itself: one line and the shell's code for a SIGTERM, not 0
    calls.clear()
    args = ["fit", "--run.name", "bvae", "--run.root", str(tmp_path / "alone")]
    assert cli.main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM" in err[0]


def test_lightning_raises_sigterm_exception_out_of_fit(tmp_path: Path) -> None:
    """What the runner relies on: a SIGTERM during `Trainer.fit` ends it with `SIGTERMException` (a SystemExit
    with no code) after the running step."""
    import os
    import signal

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            if self.steps == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return (self.w - batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(40, 1)), batch_size=4)
    model = Model()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(SIGTERMException) as stopped:
        trainer.fit(model, data)
    assert stopped.value.code is None and model.steps == 2 and trainer.received_sigterm


def _fake_run_folder(args: list[str], calls: list[str]) -> tuple[str, Path]:
    """What a stand-in for `cli.run_cli` writes first: the run folder with its config; records the stage's name."""
    name = args[args.index("--run.name") + 1]
    calls.append(name)
    run_dir = Path(args[args.index("--run.root") + 1]) / name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / ("config.yaml" if args[0] == "fit" else f"config-{args[0]}.yaml")).write_text("x: 1\n")
    return name, run_dir
