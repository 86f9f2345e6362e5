"""The raw demo set (`data=demo_raw`): a few real files of every modality, generated on first use.

    images/      scikit-image's bundled sample photographs, downscaled (PNG and JPEG)
    audio/       synthesised clips (tones, a chirp, noise, clicks) at several sample rates
    points/      procedural shapes as .npy (xyz, xyz + rgb) and .ply (ascii and binary)
    videos/      two short clips: a frame folder and a (T, H, W, 3) .npy
    captions.jsonl  a caption per item, with its provenance (image, audio or point) and label

Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

IMAGES = {  # skimage.data name -> (label, caption)
    "astronaut": ("person", "a portrait of an astronaut in a white space suit"),
    "camera": ("person", "a black and white photo of a man with a camera on a tripod"),
    "coffee": ("object", "a cup of coffee on a saucer, seen from above"),
    "chelsea": ("animal", "a ginger tabby cat looking at the camera"),
    "coins": ("object", "a grey photo of old coins on a flat surface"),
    "rocket": ("vehicle", "a rocket standing on its launch pad"),
    "hubble_deep_field": ("space", "a deep field of distant galaxies"),
    "moon": ("space", "a close up of the cratered surface of the moon"),
}
AUDIO = {  # name -> (sample rate, seconds, label, caption)
    "tone_a4": (16000, 1.0, "tone", "a steady pure tone at four hundred forty hertz"),
    "chirp": (22050, 2.0, "sweep", "a whistle sweeping quickly from low to high pitch"),
    "noise_burst": (44100, 0.5, "noise", "a short burst of hissing white noise"),
    "tremolo": (48000, 3.0, "tone", "a warbling tone that pulses in loudness"),
    "bell": (32000, 1.5, "bell", "a bell strike ringing out and slowly fading"),
    "clicks": (8000, 1.0, "clicks", "a fast train of sharp clicks like a ticking clock"),
}
SHAPES = {  # name -> (file suffix, label, caption)
    "sphere": (".npy", "sphere", "a 3D model of a smooth ball"),
    "cube": (".npy", "box", "a 3D model of a colourful cube"),
    "torus": (".ply", "ring", "a 3D model of a red doughnut shaped ring"),
    "cylinder": ("-binary.ply", "can", "a 3D model of a tall cylinder like a tin can"),
    "cone": (".npy", "cone", "a 3D model of a traffic cone"),
    "helix": ("-binary.ply", "spring", "a 3D model of a coiled spring"),
}
N_POINTS = 2048
MARKER = "DEMO_RAW_COMPLETE"


def _images(out: Path) -> dict:
    from PIL import Image
    from skimage import data

    out.mkdir()
    for i, name in enumerate(IMAGES):
        arr = getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((160, 160))
        img.save(out / f"{name}.{'jpg' if i % 2 else 'png'}")
    return {
        name: Image.open(next(out.glob(f"{name}.*"))).convert("RGB")
        for name in ("astronaut", "chelsea")
    }


def _audio(out: Path, rng: np.random.Generator) -> None:
    import soundfile as sf

    out.mkdir()
    for name, (rate, seconds, _, _) in AUDIO.items():
        t = np.arange(int(rate * seconds)) / rate
        if name == "tone_a4":
            wave = np.sin(2 * np.pi * 440 * t)
        elif name == "chirp":
            wave = np.sin(2 * np.pi * (200 * t + 0.5 * 900 * t**2))
        elif name == "noise_burst":
            wave = rng.standard_normal(len(t)) * 0.5
        elif name == "tremolo":
            wave = np.sin(2 * np.pi * 330 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t))
        elif name == "bell":
            wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((523, 1046, 1568), 1))
            wave *= np.exp(-3 * t)
        else:
            wave = np.zeros(len(t))
            wave[:: rate // 20] = 1.0
        wave = 0.8 * wave / np.abs(wave).max()
        sf.write(out / f"{name}.wav", wave.astype(np.float32), rate, subtype="PCM_16")


def _shape(name: str, rng: np.random.Generator) -> np.ndarray:
    n = N_POINTS
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 1, n)
    if name == "sphere":
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if name == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        face = rng.integers(0, 3, n)
        p[np.arange(n), face] = np.sign(rng.uniform(-1, 1, n))
        return np.concatenate([p, (p + 1) / 2 * 255], 1)  # rgb 0..255 from position
    if name == "torus":
        w = rng.uniform(0, 2 * np.pi, n)
        p = np.stack([(1 + 0.3 * np.cos(w)) * np.cos(u), (1 + 0.3 * np.cos(w)) * np.sin(u),
                      0.3 * np.sin(w)], 1)  # fmt: skip
        return np.concatenate([p, np.tile([200.0, 30.0, 30.0], (n, 1))], 1)
    if name == "cylinder":
        return np.stack([0.5 * np.cos(u), 0.5 * np.sin(u), 2 * v - 1], 1)
    if name == "cone":
        return np.stack([(1 - v) * 0.6 * np.cos(u), (1 - v) * 0.6 * np.sin(u), 1.5 * v], 1)
    return np.stack([np.cos(6 * np.pi * v), np.sin(6 * np.pi * v), 2 * v - 1], 1)  # helix


def write_ply(path: Path, pts: np.ndarray, binary: bool) -> None:
    """A vertex-only PLY: float xyz, plus uchar rgb for (n, 6) points."""
    color = pts.shape[1] == 6
    props = [("x", "f4"), ("y", "f4"), ("z", "f4")] + (
        [("red", "u1"), ("green", "u1"), ("blue", "u1")] if color else [])  # fmt: skip
    names = {"f4": "float", "u1": "uchar"}
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              "comment omnibind demo_raw", f"element vertex {len(pts)}",
              *[f"property {names[t]} {p}" for p, t in props], "end_header"]  # fmt: skip
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        if binary:
            rows = np.empty(len(pts), dtype=[(p, "<" + t) for p, t in props])
            for i, (p, _) in enumerate(props):
                rows[p] = pts[:, i]
            f.write(rows.tobytes())
        else:
            for row in pts:
                xyz = " ".join(f"{x:.6f}" for x in row[:3])
                rgb = (" " + " ".join(str(int(c)) for c in row[3:])) if color else ""
                f.write(f"{xyz}{rgb}\n".encode())


def _points(out: Path, rng: np.random.Generator) -> None:
    out.mkdir()
    for name, (suffix, _, _) in SHAPES.items():
        pts = _shape(name, rng).astype(np.float32)
        if suffix == ".npy":
            np.save(out / f"{name}.npy", pts)
        else:
            write_ply(out / f"{name}.ply", pts, binary=suffix.startswith("-binary"))


def _videos(out: Path, frames: dict) -> None:
    out.mkdir()
    pan = out / "astronaut_pan"
    pan.mkdir()
    img = frames["astronaut"]
    w, h = img.size
    for t in range(8):  # a camera pan: a window sliding right
        x = int(t * (w - h // 2) / 7)
        img.crop((x, 0, x + h // 2, h // 2)).save(pan / f"{t:03d}.png")
    cat = frames["chelsea"]
    w, h = cat.size
    zoom = [
        np.asarray(cat.crop((k, k * h // w, w - k, h - k * h // w)).resize((64, 64)))
        for k in range(0, 36, 6)
    ]  # a zoom in: a shrinking crop at a fixed size
    np.save(out / "chelsea_zoom.npy", np.stack(zoom).astype(np.uint8))


def _captions(path: Path) -> None:
    rows = [dict(id=f"image/{k}", text=c, provenance="image", label=lab)
            for k, (lab, c) in IMAGES.items()]  # fmt: skip
    rows += [dict(id=f"audio/{k}", text=c, provenance="audio", label=lab)
             for k, (_, _, lab, c) in AUDIO.items()]  # fmt: skip
    rows += [dict(id=f"point/{k}", text=c, provenance="point", label=lab)
             for k, (_, lab, c) in SHAPES.items()]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


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
        rng = np.random.default_rng(seed)
        frames = _images(tmp / "images")
        _audio(tmp / "audio", rng)
        _points(tmp / "points", rng)
        _videos(tmp / "videos", frames)
        _captions(tmp / "captions.jsonl")
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
