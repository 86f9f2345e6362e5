"""Choose the pair stage's cleaning rule by the downstream model's validation R@1.

    python bench/clean_rules.py [--seeds 0] [--rules none mutual ...] [-- overrides]

A real user has no ground truth to grade pseudo tuples by, so the rule is chosen the way they
would choose it: for each rule, run the main job's pair -> bind -> route (routed only; no fixed,
routed_l0 or oracle rows) and read the routed model's best validation mean R@1 (`omni.json`,
`best_val_mean_R1`, on the world's paired val sets). Each (rule, seed) runs as
`python train.py data.seed=S seed=S <rule overrides>` into bench/clean_rules_results/<rule>_s<S>/
(worlds shared per seed under bench/clean_rules_results/world<S>/); a finished run is skipped, so
an interrupted sweep resumes. The concept agreement of the kept tuples (pairs_summary.json) is
printed beside it for reference only; it plays no part in the choice.

The table gives each rule's mean val R@1 over the seeds, its paired difference from `none`, and
the test mean R@1 of the routed row. The last line is `RESULT clean_rules ratio=<x>`: the chosen
rule's mean val R@1 over that of `none`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "clean_rules_results"
OFF = ["pair.clean.provenance=false"]  # every rule off (the default turns provenance on)
RULES = {  # name: overrides of the pair stage (conf/config.yaml, pair.clean): one rule alone
    "none": OFF,
    "mutual": [*OFF, "pair.clean.mutual=true"],
    "cross_k5": [*OFF, "pair.clean.cross_k=5"],
    "csls10": [*OFF, "pair.clean.csls=10"],
    "provenance": ["pair.clean.provenance=true"],
    "max_reuse4": [*OFF, "pair.clean.max_reuse=4"],
    "soft_top3": [*OFF, "pair.clean.soft=true", "pair.topk=3"],
}
ONLY_ROUTED = ["~pipeline.routes.fixed", "~pipeline.routes.routed_l0", "pipeline.oracle=false"]


def paths(rule: str, seed: int) -> tuple[Path, Path, Path]:
    """The run's output folder, its routed omni.json and its results.json."""
    out = OUT / f"{rule}_s{seed}"
    return (
        out,
        out / "omni" / "base" / "routed" / "omni.json",
        out / "runs" / "pipeline-base" / "results.json",
    )


def run(rule: str, seed: int, extra: list[str]) -> None:
    """Run the main job's pair -> bind -> route (routed only) with the rule, unless it is done."""
    out, omni, results = paths(rule, seed)
    if omni.is_file() and results.is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", f"paths.output_dir={out}",
               f"paths.data_dir={OUT / f'world{seed}'}", f"seed={seed}", f"data.seed={seed}",
               *ONLY_ROUTED, *RULES[rule], *extra]  # fmt: skip
    print(f"clean_rules: {rule}, seed {seed}: {' '.join(command[1:])}", flush=True)
    with open(out / "run.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code.returncode != 0 or not omni.is_file():
        raise SystemExit(f"clean_rules: {rule} seed {seed} failed; see {out / 'run.log'}")


def read(rule: str, seed: int) -> dict | None:
    """The routed val/test mean R@1 and the tuples' agreement of a finished run, else None."""
    out, omni, results = paths(rule, seed)
    if not (omni.is_file() and results.is_file()):
        return None
    routed = json.loads(results.read_text())["methods"]["routed"]["retrieval"]
    pairs = json.loads((out / "pairs" / "pairs_summary.json").read_text())
    return dict(
        val=json.loads(omni.read_text())["best_val_mean_R1"],
        test=float(np.mean([v for k, v in routed.items() if k.endswith("/R@1")])),
        tuples=pairs["tuples"],
        fine=float(np.mean(list(pairs["concept_agreement"].values()))),
        coarse=float(np.mean(list(pairs["coarse"]["concept_agreement"].values()))),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for rule in args.rules:
        for seed in args.seeds:
            run(rule, seed, extra)
    # Every rule finished for all seeds is reported, also those another process ran.
    runs = {r: [read(r, s) for s in args.seeds] for r in RULES}
    runs = {r: xs for r, xs in runs.items() if all(xs)}
    if "none" not in runs:
        raise SystemExit(f"clean_rules: run the baseline too (--rules none) for seeds {args.seeds}")
    base = np.array([x["val"] for x in runs["none"]])
    print(f"\nseeds {args.seeds}; R@1 in %, mean over seeds; delta: paired difference from none;")
    print("agreement: whole-tuple fine/coarse concept agreement of the kept tuples (not used)")
    print(f"{'rule':<12} {'tuples':>7} {'agreement':>11} {'val R@1':>8} {'delta':>7} "
          f"{'test R@1':>9}")  # fmt: skip
    for r, xs in runs.items():
        val = np.array([x["val"] for x in xs])
        agree = f"{np.mean([x['fine'] for x in xs]):.3f}/{np.mean([x['coarse'] for x in xs]):.3f}"
        print(f"{r:<12} {np.mean([x['tuples'] for x in xs]):>7.0f} {agree:>11} "
              f"{100 * val.mean():>8.2f} {100 * (val - base).mean():>+7.2f} "
              f"{100 * np.mean([x['test'] for x in xs]):>9.2f}")  # fmt: skip
    best = max(runs, key=lambda r: np.mean([x["val"] for x in runs[r]]))
    ratio = np.mean([x["val"] for x in runs[best]]) / base.mean()
    print(f"chosen by val R@1: {best}")
    print(f"RESULT clean_rules ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
