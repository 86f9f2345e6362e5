"""The modalities, named once for the whole project, and the one device helper."""

import torch

MODALITIES: tuple[str, ...] = ("point", "audio", "image", "text")
# The modalities that a text's provenance can name (an audio, image or 3D caption).
PROVENANCES: tuple[str, ...] = ("point", "audio", "image")
# All 6 unordered modality pairs and all 12 retrieval directions, in a fixed order.
PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for i, a in enumerate(MODALITIES) for b in MODALITIES[i + 1 :]
)
DIRECTIONS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for a in MODALITIES for b in MODALITIES if a != b
)
# FreeBind's letters for the starting modality of a pseudo tuple (V is vision, i.e. image).
LETTERS: dict[str, str] = {"A": "audio", "T": "text", "V": "image", "P": "point"}


def check_modality(name: str, where: str = "") -> str:
    """Return `name` if it is a known modality, else raise naming the choices."""
    if name not in MODALITIES:
        at = f" in {where}" if where else ""
        raise ValueError(f"unknown modality {name!r}{at}; expected one of {list(MODALITIES)}")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is cuda when available, else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
