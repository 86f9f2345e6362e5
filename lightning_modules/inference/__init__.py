"""Inference: an omni model as an embedding and retrieval API (api), its galleries (gallery),
its model card (card) and the search CLI (cli, `python -m lightning_modules.inference`)."""

from lightning_modules.inference.api import OmniBind, compose
from lightning_modules.inference.gallery import Gallery, build_gallery

__all__ = ["OmniBind", "compose", "Gallery", "build_gallery"]
