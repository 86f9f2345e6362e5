"""The real-data path as a user runs it: README's guide line by line, and experiment=demo_raw."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment of a new user's shell: no HF_HUB_OFFLINE or WANDB_MODE preset (conftest
    sets them for this process), so the entry points' own offline defaults are what runs."""
    unset = ("WANDB_SERVICE", "HF_HUB_OFFLINE", "WANDB_MODE")  # WANDB_SERVICE: see test_ops._env
    env = {k: v for k, v in os.environ.items() if k not in unset}
    # A wide console: rich wraps a long table title (the gallery path) at 80 columns otherwise.
    return env | {"PYTHONPATH": str(REPO), "COLUMNS": "400"}


def guide_commands(out: Path) -> list[list[str]]:
    """README's real-data guide: its bash block's commands, writing under `out`."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Real data") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```\n", 8)]
    variables, commands = {}, []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("outputs/real", str(out))
        if m := re.fullmatch(r'(\w+)="(.*)"', line):
            variables[m.group(1)] = m.group(2)
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        argv = shlex.split(line)
        assert argv[0] == "python", line
        if argv[1] == "train.py":
            argv[1] = str(REPO / "train.py")
        commands.append([sys.executable, *argv[1:]])
    return commands


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def test_guide_parses_into_the_stages_in_order(tmp_path: Path) -> None:
    commands = guide_commands(tmp_path)
    stages = [next(a.split("=")[1] for a in c if a.startswith("stage=")) for c in commands
              if any(a.startswith("stage=") for a in c)]  # fmt: skip
    assert stages == ["extract"] * 4 + ["pair", "bind", "bind", "route", "evaluate"]
    assert all(f"paths.output_dir={tmp_path}" in c for c in commands if "train.py" in c[1])


@pytest.mark.slow
def test_the_readme_guide_runs_as_written(tmp_path: Path) -> None:
    """Every command of README's real-data guide, then a caption query over images and audio."""
    outputs = [_run(argv, tmp_path) for argv in guide_commands(tmp_path)]
    results = json.loads((tmp_path / "runs" / "evaluate" / "results.json").read_text())
    routed = results["methods"]["omni:demo/routed"]
    assert {"image_to_text/R@1", "text_to_image/R@1"} <= set(routed["retrieval"])
    assert any(k.endswith("top1") for k in routed["zeroshot"])
    meta = json.loads((tmp_path / "omni" / "demo" / "routed" / "omni.json").read_text())
    assert meta["pairs"] == "pseudo" and meta["validation"] == "pseudo"
    searches = [o.stdout for o in outputs if "query text:" in o.stdout]
    assert len(searches) == 3 and "query text: a photo of a ball" in searches[0]
    for found, gallery in zip(searches, ("image", "audio", "video"), strict=True):
        flat = re.sub(r"\s+", "", found)  # rich wraps the table title (a long path) anywhere
        assert re.search(rf"top\d+of\d+in\S*galleries/{gallery}", flat), found


@pytest.mark.slow
def test_demo_raw_experiment_runs_end_to_end(tmp_path: Path) -> None:
    """`python train.py experiment=demo_raw`: extract -> pair -> bind -> route -> evaluate."""
    argv = [sys.executable, str(REPO / "train.py"), "experiment=demo_raw",
            f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false"]  # fmt: skip
    _run(argv, tmp_path)
    run = tmp_path / "runs" / "pipeline-demo"
    methods = json.loads((run / "results.json").read_text())["methods"]
    assert {"average", "routed", "fixed"} <= set(methods)
    for name in ("average", "routed"):
        keys = set(methods[name]["retrieval"])
        assert {"text_to_image/R@1", "video_to_text/R@1"} <= keys, keys
        assert methods[name]["zeroshot"], name
    assert "Trained on **pseudo** tuples" in (run / "results.md").read_text()


@pytest.mark.slow
def test_base_tiny_runs_from_raw_files_with_no_dump(tmp_path: Path) -> None:
    """`experiment=demo_raw variant=base_tiny`: Base's six families (tiny, random weights) embed
    the raw images, audio, clouds, videos and captions themselves; the demo's dumps are deleted
    before the run, so nothing can be imported from them."""
    import shutil

    from datamodules.synthetic.demo_raw import ensure_demo_raw

    source = ensure_demo_raw(tmp_path / "data" / "raw" / "demo_raw")
    shutil.rmtree(source / "dumps")
    argv = [sys.executable, str(REPO / "train.py"), "experiment=demo_raw", "variant=base_tiny",
            f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false"]  # fmt: skip
    _run(argv, tmp_path)
    methods = json.loads((tmp_path / "runs" / "pipeline-base_tiny" / "results.json").read_text())
    methods = methods["methods"]
    spaces = ("tiny_wavcaps", "tiny_wavcaps_audiocaps", "tiny_wavcaps_clotho", "tiny_eva02_e",
              "tiny_uni3d", "tiny_imagebind")  # fmt: skip
    assert {f"raw:{s}" for s in spaces} <= set(methods)
    for name in ("average", "routed"):
        keys = set(methods[name]["retrieval"])
        pairs = ("audio", "image", "point", "video")
        assert {f"{q}_to_text/R@1" for q in pairs} | {f"text_to_{t}/R@1" for t in pairs} <= keys
        zeroshot = {k.split("/")[0] for k in methods[name]["zeroshot"]}
        assert zeroshot == {"point", "audio", "image"}, name
    meta = json.loads((tmp_path / "omni" / "base_tiny" / "routed" / "omni.json").read_text())
    # The official Base layout: 4 audio, 3 image, 6 text and 1 point groups.
    assert {m: len(g) for m, g in meta["groups"].items()} == dict(point=1, audio=4, image=3, text=6)
