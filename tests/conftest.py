"""Shared fixtures: configs composed from the real conf/ tree, and one small synthetic world."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Before any import of laion_clap/wandb: it fetches tokenizers at import otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` run from anywhere finds the packages and train.py
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lightning_modules.stages.pair import SUMMARY  # noqa: E402

# The tests' tensors are tiny: on a small shared machine, intra-op threads only contend (a
# projector step ran 10x slower with 2 threads than with 1 on the 2-core sandbox).
torch.set_num_threads(1)

CONF_DIR = REPO / "conf"
# A world small enough that generating it for four spaces takes seconds: 200 train concepts,
# 2,000 rows per pool, 300 val and 500 test retrieval pairs, 20 zero-shot classes.
SMALL_WORLD: tuple[str, ...] = (
    "data=world",  # the first world: fast, easy, and what these tests' expectations assume
    "data.pool_size={point:2000,audio:2000,image:2000,text:2000}",
    "data.n_concepts=200",
    "data.n_val_concepts=60",
    "data.n_test_concepts=100",
    "data.oracle_tuples=2000",
    "data.zeroshot={classes:20,per_class:3,templates:2,multilabel_items:60}",
    "trainer=cpu",
    "logger=none",
)
# The spaces of the shared world: an audio-text expert, a generalist, a 3D expert, the anchor.
WORLD_SPACES: tuple[str, ...] = ("clap", "imagebind", "uni3d", "eva_clip_18b")

Compose = Callable[..., DictConfig]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/config.yaml composed by Hydra with these overrides (no small-world defaults)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@functools.cache
def _configured(group: str) -> dict:
    cfg = compose_config()
    node = cfg.datamodule if group == "datamodule" else cfg.model[group]
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
            if not k.startswith("_")}  # fmt: skip


def configured(group: str, **kw) -> dict:
    """The default config's arguments of a module (`bind`, `route`: conf/model/<group>.yaml;
    `datamodule`), updated by kw: modules built by hand take the values declared there."""
    return {**copy.deepcopy(_configured(group)), **kw}


@pytest.fixture(scope="session")
def world_cfg(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """The small-world config whose data root the session's world lives in."""
    out = tmp_path_factory.mktemp("shared")
    return compose_config([*SMALL_WORLD, f"paths.output_dir={out}"])


@pytest.fixture(scope="session")
def small_world(world_cfg: DictConfig) -> Path:
    """Root of the shared small world, written once per session for WORLD_SPACES. Read-only."""
    from datamodules.synthetic.world import ensure_world
    from lightning_modules.runtime.config import space_configs

    return ensure_world(world_cfg.data, space_configs(WORLD_SPACES))


@pytest.fixture
def compose_cfg(tmp_path: Path, world_cfg: DictConfig) -> Compose:
    """compose_cfg(*overrides, shared_data=True): a small-world config writing under tmp_path.

    shared_data=True reads the session's world (use the `small_world` fixture to have it written
    first); False gives the test a world root of its own under tmp_path.
    """

    def make(*overrides: str, shared_data: bool = True) -> DictConfig:
        data = [f"paths.data_dir={world_cfg.paths.data_dir}"] if shared_data else []
        return compose_config([*SMALL_WORLD, f"paths.output_dir={tmp_path}", *data, *overrides])

    return make


# ---------------------------------------------------------------------------- shared helpers
# Used by tests in several folders (pairing/ and stages/).


def brute_topk(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by float64 scores, ties to the lower gallery row: (scores (n, k), rows (n, k))."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    rows = np.stack([np.lexsort((np.arange(len(g)), -r))[:k] for r in s])
    return np.take_along_axis(s, rows, 1), rows


def gauss_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# The pair stage on the small world, as tests/lightning_modules/stages/test_pair.py runs it.
PAIR_STAGE = ("stage=pair", "pair.routes.audio_text=clap", "pair.progress=false",
              "pair.clean.provenance=false")  # fmt: skip


def pair_summary(cfg) -> dict:
    """The pair stage's pairs_summary.json."""
    return json.loads((Path(cfg.pair.output).parent / SUMMARY).read_text())
