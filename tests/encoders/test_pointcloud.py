"""Point clouds as real inputs: every file format the readers take, the release's .npy dict read
without running its pickle, bad clouds refused naming the file, and the sampling rules."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.items import list_items
from datamodules.synthetic.demo_raw import write_ply
from encoders import readers
from encoders.base import Processor
from encoders.readers import LoadSettings, RawDataError, load_points, load_raw, read_points


def _cloud(n: int = 40, seed: int = 0) -> np.ndarray:
    """(n, 6): xyz anywhere, rgb as 0..255 integers (what PLY files store)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-2, 5, (n, 3)), rng.integers(0, 256, (n, 3))], 1)


def _release_norm(xyz: np.ndarray) -> np.ndarray:
    """The release's pc_norm (OmniBind experts.py, Uni3D datasets.py), in float32 as there."""
    xyz = xyz.astype(np.float32)
    xyz = xyz - xyz.mean(0)
    return xyz / np.sqrt((xyz**2).sum(1)).max()


def test_every_format_reads_the_same_cloud(tmp_path: Path) -> None:
    pts = _cloud().astype(np.float32)
    write_ply(tmp_path / "a.ply", pts, binary=False)
    write_ply(tmp_path / "b.ply", pts, binary=True)
    np.save(tmp_path / "c.npy", pts)
    np.savez(tmp_path / "d.npz", xyz=pts[:, :3], rgb=pts[:, 3:])
    np.savez(tmp_path / "e.npz", pts)  # one unnamed array: arr_0
    np.save(tmp_path / "f.npy", {"xyz": pts[:, :3], "rgb": pts[:, 3:]})  # the release's dict
    for name in "abcdef":
        path = str(next(tmp_path.glob(f"{name}.*")))
        np.testing.assert_allclose(read_points(path), pts, atol=1e-5, err_msg=path)
        full = load_points(path)
        np.testing.assert_allclose(full[:, :3], _release_norm(pts[:, :3]), atol=1e-6)
        np.testing.assert_allclose(full[:, 3:], pts[:, 3:] / 255, atol=1e-6)  # 0..255 -> 0..1
    # xyz only: .ply without colour, (n, 3) .npy, .npz and a dict without 'rgb'.
    write_ply(tmp_path / "g.ply", pts[:, :3], binary=True)
    np.save(tmp_path / "h.npy", pts[:, :3])
    np.savez(tmp_path / "i.npz", xyz=pts[:, :3])
    np.save(tmp_path / "j.npy", {"xyz": pts[:, :3]})
    for name in "ghij":
        path = str(next(tmp_path.glob(f"{name}.*")))
        assert read_points(path).shape == (40, 3)
        assert (load_points(path)[:, 3:] == readers.DEFAULT_RGB).all()
    items = list_items("point", {"source": tmp_path})
    assert sorted(items.keys) == list("abcdefghij")  # .npz files are listed too


def test_the_release_npy_dict_is_read_as_the_release_reads_it(tmp_path: Path) -> None:
    """OpenShape/Uni3D .npy files: an np.save'd dict of float16 xyz and rgb (0..1) among
    captions and features (OmniBind's assets/*.npy have this layout)."""
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-1, 1, (10000, 3)).astype(np.float16)
    rgb = rng.uniform(0, 1, (10000, 3)).astype(np.float16)
    record = {"dataset": "Objaverse", "id": "abc", "text": ["a toilet"], "xyz": xyz, "rgb": rgb,
              "text_feat": [{"original": rng.standard_normal(1280).astype(np.float32)}],
              "blip_caption_feat": {"original": np.float32(0.5)},
              "image_feat": rng.standard_normal((12, 1280)).astype(np.float32)}  # fmt: skip
    np.save(tmp_path / "obj.npy", record)
    got = load_points(str(tmp_path / "obj.npy"), num_points=10000)
    # 10,000 points as stored, in order: the release embeds these files whole.
    np.testing.assert_allclose(got[:, :3], _release_norm(xyz), atol=1e-6)
    np.testing.assert_array_equal(got[:, 3:], rgb.astype(np.float32))


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    np.save(tmp_path / "evil.npy", {"xyz": np.zeros((4, 3)), "x": Payload()}, allow_pickle=True)
    with pytest.raises(RawDataError, match=r"evil.npy: refuses to unpickle (posix|nt)\.mkdir"):
        load_points(str(tmp_path / "evil.npy"))
    assert not marker.exists()
    np.save(tmp_path / "list.npy", np.array([np.zeros(3), "x"], dtype=object))
    with pytest.raises(RawDataError, match="list.npy: holds an object array of shape \\(2,\\)"):
        load_points(str(tmp_path / "list.npy"))


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("nan.npy", lambda p: np.save(p, np.full((20, 3), np.nan)), "holds NaN or inf"),
        ("inf.npz", lambda p: np.savez(p, xyz=np.full((20, 3), np.inf)), "holds NaN or inf"),
        ("flat.npy", lambda p: np.save(p, np.zeros((5, 4))), r"shape \(5, 4\), expected \(n, 3\)"),
        ("line.npy", lambda p: np.save(p, np.zeros(9)), r"shape \(9,\), expected"),
        ("empty.npy", lambda p: np.save(p, np.zeros((0, 3))), "has no points"),
        ("words.npy", lambda p: np.save(p, np.array([["a", "b", "c"]])), "is not numeric"),
        ("dot.npy", lambda p: np.save(p, np.ones((20, 3))), "is a single point"),
        ("keys.npz", lambda p: np.savez(p, a=np.ones(3), b=np.ones(3)), r"holds \['a', 'b'\]"),
        ("pair.npz", lambda p: np.savez(p, xyz=np.ones((4, 3)), rgb=np.ones((3, 3))), "'rgb' "),
        ("dict.npy", lambda p: np.save(p, {"points": np.ones((4, 3))}), "not the point cloud's"),
        ("junk.npy", lambda p: p.write_bytes(b"\x93NUMPY junk"), "not a .npy file"),
        ("junk.npz", lambda p: p.write_bytes(b"PK junk"), "not a readable .npz"),
        (
            "bad.ply",
            lambda p: p.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"),
            "PLY",
        ),  # fmt: skip
        ("cloud.xyz", lambda p: p.write_text("0 0 0\n"), "not a point cloud file"),
    ],
)
def test_bad_clouds_are_refused_naming_the_file(tmp_path: Path, name, write, message) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(RawDataError, match=rf"{path}: .*{message}"):
        load_points(str(path), num_points=16)


def test_too_few_points_and_missing_colour(tmp_path: Path, monkeypatch, caplog) -> None:
    np.save(tmp_path / "small.npy", _cloud(15)[:, :3])
    with pytest.raises(
        RawDataError, match="small.npy: point cloud has 15 points, fewer than the 16"
    ):
        load_points(str(tmp_path / "small.npy"), 100, min_points=16)
    # From min_points on, a cloud is repeated up to num_points: every point kept, in order first.
    grown = load_points(str(tmp_path / "small.npy"), 100, min_points=15)
    full = load_points(str(tmp_path / "small.npy"))
    assert grown.shape == (100, 6)
    np.testing.assert_array_equal(grown[:15], full)
    assert {tuple(r) for r in grown} == {tuple(r) for r in full}
    with pytest.raises(RawDataError, match="small.npy: point cloud has no colour .*missing_rgb"):
        load_points(str(tmp_path / "small.npy"), missing_rgb="raise")
    with pytest.raises(ValueError, match="missing_rgb is 'grey'"):
        load_points(str(tmp_path / "small.npy"), missing_rgb="grey")
    monkeypatch.setattr(readers, "_UNCOLOURED", [])  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="encoders.readers"):
        load_points(str(tmp_path / "small.npy"))
        load_points(str(tmp_path / "small.npy"))
    logged = [r.getMessage() for r in caplog.records if "without colour" in r.getMessage()]
    assert len(logged) == 1 and "small.npy" in logged[0] and "rgb 0.4" in logged[0]


def test_sampling_is_seeded_and_keeps_an_exact_cloud_as_it_is(tmp_path: Path) -> None:
    pts = _cloud(200)
    np.save(tmp_path / "c.npy", pts)
    path = str(tmp_path / "c.npy")
    full = load_points(path)
    np.testing.assert_array_equal(
        load_points(path, 200, seed=5), full
    )  # order kept (FPS starts at 0)
    sub = load_points(path, 50, seed=3)
    assert len({tuple(r) for r in sub}) == 50  # without replacement
    assert {tuple(r) for r in sub} <= {tuple(r) for r in full}
    np.testing.assert_array_equal(sub, load_points(path, 50, seed=3))
    assert not np.array_equal(sub, load_points(path, 50, seed=4))


def test_load_raw_takes_the_encoders_point_count(tmp_path: Path) -> None:
    """The processor's num_points beats settings.num_points; arrays are prepared like files."""
    pts = _cloud(300)
    np.save(tmp_path / "c.npy", pts)

    class Fixed(Processor):
        num_points, min_points, missing_rgb = 64, 32, "raise"

    s = LoadSettings(num_points=100, seed=2)
    assert load_raw("point", str(tmp_path / "c.npy"), Processor(), s).shape == (100, 6)
    from_file = load_raw("point", str(tmp_path / "c.npy"), Fixed(), s, index=7)
    from_array = load_raw("point", pts, Fixed(), s, index=7)
    assert from_file.dtype == torch.float32 and from_file.shape == (64, 6)
    torch.testing.assert_close(from_file, from_array)
    with pytest.raises(RawDataError, match="point array 3: point cloud has 20 points, fewer than"):
        load_raw("point", pts[:20], Fixed(), s, index=3)
    with pytest.raises(RawDataError, match="point array 0: point cloud has no colour"):
        load_raw("point", pts[:, :3], Fixed(), s)
