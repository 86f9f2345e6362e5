"""The world's calibration to the real spaces' R@1 (bench/calibration.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.evaluation.metrics import recall_at_k

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("calibration", REPO / "bench" / "calibration.py")
calibration = importlib.util.module_from_spec(_spec)
sys.modules["calibration"] = calibration
_spec.loader.exec_module(calibration)


def test_one_pass_r1_matches_the_metric() -> None:
    # Several captions per item, as in COCO: the item->text hit is any caption ranked first.
    torch.manual_seed(0)
    items = torch.arange(300)
    captions = items.repeat_interleave(5)
    a = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    b = torch.nn.functional.normalize(a[captions] + 0.3 * torch.randn(1500, 16), dim=1)
    ab, ba = calibration.r1_both(a, b, items, captions, chunk=64)
    assert ab == pytest.approx(float(recall_at_k(a, b, items, captions, ks=(1,))[1]), abs=1e-6)
    assert ba == pytest.approx(float(recall_at_k(b, a, captions, items, ks=(1,))[1]), abs=1e-6)
    assert 0.05 < ab < 0.95 and 0.05 < ba < 0.95  # neither trivial nor impossible


def test_audio_text_spaces_are_calibrated_at_benchmark_size() -> None:
    # AudioCaps and Clotho are ~1k clips x 5 captions, cheap at their real size: every audio-text
    # row lands within 10 points of its real R@1 (the image and 3D rows are in the slow test).
    data, spaces = calibration.data_config([])
    rows = calibration.calibrate(data, spaces, benchmarks={"AudioCaps", "Clotho"})
    assert len(rows) >= 7
    bad = [(r["space"], r["benchmark"], r["target"], round(r["measured"], 1)) for r in rows]
    assert all(r["within"] for r in rows), bad
    # The experts are far better than the generalist, as in the real spaces (40 vs 9).
    r1 = {(r["space"], r["benchmark"]): r["measured"] for r in rows}
    assert r1[("wavcaps", "AudioCaps")] > 3 * r1[("imagebind", "AudioCaps")]


@pytest.mark.slow
def test_every_space_is_calibrated() -> None:
    # The full table at the benchmarks' gallery sizes (minutes on 2 cores).
    data, spaces = calibration.data_config([])
    rows = calibration.calibrate(data, spaces)
    assert len(rows) == len(calibration.TARGETS)
    bad = [(r["space"], r["benchmark"], r["target"], round(r["measured"], 1)) for r in rows]
    assert all(r["within"] for r in rows), bad
