"""bench/claims.py statistics on hand-made results.json dicts (no pipeline runs)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("claims", REPO / "bench" / "claims.py")
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)

DIRECTIONS = ("audio_to_text", "text_to_audio", "image_to_point", "point_to_image")


def results(**methods: tuple[float, ...]) -> dict:
    """A results.json with each method's R@1 per DIRECTIONS (plus an R@5 that must be ignored)."""
    out = {}
    for name, r1 in methods.items():
        retrieval = {f"{d}/R@1": v for d, v in zip(DIRECTIONS, r1, strict=True)}
        retrieval |= {f"{d}/R@5": 1.0 for d in DIRECTIONS}
        out[name] = {"retrieval": retrieval, "zeroshot": {}, "summary": {}}
    return {"methods": {**out, "raw:clap": {"retrieval": {"audio_to_text/R@1": 0.9}}}}


def test_scores_mean_and_text_directions():
    """Mean over every R@1 direction, text mean over those with text; others ignored."""
    s = claims.scores(results(fixed=(0.2, 0.4, 0.6, 1.0)))
    assert set(s) == {"fixed"}
    assert s["fixed"]["mean"] == pytest.approx(0.55)
    assert s["fixed"]["text"] == pytest.approx(0.3)
    assert s["fixed"]["point_to_image"] == 1.0 and "audio_to_text/R@5" not in s["fixed"]


def test_interval_matches_student_t_by_hand():
    """[1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051."""
    iv = claims.interval([1.0, 2.0, 3.0])
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(2.0)
    assert iv["half"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert claims.interval([0.5]) == {"n": 1, "mean": 0.5, "half": None}
    assert claims.interval([])["mean"] is None


def test_paired_difference_cancels_the_world_and_missing_method_is_absent():
    """routed - fixed is paired per run: worlds of very different difficulty, constant gap."""
    runs = [
        claims.scores(results(average=(a,) * 4, fixed=(a + 0.01,) * 4, routed=(a + 0.03,) * 4))
        for a in (0.2, 0.5, 0.7)
    ]
    # routed_l0 exists in one run only, routed_oracle in none.
    runs[0] |= claims.scores(results(routed_l0=(0.1,) * 4))
    summary = claims.summarize(runs)
    diff = summary["differences"]["routed - fixed"]["mean"]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.02)
    assert diff["half"] == pytest.approx(0.0, abs=1e-12)  # a constant gap: no spread
    # Unpaired, the same methods' intervals overlap widely: the world dominates the spread.
    assert summary["methods"]["routed"]["mean"]["half"] > 0.3
    assert summary["differences"]["routed - routed_l0"]["mean"]["n"] == 1
    assert summary["methods"]["routed_oracle"]["mean"] == {"n": 0, "mean": None, "half": None}
    text = claims.markdown(summary, "## test")
    assert "| `routed_oracle` | n/a | n/a | 0 |" in text
    assert "| routed - fixed | +2.0 ± 0.0 | +2.0 ± 0.0 | 3 | holds |" in text
    assert "| routed - routed_l0 |" in text and "| 1 | n/a |" in text


def test_outputs_written(tmp_path, monkeypatch):
    """main() on existing runs (none rerun) writes md/json/csv/png and ends with the RESULT line."""
    monkeypatch.setattr(claims, "OUT", tmp_path)
    for w in (0, 1):
        for t in (0, 1):
            path = tmp_path / "runs" / "full" / f"world{w}_train{t}" / "runs" / "pipeline-base"
            path.mkdir(parents=True)
            base = 0.4 + 0.1 * w + 0.01 * t
            r = results(average=(base,) * 4, fixed=(base + 0.02,) * 4, routed=(base - 0.01,) * 4)
            (path / "results.json").write_text(json.dumps(r))
    # One run records the code that made it, the others do not ("?"): the sweep mixes code.
    (tmp_path / "runs" / "full" / "world1_train1" / "claims_run.json").write_text(
        '{"commit": "abc"}'
    )
    out = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: out.append(" ".join(map(str, a))))
    claims.main(["--world-seeds", "0", "1", "--train-seeds", "0", "1"])
    assert out[-1] == "RESULT claims routed_minus_average=-1.00 ci=0.00 n=4"
    record = json.loads((tmp_path / "claims-full.json").read_text())
    assert record["differences"]["fixed - average"]["mean"]["mean"] == pytest.approx(0.02)
    rows = list(csv.DictReader(open(tmp_path / "claims-full.csv")))
    assert {"methods", "differences"} == {r["kind"] for r in rows}
    assert [r["commit"] for r in record["runs"]] == ["?", "?", "?", "abc"]
    text = (tmp_path / "claims-full.md").read_text()
    assert "reversed" in text and "Code: ?, abc. **Warning" in text
    assert (tmp_path / "claims-full.png").stat().st_size > 1000


def test_val_differences_pair_each_route_with_its_start(tmp_path):
    """A route export's best val minus the routed export's start val (uniform = average)."""
    run = tmp_path / "w0"
    for name, best, start in (("routed", 0.66, 0.64), ("fixed", 0.64, 0.64)):
        (run / "omni" / "base" / name).mkdir(parents=True)
        meta = {"best_val_mean_R1": best, "start_val_mean_R1": start}
        (run / "omni" / "base" / name / "omni.json").write_text(json.dumps(meta))
    val = claims.val_scores(run / "runs" / "pipeline-base" / "results.json")
    assert val == {"routed": 0.66, "fixed": 0.64, "average": 0.64}
    diffs = claims.val_differences([val, {**val, "routed": 0.68}])
    assert list(diffs) == ["fixed", "routed"]
    assert diffs["routed"]["mean"] == pytest.approx(0.03) and diffs["fixed"]["mean"] == 0.0
