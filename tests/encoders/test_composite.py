"""encoders/composite.py: a space whose modalities come from different encoders (Uni3D's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from encoders import build_encoder, build_processor
from encoders.composite import CompositeEncoder

CONF = Path(__file__).resolve().parents[2] / "conf" / "space"


def test_tiny_uni3d_embeds_points_with_uni3d_and_the_rest_with_eva02() -> None:
    """The tiny Uni3D space: the point part is Uni3D's encoder, image and text EVA02-E's, and
    each modality's output equals its part's own, normalised."""
    cfg = OmegaConf.load(CONF / "tiny_uni3d.yaml")
    enc = build_encoder(cfg.encoder, cfg.dims)
    assert isinstance(enc, CompositeEncoder)
    assert [type(p).__name__ for p in enc.parts] == ["Uni3DEncoder", "OpenClipEncoder"]
    assert enc.index == {"point": 0, "image": 1, "text": 1}
    cloud = np.random.default_rng(0).random((300, 6)).astype(np.float32)
    raw = {"point": [cloud], "image": [Image.new("RGB", (40, 30), (200, 30, 30))],
           "text": ["a chair"]}  # fmt: skip
    out = enc.encode(raw)
    for x in out.values():
        assert x.shape == (1, 64) and torch.allclose(x.norm(dim=1), torch.ones(1))
    alone = enc.parts[1].encode({"text": ["a chair"]})["text"]
    assert torch.equal(out["text"], alone)
    processor = build_processor(cfg.encoder, cfg.dims)  # no model built: the workers' side
    assert processor.num_points == 256  # Uni3D's npoints reach the point reader


def test_parts_must_cover_the_space_once() -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "tiny_uni3d.yaml").encoder)
    point, image_text = cfg["parts"]
    with pytest.raises(ValueError, match=r"no part embeds \['image', 'text'\]"):
        CompositeEncoder({"point": 64, "image": 64, "text": 64}, [point])
    twice = {"modalities": ["point"], "encoder": image_text["encoder"]}
    with pytest.raises(ValueError, match=r"parts\[1\]: 'point' is already parts\[0\]'s"):
        CompositeEncoder({"point": 64}, [point, twice])
    with pytest.raises(ValueError, match=r"encoder.parts\[0\]: expected"):
        CompositeEncoder({"point": 64}, [{"encoder": point["encoder"]}])
