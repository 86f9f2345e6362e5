"""The synthetic omni world: a deterministic stand-in for real encoders and datasets.

Concepts z_k ~ N(0, I_64) have four 16-dim aspect blocks: common, sound, appearance, shape.
An item is an instance u = z_k + instance_noise * xi, seen through a *view* (audio, photo, render,
point, or a caption whose provenance is audio, image or point):
    x = [gain_view * u + observation_noise * zeta ; style_view + style_noise * eta].
A space s encodes modality m with a fixed random 2-layer tanh MLP shared by its modalities, so the
space is internally aligned, plus a per-modality offset (the modality gap):
    e = normalize(W2_s tanh(W1_s(attend_{s,m} * x + noise_{s,m,view} * eps)) + b_{s,m}).
`attend` (what an encoder sees) and `noise` (its expertise per view) come from `conf/space/*.yaml`,
so the world simulates whichever spaces a run names, with their real dims.

Every random draw is keyed by (seed, dataset, modality[, space]), so adding a space never changes
another space's caches, and the same seed writes the same bytes.

The realistic world (v2, `conf/data/world_v2.yaml`) adds, each behind its own data key whose null
default leaves the v1 world byte for byte as it was:
- `hierarchy`: coarse categories hold fine concepts, z = sqrt(1 - r^2) * coarse + r * own, so a
  wrong top-1 is usually a semantic neighbour; pools and paired sets carry a `coarse` extra.
- `aspect_sharing` a: the sound, appearance and shape blocks derive from the common (semantic)
  block, block = sqrt(a) * common @ M_block + sqrt(1 - a) * own, for concepts and instances alike.
- `pool_coverage`: per modality, the share of train concepts a pool covers and a Zipf exponent of
  their popularity (not every concept has audio or 3D; AudioSet and Objaverse are long-tailed).
- `audio_labels`: pool audio is multi-label (a clip mixes 1, 2, 3... concepts; `multilabels` extra).
- `vague_captions`: the share of pool captions that name only the coarse category (alt-text).
- `shared_noise` c in [0, 1): errors shared between spaces. Each space's encoder noise mixes one
  draw per item common to every space with its own, sqrt(c) * common + sqrt(1 - c) * own, so
  the spaces' mistakes correlate as real spaces' do (they learn from overlapping data); with c = 0
  each space errs independently and averaging cancels more of them than it could in reality.
- `calibrated`: each space's `world.v2` block overrides its `world` block. Its values are fitted by
  `bench/calibration.py` to the real spaces' R@1 at benchmark gallery sizes. A `tower: <space>`
  there makes the space's modalities that the tower space embeds the tower's own encoder (same
  weights, same noise draws: identical embeddings), as Uni3D's image and text are EVA02-E's; its
  other modalities (Uni3D's points) go through the tower's network with their own settings.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.artifacts import CacheError, atomic_write_json
from datamodules.cache import CacheWriter, cache_dir, cache_is_complete, read_manifest
from datamodules.tuples import save_tuples
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES
from encoders.video import audio_track_weight, join_audio

log = logging.getLogger(__name__)
SPACE_DIR = Path(str(importlib.resources.files("conf"))) / "space"  # the installed config tree

BLOCK, STYLE = 16, 16
LATENT = 4 * BLOCK
# What each kind of item physically carries: gains on (common, sound, appearance, shape).
VIEW_GAIN = {
    "audio": (1, 1, 0.15, 0.15),
    "photo": (1, 0, 1, 0.5),
    "render": (1, 0, 0.5, 1),
    "point": (1, 0, 0.2, 1),
    "caption_audio": (1, 1, 0.2, 0.1),
    "caption_image": (1, 0.1, 1, 0.4),
    "caption_point": (1, 0, 0.4, 1),
}
VIEWS = tuple(VIEW_GAIN)
IMAGE_VIEWS = ("photo", "render")


def _key(*parts: object) -> int:
    """A stable 63-bit integer from strings/ints, for seeding numpy generators."""
    return (
        int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1
    )


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng([seed, _key(*parts)])


def _merge(base: Mapping, over: Mapping) -> dict:
    """`base` with `over` merged in, key by key into nested mappings (v2 names what changes)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _view_key(modality: str, view: str) -> str:
    """The key under a space's `world.noise.<modality>` for an item view."""
    return view.removeprefix("caption_") if modality == "text" else view


class World:
    """The world's latent concepts, views and the stand-in encoders of the named spaces."""

    def __init__(self, cfg: Mapping, spaces: Mapping[str, Mapping]) -> None:
        self.cfg = cfg
        self.seed = int(cfg["seed"])
        self.spaces = {name: self._check_space(name, s) for name, s in spaces.items()}
        counts = [cfg["n_concepts"], cfg["n_val_concepts"], cfg["n_test_concepts"]]
        self.n_train, n_val, n_test = (int(c) for c in counts)
        total = self.n_train + n_val + n_test
        self.concepts = _rng(self.seed, "concepts").standard_normal((total, LATENT), np.float32)
        # v2: coarse categories (each split cycles through them, so train has n_train / n_coarse
        # fine concepts per category and held-out concepts are neighbours of train ones).
        self.coarse: np.ndarray | None = None
        hierarchy = cfg.get("hierarchy")
        if hierarchy is not None:
            n_coarse, r = int(hierarchy["coarse"]), float(hierarchy["r"])
            if n_coarse < 1 or not 0 <= r <= 1:
                raise ValueError(
                    f"data.hierarchy={dict(hierarchy)}: expected coarse >= 1 and 0 <= r <= 1"
                )
            splits = (self.n_train, n_val, n_test)
            self.coarse = np.concatenate([np.arange(c) % n_coarse for c in splits])
            means = _rng(self.seed, "coarse").standard_normal((n_coarse, LATENT), np.float32)
            # The part a category's fine concepts share: what a caption naming only it describes.
            self.coarse_means = np.float32(np.sqrt(1 - r * r)) * means
            self.concepts = self.coarse_means[self.coarse] + np.float32(r) * self.concepts
        self.mixing = self._aspect_mixing(cfg.get("aspect_sharing"))
        self.split = {
            "train": np.arange(self.n_train),
            "val": np.arange(self.n_train, self.n_train + n_val),
            "test": np.arange(self.n_train + n_val, total),
        }
        style = _rng(self.seed, "style").standard_normal((len(VIEWS), STYLE))
        style *= float(cfg["style_norm"]) / np.linalg.norm(style, axis=1, keepdims=True)
        self.style = {v: style[i].astype(np.float32) for i, v in enumerate(VIEWS)}
        self._weights: dict[tuple, tuple] = {}  # drawing an encoder costs more than using it

    def _aspect_mixing(self, sharing: float | None) -> np.ndarray | None:
        """(64, 64) map that derives the sound, appearance and shape blocks from the common one."""
        if sharing is None:
            return None
        a = float(sharing)
        if not 0 <= a <= 1:
            raise ValueError(f"data.aspect_sharing={sharing}: expected a value in [0, 1]")
        r = _rng(self.seed, "aspects")
        mix = np.eye(LATENT, dtype=np.float32) * np.float32(np.sqrt(1 - a))
        mix[:BLOCK, :BLOCK] = np.eye(BLOCK, dtype=np.float32)
        for j in range(1, 4):
            # A random rotation per aspect: sound relates to the semantics differently than shape.
            q, _ = np.linalg.qr(r.standard_normal((BLOCK, BLOCK)))
            mix[:BLOCK, j * BLOCK : (j + 1) * BLOCK] = np.sqrt(a) * q
        return mix

    def latents(self, concepts: np.ndarray) -> np.ndarray:
        """Noise-free latents (n, 64) of concept rows: the concepts with their aspects derived."""
        z = self.concepts[concepts]
        return z if self.mixing is None else z @ self.mixing

    @staticmethod
    def _world_block(name: str, space: Mapping, calibrated: bool) -> Mapping:
        """A space's world settings: `world`, with its `world.v2` block over it when calibrated."""
        world = space.get("world")
        if world is None:
            raise ValueError(
                f"space {name!r} has no `world` block, so the synthetic world cannot simulate it"
            )
        if not calibrated:
            return world  # as v1 read it (its values' types enter the cache fingerprints)
        plain = (
            OmegaConf.to_container(world, resolve=True) if isinstance(world, DictConfig) else world
        )
        v2 = plain.get("v2")
        if v2 is None:
            raise ValueError(
                f"space {name!r}: data.calibrated=true needs a `world.v2` block in "
                f"conf/space/{name}.yaml (fit it with bench/calibration.py)"
            )
        return _merge({k: v for k, v in plain.items() if k != "v2"}, v2)

    def _check_space(self, name: str, space: Mapping) -> dict:
        calibrated = bool(self.cfg.get("calibrated") or False)
        world = self._world_block(name, space, calibrated)
        tower = world.get("tower")
        for m in space["dims"]:
            if m not in world["attend"] or m not in world["noise"]:
                raise ValueError(f"space {name!r}: world.attend/noise lack modality {m!r}")
        # Specialisation strength: 0 makes each encoder equally good at every view (flat expertise),
        # 1 is the configured expertise, >1 exaggerates it.
        s = float(self.cfg["specialization"])
        noise = {}
        for m, per_view in world["noise"].items():
            mean = float(np.mean(list(per_view.values())))
            noise[m] = {v: max(0.05, mean + s * (float(x) - mean)) for v, x in per_view.items()}
        out = dict(dims=dict(space["dims"]), attend=dict(world["attend"]), noise=noise)
        audio = audio_track_weight(name, space)
        if audio is not None:  # only when on, so the fingerprints of spaces without it stay
            out["audio_track"] = audio
        return out if tower is None else self._tower(name, out, str(tower))

    def _tower(self, name: str, own: dict, tower: str) -> dict:
        """`own` settings with the tower space's encoder for the modalities both embed."""
        path = SPACE_DIR / f"{tower}.yaml"
        if not path.exists():
            raise ValueError(f"space {name!r}: world.v2.tower={tower!r} names no space (no {path})")
        theirs = self._check_space(tower, OmegaConf.load(path))
        if "tower" in theirs:
            raise ValueError(f"space {name!r}: its tower {tower!r} has a tower itself")
        (dim,) = set(theirs["dims"].values())
        if set(own["dims"].values()) != {dim}:
            raise ValueError(
                f"space {name!r}: dims {own['dims']} differ from its tower {tower!r}'s dim {dim}; "
                "a shared encoder needs one dim"
            )
        shared = [m for m in own["dims"] if m in theirs["dims"]]
        return dict(
            own,
            attend={**own["attend"], **{m: theirs["attend"][m] for m in shared}},
            noise={**own["noise"], **{m: theirs["noise"][m] for m in shared}},
            tower=tower,
            shared=shared,
        )

    def rng_name(self, name: str, modality: str) -> str:
        """Whose noise draws encode `modality` in space `name`: its tower's where they share it."""
        space = self.spaces[name]
        return space["tower"] if modality in space.get("shared", ()) else name

    def encoder_weights(self, name: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """W1 (80, 2d), W2 (2d, d) and per-modality offsets of space `name` (fixed by the seed)."""
        space = self.spaces[name]
        dims = set(space["dims"].values())
        if len(dims) != 1:
            raise ValueError(
                f"space {name!r}: the world needs one dim for all modalities, got {dims}"
            )
        d = dims.pop()
        key = (space.get("tower", name), d)  # a space with a tower uses the tower's network
        if key in self._weights:
            return self._weights[key]
        h, din = 2 * d, LATENT + STYLE
        r = _rng(self.seed, "encoder", key[0])
        w1 = (r.standard_normal((din, h)) / np.sqrt(din)).astype(np.float32)
        w2 = (r.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
        off = {m: (0.2 * r.standard_normal(d)).astype(np.float32) for m in MODALITIES}
        self._weights[key] = (w1, w2, off)
        return w1, w2, off

    def sounding(self, concepts: np.ndarray) -> np.ndarray:
        """Whether each concept row makes a sound (bool): a share of all concepts, drawn once per
        world; the share is the audio pool's coverage (data.pool_coverage.audio.share), in v1 1."""
        coverage = self.cfg.get("pool_coverage")
        share = 1.0 if coverage is None else float(coverage["audio"]["share"])
        return _rng(self.seed, "sound").random(len(self.concepts))[concepts] < share

    def instances(self, concepts: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """Instance latents (n, 64) of the given concept rows (a row may mix concepts: (n, k))."""
        z = self.concepts[concepts]
        if z.ndim == 3:  # multi-concept items: the normalised sum of their concepts
            z = z.sum(1) / np.sqrt(z.shape[1])
        return self.instances_of(z, r)

    def instances_of(self, z: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """Instance latents (n, 64) around raw concept latents z (n, 64), aspects derived."""
        u = z + float(self.cfg["instance_noise"]) * r.standard_normal(z.shape, np.float32)
        return u if self.mixing is None else u @ self.mixing

    def observe(
        self,
        latents: np.ndarray,
        views: np.ndarray,
        r: np.random.Generator,
        style_shift: np.ndarray | None = None,
    ) -> np.ndarray:
        """Observations (n, 80) of latents through their views."""
        gains = np.stack([np.repeat(np.asarray(VIEW_GAIN[v], np.float32), BLOCK) for v in VIEWS])
        vidx = np.array([VIEWS.index(v) for v in views])
        x = gains[vidx] * latents + float(self.cfg["observation_noise"]) * r.standard_normal(
            latents.shape, np.float32
        )
        style = np.stack([self.style[v] for v in VIEWS])[vidx]
        style = style + float(self.cfg["style_noise"]) * r.standard_normal(style.shape, np.float32)
        if style_shift is not None:
            style = style + style_shift
        return np.concatenate([x, style], 1).astype(np.float32)

    def encode(
        self,
        name: str,
        modality: str,
        x: np.ndarray,
        views: np.ndarray,
        r: np.random.Generator,
        chunk: int = 8192,
        shared: np.random.Generator | None = None,
    ) -> np.ndarray:
        """L2-normalised embeddings (n, d) of observations x in space `name`; `shared` draws the
        noise common to every space (data.shared_noise)."""
        space = self.spaces[name]
        w1, w2, off = self.encoder_weights(name)
        gain = np.concatenate(
            [
                np.repeat(np.asarray(space["attend"][modality], np.float32), BLOCK),
                np.ones(STYLE, np.float32),
            ]
        )
        noise = space["noise"][modality]
        try:
            sigma = np.array([noise[_view_key(modality, v)] for v in views], np.float32)[:, None]
        except KeyError as e:
            raise ValueError(
                f"space {name!r}: world.noise.{modality} has no entry for view {e}"
            ) from e
        out = np.empty((len(x), w2.shape[1]), np.float32)
        c = float(self.cfg.get("shared_noise") or 0.0)
        if not 0.0 <= c < 1.0:
            raise ValueError(f"data.shared_noise={c}: expected a value in [0, 1)")
        for i in range(0, len(x), chunk):
            eps = r.standard_normal(x[i : i + chunk].shape, np.float32)
            if c:
                common = shared.standard_normal(eps.shape, np.float32)
                eps = np.float32(np.sqrt(1 - c)) * eps + np.float32(np.sqrt(c)) * common
            xt = gain * x[i : i + chunk] + sigma[i : i + chunk] * eps
            out[i : i + chunk] = np.tanh(xt @ w1) @ w2 + off[modality]
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- datasets
# A dataset is described by a function that returns, per modality, the observations, views and
# per-row extras. The encoding into each space happens afterwards, per space.


def _text_views(provenance: np.ndarray) -> np.ndarray:
    return np.array([f"caption_{PROVENANCES[p]}" for p in provenance])


def _popularity(world: World, modality: str) -> np.ndarray | None:
    """P(concept) (n_train,) of a v2 pool: a share of the train concepts, Zipf-tailed; v1: None."""
    coverage = world.cfg.get("pool_coverage")
    if coverage is None:
        return None
    if modality not in coverage:
        raise ValueError(f"data.pool_coverage has no entry for {modality!r}; expected {MODALITIES}")
    share, zipf = float(coverage[modality]["share"]), float(coverage[modality]["zipf"])
    if not 0 < share <= 1 or zipf < 0:
        raise ValueError(
            f"data.pool_coverage.{modality}={dict(coverage[modality])}: expected 0 < share <= 1 "
            "and zipf >= 0"
        )
    n = max(1, round(share * world.n_train))
    covered = _rng(world.seed, "coverage", modality).permutation(world.n_train)[:n]  # by rank
    p = np.zeros(world.n_train)
    p[covered] = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    return p / p.sum()


def _pool_meta(world: World, modality: str) -> tuple[np.random.Generator, dict]:
    """The draws of an unpaired training pool before observation: labels, views, extras."""
    cfg = world.cfg
    n = int(cfg["pool_size"][modality])
    r = _rng(world.seed, "pool", modality)
    popularity = _popularity(world, modality)
    if popularity is None:
        labels = r.choice(world.split["train"], n)
    else:
        labels = r.choice(world.n_train, n, p=popularity)
    extras = {"labels": labels.astype(np.int64)}
    if modality == "image":
        views = np.where(r.random(n) < float(cfg["render_fraction"]), "render", "photo")
        extras["view"] = (views == "render").astype(np.int8)
    elif modality == "text":
        p = np.array([float(cfg["text_provenance"][m]) for m in PROVENANCES])
        prov = r.choice(len(PROVENANCES), n, p=p / p.sum())
        views = _text_views(prov)
        extras["provenance"] = prov.astype(np.int8)
    else:
        views = np.array([modality] * n)
    if world.coarse is not None:
        extras["coarse"] = world.coarse[labels].astype(np.int64)
    if modality == "audio" and cfg.get("audio_labels") is not None:
        extras["multilabels"] = _multilabels(world, labels, popularity, r)
    if modality == "text" and cfg.get("vague_captions"):
        if world.coarse is None:
            raise ValueError(
                "data.vague_captions needs data.hierarchy (a caption names a category)"
            )
        extras["vague"] = (r.random(n) < float(cfg["vague_captions"])).astype(np.int8)
    return r, dict(views=views, extras=extras)


def _multilabels(
    world: World, labels: np.ndarray, popularity: np.ndarray | None, r: np.random.Generator
) -> np.ndarray:
    """(n, k) concept rows of multi-label audio: column 0 the main label, -1 where fewer labels."""
    spec = world.cfg["audio_labels"]
    counts = np.asarray(spec["counts"], np.float64)  # P(1 label), P(2 labels), ...
    n, k = len(labels), len(counts)
    many = 1 + r.choice(k, n, p=counts / counts.sum())
    out = np.full((n, k), -1, np.int64)
    out[:, 0] = labels
    others = r.choice(world.n_train, (n, k - 1), p=popularity) if k > 1 else out[:, 1:]
    for j in range(1, k):
        keep = (many > j) & ~(others[:, j - 1 : j] == out[:, :j]).any(1)  # no repeated label
        out[keep, j] = others[keep, j - 1]
    return out


def _pool(world: World, modality: str) -> dict:
    """An unpaired training pool of one modality, drawn from the train concepts."""
    r, pool = _pool_meta(world, modality)
    extras = pool["extras"]
    z = world.concepts[extras["labels"]]
    if "multilabels" in extras:
        # A clip is its main sound plus quieter others: z = (z_0 + w * sum z_j) / norm.
        w = float(world.cfg["audio_labels"]["secondary_weight"])
        rows = extras["multilabels"][:, 1:]
        others = np.where((rows >= 0)[..., None], world.concepts[np.maximum(rows, 0)], 0)
        z = (z + w * others.sum(1)) / np.sqrt(1 + w * w * (rows >= 0).sum(1, keepdims=True))
        z = z.astype(np.float32)
    if "vague" in extras:  # a caption that names only the category ("a dog")
        z = np.where(extras["vague"][:, None] == 1, world.coarse_means[extras["coarse"]], z)
    latents = world.instances_of(z, r)
    return dict(x=world.observe(latents, pool["views"], r), **pool)


def _partner_view(modality: str, partner: str) -> str:
    """The view of `modality` in a pair with `partner`: captions describe their partner."""
    if modality == "text":
        return f"caption_{partner}"
    if modality == "image":
        return "render" if partner == "point" else "photo"
    return modality


def _paired(world: World, split: str, a: str, b: str) -> dict[str, dict]:
    """A paired retrieval set: row i of `a` and row i of `b` share one instance."""
    per = int(world.cfg["per_concept"])
    labels = np.repeat(world.split[split], per)
    latents = world.instances(labels, _rng(world.seed, split, a, b, "instances"))
    out = {}
    for m, partner in ((a, b), (b, a)):
        views = np.array([_partner_view(m, partner)] * len(labels))
        x = world.observe(latents, views, _rng(world.seed, split, a, b, m))
        items = np.arange(len(labels), dtype=np.int64)
        extras = {"labels": labels.astype(np.int64), "items": items}
        if world.coarse is not None:
            extras["coarse"] = world.coarse[labels].astype(np.int64)
        out[m] = dict(x=x, views=views, extras=extras)
    return out


def benchmark_set(
    world: World, a: str, b: str, n_items: int, captions: int = 1, tag: str = "", split="test"
) -> dict[str, dict]:
    """A paired set of a benchmark's size: n_items items of the split's concepts, `captions` texts
    per item (COCO has 5). Same layout as the paired sets; not written to any cache."""
    r = _rng(world.seed, "benchmark", tag, a, b, "instances")
    labels = r.choice(world.split[split], n_items)
    latents = world.instances(labels, r)
    out = {}
    for m, partner in ((a, b), (b, a)):
        items = np.repeat(np.arange(n_items), captions if m == "text" else 1)
        views = np.array([_partner_view(m, partner)] * len(items))
        x = world.observe(latents[items], views, _rng(world.seed, "benchmark", tag, a, b, m))
        out[m] = dict(x=x, views=views, extras={"labels": labels[items], "items": items})
    return out


def _zeroshot(world: World, modality: str, multilabel: bool = False) -> dict[str, dict]:
    """Zero-shot classification: items of held-out classes plus class prompts (templates)."""
    zs = world.cfg["zeroshot"]
    classes = world.split["test"][: int(zs["classes"])]
    r = _rng(world.seed, "zeroshot", modality, multilabel)
    if multilabel:
        n = int(zs["multilabel_items"])
        pick = np.stack([r.choice(len(classes), 2, replace=False) for _ in range(n)])
        labels = np.zeros((n, len(classes)), np.uint8)
        np.put_along_axis(labels, pick, 1, axis=1)
        latents = world.instances(classes[pick], r)
    else:
        pick = np.repeat(np.arange(len(classes)), int(zs["per_class"]))
        labels = pick.astype(np.int64)
        latents = world.instances(classes[pick], r)
    views = np.array([_partner_view(modality, "text")] * len(latents))
    items = dict(x=world.observe(latents, views, r), views=views, extras={"labels": labels})
    # Prompts: the class concept itself (no instance noise) in a caption of this modality, with a
    # fixed style shift per template standing in for "a photo of a {}" vs "the sound of a {}".
    n_templates = int(zs["templates"])
    shifts = 0.5 * _rng(world.seed, "templates").standard_normal((n_templates, STYLE), np.float32)
    cls = np.repeat(np.arange(len(classes)), n_templates)
    tmpl = np.tile(np.arange(n_templates), len(classes))
    tviews = np.array([_partner_view("text", modality)] * len(cls))
    tx = world.observe(world.latents(classes[cls]), tviews, r, style_shift=shifts[tmpl])
    prompts = dict(
        x=tx,
        views=tviews,
        extras={"labels": cls.astype(np.int64), "template": tmpl.astype(np.int64)},
    )
    return {modality: items, "text": prompts}


def _video(world: World, split: str) -> dict[str, dict]:
    """Video-caption pairs (MSR-VTT-like, one caption each). A video is `frames` views of one
    instance, each with its own nuisance (pose, light: latent jitter) and a photo or render look;
    its cache is the `image` modality, frames embedded one by one and averaged (`frames` key).

    A video of a concept that makes a sound (`World.sounding`) also has an audio track: its
    instance heard through the audio view (`track`: observations and their rows), which joins the
    frames in the spaces whose `video.audio_track` is on. Its draws have a generator of their own,
    so the frames, captions and every cache without the option are as they were."""
    spec = world.cfg["video"]
    frames, jitter = int(spec["frames"]), float(spec["frame_noise"])
    labels = np.repeat(world.split[split], int(world.cfg["per_concept"]))
    n = len(labels)
    latents = world.instances(labels, _rng(world.seed, split, "video", "instances"))
    r = _rng(world.seed, split, "video", "image")
    look = np.where(r.random(n) < float(spec["render_fraction"]), "render", "photo")
    u = np.repeat(latents, frames, 0)
    u = u + jitter * r.standard_normal(u.shape, np.float32)
    views = np.repeat(look, frames)
    items = np.arange(n, dtype=np.int64)
    extras = {"labels": labels.astype(np.int64), "items": items}
    if world.coarse is not None:
        extras["coarse"] = world.coarse[labels].astype(np.int64)
    tviews = np.array(["caption_image"] * n)  # MSR-VTT captions describe what is seen
    tx = world.observe(latents, tviews, _rng(world.seed, split, "video", "text"))
    rows = np.flatnonzero(world.sounding(labels))
    aviews = np.array(["audio"] * len(rows))
    ax = world.observe(latents[rows], aviews, _rng(world.seed, split, "video", "audio"))
    return {
        "image": dict(
            x=world.observe(u, views, r),
            views=views,
            frames=frames,
            extras=extras,
            track=dict(x=ax, views=aviews, rows=rows),
        ),  # fmt: skip
        "text": dict(x=tx, views=tviews, extras=dict(extras)),
    }


def _datasets(world: World) -> dict[str, callable]:
    """Every dataset of the world: name -> function returning {modality: observations}."""
    out: dict[str, callable] = {"pool": lambda: {m: _pool(world, m) for m in MODALITIES}}
    for split in ("val", "test"):
        for a, b in PAIRS:
            out[f"{split}_{a}_{b}"] = lambda s=split, a=a, b=b: _paired(world, s, a, b)
        if world.cfg.get("video") is not None:
            out[f"{split}_video_text"] = lambda s=split: _video(world, s)
    for m in ("point", "audio", "image"):
        out[f"zs_{m}"] = lambda m=m: _zeroshot(world, m)
    out["zs_audio_multilabel"] = lambda: _zeroshot(world, "audio", multilabel=True)
    return out


def _dataset_modalities(name: str) -> tuple[str, ...]:
    if name == "pool":
        return MODALITIES
    if name.startswith("zs_"):
        return (name.split("_")[1], "text")
    if name.endswith("_video_text"):  # videos are cached as images (frames averaged)
        return ("image", "text")
    return tuple(name.split("_")[1:3])


WORLD_KEYS = (
    "seed", "n_concepts", "n_val_concepts", "n_test_concepts", "pool_size", "text_provenance",
    "render_fraction", "instance_noise", "observation_noise", "style_noise", "style_norm",
    "specialization", "per_concept", "zeroshot",
)  # fmt: skip
# The v2 keys enter a fingerprint only when set, so v1 caches keep their fingerprints.
V2_KEYS = (
    "hierarchy", "aspect_sharing", "pool_coverage", "audio_labels", "vague_captions", "calibrated",
    "video", "shared_noise",
)  # fmt: skip


def fingerprint(cfg: Mapping, space: Mapping | None = None) -> str:
    """A short hash of everything that decides a cache's bytes."""
    plain = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
    world = {k: plain(cfg[k]) for k in WORLD_KEYS}
    world.update({k: plain(cfg[k]) for k in V2_KEYS if cfg.get(k) not in (None, False)})
    blob = dict(world=world, space=plain(space) if space is not None else None, dtype=cfg["dtype"])
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def embed(
    world: World, dataset: str, name: str, modality: str, obs: Mapping
) -> tuple[np.ndarray, dict]:
    """Space `name`'s unit embeddings (n, d) of a dataset's observations of `modality`, and their
    per-row extras. A video is the mean of its frames' embeddings, re-normalised; where the
    space's `video.audio_track` is on, the audio tracks join (encoders/video.py's `join_audio`)
    and an `audio_track` extra marks the rows they joined."""
    r = _rng(world.seed, dataset, modality, world.rng_name(name, modality))
    shared = _rng(world.seed, dataset, modality, "shared noise")
    emb = world.encode(name, modality, obs["x"], obs["views"], r, shared=shared)
    extras = obs["extras"]
    if not obs.get("frames"):
        return emb, extras
    emb = emb.reshape(-1, obs["frames"], emb.shape[1]).mean(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    weight = world.spaces[name].get("audio_track")
    if weight is None:
        return emb, extras
    track, flags = obs["track"], np.zeros(len(emb), np.int8)
    ra = _rng(world.seed, dataset, "audio_track", world.rng_name(name, "audio"))
    rs = _rng(world.seed, dataset, "audio_track", "shared noise")
    audio = world.encode(name, "audio", track["x"], track["views"], ra, shared=rs)
    joined = join_audio(torch.from_numpy(emb[track["rows"]]), torch.from_numpy(audio), weight)
    emb[track["rows"]], flags[track["rows"]] = joined.numpy(), 1
    return emb, dict(extras, audio_track=flags)


def ensure_world(cfg: Mapping, spaces: Mapping[str, Mapping]) -> Path:
    """Write every missing cache of the world for the named spaces; return the world's root.

    An existing cache written with another configuration is refused unless `cfg.overwrite`.
    """
    root = Path(cfg["root"])
    world = World(cfg, spaces)
    for dataset, make in _datasets(world).items():
        todo = []
        for name, space in spaces.items():
            fp = fingerprint(cfg, {"name": name, **world.spaces[name]})
            for m in _dataset_modalities(dataset):
                if m not in space["dims"]:
                    continue
                d = cache_dir(root, dataset, name, m)
                existing = read_manifest(d) if d.exists() else None
                if existing is not None and existing.get("fingerprint") == fp:
                    continue
                if existing is not None and not cfg["overwrite"]:
                    raise CacheError(
                        f"{d}: an existing cache was written with a different world or space "
                        f"configuration (fingerprint {existing.get('fingerprint')} != {fp}); "
                        "pass data.overwrite=true to regenerate it"
                    )
                todo.append((name, m, d, fp))
        if not todo:
            continue
        log.info("world: writing %s for %s", dataset, sorted({t[0] for t in todo}))
        observations = make()
        for name, m, d, fp in todo:
            emb, extras = embed(world, dataset, name, m, observations[m])
            writer = CacheWriter(
                d, space=name, modality=m, dim=emb.shape[1], dtype=cfg["dtype"],
                normalized=True, fingerprint=fp, overwrite=True,
            )  # fmt: skip
            writer.append(emb, np.arange(len(emb), dtype=np.int64), **extras)
            writer.close(dataset=dataset, source="synthetic world")
    _write_oracle_tuples(cfg, root)
    _write_benchmarks(root, video=cfg.get("video") is not None)
    return root


def _write_oracle_tuples(cfg: Mapping, root: Path) -> None:
    """Ground-truth tuples: one pool item per modality, all of one concept (an upper bound)."""
    path = root / "tuples" / "oracle.npz"
    fp = f"{fingerprint(cfg)}-{int(cfg['oracle_tuples'])}"  # the count decides only this file
    if cache_is_complete(path.parent, fp) and path.exists():
        return
    world = World(cfg, {})
    r = _rng(world.seed, "oracle")
    pools = {m: _pool_meta(world, m)[1]["extras"] for m in MODALITIES}
    labels = {m: pools[m]["labels"] for m in MODALITIES}
    # Concepts with at least one item in every pool.
    counts = np.stack([np.bincount(labels[m], minlength=world.n_train) for m in MODALITIES])
    eligible = np.flatnonzero((counts > 0).all(0))
    n = int(cfg["oracle_tuples"])
    concepts = r.choice(eligible, n)
    table = {}
    for m in MODALITIES:
        order = np.argsort(labels[m], kind="stable")
        starts = np.searchsorted(labels[m][order], concepts)
        offset = (r.random(n) * counts[MODALITIES.index(m)][concepts]).astype(np.int64)
        table[m] = order[starts + offset]
    table["start"] = r.permutation(np.arange(n) % len(MODALITIES)).astype(np.int8)
    table["provenance"] = pools["text"]["provenance"][table["text"]]
    save_tuples(path, table, pool="pool", source="oracle")
    atomic_write_json(path.parent / "manifest.json", {"fingerprint": fp, "count": n})


def _write_benchmarks(root: Path, video: bool = False) -> None:
    """The benchmark manifests (val and test) that the evaluate stage and validation read.

    The format is documented in lightning_modules/evaluation/benchmarks.py. With video, a
    `world_video_text` row (MSR-VTT-like) follows the six modality pairs.
    """
    for split in ("val", "test"):
        videos = [
            dict(
                name="world_video_text", dataset=f"{split}_video_text", modalities=["video", "text"]
            )
        ]
        spec = dict(
            name=f"world-{split}",
            root=".",
            retrieval=[
                *(
                    dict(name=f"world_{a}_{b}", dataset=f"{split}_{a}_{b}", modalities=[a, b])
                    for a, b in PAIRS
                ),
                *(videos if video else []),
            ],
            zeroshot=[]
            if split == "val"
            else [
                *(
                    dict(name=f"world_{m}", dataset=f"zs_{m}", modality=m, multilabel=False)
                    for m in ("point", "audio", "image")
                ),
                dict(
                    name="world_audio_multilabel",
                    dataset="zs_audio_multilabel",
                    modality="audio",
                    multilabel=True,
                ),
            ],
        )
        atomic_write_json(root / f"benchmarks_{split}.json", spec)
