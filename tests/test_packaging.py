"""The installed console commands and the layering rules of ARCHITECTURE.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> project packages it must never import
FORBIDDEN = {
    "spn": {"datamodules", "lightning_modules", "experiments", "pytorch_lightning", "lightning"},
    "datamodules": {"spn", "lightning_modules", "experiments"},
    "lightning_modules": {"datamodules", "experiments"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_top_levels(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_mammospn_lists_its_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.tools", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("synth", "preview", "table1"):
        assert name in out


def test_configs_are_found_by_name_or_path_and_lightning_pytorch_paths_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments import configs

    monkeypatch.chdir(tmp_path)  # not in the checkout: names and configs/... paths come from the package

    assert configs.config_path("bvae_spn") == configs.CONFIG_DIR / "bvae_spn.yaml"
    assert configs.config_path("smoke") == configs.CONFIG_DIR / "profiles" / "smoke.yaml"
    assert configs.config_path("configs/data/mias.yaml") == configs.CONFIG_DIR / "data" / "mias.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n")
    args = configs.resolve_config_args(["fit", "--config", "cae", "-c", str(mine),
                                        "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"])
    assert args[2] == str(configs.CONFIG_DIR / "cae.yaml")
    assert "pytorch_lightning.callbacks.EarlyStopping" in Path(args[4]).read_text()
    assert args[5] == "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"
    with pytest.raises(FileNotFoundError, match="'nope'.*packaged: .*bvae_spn"):
        configs.resolve_config_args(["fit", "--config", "nope"])


def test_a_packaged_config_name_and_a_lightning_pytorch_callback_parse(tmp_path: Path) -> None:
    from experiments import cli

    mine = tmp_path / "cb.yaml"
    mine.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                    "      init_args: {monitor: val/loss}\n")
    parsed = cli.run_cli(["--config", "cae", "--config", "smoke", "--config", str(mine)], run=False)
    assert type(parsed.model).__name__ == "CAE"
    assert any(type(c).__module__.startswith("pytorch_lightning") and type(c).__name__ == "EarlyStopping"
               for c in parsed.trainer.callbacks)


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True, cwd=out)
    [wheel] = out.glob("mammospn-*.whl")
    return wheel


def test_the_wheel_ships_every_module_and_config_and_no_generic_configs_package(tmp_path: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())
    wanted = {f"mammospn_configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert wanted and wanted <= names
    modules = {str(p.relative_to(ROOT)) for package in ("datamodules", "spn", "lightning_modules", "experiments")
               for p in (ROOT / package).rglob("*.py")}
    assert "experiments/predict.py" in modules and modules <= names  # pyproject lists the packages by name
    assert {name.split("/")[0] for name in names} == {"datamodules", "spn", "lightning_modules", "experiments",
                                                       "mammospn_configs", "mammospn-0.1.0.dist-info"}


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv_runs_table1_outside_the_checkout(tmp_path: Path) -> None:
    """A fresh venv sees this environment's third-party packages (a .pth, no network here) but not the
    checkout: the project comes from the wheel, and `mammospn table1 --profile smoke` runs in another folder."""
    import site
    import venv

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    bin_dir = env / "bin"
    env_python = bin_dir / "python"
    env_site = Path(subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (env_site / "host.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = _build_wheel(tmp_path)
    subprocess.run([str(env_python), "-m", "pip", "install", "--no-deps", "-q", "--target", str(env_site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import sys, importlib.util, experiments; from experiments.tools import main;"
        "from experiments.configs import CONFIG_DIR;"
        f"assert not experiments.__file__.startswith({str(ROOT)!r}), experiments.__file__;"
        f"assert CONFIG_DIR.name == 'mammospn_configs' and not str(CONFIG_DIR).startswith({str(ROOT)!r}), CONFIG_DIR;"
        "assert importlib.util.find_spec('configs') is None, 'a generic top-level configs package is installed';"
        "sys.exit(main(['table1', '--profile', 'smoke', '--out', 'out']))"
    )
    env_vars = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                "HOME": str(tmp_path)}
    done = subprocess.run([str(env_python), "-c", code], cwd=work, capture_output=True, text=True, env=env_vars,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (work / "out" / "table1.csv").is_file() and (work / "out" / "table1.md").is_file()
    # the `lightning` command (python -m: pip --target puts no scripts on PATH) finds configs by name outside too
    shown = subprocess.run([str(env_python), "-m", "experiments.cli", "fit", "--config", "bvae_spn", "--config", "smoke",
                            "--print_config"], cwd=work, capture_output=True, text=True, env=env_vars, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "lightning_modules.RatSpnStage" in shown.stdout
