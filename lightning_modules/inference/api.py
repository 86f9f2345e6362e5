"""The OmniBind API: an omni model as an embedding model, loadable from any export or the Hub.

    bind = OmniBind.from_pretrained("outputs/omni/base/routed")  # any export, or a Hub id
    bind.save_pretrained("my-omnibind", results="runs/main/results.md")  # Hub-style directory
    z = bind.embed_spaces({"wavcaps": {"audio": a}, ...})       # {modality: (n, omni_dim)}
    z = OmniBind.load(d, encoders={...}).embed(audio=[...], text=["a dog barks"])
    gallery = build_gallery(bind, root, "test_audio_text", "audio", "gallery/audio")
    scores, rows = gallery.search(compose(z, {"audio": 1.0, "text": 0.5}), k=5)

`save_pretrained` writes what huggingface_hub's ModelHubMixin expects: model.safetensors,
config.json (the omni layout and the weights' sha256) and a generated model card (README.md).
`from_pretrained` reads that, or a route/convert export (omni.safetensors + omni.json).

Omni embeddings are L2-normalised; a gallery is an embedding cache (datamodules/cache.py) of
them, searched exactly (blocked matmul or faiss, lightning_modules/pairing/search.py; on equal
scores the lower row wins).

"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# First, before huggingface_hub: it sets the offline default (see there).
from lightning_modules.runtime.config import hub_files

# isort: split
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download

from datamodules import artifacts
from datamodules.artifacts import CacheError, file_sha256
from datamodules.cache import EmbeddingCache, cache_dir
from encoders import build_encoder, encoder_class
from encoders.modalities import MODALITIES, check_modality, resolve_device
from lightning_modules.inference.card import model_card_text
from lightning_modules.omni import export
from lightning_modules.omni.export import OMNI_META, OMNI_WEIGHTS, layout_of, load_omni
from lightning_modules.omni.model import WEIGHTINGS, OmniModel
from lightning_modules.pairing.search import pool_rows

# What save_pretrained writes (Hugging Face conventions) and the config.json format tag.
HUB_WEIGHTS, HUB_CONFIG, HUB_CARD = "model.safetensors", "config.json", "README.md"
HUB_FORMAT = "omnibind-omni/1"


class OmniBind(
    ModelHubMixin,
    library_name="omnibind",
    tags=["omnibind", "multimodal", "embeddings", "retrieval"],
    paper_url="https://arxiv.org/abs/2407.11895",
):
    """An omni model for use: embeddings from per-space embeddings or raw items.

    encoders: {space: encoder}, each taking {modality: [raw items]} to {modality: (n, dim_space)}
    L2-normalised embeddings: an `encoders.base.Encoder` (its `encode`) or any such callable.
    """

    def __init__(
        self,
        model: OmniModel,
        encoders: Mapping[str, Any] | None = None,
        weighting: str = "routed",
        device: str | torch.device = "cpu",
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting is {weighting!r}; expected one of {list(WEIGHTINGS)}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.directory: Path | None = None  # the export it was loaded from, if any
        self.weights_sha256: str | None = None  # of the weights file it was loaded from, if any
        self.encoders = dict(encoders or {})
        self.weighting = weighting
        # Spaces whose modality is another space's embedding (Uni3D's image/text are EVA02-E's).
        self.shares: dict[str, dict[str, str]] = model.layout.shares

    @classmethod
    def load(
        cls,
        directory: str | Path,
        encoders: Mapping[str, Any] | None = None,
        weighting: str = "routed",
        device: str | torch.device = "cpu",
    ) -> OmniBind:
        """From an omni export directory (stage=route or stage=convert)."""
        bind = cls(load_omni(directory), encoders, weighting, device)
        bind.directory = Path(directory)
        bind.weights_sha256 = file_sha256(bind.directory / OMNI_WEIGHTS)  # verified on load
        return bind

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        encoders: Mapping[str, Any] | None = None,
        weighting: str | None = None,
        device: str | torch.device = "cpu",
        **hub_kwargs: Any,
    ) -> OmniBind:
        """From a save_pretrained directory, a Hub id, or a route/convert export directory.

        weighting: None keeps the saved one. hub_kwargs (revision, cache_dir, token,
        local_files_only, force_download) go to huggingface_hub for Hub ids. The weights are
        checked against the sha256 in config.json before use.
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and not (path / HUB_CONFIG).exists():
            if not (path / OMNI_META).exists():
                raise CacheError(f"{path}: neither a save_pretrained directory ({HUB_CONFIG}) "
                                 f"nor an omni export ({OMNI_META})")  # fmt: skip
            return cls.load(path, encoders, weighting or "routed", device)
        chosen = {"encoders": encoders, "weighting": weighting, "device": device}
        model_kwargs = {k: v for k, v in chosen.items() if v is not None}
        with hub_files(f"model {str(pretrained_model_name_or_path)!r}"):
            return super().from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs, **model_kwargs
            )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict | None = None,
        encoders: Mapping[str, Any] | None = None,
        weighting: str = "routed",
        device: str | torch.device = "cpu",
    ) -> OmniBind:
        """ModelHubMixin's hook: config.json is read already; fetch, verify and load the weights."""
        where = f"{model_id}/{HUB_CONFIG}"
        if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
            found = config.get("format") if isinstance(config, dict) else None
            raise CacheError(f"{where}: not an OmniBind config (format {found!r}, expected "
                             f"{HUB_FORMAT!r}); write one with save_pretrained")  # fmt: skip
        if os.path.isdir(model_id):
            weights = Path(model_id) / HUB_WEIGHTS
        else:
            weights = Path(hf_hub_download(
                repo_id=model_id, filename=HUB_WEIGHTS, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            ))  # fmt: skip
        if config.get("sha256") is None:
            raise CacheError(f"{where}: records no sha256 of {HUB_WEIGHTS}; save it again")
        model = OmniModel(layout_of(config.get("omni") or {}, where))
        export.read_weights(model, weights, config["sha256"], where,
                            "save it again with save_pretrained, or download it again "
                            "(force_download=True)")  # fmt: skip
        bind = cls(model, encoders, weighting, device)
        bind.directory, bind.weights_sha256 = weights.parent, config["sha256"]
        return bind

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        results: str | Path | None = None,
        command: str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Write model.safetensors, config.json and a model card (README.md) into a directory.

        results: a results.md path or the table's markdown (default: results.md of the export it
        was loaded from, if there is one). command: the training command (default: the export's
        `command`). Other arguments are ModelHubMixin.save_pretrained's (push_to_hub, repo_id).
        """
        # The card describes these weights: an old one in the directory would be kept otherwise.
        (Path(save_directory) / HUB_CARD).unlink(missing_ok=True)
        card = {"results": results, "command": command, **(model_card_kwargs or {})}
        return super().save_pretrained(save_directory, model_card_kwargs=card, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """ModelHubMixin's hook: the weights (safetensors), then config.json with their sha256."""
        config = dict(format=HUB_FORMAT, weighting=self.weighting, omni=self.model.layout.to_dict())
        export.write(save_directory, HUB_WEIGHTS, HUB_CONFIG, self.model, config)

    def generate_model_card(
        self, results: str | Path | None = None, command: str | None = None, **kwargs: Any
    ) -> ModelCard:
        """A model card: the spaces, the routing groups, the tuple source, results and command."""
        return ModelCard(
            f"---\n{self._hub_mixin_info.model_card_data.to_yaml()}\n---\n"
            + model_card_text(self, self._results_table(results), command)
        )

    def _results_table(self, results: str | Path | None) -> str | None:
        if results is None:
            beside = self.directory / "results.md" if self.directory else None
            return beside.read_text() if beside and beside.is_file() else None
        if isinstance(results, Path) or ("\n" not in results and results.endswith(".md")):
            if not Path(results).is_file():
                raise FileNotFoundError(f"results={str(results)!r}: no such results file")
            return Path(results).read_text()
        return results

    def fingerprint(self) -> str:
        """A hash of the weights and the weighting: what a gallery of this model depends on."""
        weights = self.weights_sha256
        if weights is None:  # built in memory: hash the tensors themselves
            h = hashlib.sha256()
            for key, value in self.model.state_dict().items():
                h.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
            weights = h.hexdigest()
        return artifacts.fingerprint([self.weighting, weights])

    @property
    def modalities(self) -> list[str]:
        return self.model.layout.modalities

    @property
    def dim(self) -> int:
        """The omni dim (the anchor's)."""
        return self.model.layout.out_dim

    def needed(self, modality: str) -> list[str]:
        """The spaces whose `modality` embeddings the model reads."""
        if modality not in self.model.layout.groups:
            raise ValueError(f"the omni model embeds {self.modalities}, not {modality!r}")
        return self.model.needed_spaces(modality)

    def source(self, space: str, modality: str) -> str:
        """The space whose embedding stands for `space`'s `modality` (itself unless shared)."""
        return self.shares.get(space, {}).get(modality, space)

    @torch.no_grad()
    def embed_spaces(
        self, inputs: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """{space: {modality: (n, dim_space)}} -> {modality: (n, omni_dim)}, L2-normalised.

        Every modality that some input carries is embedded, and needs every space of `needed`.
        """
        offered = {m for per in inputs.values() for m in per}
        for m in offered:
            check_modality(m, "embed_spaces inputs")
        out = {}
        for m in [m for m in MODALITIES if m in offered]:
            per_space, missing = {}, []
            for space in self.needed(m):
                x = inputs.get(space, {}).get(m)
                if x is None:
                    x = inputs.get(self.source(space, m), {}).get(m)
                if x is None:
                    src = self.source(space, m)
                    missing.append(space if src == space else f"{space} (or {src})")
                    continue
                per_space[space] = self._check(torch.as_tensor(x), space, m)
            if missing:
                raise ValueError(f"{m}: no embeddings of spaces {missing}; this omni model reads "
                                 f"{m} from {self.needed(m)}")  # fmt: skip
            rows = {s: len(x) for s, x in per_space.items()}
            if len(set(rows.values())) != 1:
                raise ValueError(f"{m}: spaces disagree on the number of rows {rows}")
            out[m] = self.model.embed_spaces(m, per_space, self.weighting)
        return out

    def _check(self, x: torch.Tensor, space: str, modality: str) -> torch.Tensor:
        layout = self.model.layout
        want = self.dim if space == layout.anchor else layout.spaces.get(space, {}).get("dims", {})
        want = want.get(modality) if isinstance(want, dict) else want
        if x.ndim != 2 or (want is not None and x.shape[1] != want):
            raise ValueError(f"{space}/{modality}: embeddings of shape {tuple(x.shape)}, expected "
                             f"(n, {want if want is not None else 'dim'})")  # fmt: skip
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def embed(
        self,
        *,
        point: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        image: Sequence[Any] | None = None,
        text: Sequence[Any] | None = None,
        video: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw items per modality (paths, PIL images, waveforms, strings) -> omni embeddings.

        video: frame folders, .npy clips or video files; as in the paper, their sampled frames go
        through the image encoders (averaged, re-normalised) and the image router and groups.
        """
        raw = {
            m: list(x)
            for m, x in zip(MODALITIES, (point, audio, image, text), strict=True)
            if x is not None
        }
        out = self._embed(raw) if raw else {}
        if video is not None:
            out["video"] = self._embed({"image": list(video)}, read_as={"image": "video"})["image"]
        return out

    def _embed(
        self, raw: dict[str, list], read_as: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """{modality: raw items} through the spaces' encoders (an item of modality m is read
        as read_as[m], e.g. a video for the image side) and the omni model."""
        read_as = dict(read_as or {})
        calls: dict[str, list[str]] = {}  # encoder space -> modalities it embeds here
        for m in raw:
            for space in self.needed(m):
                calls.setdefault(self.source(space, m), [])
                if m not in calls[self.source(space, m)]:
                    calls[self.source(space, m)].append(m)
        for space in calls:  # the spaces' own encoders, as the route stage recorded them
            if space not in self.encoders and space in self.model.layout.encoders:
                self.encoders[space] = self._build_encoder(space)
        absent = sorted(s for s in calls if s not in self.encoders)
        if absent:
            raise ValueError(f"no encoders for spaces {absent}; pass OmniBind(..., encoders="
                             f"{{space: encoder}}) for every space in {sorted(calls)}")  # fmt: skip
        inputs = {}
        for space, mods in calls.items():
            encoder = self.encoders[space]
            encode = getattr(encoder, "encode", encoder)
            got = encode({read_as.get(m, m): raw[m] for m in mods})
            got = {m: got[read_as[m]] for m in mods if read_as.get(m) in got} | got
            for m in mods:
                if m not in got or len(got[m]) != len(raw[m]):
                    shape = tuple(got[m].shape) if m in got else None
                    raise ValueError(f"encoder of {space!r} returned {m} embeddings {shape}, "
                                     f"expected {len(raw[m])} rows")  # fmt: skip
            inputs[space] = {m: got[m] for m in mods}
        return self.embed_spaces(inputs)

    def _build_encoder(self, space: str):
        """The frozen encoder of `space` from the export's `encoders` record."""
        record = self.model.layout.encoders[space]
        if encoder_class(record["encoder"]).precomputed:
            raise ValueError(f"space {space!r} reads precomputed dumps, which cannot embed a new "
                             "item; pass OmniBind(..., encoders={space: encoder})")  # fmt: skip
        with hub_files(f"the encoder of space {space!r}"):
            return build_encoder(record["encoder"], record["dims"]).to(self.device)

    @torch.no_grad()
    def embed_rows(
        self, root: str | Path, dataset: str, modality: str, rows: Sequence[int] | slice
    ) -> torch.Tensor:
        """Omni embeddings (len(rows), omni_dim) of rows of a dataset's per-space caches."""
        inputs, count = {}, None
        for space in self.needed(modality):
            cache = EmbeddingCache(cache_dir(root, dataset, space, modality))
            if count is not None and cache.count != count:
                raise CacheError(f"{cache.directory}: {cache.count} rows, other spaces {count}")
            count = cache.count
            data = pool_rows(cache)
            if isinstance(rows, slice):
                x = np.asarray(data[rows], dtype=np.float32)
            else:
                bad = [r for r in rows if not 0 <= r < count]
                if bad:
                    raise IndexError(f"{cache.directory}: rows {bad} outside [0, {count})")
                x = np.stack([np.asarray(data[r : r + 1][0], dtype=np.float32) for r in rows])
            inputs[space] = {modality: torch.from_numpy(x)}
        return self.embed_spaces(inputs)[modality]


def compose(
    embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
) -> torch.Tensor:
    """A composed query normalize(sum_k w_k * e_k) of (n, dim) or (dim,) embeddings (w_k = 1).

    Keys are any labels (usually modalities, as `embed` returns them); rows broadcast, so one
    (1, dim) text can steer n audio queries. Negative weights subtract a concept.
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(embeddings))
    if unknown:
        raise ValueError(f"weights for {unknown}, which are not among {sorted(embeddings)}")
    if not embeddings:
        raise ValueError("compose needs at least one embedding")
    parts = [float(weights.get(k, 1.0)) * F.normalize(torch.atleast_2d(e).float(), dim=-1)
             for k, e in embeddings.items()]  # fmt: skip
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise ValueError(f"embeddings of different dims {dims} cannot be composed")
    return F.normalize(torch.stack(torch.broadcast_tensors(*parts)).sum(0), dim=-1)
