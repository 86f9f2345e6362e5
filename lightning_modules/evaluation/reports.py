"""The evaluate stage's reports: results.md (complete) and a compact console summary.

`results` is the stage's results.json object: {"methods": {name: {"retrieval": {key: fraction},
"zeroshot": {key: fraction}, "summary": {"mean_R@1": ..., ...}}}, ...}.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_modules.evaluation.benchmarks import Benchmarks, columns
from lightning_modules.evaluation.scoring import TIES, mean_r1

ARROW = "\u2192"


def label(key: str) -> str:
    """A result key as a column title: `text_to_audio/R@1` -> `text→audio R@1`."""
    parts = key.split("/")
    if "_to_" in parts[0]:
        q, t = parts[0].split("_to_")
        return " ".join([f"{q}{ARROW}{t}", *parts[1:]])
    return " ".join(parts[1:])


def percent(value: float | None) -> str:
    """A fraction as a percentage with 2 decimals; `-` for a metric the method does not cover."""
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(results: Mapping, benchmarks: Benchmarks) -> str:
    """results.md: percent tables like the paper's Tables 2 and 3, methods as rows."""
    methods = results["methods"]
    retrieval, zeroshot = columns(benchmarks, methods)
    note = f"Manifest `{benchmarks.path}`. Percentages; `-`: the method does not cover it. {TIES}"
    lines = [f"# Evaluation on {benchmarks.name}", "", note, ""]
    trained = {n: m["tuples"] for n, m in methods.items() if m.get("tuples")}
    sources = {}  # one line per tuple table: which methods trained on it
    for name, t in trained.items():
        key = (t.get("pairs"), t.get("tuples_sha256", "")[:12])
        sources.setdefault(key, []).append(f"`{name}`")
    for (pairs, digest), names in sources.items():
        lines.append(
            f"- Trained on **{pairs}** tuples (table sha256 {digest}...): {', '.join(names)}"
        )
    if sources:
        lines.append("")

    def table(title: str, keys: list[str], kind: str, extra: str | None = None) -> None:
        header = ["method", *(label(k) for k in keys)] + ([extra] if extra else [])
        lines.extend([f"## {title}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)])  # fmt: skip
        for name, m in methods.items():
            cells = [percent(m[kind].get(k)) for k in keys]
            if extra:
                cells.append(percent(m["summary"]["mean_R@1"]))
            lines.append("| " + " | ".join([f"`{name}`", *cells]) + " |")
        lines.append("")

    if retrieval:
        table("Cross-modal retrieval (Table 2)", retrieval, "retrieval", "mean R@1 (covered)")
    if zeroshot:
        table("Zero-shot classification (Table 3)", zeroshot, "zeroshot")
    return "\n".join(lines)


def _zeroshot_top1(scores: Mapping[str, float]) -> float | None:
    top1 = [v for k, v in scores.items() if k.endswith("/top1")]
    return sum(top1) / len(top1) if top1 else None


def compact_summary(results: Mapping, width: int = 100) -> str:
    """One line per method, at most `width` columns: mean R@1, text R@1, video R@1, zero-shot.

    text R@1 is the mean R@1 of the directions to or from text; the video column appears only
    when some method scored video. Percentages; `-` where a method covers nothing of it.
    """
    methods = results["methods"]
    rows = {
        name: {
            "dirs": str(len([k for k in m["retrieval"] if k.endswith("/R@1")])),
            "mean R@1": percent(m["summary"]["mean_R@1"]),
            "text R@1": percent(mean_r1(m["retrieval"], "text")),
            "video R@1": percent(mean_r1(m["retrieval"], "video")),
            "zero-shot top1": percent(_zeroshot_top1(m["zeroshot"])),
        }
        for name, m in methods.items()
    }
    heads = ["dirs", "mean R@1", "text R@1", "video R@1", "zero-shot top1"]
    if all(r["video R@1"] == "-" for r in rows.values()):
        heads.remove("video R@1")
    cells = "".join(f"{h:>{len(h) + 2}}" for h in heads)
    name_width = min(max([len("method"), *map(len, rows)]), width - len(cells))
    fit = lambda s: s if len(s) <= name_width else s[: name_width - 1] + "\u2026"  # noqa: E731
    lines = [f"{'method':<{name_width}}{cells}"]
    for name, r in rows.items():
        lines.append(f"{fit(name):<{name_width}}" + "".join(f"{r[h]:>{len(h) + 2}}" for h in heads))
    return "\n".join(lines)
