"""Config files by name or by path, from the checkout or the installed package.

``lightning fit --config bvae_spn`` finds ``configs/bvae_spn.yaml`` (then ``configs/profiles/<name>.yaml``
and ``configs/data/<name>.yaml``) wherever the project is installed: in a checkout they are the repo's
``configs/``; a wheel ships the same folder as the package ``mammospn_configs`` (a project-specific
name: a top-level ``configs`` package would clash with any other project's). A path that exists is used
as it is. Class paths written for the unified ``lightning`` package
(``lightning.pytorch.callbacks.ModelCheckpoint``) are read as their ``pytorch_lightning.*`` twins, which
this project's Trainer uses (a callback of the other package's class would be refused by it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

#: The import name the wheel gives the repo's ``configs/`` (pyproject.toml, ``package-dir``).
CONFIG_PACKAGE = "mammospn_configs"


def _config_dir() -> Path:
    """The repo's ``configs/`` when this file is in a checkout (editable install or not), else the wheel's
    ``mammospn_configs/``."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root / "configs"
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{CONFIG_PACKAGE} (the packaged configs) is not installed beside "
                                  f"{root / 'experiments'}; reinstall mammospn")
    return Path(next(iter(spec.submodule_search_locations)))


#: The configs: ``<checkout>/configs`` or ``<site-packages>/mammospn_configs``.
CONFIG_DIR = _config_dir()
_SUBDIRS = ("", "profiles", "data")
_UNIFIED, _STANDALONE = "lightning.pytorch.", "pytorch_lightning."


def packaged_names() -> list[str]:
    """Names ``--config`` accepts without a path (``cae``, ``profiles/quick`` is also ``quick``)."""
    return sorted({p.stem for sub in _SUBDIRS for p in (CONFIG_DIR / sub).glob("*.yaml")})


def config_path(name: str | Path) -> Path:
    """An existing file as given, else the packaged config of that name (``bvae_spn``, ``quick``,
    ``profiles/quick.yaml``, ``configs/cae.yaml`` from another folder); FileNotFoundError naming both."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    parts = [p for p in path.parent.parts if p not in ("configs", ".")]
    candidates = [CONFIG_DIR.joinpath(*parts, f"{stem}.yaml")] if parts else []
    candidates += [CONFIG_DIR / sub / f"{stem}.yaml" for sub in _SUBDIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config {str(name)!r} is neither a file nor a packaged config; packaged: {', '.join(packaged_names())}"
    )


def _standalone_copy(path: Path) -> Path:
    """``path`` itself, or (when it names ``lightning.pytorch.*`` classes) a copy naming ``pytorch_lightning.*``."""
    text = path.read_text()
    if _UNIFIED not in text:
        return path
    digest = hashlib.sha1(f"{path.resolve()}\n{text}".encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / "mammospn-configs" / f"{path.stem}-{digest}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text.replace(_UNIFIED, _STANDALONE))
    return copy


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value resolved by `config_path` and every
    ``lightning.pytorch.*`` class path (in those files and in the arguments) read as ``pytorch_lightning.*``."""
    out: list[str] = []
    expect_config = False
    for arg in args:
        if expect_config:
            out.append(str(_standalone_copy(config_path(arg))))
            expect_config = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect_config = True
        elif arg.startswith("--config="):
            out.append(f"--config={_standalone_copy(config_path(arg.split('=', 1)[1]))}")
        else:
            out.append(arg.replace(_UNIFIED, _STANDALONE))
    return out
