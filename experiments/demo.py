"""`mammospn demo`: a few-minute end-to-end run on synthetic data: fit a CAE, test it, predict a scan.

It goes through the same `lightning` commands a user types (printed as it runs), so it doubles as a
walk-through: where the run folder, metrics, maps and prediction PNGs land.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from experiments.table1_stages import CONFIG_DIR


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `mammospn demo`."""
    parser.add_argument("--out", default="demo", help="folder for runs/, results/ and the synthetic data")
    parser.add_argument("--model", default="cae", choices=("cae", "bvae", "vqvae"), help="autoencoder to train")
    parser.add_argument("--profile", default="smoke", choices=("smoke", "quick"),
                        help="smoke: about a minute on 2 CPU cores; quick: a few minutes, better maps")
    parser.add_argument("--seed", type=int, default=0)


def _first_test_scan(data_root: Path) -> Path | None:
    """A full synthetic mass test mammogram (CBIS-DDSM layout: the case folder's first DICOM)."""
    for case in sorted((data_root / "cbis-ddsm" / "CBIS-DDSM").glob("Mass-Test_*")):
        if case.name.endswith(("_CC", "_MLO")):  # "<case>_1" folders hold ROI masks and crops
            dicoms = sorted(case.rglob("*.dcm"))
            if dicoms:
                return dicoms[0]
    return None


def run(args: argparse.Namespace) -> int:
    """Fit, test and predict; returns 0 when every step wrote its outputs."""
    from experiments.cli import run_cli

    out = Path(args.out)
    data_root = out / "data" / f"synthetic-{args.profile}"
    common = [
        "--config", str(CONFIG_DIR / f"{args.model}.yaml"),
        "--config", str(CONFIG_DIR / "profiles" / f"{args.profile}.yaml"),
        "--data.init_args.root", str(data_root), "--data.init_args.cache_dir", str(out / "cache"),
        "--seed_everything", str(args.seed), "--data.init_args.seed", str(args.seed),
        "--run.root", str(out / "runs"), "--run.results_dir", str(out / "results"), "--run.group", "demo",
        "--model.init_args.lr", "1e-3",  # the paper's 1e-5 needs 100 epochs; a demo has a few hundred steps
    ]
    name = f"demo-{args.model}"
    steps = [
        ["fit", *common, "--run.name", name],
        ["test", *common, "--run.name", f"{name}-test-mass",
         "--ckpt_path", str(out / "runs" / name / "checkpoints" / "best.ckpt")],
    ]
    for step in steps:
        print("$ lightning " + " ".join(step), flush=True)
        run_cli(step)
    metrics_path = out / "results" / f"{name}-test-mass" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    scan = _first_test_scan(data_root)
    if scan is not None:
        predict_dir = out / "predict-input"
        predict_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(scan, predict_dir / "scan.dcm")
        step = ["predict", *common, "--run.name", name, "--data.init_args.predict_path", str(predict_dir),
                "--ckpt_path", str(out / "runs" / name / "checkpoints" / "best.ckpt")]
        print("$ lightning " + " ".join(step), flush=True)
        run_cli(step)
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"\n{args.model} on the synthetic mass test set: pixel AUC {fmt('pixel_auc')}, "
        f"image AUC {fmt('image_auc_mean')} +- {fmt('image_auc_std')}, "
        f"H {fmt('hausdorff_px_mean')} px ({metrics.get('threshold_rule')})\n"
        f"run folder: {out / 'runs' / name}\nmetrics: {metrics_path}\n"
        f"predictions: {out / 'results' / name / 'predictions'}",
        flush=True,
    )
    return 0 if metrics_path.is_file() else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    sys.exit(run(parser.parse_args()))
