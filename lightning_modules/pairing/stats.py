"""Agreement statistics of the pair stage's tuples, for `pairs_summary.json` and the logger.

How often a tuple's items share a concept with its starting item (fine labels and, where the
pools have them, coarse ones), per start, target and hop, against chance.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from datamodules.tuples import modalities_of
from encoders.modalities import MODALITIES
from lightning_modules.pairing.plan import Hop


def _concepts(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, L) concepts of pool rows from (pool,) labels or (pool, L) multi-labels (-1 pads).

    A missing item (row -1) has no concept (all -1).
    """
    labels = labels if labels.ndim == 2 else labels[:, None]
    out = labels[np.maximum(rows, 0)]
    out[rows < 0] = -1
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) bool: the (n, La) and (n, Lb) concept rows name a common concept."""
    return ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any((1, 2))


def _agreement(table: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict:
    """Fine (or coarse) concept agreement of a table's tuples with their start item, per start.

    concept_agreement[s]: fraction of tuples started from s whose present items all share a
    concept with the starting item (multi-label items: any of their labels). chance_agreement[s]:
    the same for main labels if the other present items were drawn uniformly from their pools.
    target_agreement[s][t]: fraction of those holding a t item whose t item shares one.
    concept_agreement_overall: the fraction over all tuples with a labelled start. Only the
    labelled pools count: an item of a pool without labels is left out of the comparison.
    """
    mods = [m for m in modalities_of(table) if m in labels]
    main = {m: labels[m] if labels[m].ndim == 1 else labels[m][:, 0] for m in mods}
    n_concepts = 1 + max(int(main[m].max()) for m in mods)
    share = {m: np.bincount(main[m], minlength=n_concepts) / len(main[m]) for m in mods}
    starts = table["start"]
    agree, chance, target = {}, {}, {}
    whole, measured = np.zeros(len(starts), bool), np.zeros(len(starts), bool)
    for i, s in enumerate(MODALITIES):
        rows = starts == i
        if s not in mods or not rows.any():
            continue
        measured |= rows
        own = _concepts(labels[s], table[s][rows])
        others = [t for t in mods if t != s]
        has = {t: table[t][rows] >= 0 for t in others}
        same = {t: _overlap(_concepts(labels[t], table[t][rows]), own) for t in others}
        whole[rows] = np.logical_and.reduce([same[t] | ~has[t] for t in others])
        agree[s] = float(whole[rows].mean())
        target[s] = {t: float(same[t][has[t]].mean()) if has[t].any() else None for t in others}
        own_main = main[s][table[s][rows]]
        p = np.prod([np.where(has[t], share[t][own_main], 1.0) for t in others], axis=0)
        chance[s] = float(p.mean())
    return dict(
        concept_agreement=agree,
        chance_agreement=chance,
        target_agreement=target,
        concept_agreement_overall=float(whole[measured].mean()) if measured.any() else None,
    )


def summarize(
    table: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Counts per starting modality and, given pool labels, how often tuples share a concept.

    The keys of `_agreement` for the fine labels, and under `coarse` for the coarse ones.
    """
    starts = table["start"]
    out: dict = {
        "tuples": int(len(starts)),
        "counts": {m: int((starts == i).sum()) for i, m in enumerate(MODALITIES)},
        "items": {m: int((table[m] >= 0).sum()) for m in modalities_of(table)},
    }
    if labels is None:
        return out
    out.update(_agreement(table, labels))
    if coarse is not None:
        out["coarse"] = _agreement(table, coarse)
    return out


def hop_stats(
    hops: Mapping[tuple, Hop],
    keep: Mapping[tuple, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None,
) -> dict[str, dict]:
    """Per hop 'x->y' over all starts: count, kept fraction, fine and coarse agreement kept."""
    grouped: dict[str, list[tuple]] = {}
    for prefix, hop in hops.items():
        grouped.setdefault(hop.name, []).append(prefix)
    out = {}
    for name, prefixes in grouped.items():
        x, y = name.split("->")
        kept = np.concatenate([keep[p] for p in prefixes])
        entry: dict = {"hops": int(len(kept)), "kept_fraction": float(kept.mean())}
        for key, lab in (("fine", labels), ("coarse", coarse)):
            if lab is None or x not in lab or y not in lab or not kept.any():
                continue
            q = np.concatenate([hops[p].query for p in prefixes])[kept]
            it = np.concatenate([hops[p].item for p in prefixes])[kept]
            entry[key] = float(_overlap(_concepts(lab[x], q), _concepts(lab[y], it)).mean())
        out[name] = entry
    return out


def rule_stats(
    rule: str,
    table: Mapping[str, np.ndarray],
    before: int,
    hops: Mapping[tuple, Hop],
    keep: Mapping[tuple, np.ndarray],
    labels: Mapping[str, np.ndarray] | None,
    coarse: Mapping[str, np.ndarray] | None,
) -> dict:
    """One rule's entry in the summary: tuples kept, items per start and agreement."""
    s = summarize(table, labels, coarse)
    out = dict(rule=rule, tuples=s["tuples"], kept_fraction=s["tuples"] / max(before, 1),
               counts=s["counts"], items=s["items"])  # fmt: skip
    if labels is not None:
        out["fine"] = {k: s[k] for k in ("concept_agreement", "target_agreement")}
        out["fine"]["overall"] = s["concept_agreement_overall"]
    if coarse is not None:
        c = s["coarse"]
        out["coarse"] = {k: c[k] for k in ("concept_agreement", "target_agreement")}
        out["coarse"]["overall"] = c["concept_agreement_overall"]
    out["hops"] = hop_stats(hops, keep, labels, coarse)
    return out


def flat_metrics(entry: Mapping, prefix: str) -> dict[str, float]:
    """{'prefix/a/b': number} of every number in a nested summary entry (for a logger)."""
    out = {}
    for key, value in entry.items():
        name = f"{prefix}/{key}".replace("->", "_to_")
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out
