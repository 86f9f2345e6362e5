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
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamodules.cache import (
    CacheError,
    CacheWriter,
    atomic_write_json,
    cache_dir,
    cache_is_complete,
    read_manifest,
)
from datamodules.tuples import save_tuples
from encoders.modalities import MODALITIES, PAIRS, PROVENANCES

log = logging.getLogger(__name__)

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
        self.split = {
            "train": np.arange(self.n_train),
            "val": np.arange(self.n_train, self.n_train + n_val),
            "test": np.arange(self.n_train + n_val, total),
        }
        style = _rng(self.seed, "style").standard_normal((len(VIEWS), STYLE))
        style *= float(cfg["style_norm"]) / np.linalg.norm(style, axis=1, keepdims=True)
        self.style = {v: style[i].astype(np.float32) for i, v in enumerate(VIEWS)}
        self._weights: dict[str, tuple] = {}  # drawing a space's encoder costs more than using it

    def _check_space(self, name: str, space: Mapping) -> dict:
        world = space.get("world")
        if world is None:
            raise ValueError(
                f"space {name!r} has no `world` block, so the synthetic world cannot simulate it"
            )
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
        return dict(dims=dict(space["dims"]), attend=dict(world["attend"]), noise=noise)

    def encoder_weights(self, name: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """W1 (80, 2d), W2 (2d, d) and per-modality offsets of space `name` (fixed by the seed)."""
        if name in self._weights:
            return self._weights[name]
        space = self.spaces[name]
        dims = set(space["dims"].values())
        if len(dims) != 1:
            raise ValueError(
                f"space {name!r}: the world needs one dim for all modalities, got {dims}"
            )
        d = dims.pop()
        h, din = 2 * d, LATENT + STYLE
        r = _rng(self.seed, "encoder", name)
        w1 = (r.standard_normal((din, h)) / np.sqrt(din)).astype(np.float32)
        w2 = (r.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
        off = {m: (0.2 * r.standard_normal(d)).astype(np.float32) for m in MODALITIES}
        self._weights[name] = (w1, w2, off)
        return w1, w2, off

    def instances(self, concepts: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """Instance latents (n, 64) of the given concept rows (a row may mix concepts: (n, k))."""
        z = self.concepts[concepts]
        if z.ndim == 3:  # multi-concept items: the normalised sum of their concepts
            z = z.sum(1) / np.sqrt(z.shape[1])
        return z + float(self.cfg["instance_noise"]) * r.standard_normal(z.shape, np.float32)

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
    ) -> np.ndarray:
        """L2-normalised embeddings (n, d) of observations x in space `name`."""
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
        for i in range(0, len(x), chunk):
            xt = gain * x[i : i + chunk] + sigma[i : i + chunk] * r.standard_normal(
                x[i : i + chunk].shape, np.float32
            )
            out[i : i + chunk] = np.tanh(xt @ w1) @ w2 + off[modality]
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- datasets
# A dataset is described by a function that returns, per modality, the observations, views and
# per-row extras. The encoding into each space happens afterwards, per space.


def _text_views(provenance: np.ndarray) -> np.ndarray:
    return np.array([f"caption_{PROVENANCES[p]}" for p in provenance])


def _pool_meta(world: World, modality: str) -> tuple[np.random.Generator, dict]:
    """The draws of an unpaired training pool before observation: labels, views, extras."""
    cfg = world.cfg
    n = int(cfg["pool_size"][modality])
    r = _rng(world.seed, "pool", modality)
    labels = r.choice(world.split["train"], n)
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
    return r, dict(views=views, extras=extras)


def _pool(world: World, modality: str) -> dict:
    """An unpaired training pool of one modality, drawn from the train concepts."""
    r, pool = _pool_meta(world, modality)
    latents = world.instances(pool["extras"]["labels"], r)
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
        out[m] = dict(x=x, views=views, extras={"labels": labels.astype(np.int64), "items": items})
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
    tx = world.observe(world.concepts[classes[cls]], tviews, r, style_shift=shifts[tmpl])
    prompts = dict(
        x=tx,
        views=tviews,
        extras={"labels": cls.astype(np.int64), "template": tmpl.astype(np.int64)},
    )
    return {modality: items, "text": prompts}


def _datasets(world: World) -> dict[str, callable]:
    """Every dataset of the world: name -> function returning {modality: observations}."""
    out: dict[str, callable] = {"pool": lambda: {m: _pool(world, m) for m in MODALITIES}}
    for split in ("val", "test"):
        for a, b in PAIRS:
            out[f"{split}_{a}_{b}"] = lambda s=split, a=a, b=b: _paired(world, s, a, b)
    for m in ("point", "audio", "image"):
        out[f"zs_{m}"] = lambda m=m: _zeroshot(world, m)
    out["zs_audio_multilabel"] = lambda: _zeroshot(world, "audio", multilabel=True)
    return out


def _dataset_modalities(name: str) -> tuple[str, ...]:
    if name == "pool":
        return MODALITIES
    if name.startswith("zs_"):
        return (name.split("_")[1], "text")
    return tuple(name.split("_")[1:3])


WORLD_KEYS = (
    "seed", "n_concepts", "n_val_concepts", "n_test_concepts", "pool_size", "text_provenance",
    "render_fraction", "instance_noise", "observation_noise", "style_noise", "style_norm",
    "specialization", "per_concept", "zeroshot",
)  # fmt: skip


def fingerprint(cfg: Mapping, space: Mapping | None = None) -> str:
    """A short hash of everything that decides a cache's bytes."""
    plain = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
    world = {k: plain(cfg[k]) for k in WORLD_KEYS}
    blob = dict(world=world, space=plain(space) if space is not None else None, dtype=cfg["dtype"])
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            obs = observations[m]
            emb = world.encode(name, m, obs["x"], obs["views"], _rng(world.seed, dataset, m, name))
            writer = CacheWriter(
                d, space=name, modality=m, dim=emb.shape[1], dtype=cfg["dtype"],
                normalized=True, fingerprint=fp, overwrite=True,
            )  # fmt: skip
            writer.append(emb, np.arange(len(emb), dtype=np.int64), **obs["extras"])
            writer.close(dataset=dataset, source="synthetic world")
    _write_oracle_tuples(cfg, root)
    _write_benchmarks(root)
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


def _write_benchmarks(root: Path) -> None:
    """The benchmark manifests (val and test) that the evaluate stage and validation read.

    The format is documented in lightning_modules/evaluate.py.
    """
    for split in ("val", "test"):
        spec = dict(
            name=f"world-{split}",
            root=".",
            retrieval=[
                dict(name=f"world_{a}_{b}", dataset=f"{split}_{a}_{b}", modalities=[a, b])
                for a, b in PAIRS
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
