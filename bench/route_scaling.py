"""How route-step time grows with the number of bound spaces (4, 8, 16).

Times RouteModule's real training step (forward, L_align + lambda * L_dec, backward, Adam step) on
random projected groups: every space covers every modality, so each modality routes over n
groups. The reference is linear growth from the smallest size: ratio = (time at 4 spaces x 16/4)
/ (time at 16 spaces), so 1.0 means exactly linear and higher means better than linear.

    python bench/route_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from datamodules.projected import PROJECTED
from encoders.modalities import MODALITIES, PROVENANCES
from lightning_modules.runtime.config import CONF_DIR
from lightning_modules.stages.route import RouteModule

torch.set_num_threads(2)


def make_batch(n_spaces: int, batch: int, dim: int, pred_dim: int) -> tuple[RouteModule, dict]:
    """A RouteModule over n spaces and one batch of random, normalised projected groups."""
    spaces = [f"s{i}" for i in range(n_spaces)]
    groups = {m: spaces for m in MODALITIES}
    predictors = {m: ["pred"] for m in MODALITIES}
    specialty = {s: PROVENANCES[i % len(PROVENANCES)] for i, s in enumerate(spaces)}
    meta = dict(kind="routed", anchor="anchor", groups=groups, predictors=predictors,
                predictor_dims={m: pred_dim for m in MODALITIES}, specialty=specialty,
                # tiny projectors: the batch carries the groups' projections already
                spaces={s: dict(dims={m: 8 for m in MODALITIES}, out_dim=dim, hidden_dim=8,
                                experts=["mix"], renormalize=False) for s in spaces},
                scales={m: 10.0 if m == "text" else 1.0 for m in MODALITIES})  # fmt: skip
    # conf/model/route.yaml's values, every router training (as the paper's recipe)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        route = compose("config").model.route
    model: RouteModule = hydra.utils.instantiate(route, layout=meta, train=None, _recursive_=False)
    emb = {s + PROJECTED: {m: F.normalize(torch.randn(batch, dim), dim=-1) for m in MODALITIES}
           for s in spaces}  # fmt: skip
    emb["pred"] = {m: torch.randn(batch, pred_dim) for m in MODALITIES}
    prov = torch.randint(0, len(PROVENANCES), (batch,))
    return model, {"emb": emb, "provenance": prov, "start": torch.zeros(batch, dtype=torch.long)}


def time_steps(n_spaces: int, batch: int, dim: int, steps: int) -> float:
    """Median seconds per training step (after two warm-up steps; the median resists noise)."""
    model, data = make_batch(n_spaces, batch, dim, 1024)
    model.log = lambda *a, **k: None  # no Trainer attached: logging is a no-op here
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = model.training_step(data, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch and fewer steps")
    args = ap.parse_args()
    batch, steps = (256, 5) if args.quick else (1024, 10)
    sizes = (4, 8, 16)
    time_steps(4, batch, 1536, 2)  # warm up the allocator and thread pool once
    seconds = {n: time_steps(n, batch, 1536, steps) for n in sizes}
    print(f"route step, batch {batch}, omni dim 1536, 4 modalities, {steps} steps per size")
    print(f"{'spaces':>6} | {'ms/step':>8} | {'ms/step/space':>13} | {'x vs 4 spaces':>13}")
    for n in sizes:
        ms = 1000 * seconds[n]
        print(f"{n:>6} | {ms:8.1f} | {ms / n:13.2f} | {seconds[n] / seconds[4]:13.2f}")
    ratio = seconds[4] * (16 / 4) / seconds[16]
    print(f"linear reference at 16 spaces: {1000 * seconds[4] * 4:.1f} ms/step")
    print(f"RESULT route_scaling ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
