"""Stage costs: wall time and peak RSS of each pipeline stage on a data config, extrapolated.

    python bench/stage_costs.py [--data world|world_medium] [--out DIR] [--variant base]
                                [-- extra train.py overrides ...]

Runs, each in its own process (so each peak RSS is its own, from wait4): the world's caches for
the variant's spaces and the anchor, the pair stage (pseudo tuples), bind for every space of the
variant, route, and evaluate, as `python train.py stage=<stage> ...` with one output dir. Prints
a table of seconds and peak RSS per stage, and the same extrapolated to the paper's pools
(800k points, 2M audio, 1.2M images, 3M texts) from the measured cost per pool row:
- world (stand-in for extract), bind, route: linear in pool rows (an epoch reads each tuple once;
  the tuple table grows with the pools);
- pair: quadratic (exact search compares every query with every gallery row);
- evaluate: constant (the test sets do not grow with the pools).
Memory above the interpreter's base is extrapolated linearly for world and pair (they hold whole
pools) and kept as measured for bind, route and evaluate (caches beyond the datamodule's
resident_mb stay on disk; bench/route_memory.py). Ends with `RESULT stage_costs ratio=<total
seconds measured / total seconds extrapolated>` (the scale-down factor, for the record).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_POOLS = {"point": 800_000, "audio": 2_000_000, "image": 1_200_000, "text": 3_000_000}
SCALING = {"world": 1, "pair": 2, "bind": 1, "route": 1, "evaluate": 0}  # power of the pool ratio
# Memory above the interpreter: bind and route read caches beyond the datamodule's resident_mb
# per batch (bench/route_memory.py), so theirs does not grow; world and pair hold whole pools.
MEMORY_SCALING = {"world": 1, "pair": 1, "bind": 0, "route": 0, "evaluate": 0}


def compose(overrides: list[str]):
    """conf/config.yaml with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def make_world(overrides: list[str]) -> None:
    """Write the world's caches for the variant's spaces and the anchor (the child of `world`)."""
    from lightning_modules.runtime.config import ensure_data

    cfg = compose(overrides)
    ensure_data(cfg, [*cfg.variant.spaces, cfg.anchor.name])


def run(cmd: list[str], log: Path) -> dict:
    """Run cmd, wait for it with wait4; returns seconds, peak RSS (bytes), return code."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    lines = [x for x in log.read_text().splitlines() if x.strip() and "HYDRA_FULL_ERROR" not in x]
    tail = lines[-1:] if proc.returncode else []
    return dict(seconds=seconds, peak=usage.ru_maxrss * 1024, rc=proc.returncode, tail=tail)


def stages(cfg, common: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, kind, command) of every stage run, in pipeline order."""
    py, train = sys.executable, str(REPO / "train.py")
    out = [("world", "world", [py, __file__, "--child-world", "--", *common])]
    out.append(("pair", "pair", [py, train, "stage=pair", *common]))
    for space in cfg.variant.spaces:
        out.append((f"bind {space}", "bind", [py, train, "stage=bind", f"space={space}", *common]))
    out.append(("route", "route", [py, train, "stage=route", *common]))
    methods = [f"{k}:{s}" for s in cfg.variant.spaces for k in ("raw", "bound")]
    methods.append(f"routed=omni:{cfg.variant.name}/routed")
    quoted = ",".join(f"'{m}'" for m in methods)  # Hydra's grammar needs 'a=b' quoted
    evaluate = [py, train, "stage=evaluate", f"evaluate.methods=[{quoted}]", *common]
    out.append(("evaluate", "evaluate", evaluate))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="world", help="conf/data choice (world, world_medium)")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--out", default=None, help="output dir (default: /tmp/stage_costs_<data>)")
    parser.add_argument("--only", default=None, help="stages to run: world,pair,bind,bind:clap,...")
    parser.add_argument("--child-world", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (after --)")
    args = parser.parse_args()
    if args.child_world:
        make_world(args.overrides)
        return
    out = Path(args.out or f"/tmp/stage_costs_{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data={args.data}", f"variant={args.variant}", f"paths.output_dir={out}",
              "logger=none", "trainer=cpu", *args.overrides]  # fmt: skip
    cfg = compose(common)
    pools = {m: int(n) for m, n in cfg.data.pool_size.items()}
    ratio = sum(PAPER_POOLS.values()) / sum(pools.values())
    base = run([sys.executable, "-c", "import torch, lightning"], out / "base.log")["peak"]

    from rich.console import Console
    from rich.table import Table

    everything = stages(cfg, common)
    todo = everything
    if args.only:
        only = args.only.split(",")  # a kind (bind) or one stage (bind:clap)
        todo = [t for t in todo if t[1] in only or t[0].replace(" ", ":") in only]
    # Results of earlier runs into the same --out (a rerun of failed stages keeps the others).
    saved = out / "stage_costs.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for name, _, cmd in todo:
        results[name] = r = run(cmd, out / f"{name.replace(' ', '_')}.log")
        saved.write_text(json.dumps(results, indent=1))
        print(json.dumps({"stage": name, **r}), flush=True)
    rows, total, total_paper = [], 0.0, 0.0
    for name, kind, _ in everything:
        if name not in results:
            continue
        r = results[name]
        scale = ratio ** SCALING[kind]
        above = max(r["peak"] - base, 0)
        rows.append((name, r, r["seconds"] * scale, base + above * ratio ** MEMORY_SCALING[kind]))
        total += r["seconds"]
        total_paper += r["seconds"] * scale
    table = Table(
        title=f"stage costs: data={args.data} ({sum(pools.values()):,} pool rows), variant "
        f"{args.variant}; paper pools {sum(PAPER_POOLS.values()):,} rows = {ratio:,.1f}x"
    )
    for col in ("stage", "seconds", "peak RSS", "scales as", "paper: seconds", "paper: peak RSS"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    names = {0: "constant", 1: "rows", 2: "rows^2"}
    for name, r, paper_s, paper_peak in rows:
        status = "" if r["rc"] == 0 else f" (failed: {' '.join(r['tail'])[:60]})"
        table.add_row(name + status, f"{r['seconds']:.1f}", f"{r['peak'] / 2**30:.2f} GiB",
                      names[SCALING[name.split()[0]]], f"{paper_s / 3600:.2f} h",
                      f"{paper_peak / 2**30:.1f} GiB")  # fmt: skip
    table.add_row("total", f"{total:.1f}", "", "", f"{total_paper / 3600:.2f} h", "")
    Console(width=130).print(table)
    print(f"(interpreter with torch + lightning: {base / 2**30:.2f} GiB peak RSS)")
    print(f"RESULT stage_costs ratio={total / total_paper:.5f}")


if __name__ == "__main__":
    main()
