"""The raw demo set (`data=demo_raw`): a few hundred generated files of every modality.

Six concepts (ball, box, can, cone, ring, spring), each seen as a drawn picture, heard as a
synthesised sound, and sampled as a 3D shape, so the pair stage has something to link:
    pool/images/        60 drawn pictures (PNG and JPEG)          pool/audio/  24 clips (wav)
    pool/points/        48 clouds (.npy, ascii and binary .ply)   pool/captions.jsonl  a caption
                        per pool item, with its provenance (image, audio or point) and label
    test/{images,audio,points}/<class>/   labelled items (zero-shot); test/captions.jsonl: five
                        captions per test image (COCO-style, `item` names the image);
                        test/{audio,point}_captions.jsonl: two per test clip and cloud
                        (AudioCaps- and Objaverse-style, datasets test_audio and test_point)
    videos/             12 clips (frame folders, (T, H, W, 3) .npy and .mp4) with three captions
                        each in video_captions.jsonl (MSR-VTT-style)
    benchmarks.json     retrieval (image-, audio-, point- and video-text) and zero-shot manifests
                        with classes and templates (lightning_modules/evaluation/benchmarks.py)
    dumps/<dataset>/{point,image,text}.npy + .ids.json: 1024-d "precomputed" embeddings (class
                        prototype + noise) for `space=demo_uni3d` (its dumps)
Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

# concept -> (sound, shape, what its sound is, how its picture is drawn)
CONCEPTS = {
    "ball": ("bounce", "sphere", "a ball bouncing on a hard floor"),
    "box": ("knock", "cube", "someone knocking on a wooden box"),
    "can": ("hum", "cylinder", "a tin can humming with a low metallic tone"),
    "cone": ("whistle", "cone", "a whistle rising quickly in pitch"),
    "ring": ("bell", "torus", "a metal ring struck like a bell, ringing out"),
    "spring": ("boing", "helix", "a spring wobbling with a warbling boing"),
}
CLASSES = sorted(CONCEPTS)
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200),
           "yellow": (230, 200, 40), "purple": (130, 50, 160),
           "orange": (240, 130, 30)}  # fmt: skip
BACKGROUNDS = {"white": (235, 235, 235), "grey": (120, 120, 120), "black": (20, 20, 20)}
COUNTS = {
    "pool": {"image": 10, "audio": 4, "point": 8},
    "test": {"image": 4, "audio": 2, "point": 3},
}
VIDEOS_PER_CLASS, VIDEO_FRAMES, SIZE, N_POINTS, DUMP_DIM = 2, 8, 96, 1024, 1024
TEMPLATES = {"image": ["a photo of a {}.", "a drawing of a {}."],
             "audio": ["the sound of a {}.", "a recording of a {}."],
             "point": ["a 3D model of a {}.", "a point cloud of a {}."]}  # fmt: skip
MARKER = "DEMO_RAW_COMPLETE_V2"  # V2: audio and point captions for retrieval


def draw(concept: str, colour: str, bg: str, rng: np.random.Generator, size: int = SIZE):
    """A picture of `concept`: its silhouette in `colour` on a noisy `bg` background."""
    from PIL import Image, ImageDraw, ImageFilter

    noise = rng.normal(0, 12, (size, size, 3))
    base = np.clip(np.array(BACKGROUNDS[bg]) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    d, fill = ImageDraw.Draw(img), COLOURS[colour]
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if concept == "ball":
        d.ellipse(box, fill=fill)
    elif concept == "box":
        d.rectangle(box, fill=fill)
    elif concept == "ring":
        d.ellipse(box, outline=fill, width=int(r / 2.5))
    elif concept == "can":
        d.rectangle((cx - r / 2, cy - r, cx + r / 2, cy + r), fill=fill)
        d.ellipse((cx - r / 2, cy - r - r / 5, cx + r / 2, cy - r + r / 5), fill=fill)
    elif concept == "cone":
        d.polygon([(cx, cy - r), (cx - r * 0.7, cy + r), (cx + r * 0.7, cy + r)], fill=fill)
    else:  # spring: a zigzag coil
        pts = [(cx + (r * 0.6 if k % 2 else -r * 0.6), cy - r + k * r / 4) for k in range(9)]
        d.line(pts, fill=fill, width=max(2, int(r / 6)))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def sound(kind: str, rate: int, rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    """A mono clip of `kind` (bounce, knock, hum, whistle, bell, boing), peak 0.8."""
    t = np.arange(int(rate * seconds)) / rate
    f = rng.uniform(0.9, 1.1)  # each clip a little higher or lower
    if kind == "bounce":  # clicks closer and closer together
        wave = np.zeros(len(t))
        for k in np.cumsum(0.3 * 0.7 ** np.arange(12)):
            wave[int(k * rate) : int(k * rate) + rate // 200] = 1.0
    elif kind == "knock":  # short low noise bursts
        wave = rng.standard_normal(len(t)) * ((t % 0.25) < 0.03) * np.sin(2 * np.pi * 150 * f * t)
    elif kind == "hum":
        wave = sum(np.sin(2 * np.pi * 110 * f * k * t) / k for k in (1, 2.7, 5.4))
    elif kind == "whistle":
        wave = np.sin(2 * np.pi * (600 * f * t + 0.5 * 1500 * t**2))
    elif kind == "bell":
        wave = sum(np.sin(2 * np.pi * 523 * f * k * t) / k for k in (1, 2, 3)) * np.exp(-3 * t)
    else:  # boing: vibrato
        wave = np.sin(2 * np.pi * 220 * f * t + 8 * np.sin(2 * np.pi * 6 * t)) * np.exp(-t)
    wave = wave + 0.01 * rng.standard_normal(len(t))
    return (0.8 * wave / np.abs(wave).max()).astype(np.float32)


def shape(name: str, rng: np.random.Generator, n: int = N_POINTS) -> np.ndarray:
    """A point cloud (n, 3) of `name`, randomly scaled and jittered."""
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 1, n)
    if name == "sphere":
        p = rng.standard_normal((n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif name == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        p[np.arange(n), rng.integers(0, 3, n)] = np.sign(rng.uniform(-1, 1, n))
    elif name == "torus":
        w = rng.uniform(0, 2 * np.pi, n)
        p = np.stack([(1 + 0.3 * np.cos(w)) * np.cos(u), (1 + 0.3 * np.cos(w)) * np.sin(u),
                      0.3 * np.sin(w)], 1)  # fmt: skip
    elif name == "cylinder":
        p = np.stack([0.5 * np.cos(u), 0.5 * np.sin(u), 2 * v - 1], 1)
    elif name == "cone":
        p = np.stack([(1 - v) * 0.6 * np.cos(u), (1 - v) * 0.6 * np.sin(u), 1.5 * v], 1)
    else:  # helix
        p = np.stack([np.cos(6 * np.pi * v), np.sin(6 * np.pi * v), 2 * v - 1], 1)
    return p * rng.uniform(0.5, 2.0, 3) + rng.normal(0, 0.01, (n, 3))


def write_ply(path: Path, pts: np.ndarray, binary: bool) -> None:
    """A vertex-only PLY (plyfile): float xyz, plus uchar rgb for (n, 6) points."""
    from plyfile import PlyData, PlyElement

    props = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if pts.shape[1] == 6:
        props += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.empty(len(pts), dtype=props)
    for i, (p, _) in enumerate(props):
        rows[p] = pts[:, i]
    PlyData([PlyElement.describe(rows, "vertex")], text=not binary).write(str(path))


def write_mp4(path: Path, frames: list, fps: int = 4) -> None:
    """Frames (PIL, even sizes) as an MPEG-4 video (PyAV)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *frames[0].size, "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(img)))
        out.mux(stream.encode())


class _Writer:
    """Writes one split's files and remembers (key, class) per modality for the dumps."""

    def __init__(self, root: Path, rng: np.random.Generator) -> None:
        self.root, self.rng, self.rows = root, rng, {}

    def add(self, dataset: str, modality: str, key: str, label: str) -> None:
        self.rows.setdefault((dataset, modality), []).append((key, label))

    def jsonl(self, path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _split(w: _Writer, split: str) -> None:
    import soundfile as sf

    rng, root, n = w.rng, w.root / split, COUNTS[split]
    captions, labelled = [], split == "test"
    item_captions: dict[str, list[dict]] = {"audio": [], "point": []}  # test clips and clouds
    for c in CLASSES:
        kind, shape_name, heard = CONCEPTS[c]
        sub = f"{c}/" if labelled else ""
        for i in range(n["image"]):
            colour, bg = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
            key = f"{sub}{c}_{i:02d}"
            (root / "images" / key).parent.mkdir(parents=True, exist_ok=True)
            ext = ".jpg" if i % 2 else ".png"
            draw(c, colour, bg, rng).save(root / "images" / f"{key}{ext}")
            w.add(split, "image", key, c)
            texts = [f"a {colour} {c} on a {bg} background"]
            if labelled:  # five captions per test image, COCO-style
                texts += [f"a picture of a {c} drawn in {colour}", f"a simple drawing of a {c}",
                          f"{colour} {c}, seen from the front",
                          f"a {c} in front of {bg}"]  # fmt: skip
            for j, text in enumerate(texts):
                cid = f"{key}/{j}" if labelled else f"image/{key}"
                captions.append(dict(id=cid, text=text, provenance="image", label=c, item=key))
        for i in range(n["audio"]):
            rate = int(rng.choice([16000, 22050, 32000, 44100, 48000]))
            key = f"{sub}{c}_{i:02d}"
            (root / "audio" / key).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / "audio" / f"{key}.wav", sound(kind, rate, rng), rate, subtype="PCM_16")
            w.add(split, "audio", key, c)
            if not labelled:
                captions.append(dict(id=f"audio/{key}", text=heard, provenance="audio", label=c))
            else:  # two captions per test clip, AudioCaps-style
                for j, text in enumerate([heard, f"the sound of a {c}"]):
                    item_captions["audio"].append(
                        dict(id=f"{key}/{j}", text=text, provenance="audio", label=c, item=key)
                    )
        for i in range(n["point"]):
            key = f"{sub}{c}_{i:02d}"
            (root / "points" / key).parent.mkdir(parents=True, exist_ok=True)
            pts = shape(shape_name, rng).astype(np.float32)
            if i % 3 == 0:
                np.save(root / "points" / f"{key}.npy", pts)
            else:
                write_ply(root / "points" / f"{key}.ply", pts, binary=i % 3 == 2)
            w.add(split, "point", key, c)
            if labelled:  # two captions per test cloud, as Objaverse's
                for j, text in enumerate(
                    [f"a 3D model of a {c}", f"a {shape_name} shaped like a {c}"]
                ):
                    item_captions["point"].append(
                        dict(id=f"{key}/{j}", text=text, provenance="point", label=c, item=key)
                    )
                w.add("test_point", "point", key, c)
            if not labelled:
                size = ["small", "large", "tall", "flat"][i % 4]
                captions.append(dict(id=f"point/{key}", text=f"a 3D model of a {size} {c}",
                                     provenance="point", label=c))  # fmt: skip
    if not labelled:
        for r in captions:
            r.pop("item", None)
    w.jsonl(root / "captions.jsonl", captions)
    for r in captions:
        w.add(split, "text", r["id"], r["label"])
    for m, rows in item_captions.items():
        if rows:  # their own datasets (test_audio, test_point), as AudioCaps and Objaverse are
            w.jsonl(root / f"{m}_captions.jsonl", rows)
            for r in rows:
                w.add(f"test_{m}", "text", r["id"], r["label"])


def _videos(w: _Writer) -> None:
    from PIL import Image

    out, rows = w.root / "videos", []
    out.mkdir()
    for c in CLASSES:
        for i in range(VIDEOS_PER_CLASS):
            colour, bg = w.rng.choice(list(COLOURS)), w.rng.choice(list(BACKGROUNDS))
            big = draw(c, colour, bg, w.rng, size=128)
            frames = [big.crop((8 * t, 16, 8 * t + 64, 80)) for t in range(VIDEO_FRAMES)]  # a pan
            key, form = f"{c}_{i}", (len(rows) // 3) % 3
            if form == 0:
                (out / key).mkdir()
                for t, f in enumerate(frames):
                    f.save(out / key / f"{t:03d}.png")
            elif form == 1:
                np.save(out / f"{key}.npy", np.stack([np.asarray(f) for f in frames]))
            else:
                write_mp4(out / f"{key}.mp4", [Image.fromarray(np.asarray(f)) for f in frames])
            w.add("video", "image", key, c)
            texts = [f"a {colour} {c} sliding across the screen", f"a video of a {c}",
                     f"the camera pans over a {c}"]  # fmt: skip
            for j, text in enumerate(texts):
                rows.append(dict(id=f"{key}/{j}", text=text, provenance="image", label=c, item=key))
                w.add("video", "text", f"{key}/{j}", c)
    w.jsonl(w.root / "video_captions.jsonl", rows)


def _benchmarks(w: _Writer) -> None:
    zeroshot = [dict(name=f"demo_{m}_cls", dataset="test", modality=m, classes=CLASSES,
                     templates=TEMPLATES[m]) for m in ("image", "audio", "point")]  # fmt: skip
    retrieval = [dict(name="demo_coco", dataset="test", modalities=["image", "text"],
                      items={"text": "item"}),
                 dict(name="demo_audiocaps", dataset="test_audio", modalities=["audio", "text"],
                      items={"text": "item"}),
                 dict(name="demo_objaverse_text", dataset="test_point",
                      modalities=["point", "text"], items={"text": "item"}),
                 dict(name="demo_msrvtt", dataset="video", modalities=["video", "text"],
                      items={"text": "item"})]  # fmt: skip
    spec = dict(name="demo_raw", root=".", retrieval=retrieval, zeroshot=zeroshot)
    (w.root / "benchmarks.json").write_text(json.dumps(spec, indent=1))
    for z in zeroshot:
        for c in CLASSES:
            for t in range(len(z["templates"])):
                w.add(f"{z['name']}_prompts", "text", f"{c}/{t}", c)


def _dumps(w: _Writer) -> None:
    """uni3d-shaped dumps: a unit prototype per class plus noise, for point, image and text."""
    protos = {c: w.rng.standard_normal(DUMP_DIM) for c in CLASSES}
    for (dataset, modality), rows in w.rows.items():
        if modality == "audio":
            continue
        folder = w.root / "dumps" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        emb = np.stack([protos[c] + 0.8 * w.rng.standard_normal(DUMP_DIM) for _, c in rows])
        np.save(folder / f"{modality}.npy", emb.astype(np.float32))
        (folder / f"{modality}.ids.json").write_text(json.dumps([k for k, _ in rows]))


def ensure_demo_raw(source: str | Path, seed: int = 0) -> Path:
    """Write the demo files into `source` unless they are there; returns `source`.

    Written into a temporary folder and renamed into place, so a crash leaves no half set and
    concurrent ranks agree on one copy.
    """
    source = Path(source)
    if (source / MARKER).exists():
        return source
    if source.exists() and any(source.iterdir()):
        raise FileExistsError(f"{source}: exists but is not a complete demo set; remove it")
    source.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=source.parent, prefix=f".{source.name}."))
    try:
        w = _Writer(tmp, np.random.default_rng(seed))
        for split in ("pool", "test"):
            _split(w, split)
        _videos(w)
        _benchmarks(w)
        _dumps(w)
        (tmp / MARKER).write_text("complete\n")
        if source.exists():
            source.rmdir()  # empty
        try:
            tmp.rename(source)
        except OSError:  # another rank finished first
            if not (source / MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source
