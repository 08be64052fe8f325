"""What a smoke run prints: the run's own lines, no library warning that says nothing about it.

The commands run as fresh processes (as a user starts them), with W&B offline so the media paths run
too: pytest's own warning filters and Python's once-per-location rule cannot hide anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: Messages every command used to print (issue 11), each fixed at its cause; none may come back.
KNOWN_NOISE = (
    "Images sizes do not match",  # W&B, a list of heatmap panels / overlays of several sizes
    "callbacks used to create the checkpoint need to be provided",  # fit's callback states at test / predict
    "The dirpath has changed from",  # the same, for a ModelCheckpoint of a predict / test run
    "configure_optimizers` returned `None`",  # the RAT-SPN stage's EM has no optimizer
    "module(s) in eval mode at the start of training",  # the RAT-SPN stage's frozen autoencoder
    "scores the model's initial weights",  # the intensity baseline has no weights to train
    "litlogger",
    "litmodels",
    "💡 Tip",
    "LeafSpec",
    "couldn't infer the batch indices",
    "infer the batch indices",
)
#: How a warning looks in a log: Python's ``file.py:12: Category: msg``, Lightning's ``file.py:12: msg``,
#: a root-logger ``WARNING:root:`` line
WARNING_LINE = re.compile(r"(\.py:\d+: )|(^WARNING:)|(Warning: )")


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DATA_DIR": str(cwd / "wandb-data")}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if WARNING_LINE.search(line) or any(message in line for message in KNOWN_NOISE)]


@pytest.mark.slow
def test_smoke_table1_and_predict_print_no_warnings(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    synth = tmp_path / "synth"
    output = _run([str(bin_dir / "mammospn"), "table1", "--profile", "smoke", "--out", "out",
                   "--data-root", str(synth)], tmp_path)
    assert (tmp_path / "out" / "table1.csv").is_file()
    assert "W&B offline run:" in output  # the W&B paths (tables, heatmap panels) did run
    scans = sorted(synth.rglob("Mass-Test_*/**/*.dcm"))[:2]
    assert scans
    output += _run([str(bin_dir / "lightning"), "predict", "--config", "cae", "--config", "smoke",
                    "--data.init_args.root", str(synth), "--data.init_args.predict_path", str(scans[0].parents[2]),
                    "--ckpt_path", str(tmp_path / "out" / "runs" / "cae" / "checkpoints" / "best.ckpt")], tmp_path)
    assert "predict: scored" in output
    assert _noise(output) == []
