"""The inference API: embeddings from per-space embeddings and from raw items (fake encoders),
composed queries, gallery caches searched exactly, and the search CLI on the small world."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

from datamodules.artifacts import CacheError, CorruptFileError, sha256_file
from datamodules.cache import EmbeddingCache, cache_dir
from lightning_modules.evaluation.methods import embed_cached
from lightning_modules.inference import Gallery, OmniBind, build_gallery, compose
from lightning_modules.inference.api import HUB_CARD, HUB_CONFIG, HUB_WEIGHTS
from lightning_modules.inference.cli import main
from lightning_modules.omni.export import save_omni
from lightning_modules.omni.layout import OmniLayout
from lightning_modules.omni.model import OmniModel

ANCHOR, OMNI = "eva_clip_18b", 1536
# The small world's spaces (tests/conftest.py WORLD_SPACES) and their real dims.
DIMS = {
    "clap": {"audio": 512, "text": 512},
    "imagebind": {"audio": 1024, "image": 1024, "text": 1024},
    "uni3d": {"point": 1024, "image": 1024, "text": 1024},
}


def tiny_model(seed: int = 0, shares: dict | None = None) -> OmniModel:
    """A route-export-like omni model over the small world's spaces, with random weights."""
    torch.manual_seed(seed)
    meta = dict(
        variant="tiny",
        kind="routed",
        anchor=ANCHOR,
        groups=dict(point=["uni3d"], audio=["clap", "imagebind"],
                    image=["imagebind", "uni3d", ANCHOR],
                    text=["clap", "imagebind", "uni3d", ANCHOR]),
        predictors=dict(point=["uni3d"], audio=["clap"], image=["imagebind"],
                        text=["clap", "uni3d"]),
        predictor_dims=dict(point=1024, audio=512, image=1024, text=1536),
        scales=dict(point=1.0, audio=1.0, image=1.0, text=10.0),
        spaces={s: dict(space=s, anchor=ANCHOR, dims=d, out_dim=OMNI, hidden_dim=16,
                        experts=["mix", "A"], renormalize=False) for s, d in DIMS.items()},
    )  # fmt: skip
    if shares:
        meta["shares"] = shares
    model = OmniModel(OmniLayout.from_dict(meta))
    for router in model.routers.values():  # spread the router scores: routing must matter
        torch.nn.init.normal_(router.router[6].weight, std=3.0)
    return model.eval()


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def per_space(n: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    dims = DIMS | {ANCHOR: {"image": OMNI, "text": OMNI}}
    return {s: {m: unit(n, d, 7 * i + j) for j, (m, d) in enumerate(dm.items())}
            for i, (s, dm) in enumerate(dims.items())}  # fmt: skip


class FakeEncoder:
    """{modality: raw items} -> a fixed unit vector per (space, item): stands in for encoders/."""

    def __init__(self, name: str, dims: dict[str, int]) -> None:
        self.name, self.dims, self.calls = name, dims, []

    def vector(self, modality: str, item: str) -> torch.Tensor:
        seed = zlib.crc32(f"{self.name}/{modality}/{item}".encode())
        return unit(1, self.dims[modality], seed)[0]

    def encode(self, raw: dict[str, list]) -> dict[str, torch.Tensor]:
        self.calls.append(sorted(raw))
        return {m: torch.stack([self.vector(m, x) for x in items]) for m, items in raw.items()}


# ---------------------------------------------------------------------------- embedding


def test_embed_spaces_equals_the_omni_model() -> None:
    model = tiny_model()
    bind = OmniBind(model)
    inputs = per_space()
    out = bind.embed_spaces(inputs)
    assert set(out) == {"point", "audio", "image", "text"}
    for m, z in out.items():
        direct = model.embed_spaces(m, {s: e[m] for s, e in inputs.items() if m in e})
        assert torch.equal(z, direct)
        assert z.shape == (5, OMNI) and torch.allclose(z.norm(dim=1), torch.ones(5))
    average = OmniBind(model, weighting="average").embed_spaces(inputs)
    assert (average["text"] - out["text"]).norm(dim=1).max() > 0.05  # the routers do something
    only_audio = bind.embed_spaces(
        {s: {"audio": e["audio"]} for s, e in inputs.items() if "audio" in e}
    )
    assert set(only_audio) == {"audio"} and torch.equal(only_audio["audio"], out["audio"])


def test_embed_spaces_errors_name_what_is_wrong() -> None:
    bind = OmniBind(tiny_model())
    inputs = per_space()
    no_clap = {s: e for s, e in inputs.items() if s != "clap"}
    with pytest.raises(ValueError, match="clap"):
        bind.embed_spaces(no_clap)
    wrong = dict(inputs, uni3d={"point": torch.zeros(5, 512)})
    with pytest.raises(ValueError, match=r"uni3d/point.*\(n, 1024\)"):
        bind.embed_spaces(wrong)
    short = dict(inputs, clap={"audio": inputs["clap"]["audio"][:3]})
    with pytest.raises(ValueError, match="number of rows"):
        bind.embed_spaces({s: {"audio": e["audio"]} for s, e in short.items() if "audio" in e})
    with pytest.raises(ValueError, match="video"):
        bind.embed_spaces({"clap": {"video": torch.zeros(1, 512)}})
    with pytest.raises(ValueError, match="weighting"):
        OmniBind(tiny_model(), weighting="best")


def test_embed_raw_items_through_encoders() -> None:
    dims = DIMS | {ANCHOR: {"image": OMNI, "text": OMNI}}
    encoders = {s: FakeEncoder(s, d) for s, d in dims.items()}
    plain = encoders.pop("clap")
    encoders["clap"] = lambda raw: plain.encode(raw)  # a bare callable works too
    bind = OmniBind(tiny_model(), encoders=encoders)
    texts, audio = ["a dog barks", "rain on a roof"], ["dog.wav", "rain.wav"]
    out = bind.embed(text=texts, audio=audio)
    assert set(out) == {"audio", "text"}
    expect = {
        s: {m: torch.stack([e.vector(m, x) for x in items]) for m, items in
            (("text", texts), ("audio", audio)) if m in e.dims}
        for s, e in {**encoders, "clap": plain}.items()
    }  # fmt: skip
    want = bind.embed_spaces(expect)
    for m in out:
        assert torch.equal(out[m], want[m])
    assert encoders["imagebind"].calls == [["audio", "text"]]  # one call per encoder
    assert encoders["uni3d"].calls == [["text"]]
    partial = {"imagebind": encoders["imagebind"], ANCHOR: encoders[ANCHOR]}
    with pytest.raises(ValueError, match=r"no encoders for spaces \['uni3d'\]"):
        OmniBind(tiny_model(), encoders=partial).embed(image=["x.png"])


def test_encoders_package_interface_plugs_in() -> None:
    """An encoders.base.Encoder (raw items -> processor -> embed -> L2-normalised) is used as is."""
    from encoders.base import Encoder, Processor

    class Lookup(Encoder):
        def __init__(self, name: str, dims: dict[str, int]) -> None:
            super().__init__(dims, Processor())
            self.fake = FakeEncoder(name, dims)

        def embed(self, modality: str, batch: list) -> torch.Tensor:
            return 3.0 * torch.stack([self.fake.vector(modality, x) for x in batch])  # unnormalised

    dims = DIMS | {ANCHOR: {"image": OMNI, "text": OMNI}}
    real = OmniBind(tiny_model(), encoders={s: Lookup(s, d) for s, d in dims.items()})
    fake = OmniBind(tiny_model(), encoders={s: FakeEncoder(s, d) for s, d in dims.items()})
    texts = ["a violin", "a truck"]
    # normalize(3 v) equals v only up to float32 rounding, which the routers carry into the
    # output (measured 7e-8): compare to 1e-6, far below any real difference of encoders.
    torch.testing.assert_close(
        real.embed(text=texts)["text"], fake.embed(text=texts)["text"], atol=1e-6, rtol=0
    )


def test_shared_sides_use_the_other_spaces_encoder() -> None:
    """Like Uni3D, whose image and text are EVA02-E's: uni3d's text here is imagebind's."""
    shares = {"uni3d": {"text": "imagebind"}}
    dims = DIMS | {ANCHOR: {"image": OMNI, "text": OMNI}}
    encoders = {s: FakeEncoder(s, d) for s, d in dims.items()}
    encoders["uni3d"] = FakeEncoder("uni3d", {"point": 1024, "image": 1024})  # no text side
    bind = OmniBind(tiny_model(shares=shares), encoders=encoders)
    got = bind.embed(text=["a chair"])["text"]
    assert encoders["uni3d"].calls == [] and encoders["imagebind"].calls == [["text"]]
    raw = {s: {"text": e.vector("text", "a chair")[None]} for s, e in encoders.items()
           if "text" in e.dims}  # fmt: skip
    explicit = dict(raw, uni3d={"text": raw["imagebind"]["text"]})
    assert torch.equal(got, OmniBind(tiny_model()).embed_spaces(explicit)["text"])


# ---------------------------------------------------------------------------- Hub-style files


def trained_model(seed: int = 0) -> OmniModel:
    """tiny_model with BatchNorm statistics moved off their defaults, as training leaves them:
    a save/load that dropped buffers would then change the outputs."""
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    return model


def test_save_pretrained_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = trained_model()
    model.layout = model.layout.replace(
        record={"pairs": "outputs/pairs/tuples.npz", "command": "python train.py variant=tiny"}
    )
    bind = OmniBind(model)
    (tmp_path / "results.md").write_text("| method | mean R@1 |\n|---|---|\n| omni | 42.0 |\n")
    out = tmp_path / "hub"
    bind.save_pretrained(out, results=tmp_path / "results.md")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [HUB_CARD, HUB_CONFIG, HUB_WEIGHTS]
    )
    config = json.loads((out / HUB_CONFIG).read_text())
    assert config["sha256"] == sha256_file(out / HUB_WEIGHTS)
    assert config["omni"] == model.layout.to_dict()

    loaded = OmniBind.from_pretrained(out)
    inputs = per_space()
    for weighting in ("routed", "average"):
        want = OmniBind(model, weighting=weighting).embed_spaces(inputs)
        got = OmniBind.from_pretrained(out, weighting=weighting).embed_spaces(inputs)
        assert all(torch.equal(got[m], want[m]) for m in want)
    assert loaded.model.layout == model.layout and loaded.weighting == "routed"
    assert loaded.fingerprint() == OmniBind.from_pretrained(out).fingerprint()

    card = ModelCard.load(out / HUB_CARD)
    assert card.data.library_name == "omnibind" and "model_hub_mixin" in card.data.tags
    for text in (*DIMS, ANCHOR, "outputs/pairs/tuples.npz", "| omni | 42.0 |",
                 "python train.py variant=tiny", "| text | `clap`, `imagebind`"):  # fmt: skip
        assert text in card.text, text


def test_saved_weighting_is_kept_and_card_is_regenerated(tmp_path: Path) -> None:
    out = tmp_path / "hub"
    OmniBind(trained_model(), weighting="average").save_pretrained(out, results="| a | b |")
    assert OmniBind.from_pretrained(out).weighting == "average"
    assert "| a | b |" in (out / HUB_CARD).read_text()
    OmniBind(trained_model()).save_pretrained(out)  # the same directory, another model
    card = (out / HUB_CARD).read_text()
    assert "| a | b |" not in card and "No results table" in card and "Not recorded" in card
    with pytest.raises(FileNotFoundError, match="nowhere/results.md"):
        OmniBind(trained_model()).save_pretrained(out, results="nowhere/results.md")


def test_route_export_loads_through_from_pretrained(tmp_path: Path) -> None:
    model = trained_model()
    export = save_omni(model, tmp_path / "omni")  # what stage=route and stage=convert write
    (export / "results.md").write_text("| beside | the export |\n")
    bind = OmniBind.from_pretrained(export, weighting="average")
    inputs = per_space()
    want = OmniBind(model, weighting="average").embed_spaces(inputs)
    assert all(torch.equal(bind.embed_spaces(inputs)[m], want[m]) for m in want)
    bind.save_pretrained(tmp_path / "hub")  # results.md beside the export goes into the card
    assert "| beside | the export |" in (tmp_path / "hub" / HUB_CARD).read_text()
    # An export's own digest of omni.safetensors (omni.json `sha256`) is not carried over.
    meta = json.loads((export / "omni.json").read_text())
    digest = sha256_file(export / "omni.safetensors")
    (export / "omni.json").write_text(json.dumps({**meta, "sha256": digest}))
    recorded = OmniBind.from_pretrained(export, weighting="average")
    assert recorded.weights_sha256 == digest and recorded.fingerprint() == bind.fingerprint()
    recorded.save_pretrained(tmp_path / "hub2")
    assert "sha256" not in json.loads((tmp_path / "hub2" / HUB_CONFIG).read_text())["omni"]
    assert bind.fingerprint() == OmniBind.load(export, weighting="average").fingerprint()


def test_corrupt_or_foreign_files_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "hub"
    OmniBind(trained_model()).save_pretrained(out)
    recorded = json.loads((out / HUB_CONFIG).read_text())["sha256"]
    data = bytearray((out / HUB_WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # one mantissa bit of a weight: loads fine, silently different
    (out / HUB_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as e:
        OmniBind.from_pretrained(out)
    message = str(e.value)
    assert str(out / HUB_WEIGHTS) in message and recorded in message
    assert sha256_file(out / HUB_WEIGHTS) in message and "save_pretrained" in message

    (out / HUB_CONFIG).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheError, match="not an OmniBind config"):
        OmniBind.from_pretrained(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="neither a save_pretrained directory"):
        OmniBind.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------- composing


def test_compose() -> None:
    a, b = unit(3, 8, 1), unit(1, 8, 2)
    assert torch.allclose(compose({"a": a}), a)
    assert torch.allclose(compose({"a": a, "b": b}, {"b": 0.0}), a)
    both = compose({"audio": a, "text": b}, {"audio": 1.0, "text": 0.5})
    assert torch.allclose(both, F.normalize(a + 0.5 * b, dim=-1))  # b broadcasts over a's rows
    assert torch.allclose(compose({"x": a[0], "y": a[0]}, {"y": -0.5}), a[:1])
    with pytest.raises(ValueError, match="typo"):
        compose({"a": a}, {"typo": 1.0})
    with pytest.raises(ValueError, match="different dims"):
        compose({"a": a, "c": unit(1, 4, 3)})


# ---------------------------------------------------------------------------- galleries


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return save_omni(tiny_model(), tmp_path / "omni")


def test_gallery_is_the_omni_cache_and_search_is_exact(
    small_world: Path, export: Path, tmp_path: Path
) -> None:
    bind = OmniBind.load(export)
    out = tmp_path / "gallery"
    gallery = build_gallery(bind, small_world, "test_audio_text", "audio", out, dtype="float32",
                            chunk=128)  # fmt: skip
    full = embed_cached(bind.model, small_world, "test_audio_text", "audio")
    stored = torch.from_numpy(gallery.cache.load())
    assert torch.allclose(stored, full, atol=1e-6)
    source = EmbeddingCache(cache_dir(small_world, "test_audio_text", "clap", "audio"))
    assert np.array_equal(gallery.cache.ids, source.ids)
    assert np.array_equal(gallery.cache.extra("labels"), source.extra("labels"))
    # Current: reused as is. Another weighting: rebuilt.
    manifest = (out / "manifest.json").stat().st_mtime_ns
    build_gallery(bind, small_world, "test_audio_text", "audio", out, dtype="float32")
    assert (out / "manifest.json").stat().st_mtime_ns == manifest
    average = OmniBind.load(export, weighting="average")
    rebuilt = build_gallery(average, small_world, "test_audio_text", "audio", out, dtype="float32")
    assert rebuilt.cache.fingerprint != gallery.cache.fingerprint
    gallery = build_gallery(bind, small_world, "test_audio_text", "audio", out, dtype="float32")

    queries = bind.embed_rows(small_world, "test_audio_text", "text", list(range(20)))
    # 20 rows against chunks of 8192: BLAS may round other shapes differently (1e-6 is 50x that)
    full_text = embed_cached(bind.model, small_world, "test_audio_text", "text")[:20]
    assert torch.allclose(queries, full_text, atol=1e-6)
    scores, rows = gallery.search(queries, k=5)
    order = torch.sort(-(queries @ stored.T), dim=1, stable=True).indices[:, :5]
    assert np.array_equal(rows, order.numpy())
    assert np.allclose(scores, (queries @ stored.T).gather(1, order).numpy(), atol=1e-5)
    self_rows = gallery.search(stored[[3, 40]], k=1)[1][:, 0]
    assert self_rows.tolist() == [3, 40]
    faiss_rows = Gallery(out, backend="faiss").search(queries, k=5)[1]
    assert np.array_equal(faiss_rows, rows)
    with pytest.raises(ValueError, match="dim 8"):
        gallery.search(torch.zeros(1, 8))


def test_cli_index_then_composed_search(
    small_world: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "gallery"
    common = ["--model", str(export), "--root", str(small_world)]
    assert main(["index", *common, "--dataset", "test_audio_text", "--modality", "audio",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "rows of test_audio_text" in capsys.readouterr().out
    queries = ["test_audio_text:text:3", "test_audio_text:audio:3@0.5"]
    assert main(["search", *common, "--gallery", str(out), "--k", "3",
                 *[a for q in queries for a in ("--query", q)]]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    bind = OmniBind.load(export)
    query = compose(
        {
            "text": bind.embed_rows(small_world, "test_audio_text", "text", [3]),
            "audio": bind.embed_rows(small_world, "test_audio_text", "audio", [3]),
        },
        {"audio": 0.5},
    )
    rows = Gallery(out).search(query, k=3)[1][0]
    assert f"top 3 of {len(Gallery(out))}" in printed
    ids = Gallery(out).cache.ids
    for row in rows:
        assert f"id={ids[row]}" in printed
    assert main(["search", *common, "--gallery", str(out), "--query", "test_audio_text:3"]) == 2
    assert "DATASET:MODALITY:ROW" in capsys.readouterr().err
    assert main(["search", *common, "--gallery", str(out), "--query", "nope:audio:0"]) == 2
    assert "nope" in capsys.readouterr().err
