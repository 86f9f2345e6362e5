"""Config helpers every stage shares: space configs, the data root, tuple tables, the Hub."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

# Hugging Face libraries read HF_HUB_OFFLINE once, at their import, and online they retry a file
# for minutes on a machine without network (laion_clap fetches tokenizers at import). Every entry
# point (train.py, the inference CLI and OmniBind) imports this module before them, so each looks
# on disk only, and fails at once naming what is missing (hub_files), unless HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Warnings third-party code raises on every run, which a user cannot act on: laion_clap calls
# torch.meshgrid without `indexing`, open_clip and laion_clap import timm's old paths, and
# Lightning's and older transformers' pytree helpers call deprecated torch APIs.
for _message in (r"torch\.meshgrid: in an upcoming release", r"Importing from timm\.models\.",
                 r".*_pytree\._register_pytree_node is deprecated",
                 r"`isinstance\(treespec, LeafSpec\)` is deprecated"):  # fmt: skip
    warnings.filterwarnings("ignore", message=_message)

import hydra  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402

from datamodules.artifacts import CacheError, file_sha256  # noqa: E402
from datamodules.synthetic.world import ensure_world  # noqa: E402

log = logging.getLogger(__name__)
CONF_DIR = Path(str(importlib.resources.files("conf")))  # the installed package's config tree


def group_config(group: str, name: str) -> DictConfig:
    """`conf/<group>/<name>.yaml`, composed by Hydra (its defaults list included)."""
    available = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if name not in available:
        raise ValueError(f"unknown {group} {name!r}; conf/{group} has {available}")
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=f"{group}/{name}")[group]
    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra.compose(config_name=f"{group}/{name}")[group]


def space_configs(names: Iterable[str]) -> dict[str, DictConfig]:
    """The `conf/space/<name>.yaml` of each name."""
    return {name: group_config("space", name) for name in names}


def ensure_data(cfg: DictConfig, names: Iterable[str]) -> Path:
    """The cache root for these spaces; the synthetic world writes missing caches first."""
    if cfg.data.kind == "synthetic":  # raw data needs no space config here: its caches exist
        return ensure_world(cfg.data, space_configs(dict.fromkeys(names)))
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; run stage=extract first")
    return root


def pairs_source(which: str) -> str:
    """`auto` is the pair stage's table (pseudo tuples), on the synthetic world too."""
    return "pseudo" if which == "auto" else str(which)


def tuples_path(cfg: DictConfig, which: str, root: Path) -> Path:
    """The tuple table that bind or route trains on: auto, oracle, pseudo, or a .npz path."""
    which = pairs_source(which)
    if which == "oracle":
        if cfg.data.kind != "synthetic":
            raise ValueError(
                "pairs=oracle needs the synthetic world (data=world); real data has no oracle"
            )
        return root / "tuples" / "oracle.npz"
    if which == "pseudo":
        return Path(cfg.pair.output)
    return Path(which)


def ensure_tuples(cfg: DictConfig, which: str, root: Path) -> Path:
    """tuples_path, made first by the pipeline's pair step when it is a missing pseudo table;
    with upstream=false a missing table is refused, naming the command that makes it."""
    path = tuples_path(cfg, which, root)
    if path.exists() or pairs_source(which) != "pseudo":
        return path
    command = f"python train.py stage=pair paths.output_dir={cfg.paths.output_dir}"
    if not cfg.upstream:
        raise CacheError(f"{path}: no such tuple table (upstream=false); make it: {command} "
                         "(with this run's data and pair overrides)")  # fmt: skip
    log.info("%s: no tuple table yet; running the pair stage first (upstream=false: don't)", path)
    # Imported here: the pipeline imports every stage, and the stages import this module.
    from lightning.pytorch.utilities.seed import isolate_rng

    from lightning_modules.stages.pipeline import pair_step

    with isolate_rng():  # the stage goes on with the randomness it had, as when run alone
        pair_step(cfg)
    return path


def tuples_record(cfg: DictConfig, which: str, root: Path) -> dict:
    """What an export records of its training tuples: the source and the table's sha256."""
    path = tuples_path(cfg, which, root)
    return {"pairs": pairs_source(which), "tuples_sha256": file_sha256(path)}


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


@contextlib.contextmanager
def hub_files(what: str) -> Iterator[None]:
    """Re-raise a Hugging Face load that found no file on disk as a FileNotFoundError naming the
    repo and files it asked for and HF_HUB_OFFLINE (transformers' own message names neither)."""
    try:
        yield
    except OSError as e:
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        chain, cause = [], e
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        asked = next((a for c in chain if (a := _hub_request(c))), None)
        # transformers re-raises a miss as a plain OSError, and build_encoder drops its cause.
        missed = any(isinstance(c, LocalEntryNotFoundError | OfflineModeIsEnabled) for c in chain)
        if not (missed or (type(e) is OSError and asked)):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE=1 (the default here) keeps downloads off"
            fix = "or set HF_HUB_OFFLINE=0 to download it"
        else:
            why = "it could not be downloaded (HF_HUB_OFFLINE=0)"
            fix = "or, without network, leave HF_HUB_OFFLINE unset (default 1) to fail at once"
        raise FileNotFoundError(
            f"{what}: {asked or 'a file from the Hub'} is not on disk and {why}; put it in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) or a local folder the config names, "
            f"{fix} ({first})"
        ) from e


def _hub_request(error: BaseException) -> str | None:
    """The repo (and files) a failed Hub look-up asked for, read from its traceback's frames."""
    asked, tb = None, error.__traceback__
    while tb is not None:  # the innermost frame that names a repo wins
        local = tb.tb_frame.f_locals
        repo = local.get("path_or_repo_id", local.get("repo_id"))
        if isinstance(repo, str):
            files = local.get("full_filenames") or local.get("filenames") or local.get("filename")
            files = [files] if isinstance(files, str) else list(files or [])
            asked = f"{repo!r}" + (f" ({', '.join(map(str, files))})" if files else "")
        tb = tb.tb_next
    return asked
