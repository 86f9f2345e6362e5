"""Declared, typed configuration: one dataclass per config block, checked before any stage work.

Every key a stage reads is declared here once with its type. Its default value lives in the YAML
file that declares it (a field with a default here is one that file may leave out), and each
error names that file: `conf/config.yaml` for the stage blocks (`bind:`, `route:`, `pair:`, ...),
`conf/data/<name>.yaml` for `data.*`, `conf/space/<name>.yaml` for a space. `validate(cfg)` runs
on any composed config (train.py calls it first; tests may call it on `compose(...)`); it reports
every missing or wrong-typed key at once. A key that no schema declares is only warned about at run
time (tests/lightning_modules/runtime/test_schema.py fails on it, so the schemas stay
complete).

Hydra's struct mode already refuses an unknown key at composition. Not registered in Hydra's
ConfigStore: the checks need literal choices and either-or types, which pydantic validates and
OmegaConf's structured configs do not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass

from datamodules.cache import DTYPES
from encoders.modalities import MODALITIES, PROVENANCES
from encoders.readers import LoadSettings
from encoders.video import AUDIO_WEIGHT
from lightning_modules.pairing.ann import SEARCHES
from lightning_modules.pairing.clean import Clean
from lightning_modules.pairing.search import BACKENDS

log = logging.getLogger(__name__)

# Strict scalars: YAML and Hydra overrides give real ints, floats and bools, so a string there
# ("3", "yes") is a mistake (the code would treat "no" as true). A float also takes an int.
Int, Float, Bool, Str = StrictInt, StrictFloat, StrictBool, StrictStr
Modality = Literal[MODALITIES]
Provenance = Literal[PROVENANCES]
Dtype = Literal[DTYPES]
CLOSED = ConfigDict(extra="forbid")  # a block's keys are all declared here
OPEN = ConfigDict(extra="ignore")  # instantiated nodes: their other keys are their target's


class ConfigError(ValueError):
    """The composed config does not match its schema; the message lists every problem."""


def either(expected: str, test: Callable[[Any], bool]) -> Any:
    """A type for values that pass `test`: a union with one readable error, `expected ...`."""

    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"expected {expected}")
        return value

    return Annotated[Any, AfterValidator(check)]


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


Count = Annotated[StrictInt, Field(ge=1)]  # an integer >= 1
Experts = either("freebind or a list of subset names", lambda v: v == "freebind" or _names(v))
PairModalities = either("auto or a list of modalities", lambda v: v == "auto" or _names(v))
Manifests = either("a manifest path or a list of them", lambda v: isinstance(v, str) or _names(v))
Precision = either("a Lightning precision (str or int)", lambda v: isinstance(v, str | int))


# --------------------------------------------------------------------- conf/config.yaml blocks


@dataclass(config=CLOSED)
class Run:
    """The top-level keys of conf/config.yaml."""

    seed: Int
    resume: Bool
    force: Bool
    upstream: Bool
    debug: Bool
    run_dir: Str


@dataclass(config=CLOSED)
class Bind:
    pairs: Str  # auto | oracle | pseudo | a .npz path
    experts: Experts
    hidden_dim: Int
    renormalize: Bool
    epochs: Int
    batch_size: Int
    lr: Float
    weight_decay: Float
    warmup_fraction: Float
    seed: Int | None
    export_dir: Str


@dataclass(config=CLOSED)
class Pipeline:
    routes: dict[Str, dict[Str, Any]]  # run name -> {dotted key: value} overrides
    oracle: Bool
    extract: dict[Str, dict[Str, Any]] = Field(default_factory=dict)  # space -> its overrides
    extract_datasets: dict[Str, list[Str] | None] | None = None  # space -> datasets (null: all)


@dataclass(config=CLOSED)
class Extract:
    datasets: list[Str] | None
    modalities: list[Modality] | None
    batch_size: Int
    num_workers: Int
    shard_size: Int
    dtype: Dtype
    on_error: Literal["skip", "raise"]
    overwrite: Bool


@dataclass(config=CLOSED)
class Pair:
    dataset: Str
    starts: list[Modality]
    modalities: PairModalities
    routes: dict[Str, Str]
    chain: dict[Str, list[Modality]] | None
    topk: Int
    chunk: Int
    gallery_chunk: Int
    backend: Literal[BACKENDS]  # auto | torch | faiss (lightning_modules/pairing/search.py)
    device: Str
    search: Literal[SEARCHES]  # exact | ivf | hnsw (lightning_modules/pairing/ann.py)
    nlist: Count
    nprobe: Count
    hnsw_m: Count
    ef_search: Count
    ef_construction: Count
    recall_queries: Count
    dedupe: Bool
    min_tuples: Int
    clean: Clean  # typed in lightning_modules/pairing/clean.py
    progress: Bool
    output: Str


@dataclass(config=CLOSED)
class Route:
    kind: Literal["routed", "fixed"]
    pairs: Str
    scales: dict[Modality, Float]
    epochs: Int
    batch_size: Int
    lr: Float
    weight_decay: Float
    train: list[Modality] | None
    specialty: dict[Str, Provenance]
    align: Literal["all", "leave_retriever_out"]
    bound_dir: Str
    export_dir: Str


@dataclass(config=CLOSED)
class Convert:
    checkpoint: Str | None
    export_dir: Str


@dataclass(config=CLOSED)
class Evaluate:
    output_dir: Str
    methods: list[Str]
    benchmarks: Str  # val | test | a manifest path
    bound_dir: Str
    omni_dir: Str
    ks: list[Int]
    topk: list[Int]
    chunk: Int
    device: Str
    templates: dict[Modality, list[Str]]


@dataclass(config=CLOSED)
class Loss:
    temperature: Float
    gather: Bool
    weights: dict[Str, Float]  # <source modality>_<anchor modality> -> weight
    align: Float
    lambda_dec: Float


# ------------------------------------------------------------------------- other config groups


@dataclass(config=CLOSED)
class StageNode:
    name: Str
    run: Str  # dotted path of the stage's run(cfg)


@dataclass(config=CLOSED)
class Stage:
    """conf/stage/<name>.yaml: the stage node and the run name."""

    stage: StageNode
    run_name: Str


@dataclass(config=CLOSED)
class Paths:
    output_dir: Str
    data_dir: Str
    runs_dir: Str


@dataclass(config=OPEN)
class Instantiated:
    """A node built with hydra.utils.instantiate: its target checks the other keys."""

    target: Str = Field(alias="_target_")


@dataclass(config=OPEN)
class Trainer:
    """conf/trainer/<name>.yaml: lightning's Trainer checks its other keys."""

    precision: Precision
    max_epochs: Int | None  # null: the stage's own epochs
    target: Str = Field(alias="_target_")
    enable_progress_bar: Bool = True


# ------------------------------------------------------------------------------------- spaces


@dataclass(config=CLOSED)
class SpaceWorld:
    """A space's stand-in encoder in the synthetic world."""

    attend: dict[Modality, list[Float]]
    noise: dict[Modality, dict[Str, Float]]
    v2: dict[Str, Any] | None = None  # data=world_v2 overrides (bench/calibration.py)


@dataclass(config=CLOSED)
class SpaceVideo:
    """A space's video options (encoders/video.py); a space without `video:` has them off."""

    audio_track: Bool  # join the clip's audio embedding (a space with an audio side only)
    audio_weight: Float = AUDIO_WEIGHT  # w in normalize((1 - w) frames + w audio)


@dataclass(config=CLOSED)
class Space:
    """conf/space/<name>.yaml: `space`, `anchor` and each `variant.spaces.<name>`."""

    name: Str
    role: Literal["source", "anchor"]
    dims: dict[Modality, Int]
    text_specialty: Provenance
    encoder: dict[Str, Any] | None = None  # instantiated by encoders/ (extract)
    world: SpaceWorld | None = None  # only the synthetic world needs it
    video: SpaceVideo | None = None  # video options (absent: frames only)


@dataclass(config=CLOSED)
class Variant:
    name: Str
    include_anchor: Bool
    predictors: dict[Modality, list[Str]]
    spaces: dict[Str, dict[Str, Any]]  # each is checked as a Space
    # A demo variant's pair links and pair-only spaces (experiment=demo_raw reads them).
    pair: dict[Str, dict[Str, Any]] | None = None
    extract: dict[Str, dict[Str, Any]] | None = None


# --------------------------------------------------------------------------------------- data


@dataclass(config=CLOSED)
class Data:
    """The keys of every data kind; a kind other than synthetic or raw has caches under root."""

    kind: Str
    name: Str
    root: Str
    dtype: Dtype  # stored dtype of the world's caches and of route's projected caches


@dataclass(config=CLOSED)
class ZeroShot:
    classes: Int
    per_class: Int
    templates: Int
    multilabel_items: Int


@dataclass(config=CLOSED)
class Hierarchy:
    coarse: Int
    r: Float


@dataclass(config=CLOSED)
class Coverage:
    share: Float
    zipf: Float


@dataclass(config=CLOSED)
class AudioLabels:
    counts: list[Float]
    secondary_weight: Float


@dataclass(config=CLOSED)
class Video:
    frames: Int
    frame_noise: Float
    render_fraction: Float


@dataclass(config=CLOSED)
class WorldData(Data):
    """data.kind=synthetic: the generated world (datamodules/synthetic/world.py)."""

    kind: Literal["synthetic"]
    seed: Int
    n_concepts: Int
    n_val_concepts: Int
    n_test_concepts: Int
    pool_size: dict[Modality, Int]
    text_provenance: dict[Provenance, Float]
    render_fraction: Float
    instance_noise: Float
    observation_noise: Float
    style_noise: Float
    style_norm: Float
    specialization: Float
    per_concept: Int
    zeroshot: ZeroShot
    oracle_tuples: Int
    hierarchy: Hierarchy | None
    aspect_sharing: Float | None
    pool_coverage: dict[Modality, Coverage] | None
    audio_labels: AudioLabels | None
    vague_captions: Float | None
    shared_noise: Float | None
    calibrated: Bool
    overwrite: Bool
    video: Video | None = None  # val/test_video_text sets (world.py reads it with .get)


@dataclass(config=CLOSED)
class Load(LoadSettings):
    """data.load: LoadSettings of encoders/readers.py, declared there (`seed` is data.seed)."""


@dataclass(config=CLOSED)
class Source:
    """One modality of a raw dataset (datamodules/items.py checks the files)."""

    source: Str  # a folder, or a .txt/.csv/.json/.jsonl list
    labels: Literal["dirs"] | None = None
    items: Modality | None = None  # a caption list: the modality its rows describe
    provenance: Provenance | None = None  # captions: the provenance of rows naming none
    frames: Int | None = None  # video: frames per clip through the image encoder
    stride: Int | None = None


@dataclass(config=CLOSED)
class RawData(Data):
    """data.kind=raw: files that stage=extract embeds (conf/data/demo_raw.yaml)."""

    kind: Literal["raw"]
    seed: Int
    datasets: dict[Str, dict[Modality, Source] | None]
    source: Str | None = None  # the raw files' folder (read by `generate`)
    generate: Literal["demo"] | None = None
    load: Load | None = None
    benchmarks: Manifests | None = None  # manifests whose zero-shot prompts extract embeds


# ------------------------------------------------------------------------------------ checking

BLOCKS = {
    "bind": Bind,
    "pipeline": Pipeline,
    "extract": Extract,
    "pair": Pair,
    "route": Route,
    "convert": Convert,
    "evaluate": Evaluate,
    "loss": Loss,
}
DATA_KINDS = {"synthetic": WorldData, "raw": RawData}


def _file(group: str, fallback: Any, key: str | None = None) -> str:
    """conf/<group>/<file>.yaml: the file Hydra composed (train.py), else the node's own name."""
    choice = fallback if isinstance(fallback, str) else None
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(key or group) or choice
    return f"conf/{group}/{choice}.yaml" if choice else f"a file of conf/{group}/"


def _name(cfg: DictConfig, key: str) -> Any:
    """`<key>.name` without resolving anything else, or None."""
    try:
        return OmegaConf.select(cfg, f"{key}.name", default=None)
    except OmegaConfBaseException:
        return None


def _blocks(cfg: DictConfig) -> Iterator[tuple[str, type, str, list[str] | None]]:
    """(key, schema, file that declares it, keys to check or None for all) of each block."""
    yield "", Run, "conf/config.yaml", ["seed", "resume", "force", "upstream", "debug", "run_dir"]
    yield "", Stage, _file("stage", _name(cfg, "stage")), ["stage", "run_name"]
    yield "paths", Paths, _file("paths", "default"), None
    for key, schema in BLOCKS.items():
        yield key, schema, f"conf/config.yaml's `{key}:` block", None
    kind = OmegaConf.select(cfg, "data.kind", default=None)
    data = DATA_KINDS.get(kind, Data)
    only = None if data is not Data else ["kind", "name", "root", "dtype"]
    yield "data", data, _file("data", _name(cfg, "data")), only
    yield "space", Space, _file("space", _name(cfg, "space")), None
    yield "anchor", Space, _file("space", _name(cfg, "anchor"), "space@anchor"), None
    variant = _file("variant", _name(cfg, "variant"))
    yield "variant", Variant, variant, None
    spaces = OmegaConf.select(cfg, "variant.spaces", default=None)
    for name in spaces if isinstance(spaces, DictConfig) else ():
        yield f"variant.spaces.{name}", Space, f"conf/space/{name}.yaml (via {variant})", None
    yield "trainer", Trainer, _file("trainer", None), None
    for key in ("logger", "model.bind", "model.route", "datamodule"):
        if OmegaConf.select(cfg, key, default=None):  # logger=none leaves no or an empty node
            group = key.split(".")[0]
            yield key, Instantiated, _file(group, None, key.replace(".", "@", 1)), None
    callbacks = OmegaConf.select(cfg, "callbacks", default=None)
    for name in callbacks if isinstance(callbacks, DictConfig) else ():
        if callbacks[name] is not None:  # callbacks.<name>=null switches one off
            yield f"callbacks.{name}", Instantiated, f"conf/callbacks/{name}.yaml", None


def _resolved(cfg: DictConfig, key: str, keys: list[str] | None) -> Any:
    """The resolved plain value of a block (only `keys` of it, when given)."""
    node = OmegaConf.select(cfg, key, throw_on_missing=True) if key else cfg
    if keys is not None:
        return {k: _resolved(node, k, None) for k in keys if k in node}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def _written(raw: dict, key: str, keys: list[str] | None) -> Any:
    """The value of a block as written, interpolations unresolved (`raw`: the whole config)."""
    node: Any = raw
    for part in key.split(".") if key else ():
        node = node.get(part) if isinstance(node, dict) else None
    if keys is not None and isinstance(node, dict):
        return {k: node[k] for k in keys if k in node}
    return node


def _problem(error: dict, key: str, schema: type, file: str) -> str:
    """One line naming the dotted key, what is wrong, and the file that declares it."""
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    full = ".".join(p for p in (key, *loc) if p)
    if error["type"] == "missing":
        return f"{full}: missing; declare it in {file}"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return (
            f"{full}: not a declared key; declare it with its type in "
            f"lightning_modules/runtime/schema.py ({schema.__name__}), or remove it from {file}"
        )
    what = "the key" if "[key]" in error["loc"] else "got"
    message = error["msg"].removeprefix("Value error, ")
    return f"{full}: {what} {error['input']!r}: {message} (declared in {file}, or an override)"


UNDECLARED = ("unexpected_keyword_argument", "extra_forbidden")


def _check(
    cfg: DictConfig,
    raw: dict,
    undeclared: bool,
    key: str,
    schema: type,
    file: str,
    keys: list[str] | None,
) -> list[str]:
    """The problems of one block: missing (and undeclared) keys as written, so that a broken
    interpolation elsewhere hides none, then the types of the resolved values."""
    unresolved = _written(raw, key, keys)
    if unresolved is None:
        return [f"{key}: missing; declare it in {file}"]
    wanted = ("missing", *UNDECLARED) if undeclared else ("missing",)
    out = []
    try:
        TypeAdapter(schema).validate_python(unresolved)
    except ValidationError as e:
        out += [_problem(err, key, schema, file) for err in e.errors() if err["type"] in wanted]
    try:
        TypeAdapter(schema).validate_python(_resolved(cfg, key, keys))
    except MissingMandatoryValue as e:
        out.append(f"{e.full_key or key}: missing (???); set it in {file}")
    except OmegaConfBaseException as e:
        out.append(f"{e.full_key or key}: {str(e).splitlines()[0]} (in {file})")
    except ValidationError as e:
        errors = [err for err in e.errors() if undeclared or err["type"] not in UNDECLARED]
        out += [_problem(err, key, schema, file) for err in errors]
    return list(dict.fromkeys(out))


def problems(cfg: DictConfig, undeclared: bool = True) -> list[str]:
    """Every mismatch between the composed config and the schemas, one line each; keys that no
    schema declares among them when `undeclared`."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    first: dict[str, str] = {}
    for block in _blocks(cfg):
        for line in _check(cfg, raw, undeclared, *block):
            # A broken interpolation in variant.spaces.<name> shows in two blocks: name it once.
            first.setdefault(line.split(" (in ")[0], line)
    return list(first.values())


def validate(cfg: DictConfig, strict: bool = False) -> None:
    """Raise ConfigError listing each missing or wrong-typed key and the file that should
    declare it; a key no schema declares fails too when `strict` (as train.py runs it: a
    misspelled key would otherwise be ignored), else it is warned about."""
    found = problems(cfg, undeclared=strict)
    if not strict:
        for line in sorted(set(problems(cfg)) - set(found)):
            log.warning("config: %s", line)
    if found:
        raise ConfigError(
            "the configuration does not match its schema (lightning_modules/runtime/schema.py):\n"
            + "\n".join(f"  - {line}" for line in found)
        )
