"""The paper's claims measured with 95% confidence intervals over world and training seeds.

    python bench/claims.py [--world-seeds 0 1 2] [--train-seeds 0 1 2] [--quick] [--finished]
                           [-- overrides]

Runs the full main job (`python train.py experiment=full`: pair -> bind -> every route recipe
-> evaluate) once per (world seed, training seed) pair, as `data.seed=W seed=T`, each into its
own directory under bench/claims_results/runs/<tag>/. A world's caches and bound spaces are
shared by its training seeds (`bind.seed=0`, one `route.bound_dir` per world): the training
seeds vary the routes, the methods compared, over the same projectors; the world seeds vary
everything. A
pair whose results.json exists is skipped, so an interrupted sweep resumes. `--quick` is 2 x 2
seeds on the small test world (tests/conftest.py SMALL_WORLD); overrides after `--` go to every
run, and a hash of them names the runs' folder so that runs with other settings never mix.
`--finished` runs nothing: it reports the grid's finished runs and names the missing ones.

From each run's results.json it reads every direction's R@1 per method, the mean over all
directions (12) and over those that involve text (6). For each method it reports mean +- the 95%
Student-t half-width over the n runs. Runs are treated as independent draws. The world and the
training seed both vary, so the interval covers both sources of spread. The claims are decided by
paired differences (routed - fixed, fixed - average, routed - routed_l0), taken within each
(world, training) pair so that a world's difficulty cancels. A method missing from a run counts as
absent there ("n/a" when absent everywhere). Writes claims-<tag>.{md,json,csv,png} beside the
runs. The last line is `RESULT claims routed_minus_fixed=<x> ci=<y> n=<n>`, in points of mean R@1.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "claims_results"
# The main job's omni methods in report order; any other route of pipeline.routes follows them.
METHODS = ("average", "fixed", "routed_paper", "routed_l0", "routed", "routed_oracle")
BASELINE = "average"  # every method is compared with it, within each run
SUMMARIES = {"mean": "mean R@1 (all directions)", "text": "text R@1 (directions with text)"}


def small_world() -> list[str]:
    """The small test world's overrides, SMALL_WORLD of tests/conftest.py (read, not imported)."""
    tree = ast.parse((REPO / "tests" / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SMALL_WORLD":
            return list(ast.literal_eval(node.value))
    raise ValueError("tests/conftest.py: no SMALL_WORLD tuple of overrides found")


def run_pipeline(runs: Path, world: int, train: int, overrides: list[str]) -> tuple[Path, str]:
    """results.json of the main job for this seed pair (run now unless it exists), and its code."""
    out = runs / f"world{world}_train{train}"
    results, record = out / "runs" / "pipeline-base" / "results.json", out / "claims_run.json"
    if results.is_file():
        print(f"claims: world {world}, train {train}: {results} exists, skipped", flush=True)
        return results, json.loads(record.read_text())["commit"] if record.is_file() else "?"
    out.mkdir(parents=True, exist_ok=True)
    data = runs / f"world{world}_data"  # one world per seed, shared by its training seeds
    bound = runs / f"world{world}_bound"  # bound once per world (bind.seed=0), see the docstring
    command = [sys.executable, "train.py", f"paths.output_dir={out}", f"paths.data_dir={data}",
               f"seed={train}", f"data.seed={world}", "bind.seed=0", f"route.bound_dir={bound}",
               *overrides]  # fmt: skip
    print(f"claims: world {world}, train {train}: {' '.join(command[1:])}", flush=True)
    with open(out / "claims.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not results.is_file():
        raise SystemExit(f"claims: the run for world {world}, train {train} failed (exit {code}, "
                         f"expected {results}); its output is in {out / 'claims.log'}")  # fmt: skip
    # A resumed sweep mixes runs made at different times: record which code made each.
    git = ["git", "describe", "--always", "--dirty"]
    made = subprocess.run(git, cwd=REPO, capture_output=True, text=True).stdout.strip() or "?"
    record.write_text(json.dumps({"commit": made}) + "\n")
    return results, made


def method_order(names) -> list[str]:
    """The omni methods among `names` (not raw:/bound: spaces): METHODS first, then the rest."""
    omni = [n for n in names if ":" not in n]
    return [m for m in METHODS if m in omni] + sorted(set(omni) - set(METHODS))


def val_scores(results_path: Path) -> dict[str, float]:
    """{method: val mean R@1} from each route export's record; `average` is the routes' shared
    start (uniform weights over the same bound spaces), so val differences pair within a run."""
    out = {}
    for omni in sorted(results_path.parents[2].glob("omni/*/*/omni.json")):
        meta = json.loads(omni.read_text())
        if meta.get("best_val_mean_R1") is None:
            continue
        out[omni.parent.name] = float(meta["best_val_mean_R1"])
        if omni.parent.name == "routed" and meta.get("start_val_mean_R1") is not None:
            out[BASELINE] = float(meta["start_val_mean_R1"])
    return out


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{method: {'mean'|'text'|'<q>_to_<t>': R@1 fraction}} for the omni methods of results."""
    out = {}
    for method in method_order(results.get("methods", {})):
        entry = results["methods"][method]
        if not entry.get("retrieval"):
            continue
        r1 = {k[:-4]: v for k, v in entry["retrieval"].items() if k.endswith("/R@1")}
        text = [v for k, v in r1.items() if "text" in k.split("_to_")]
        out[method] = {"mean": float(np.mean(list(r1.values()))), **r1}
        if text:
            out[method]["text"] = float(np.mean(text))
    return out


def interval(values: list[float]) -> dict:
    """Mean and 95% Student-t half-width of values (None where undefined: n = 0, or n = 1)."""
    n = len(values)
    mean = float(np.mean(values)) if n else None
    half = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "half": half}


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """Every method against the baseline, then routed against fixed and the paper's recipe."""
    pairs = [(m, BASELINE) for m in methods if m != BASELINE and BASELINE in methods]
    if "routed" in methods:
        pairs += [("routed", b) for b in ("fixed", "routed_paper", "routed_l0") if b in methods]
    return pairs


def val_differences(runs: list[dict[str, float]]) -> dict[str, dict]:
    """{method: interval of (its val mean R@1 - the baseline's)} paired within each run: what
    chooses the default recipe (never the test sets)."""
    names = method_order({m for run in runs for m in run} - {BASELINE})
    return {m: interval([r[m] - r[BASELINE] for r in runs if m in r and BASELINE in r])
            for m in names}  # fmt: skip


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict:
    """Per-method intervals of every metric over runs, and paired differences within each run."""
    metrics = sorted({k for run in runs for m in run.values() for k in m} - set(SUMMARIES))
    metrics = [*SUMMARIES, *metrics]
    names = [*METHODS, *method_order({m for run in runs for m in run} - set(METHODS))]
    methods = {m: {k: interval([r[m][k] for r in runs if k in r.get(m, {})]) for k in metrics}
               for m in names}  # fmt: skip
    differences = {}
    for a, b in comparisons(names):
        both = [r for r in runs if a in r and b in r]
        differences[f"{a} - {b}"] = {
            k: interval([r[a][k] - r[b][k] for r in both if k in r[a] and k in r[b]])
            for k in metrics
        }
    return {"metrics": metrics, "methods": methods, "differences": differences}


def cell(iv: dict, sign: str = "") -> str:
    """'mean +- half' in percent, or n/a."""
    if iv["n"] == 0:
        return "n/a"
    half = "n/a" if iv["half"] is None else f"{100 * iv['half']:.1f}"
    return f"{100 * iv['mean']:{sign}.1f} ± {half}"


def markdown(summary: dict, header: str) -> str:
    """The three tables: overall per method, paired differences, per direction."""
    metrics, methods, diffs = summary["metrics"], summary["methods"], summary["differences"]
    lines = [header, "", "| method | " + " | ".join(SUMMARIES.values()) + " | n |",
             "|---|" + "---|" * (len(SUMMARIES) + 1)]  # fmt: skip
    for m, ivs in methods.items():
        row = [cell(ivs[k]) for k in SUMMARIES]
        lines.append(f"| `{m}` | " + " | ".join(row) + f" | {ivs['mean']['n']} |")
    lines += ["", "Paired differences (points; the claim holds when the interval excludes 0):", "",
              "| difference | " + " | ".join(SUMMARIES.values()) + " | n | claim |",
              "|---|" + "---|" * (len(SUMMARIES) + 2)]  # fmt: skip
    for name, ivs in diffs.items():
        iv, verdict = ivs["mean"], "n/a"
        if iv["half"] is not None:
            low, high = iv["mean"] - iv["half"], iv["mean"] + iv["half"]
            verdict = "holds" if low > 0 else "reversed" if high < 0 else "within noise"
        row = [cell(ivs[k], "+") for k in SUMMARIES]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {iv['n']} | {verdict} |")
    if summary.get("val"):
        lines += ["", f"Validation mean R@1, paired difference against `{BASELINE}` (points; the "
                  "default recipe is chosen from these, never from the test sets):", "",
                  "| method | val difference | n |", "|---|---|---|"]  # fmt: skip
        for m, iv in summary["val"].items():
            lines.append(f"| `{m}` | {cell(iv, '+')} | {iv['n']} |")
    lines += ["", "Per direction, R@1 (%):", "", "| direction | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]  # fmt: skip
    for k in metrics[len(SUMMARIES) :]:
        lines.append(f"| {k} | " + " | ".join(cell(methods[m][k]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def write_csv(summary: dict, path: Path) -> None:
    """One row per (kind, name, metric): n, mean, 95% half-width and bounds (fractions)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "name", "metric", "n", "mean", "half", "low", "high"])
        for kind in ("methods", "differences"):
            for name, ivs in summary[kind].items():
                for k, iv in ivs.items():
                    bounds = [None, None]
                    if iv["half"] is not None:
                        bounds = [iv["mean"] - iv["half"], iv["mean"] + iv["half"]]
                    writer.writerow([kind, name, k, iv["n"], iv["mean"], iv["half"], *bounds])


def plot(summary: dict, path: Path, title: str) -> None:
    """Per-method means with 95% CI error bars: overall, then per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = summary["metrics"]
    methods = {m: ivs for m, ivs in summary["methods"].items() if ivs["mean"]["n"]}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(metrics)), 5))
    width = 0.8 / max(len(methods), 1)
    for i, (m, ivs) in enumerate(methods.items()):
        x = np.arange(len(metrics)) + (i - (len(methods) - 1) / 2) * width
        mean = [100 * (ivs[k]["mean"] or 0) for k in metrics]  # a method without k: no bar
        half = [100 * (ivs[k]["half"] or 0) for k in metrics]
        ax.bar(x, mean, width, yerr=half, capsize=2, label=m)
    ax.set_xticks(np.arange(len(metrics)), [SUMMARIES.get(k, k) for k in metrics], rotation=45,
                  ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("R@1 (%), mean ± 95% CI")
    ax.set_ylim(0, 100)  # R@1's range: an interval wider than that is cut at the frame
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    """The CPU's model name (lscpu), for the record."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), "unknown CPU")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the seed grid, then print and write the statistics."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--train-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="2 x 2 seeds on the small test world")
    ap.add_argument("--finished", action="store_true", help="report finished runs only")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    default = [0, 1] if args.quick else [0, 1, 2]
    worlds, trains = args.world_seeds or default, args.train_seeds or default
    # experiment=full: the main job with every route recipe and the oracle row, on full pools.
    overrides = ["experiment=full", *(small_world() if args.quick else []), *extra]
    tag = "quick" if args.quick else "full"
    if extra:  # other settings, other runs: never resume a run made with different overrides
        tag += "-" + hashlib.sha256("\n".join(extra).encode()).hexdigest()[:8]
    runs = OUT / "runs" / tag
    per_run, missing = [], []
    for w in worlds:
        for t in trains:
            done = runs / f"world{w}_train{t}" / "runs" / "pipeline-base" / "results.json"
            if args.finished and not done.is_file():
                missing.append(f"world {w} train {t}")
                continue
            path, made = run_pipeline(runs, w, t, overrides)
            per_run.append({"world": w, "train": t, "commit": made, "val": val_scores(path),
                            "scores": scores(json.loads(path.read_text()))})  # fmt: skip
    summary = summarize([r["scores"] for r in per_run])
    summary["val"] = val_differences([r["val"] for r in per_run])
    command = " ".join(["python bench/claims.py", *argv])
    header = (
        f"## Claims, {datetime.date.today()}, {cpu_model()}\n\n`{command}`: world seeds {worlds} x "
        f"training seeds {trains}, n = {len(per_run)} runs; overrides {overrides or 'none'}. "
        "Mean ± 95% CI (Student t over the runs), R@1 in %."
    )
    commits = sorted({r["commit"] for r in per_run})
    header += f" Code: {', '.join(commits)}."
    if missing:
        header += f" Not run: {', '.join(missing)}."
    if len(commits) > 1:  # resumed across code changes: the runs may not be comparable
        header += " **Warning: the runs were made by different code; delete runs/ to redo.**"
    text = markdown(summary, header)
    print(text)
    stem = OUT / f"claims-{tag}"
    stem.with_suffix(".md").write_text(text)
    record = {"command": command, "overrides": overrides, "runs": per_run, **summary}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    write_csv(summary, stem.with_suffix(".csv"))
    plot(summary, stem.with_suffix(".png"), f"{command} (n = {len(per_run)})")
    print(f"wrote {stem}.{{md,json,csv,png}}")
    empty = {"mean": None, "half": None, "n": 0}
    iv = summary["differences"].get(f"routed - {BASELINE}", {}).get("mean", empty)
    points = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(f"RESULT claims routed_minus_{BASELINE}={points(iv['mean'])} ci={points(iv['half'])} "
          f"n={iv['n']}")  # fmt: skip


if __name__ == "__main__":
    main()
