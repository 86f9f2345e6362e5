"""The Hydra config tree: every group value composes, resolves and is internally consistent."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from encoders.modalities import MODALITIES, PROVENANCES

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# conf/sweep holds W&B sweep configs (their ${args} are W&B macros), not a Hydra group.
GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("sweep", "__pycache__")
)
CHOICES = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SPACES = sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))
# Groups that config.yaml's defaults list names (`optional group@package: value` -> group).
DEFAULTS = {
    key.removeprefix("optional ").split("@")[0]
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults
    if not isinstance(entry, str)
    for key in entry
}


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed by Hydra, as train.py would."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _override(group: str, name: str) -> str:
    """`group=name` for a group in config.yaml's defaults list, else `+group=name`."""
    if group == "model":  # composed twice, at model.bind and model.route
        return f"model@model.{name}={name}"
    return f"{group}={name}" if group in DEFAULTS else f"+{group}={name}"


@pytest.mark.parametrize(("group", "name"), CHOICES, ids=[f"{g}={n}" for g, n in CHOICES])
def test_every_group_value_composes_and_resolves(group: str, name: str, tmp_path: Path) -> None:
    cfg = compose_config([_override(group, name), f"paths.output_dir={tmp_path}"])
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert plain["run_dir"].startswith(str(tmp_path)), "a run must write under paths.output_dir"
    for node in ("trainer", "logger"):  # what make_trainer will instantiate must import
        target = (plain.get(node) or {}).get("_target_")
        if target:
            hydra.utils.get_class(target)
    if group == "stage":
        assert plain["stage"]["name"] == name
        assert callable(hydra.utils.get_method(plain["stage"]["run"]))


def test_space_anchor_choice_composes() -> None:
    cfg = compose_config(["space=imagebind", "space@anchor=siglip"])
    assert (cfg.space.name, cfg.anchor.name) == ("imagebind", "siglip")


def test_default_config() -> None:
    cfg = compose_config(["stage=bind", "space=uni3d"])
    assert cfg.run_name == "bind-uni3d" and cfg.anchor.name == "eva_clip_18b"
    assert cfg.run_dir == f"{cfg.paths.runs_dir}/bind-uni3d"  # stable: resume finds the run again
    assert cfg.loss.temperature == 0.03 and cfg.loss.lambda_dec == 3  # the paper's settings
    assert cfg.bind.export_dir.endswith("bound/uni3d")


def test_the_quick_jobs_pools_stay_with_its_world() -> None:
    # The quick job's smaller pools come with its world (data=world_v2_quick), so a data choice
    # on the command line keeps its own pools, and experiment=full the calibrated 8,000.
    pools = {ov: compose_config(list(ov)).data.get("pool_size") for ov in
             [(), ("experiment=full",), ("data=world_medium",), ("data=demo_raw",)]}  # fmt: skip
    assert pools[()]["text"] == 4000 and pools[("experiment=full",)]["text"] == 8000
    assert pools[("data=world_medium",)]["text"] == 160000 and pools[("data=demo_raw",)] is None


@pytest.mark.parametrize("name", SPACES)
def test_space_files_are_consistent(name: str) -> None:
    space = compose_config([f"space={name}"]).space
    assert space.name == name, "the file name is the space's name"
    assert space.role in ("source", "anchor")
    assert set(space.dims) <= set(MODALITIES) and len(set(space.dims.values())) == 1
    assert space.text_specialty in PROVENANCES
    for key in ("attend", "noise"):
        assert set(space.world[key]) == set(space.dims), f"world.{key} must cover the dims"
    assert all(len(gains) == 4 for gains in space.world.attend.values())


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "variant").glob("*.yaml")))
def test_variant_names_real_spaces(name: str) -> None:
    variant = compose_config([f"variant={name}"]).variant
    assert set(variant.spaces) <= set(SPACES)
    assert set(variant.predictors) == set(MODALITIES)
    for spaces in variant.predictors.values():
        assert set(spaces) <= set(SPACES)


def test_bad_group_value_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException) as e:
        compose_config(["space=nosuch"])
    message = str(e.value)
    assert "nosuch" in message and "Available options" in message
    assert all(s in message for s in ("clap", "uni3d", "eva_clip_18b"))
    with pytest.raises(MissingConfigException, match=r"(?s)Available options.*bind"):
        compose_config(["stage=nosuch"])


@pytest.mark.parametrize("override", ["bind.nosuch=1", "data.nosuch=1", "nosuch=1"])
def test_bad_key_fails(override: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        compose_config([override])
    assert "nosuch" in str(e.value)
