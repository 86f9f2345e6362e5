"""Does a video's audio track help? Text<->video R@1 of raw ImageBind, with and without it.

    python bench/video_audio.py [--seeds 0,1,2] [--weights 0.5,0.25] [data overrides]

For each world seed (`data.seed`), the world's `test_video_text` set (data=world_v2 by default:
1,000 videos of 200 held-out concepts, 4 frames each, one caption each) is embedded by ImageBind's
stand-in encoder exactly as the world writes its caches (`datamodules.synthetic.world.embed`,
stored at `data.dtype`), once with frames only and once per audio weight w with
`video.audio_track` on (the audio track joins the frame mean: normalize((1 - w) v + w a),
encoders/video.py). Only videos of concepts that make a sound have a track (world_v2: about
half). R@1 both ways is the
project's metric (`recall_at_k`, the evaluate stage's `raw:imagebind` numbers).

Prints per-seed rows, then mean +- the 95% Student-t half-width over seeds for each setting and
for its paired difference from frames only. Nothing is written to disk. The last line is
`RESULT video_audio ratio=<x>`: mean text<->video R@1 with the track at the first weight over
frames only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy import stats  # noqa: E402

from datamodules.synthetic.world import World, _video, embed  # noqa: E402
from lightning_modules.evaluation.metrics import recall_at_k  # noqa: E402

SPACE, DATASET = "imagebind", "test_video_text"


def configs(overrides: list[str]) -> tuple[dict, dict]:
    """The data config (world_v2 plus overrides) and ImageBind's space config, plain."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=world_v2", *overrides])
        space = compose(config_name=f"space/{SPACE}").space
    plain = OmegaConf.to_container
    return plain(cfg.data, resolve=True), plain(space, resolve=True)


def r1(data: dict, space: dict, weight: float | None) -> tuple[float, float, float]:
    """(text->video R@1, video->text R@1, share of videos with a track) of one world."""
    video = {"audio_track": weight is not None, "audio_weight": weight or 0.5}
    world = World(data, {SPACE: {**space, "video": video}})
    obs = _video(world, DATASET.split("_")[0])
    emb = {}
    for m in ("image", "text"):
        x, extras = embed(world, DATASET, SPACE, m, obs[m])
        emb[m] = torch.from_numpy(x.astype(data["dtype"]).astype(np.float32))  # as cached
    items = torch.from_numpy(extras["items"])
    t2v = recall_at_k(emb["text"], emb["image"], items, items, ks=(1,))[1]
    v2t = recall_at_k(emb["image"], emb["text"], items, items, ks=(1,))[1]
    return float(t2v), float(v2t), len(obs["image"]["track"]["rows"]) / len(items)


def ci(values: list[float]) -> str:
    """mean +- the 95% Student-t half-width, in points."""
    x = 100 * np.asarray(values)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0
    return f"{x.mean():.2f} ± {half:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="world seeds (data.seed)")
    ap.add_argument("--weights", default="0.5,0.25", help="audio weights w to measure")
    ap.add_argument("overrides", nargs="*", help="data overrides, e.g. data.per_concept=5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [None, *(float(w) for w in args.weights.split(","))]
    rows: dict[float | None, list[tuple]] = {w: [] for w in settings}
    start = time.perf_counter()
    for seed in seeds:
        data, space = configs([f"data.seed={seed}", *args.overrides])
        for w in settings:
            rows[w].append(r1(data, space, w))
            t2v, v2t, share = rows[w][-1]
            name = "frames only" if w is None else f"audio track, w={w}"
            print(f"seed {seed}  {name:<22} text->video {100 * t2v:6.2f}  "
                  f"video->text {100 * v2t:6.2f}  (videos with a track: {share:.0%})")  # fmt: skip
    print(f"\n{len(seeds)} seeds, {time.perf_counter() - start:.1f} s\n")
    print("| ImageBind (raw), test_video_text | text→video R@1 | video→text R@1 "
          "| Δ text→video | Δ video→text |")  # fmt: skip
    print("|---|---|---|---|---|")
    base = rows[None]
    for w in settings:
        t2v, v2t = ([r[i] for r in rows[w]] for i in (0, 1))
        name = "frames only (default)" if w is None else f"+ audio track, w = {w}"
        deltas = ["", ""] if w is None else [
            ci([a[i] - b[i] for a, b in zip(rows[w], base, strict=True)]) for i in (0, 1)
        ]  # fmt: skip
        print(f"| {name} | {ci(t2v)} | {ci(v2t)} | {deltas[0]} | {deltas[1]} |")
    # Ours (the first audio weight) over the reference (frames only): mean text<->video R@1.
    ours = np.mean([r[:2] for r in rows[settings[1]]])
    print(f"RESULT video_audio ratio={ours / np.mean([r[:2] for r in base]):.4f}")


if __name__ == "__main__":
    main()
