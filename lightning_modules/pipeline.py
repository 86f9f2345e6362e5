"""The main job: pair -> bind (every space of the variant) -> route -> evaluate.

A stage whose outputs exist and are valid is skipped unless force=true.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from lightning_modules import bind
from lightning_modules.common import space_configs

log = logging.getLogger(__name__)


def _stage_cfg(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of cfg with some keys replaced (e.g. space, run_name) for one sub-stage."""
    sub = cfg.copy()
    with open_dict(sub):
        for key, value in changes.items():
            sub[key] = value
    return sub


def run(cfg: DictConfig) -> float | None:
    spaces = space_configs(cfg.variant.spaces)
    result = None
    for name, space in spaces.items():
        sub = _stage_cfg(cfg, space=space, run_name=f"bind-{name}")
        sub.bind.export_dir = f"{cfg.paths.output_dir}/bound/{name}"
        try:
            if not cfg.force:
                bind.load_bound_space(sub.bind.export_dir)
                log.info("pipeline: %s is already bound (%s); skipping", name, sub.bind.export_dir)
                continue
        except (OSError, ValueError):
            pass
        log.info("pipeline: binding %s", name)
        result = bind.run(sub)
    return result
