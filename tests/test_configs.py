"""Every YAML loads under a loader that refuses duplicate keys; model YAMLs hold no data block; profiles are
overlays; the CLI merges the synthetic data config when none is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments import cli, table1, table1_stages

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a repeated key (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def strict_load(path: Path) -> object:
    return yaml.load(path.read_text(), Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def test_the_strict_loader_refuses_a_duplicate_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: a comment that lost its hash\nmodel: {}\ndata:\n  init_args: {}\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'data'"):
        strict_load(bad)
    assert yaml.safe_load(bad.read_text())["data"] == {"init_args": {}}  # what PyYAML did silently


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads_without_duplicate_keys(path: Path) -> None:
    assert isinstance(strict_load(path), dict)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_model_yamls_hold_model_and_trainer_settings_only(path: Path) -> None:
    config = strict_load(path)
    assert "class_path" in config["model"] and set(config) <= {"seed_everything", "model", "trainer", "data", "run"}
    # at most a loader setting of the stage itself (the RAT-SPN's batch of 1024), never a copied data block
    assert set(config.get("data", {})) <= {"init_args"}
    assert set(config.get("data", {}).get("init_args", {})) <= {"batch_size"}


def test_profiles_are_overlays_of_known_fits() -> None:
    fits = {spec.name for spec in table1_stages.FITS}
    for profile in table1_stages.PROFILES:
        base = strict_load(CONFIGS / "profiles" / f"{profile}.yaml")
        assert "class_path" not in base.get("data", {}), profile  # refines the data class, never picks one
        overlays = {p.stem for p in (CONFIGS / "profiles" / profile).glob("*.yaml")}
        assert overlays <= fits, profile
        for stem in overlays:
            assert "class_path" not in strict_load(CONFIGS / "profiles" / profile / f"{stem}.yaml").get("model", {})
    assert not hasattr(table1, "PROFILE_OVERRIDES") and not hasattr(table1_stages, "PROFILE_OVERRIDES")


def test_cli_merges_the_synthetic_data_config_when_none_is_given() -> None:
    model = str(CONFIGS / "cae_spn.yaml")
    mias = str(CONFIGS / "data" / "mias.yaml")
    default = ["fit", "--config", str(cli.DEFAULT_DATA_CONFIG), "--config", model]
    assert cli._default_data_args(["fit", "--config", model]) == default
    # the model's data.init_args refine a class: the default still comes first, the named source after it
    assert cli._default_data_args(["fit", "--config", model, "--config", mias])[:3] == default[:3]
    assert cli._default_data_args(["fit", "--config", mias, "--config", model]) == ["fit", "--config", mias,
                                                                                    "--config", model]
    assert cli._default_data_args(["fit", "--data", "x.Y"]) == ["fit", "--data", "x.Y"]
    assert cli._default_data_args(["--help"]) == ["--help"]
