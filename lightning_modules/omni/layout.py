"""The omni model's architecture as data: `OmniLayout`, typed and versioned.

Every export and checkpoint stores it (as `OmniLayout.to_dict()`), so it outlives the code that
wrote it. `from_dict` reads today's format and the unversioned one written before it; a newer
version fails naming both. What is not architecture (the tuple source, the training command,
validation scores, encoder recipes, a converted checkpoint's digest) rides along in `record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from encoders.modalities import MODALITIES

LAYOUT_VERSION = 1
KINDS = ("routed", "fixed")
# What a bound space's record must say for its projector mixture to be built.
SPACE_KEYS = ("dims", "out_dim", "hidden_dim", "experts", "renormalize")


class LayoutError(ValueError):
    """A stored layout that cannot be read: names the key or version and what was expected."""


@dataclass(frozen=True)
class OmniLayout:
    """Groups, routers and projectors of an omni model (paper Eq. 3-4).

    groups: {modality: [group, ...]}, in router-output order; a group is a bound space, the anchor
    (used as is), or a key of `blends`: normalize(sum_s weight_s * P_s) over spaces, like the
    official Full's fixed normalize(0.9 EVA-18B + 0.1 ImageBind).
    predictors: {modality: [space, ...]} whose embeddings the router reads, concatenated
    (predictor_dims their summed width). scales: {modality: s}, weights = softmax(s * sigmoid).
    spaces: {space: bound-space record}, each with SPACE_KEYS. specialty: {group: provenance}, the
    L_dec labels. shares: {space: {modality: other space}}, sides a space borrows (Uni3D's
    image/text are EVA02-E's). encoders: {space: {encoder, dims}} to embed raw items.
    """

    anchor: str
    groups: dict[str, list[str]]
    predictors: dict[str, list[str]]
    predictor_dims: dict[str, int]
    scales: dict[str, float]
    spaces: dict[str, dict[str, Any]]
    kind: str = "routed"
    variant: str | None = None
    specialty: dict[str, str] = field(default_factory=dict)
    blends: dict[str, dict[str, float]] = field(default_factory=dict)
    shares: dict[str, dict[str, str]] = field(default_factory=dict)
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"layout kind is {self.kind!r}; expected one of {KINDS}")
        for m, groups in self.groups.items():
            if m not in MODALITIES or not groups:
                raise LayoutError(f"layout groups[{m!r}]: expected a modality of {MODALITIES} "
                                  "with at least one group")  # fmt: skip
            for g in groups:
                if g != self.anchor and g not in self.spaces and g not in self.blends:
                    raise LayoutError(f"layout group {g!r} of {m}: neither the anchor, a bound "
                                      f"space {sorted(self.spaces)} nor a blend")  # fmt: skip
            for key in ("predictors", "predictor_dims", "scales"):
                if m not in getattr(self, key):
                    raise LayoutError(f"layout {key}: no entry for {m!r}")
        for name, space in self.spaces.items():
            missing = [k for k in SPACE_KEYS if k not in space]
            if missing:
                raise LayoutError(f"layout spaces[{name!r}]: missing {missing}")

    @property
    def modalities(self) -> list[str]:
        """The modalities it embeds, in MODALITIES order."""
        return [m for m in MODALITIES if m in self.groups]

    @property
    def out_dim(self) -> int:
        """The omni space's width (the anchor's)."""
        return int(next(iter(self.spaces.values()))["out_dim"])

    def replace(self, **changes: Any) -> OmniLayout:
        """A copy with some fields changed; `record=` entries are added to the record."""
        record = {**self.record, **changes.pop("record", {})}
        return dataclasses.replace(self, record=record, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: flat JSON, the record's keys beside the architecture's."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record = fields.pop("record")
        return {**record, **fields, "layout_version": LAYOUT_VERSION}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], where: str = "layout") -> OmniLayout:
        """Read `to_dict`'s form, or the unversioned one (layout_version absent) before it."""
        if not isinstance(stored, Mapping):
            raise LayoutError(f"{where}: expected a JSON object, got {type(stored).__name__}")
        stored = dict(stored)
        version = stored.pop("layout_version", LAYOUT_VERSION)
        if version != LAYOUT_VERSION:
            raise LayoutError(f"{where}: layout_version {version!r}; this code reads "
                              f"{LAYOUT_VERSION} (and unversioned exports)")  # fmt: skip
        names = {f.name for f in dataclasses.fields(cls)} - {"record"}
        unset = dataclasses.MISSING
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is unset and f.default_factory is unset]  # fmt: skip
        missing = [k for k in required if k not in stored]
        if missing:
            raise LayoutError(f"{where}: missing {missing}; not an omni layout")
        known = {k: v for k, v in stored.items() if k in names}
        known = {k: v for k, v in known.items() if v is not None or k == "variant"}
        try:
            return cls(**known, record={k: v for k, v in stored.items() if k not in names})
        except LayoutError as e:
            raise LayoutError(f"{where}: {e}") from e


def variant_groups(
    variant: str,
    names: list[str],
    dims: Mapping[str, Mapping[str, int]],
    anchor: str,
    include_anchor: bool,
    predictors: Mapping[str, list[str]],
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, int]]:
    """A variant's groups, predictors and predictor widths from its spaces' dims.

    names: the variant's bound spaces, in group order; dims: {space: {modality: dim}} of those, the
    anchor and every predictor. A modality's groups are the spaces with a side for it (then the
    anchor, when included); its router reads the concatenated `predictors[modality]`.
    """
    groups = {}
    for m in MODALITIES:
        g = [s for s in names if m in dims[s]]
        if include_anchor and m in dims[anchor]:
            g.append(anchor)
        if g:
            groups[m] = g
    chosen, widths = {}, {}
    for m in groups:
        preds = list(predictors.get(m, []))
        if not preds:
            raise ValueError(
                f"variant {variant!r}: no predictors for {m!r} (variant.predictors.{m})"
            )
        for p in preds:
            if m not in dims[p]:
                raise ValueError(f"variant {variant!r}: predictor {p!r} has no {m} side")
        chosen[m] = preds
        widths[m] = sum(int(dims[p][m]) for p in preds)
    return groups, chosen, widths
