"""The config schema (lightning_modules/runtime/schema.py): every composable config passes with
every key declared, and a missing or wrong-typed key fails at startup naming the key and the file
that should declare it (an undeclared one too, with strict=True)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_config
from test_config import CHOICES, _override

from lightning_modules.runtime.schema import ConfigError, problems, validate
from train import train


def _fails(overrides: list[str], *expected: str) -> str:
    """validate(strict) on the composed config raises, its message containing each line."""
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides), strict=True)
    message = str(e.value)
    for line in expected:
        assert line in message, f"{line!r} not in:\n{message}"
    return message


@pytest.mark.parametrize(("group", "name"), CHOICES, ids=[f"{g}={n}" for g, n in CHOICES])
def test_every_group_value_passes(group: str, name: str, tmp_path: Path) -> None:
    # config.yaml composes each model file under its own package (model@model.bind: bind).
    override = f"model@model.{name}={name}" if group == "model" else _override(group, name)
    cfg = compose_config([override, f"paths.output_dir={tmp_path}"])
    assert problems(cfg) == []


def test_missing_keys_name_the_file_that_declares_them() -> None:
    _fails(["~bind.lr"], "bind.lr: missing; declare it in conf/config.yaml's `bind:` block")
    _fails(
        ["data=world", "~data.n_concepts"],
        "data.n_concepts: missing; declare it in conf/data/world.yaml",
    )
    _fails(
        ["~space.text_specialty"],
        "space.text_specialty: missing; declare it in conf/space/clap.yaml",
    )
    _fails(
        ["~variant.spaces.uni3d.dims"],
        "variant.spaces.uni3d.dims: missing; declare it in "
        "conf/space/uni3d.yaml (via conf/variant/base.yaml)",
    )
    _fails(
        ["experiment=demo_raw", "~data.datasets"],
        "data.datasets: missing; declare it in conf/data/demo_raw.yaml",
    )
    _fails(["~pipeline"], "pipeline: missing; declare it in conf/config.yaml's `pipeline:` block")
    # A broken interpolation names the key that holds it; the missing key is named too.
    _fails(
        ["~paths.output_dir"],
        "paths.output_dir: missing; declare it in conf/paths/default.yaml",
        "bind.export_dir: Interpolation key 'paths.output_dir' not found",
    )
    _fails(
        ["data=world", "data.root=???"], "data.root: missing (???); set it in conf/data/world.yaml"
    )


def test_wrong_types_name_the_key_value_and_file() -> None:
    message = _fails(
        ["bind.epochs=abc", "pair.starts=image", "route.kind=routd", "pair.dedupe=yes"],
        "bind.epochs: got 'abc': Input should be a valid integer (declared in conf/config.yaml's "
        "`bind:` block, or an override)",
        "pair.starts: got 'image': Input should be a valid list",  # a list is required
        "route.kind: got 'routd': Input should be 'routed' or 'fixed'",
        "pair.dedupe: got 'yes': Input should be a valid boolean",  # "no" would read as true
    )
    assert len(re.findall(r"^  - ", message, re.M)) == 4, "every problem is listed at once"
    _fails(["bind.experts=mix"], "bind.experts: got 'mix': expected freebind or a list")
    _fails(
        ["data=world_v2", "data.hierarchy={coarse:5,r:x}"],
        "data.hierarchy.r: got 'x'",
        "conf/data/world_v2.yaml",
    )
    _fails(
        ["variant.spaces.uni3d.dims.point=abc"],
        "variant.spaces.uni3d.dims.point: got 'abc'",
        "conf/space/uni3d.yaml",
    )
    _fails(
        ["+space.dims.video=64"],
        "space.dims.video: the key 'video': Input should be 'point', 'audio', 'image' or 'text'",
    )
    _fails(["anchor.role=x"], "anchor.role: got 'x'", "conf/space/eva_clip_18b.yaml")
    _fails(
        ["run_name=3"],
        "run_name: got 3: Input should be a valid string (declared in conf/stage/pipeline.yaml",
    )


def test_undeclared_keys_are_refused_naming_the_schema(caplog: pytest.LogCaptureFixture) -> None:
    _fails(
        ["+space.foo=1"],
        "space.foo: not a declared key; declare it with its type in "
        "lightning_modules/runtime/schema.py (Space), or remove it from conf/space/clap.yaml",
    )
    _fails(["+bind.foo=1"], "bind.foo: not a declared key", "(Bind)")
    # train.py refuses them: a misspelled key (`lables` for `labels`) would be silently ignored.
    with pytest.raises(ConfigError, match=r"data.datasets.test.image.lables: not a declared key"):
        train(compose_config(["experiment=demo_raw", "+data.datasets.test.image.lables=dirs"]))
    # validate() without strict only warns, naming the key.
    with caplog.at_level("WARNING", logger="lightning_modules.runtime.schema"):
        validate(compose_config(["+bind.foo=1"]))
    assert "bind.foo: not a declared key" in caplog.text
    with pytest.raises(ConfigError, match="bind.epochs") as e:
        validate(compose_config(["+bind.foo=1", "bind.epochs=x"]))
    assert "bind.foo" not in str(e.value)


def test_each_data_kind_has_its_own_schema() -> None:
    # A raw config with a world key, and a world config with a raw key, are each refused.
    _fails(
        ["experiment=demo_raw", "+data.n_concepts=5"],
        "data.n_concepts: not a declared key",
        "(RawData), or remove it from conf/data/demo_raw.yaml",
    )
    _fails(["+data.datasets={}"], "data.datasets: not a declared key", "(WorldData)")
    _fails(
        ["experiment=demo_raw", "data.datasets.test.image.labels=folders"],
        "data.datasets.test.image.labels: got 'folders': Input should be 'dirs'",
    )
    _fails(
        ["experiment=demo_raw", "~data.datasets.pool.image.source"],
        "data.datasets.pool.image.source: missing",
    )
    # Another kind reads caches already under data.root: only the common keys are checked.
    assert problems(compose_config(["data.kind=extracted"])) == []
    _fails(["data.kind=extracted", "~data.root"], "data.root: missing")


def test_optional_keys_may_be_left_out() -> None:
    # A real raw config has no generator, load settings or benchmarks; a space may lack an
    # encoder (world only) or a world block (real data only).
    overrides = [
        "experiment=demo_raw",
        "~data.generate",
        "~data.load",
        "~data.benchmarks",
        "~space.encoder",
        "~anchor.world",
    ]
    assert problems(compose_config(overrides)) == []
    _fails(["experiment=demo_raw", "+data.load.nosuch=1"], "data.load.nosuch: not a declared key")


def test_train_validates_before_any_stage_work(tmp_path: Path) -> None:
    from train import train

    cfg = compose_config(["stage=bind", "bind.epochs=abc", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="bind.epochs: got 'abc'"):
        train(cfg)
    assert list(tmp_path.iterdir()) == [], "nothing is written before the config is checked"


@pytest.mark.slow
def test_train_py_fails_at_startup_naming_key_and_file(tmp_path: Path) -> None:
    """The command line path: Hydra's chosen files name the declaring file."""
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "stage=bind",
            "~bind.lr",
            f"paths.output_dir={tmp_path}",
            "data=world_v2",
            "~data.n_concepts",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1
    # A user error prints its message, no traceback (debug=true shows one).
    assert "Traceback" not in run.stderr and "(debug=true shows the traceback)" in run.stderr
    assert "bind.lr: missing; declare it in conf/config.yaml's `bind:` block" in run.stderr
    assert "data.n_concepts: missing; declare it in conf/data/world_v2.yaml" in run.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "bound").exists()
