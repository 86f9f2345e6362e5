"""Config helpers every stage shares: space configs, the data root, tuple tables."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.artifacts import file_sha256
from datamodules.world import ensure_world

CONF_DIR = Path(str(importlib.resources.files("conf")))  # the installed package's config tree


def space_configs(names: Iterable[str]) -> dict[str, DictConfig]:
    """The `conf/space/<name>.yaml` of each name, composed by Hydra."""
    available = sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))
    out = {}
    for name in names:
        if name not in available:
            raise ValueError(f"unknown space {name!r}; conf/space has {available}")
        if GlobalHydra.instance().is_initialized():
            out[name] = hydra.compose(config_name=f"space/{name}").space
        else:
            with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                out[name] = hydra.compose(config_name=f"space/{name}").space
    return out


def ensure_data(cfg: DictConfig, names: Iterable[str]) -> Path:
    """The cache root for these spaces; the synthetic world writes missing caches first."""
    if cfg.data.kind == "synthetic":  # raw data needs no space config here: its caches exist
        return ensure_world(cfg.data, space_configs(dict.fromkeys(names)))
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; run stage=extract first")
    return root


def pairs_source(cfg: DictConfig, which: str) -> str:
    """`auto` is the pair stage's table (pseudo tuples), on the synthetic world too."""
    return "pseudo" if which == "auto" else str(which)


def tuples_path(cfg: DictConfig, which: str, root: Path) -> Path:
    """The tuple table that bind or route trains on: auto, oracle, pseudo, or a .npz path."""
    which = pairs_source(cfg, which)
    if which == "oracle":
        if cfg.data.kind != "synthetic":
            raise ValueError(
                "pairs=oracle needs the synthetic world (data=world); real data has no oracle"
            )
        return root / "tuples" / "oracle.npz"
    if which == "pseudo":
        return Path(cfg.pair.output)
    return Path(which)


def tuples_record(cfg: DictConfig, which: str, root: Path) -> dict:
    """What an export records of its training tuples: the source and the table's sha256."""
    path = tuples_path(cfg, which, root)
    return {"pairs": pairs_source(cfg, which), "tuples_sha256": file_sha256(path)}


def validation_record(datamodule) -> dict:
    """What an export records of its validation: `paired` sets, or `pseudo` (held-out tuples)."""
    pseudo = [f"{a}_{b}" for a, b in getattr(datamodule, "pseudo_validated", [])]
    return {"validation": "pseudo" if pseudo else "paired"} | (
        {"pseudo_validated": pseudo} if pseudo else {}
    )


def to_plain(cfg):
    """A resolved plain value of a config node: dicts, lists and scalars (for hparams, hashes)."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
