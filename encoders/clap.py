"""LAION-CLAP audio-text encoders (the `laion_clap` package), fully offline.

    encoder: {_target_: encoders.clap.ClapEncoder, amodel: HTSAT-base, enable_fusion: false,
              checkpoint: /path/to/630k-audioset-best.pt, text_model_dir: /path/to/roberta-base}

laion_clap builds its text branch with `RobertaModel.from_pretrained('roberta-base')` and
tokenises with the `roberta-base` tokenizer, both from the Hugging Face Hub. Here the text branch
is built from the config in `text_model_dir` (a local folder holding roberta-base's config.json
and tokenizer files; null means the Hub id `roberta-base`, which offline must be in the HF cache),
and its weights come from the CLAP checkpoint, which holds the whole model. `tiny_text: true`
writes a tiny RoBERTa config (hidden size 768, as CLAP's text projection expects) and a byte-level
tokenizer into `text_model_dir` when it is missing: the smoke space `tiny_clap` uses it.
`checkpoint: null` means random weights drawn from `seed`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.base import Encoder, Processor, param_dtype, seeded, write_folder_once

MODALITIES = ("audio", "text")
CONTEXT = 77  # laion_clap's tokenizer max_length
HUB_TEXT_MODEL = "roberta-base"


def audio_config(amodel: str) -> dict:
    """laion_clap's audio config of `amodel` (rate, clip length, mel settings), read without
    importing laion_clap (its import loads tokenizers and takes seconds)."""
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("laion_clap is not installed: pip install laion-clap")
    folder = Path(next(iter(spec.submodule_search_locations))) / "clap_module" / "model_configs"
    path = folder / f"{amodel}.json"
    if not path.exists():
        names = sorted(p.stem for p in folder.glob("*.json"))
        raise ValueError(f"laion_clap has no audio model {amodel!r}; it has {names}")
    return json.loads(path.read_text())["audio_cfg"]


def ensure_tiny_text_model(directory: str | Path) -> Path:
    """Write a tiny RoBERTa config and byte-level BPE tokenizer into `directory` if missing.

    1 layer, hidden size 768 (CLAP projects a 768-dim pooled text feature), 261 tokens: every
    byte plus RoBERTa's special tokens in RoBERTa's order, no merges. Written atomically.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaConfig, RobertaTokenizer

    def write(tmp: Path) -> None:
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for char in sorted(ByteLevel.alphabet()):
            vocab[char] = len(vocab)
        vocab["<mask>"] = len(vocab)
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "merges.txt").write_text("#version: 0.2\n")
        RobertaTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt")).save_pretrained(tmp)
        RobertaConfig(
            vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
            intermediate_size=256, max_position_embeddings=CONTEXT + 3, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ).save_pretrained(tmp)  # fmt: skip

    return write_folder_once(directory, write)


def _text_source(text_model_dir: str | None, tiny_text: bool) -> str:
    if text_model_dir is None:
        if tiny_text:
            raise ValueError("encoder.tiny_text needs encoder.text_model_dir (where to write it)")
        return HUB_TEXT_MODEL
    if tiny_text:
        ensure_tiny_text_model(text_model_dir)
    if not Path(text_model_dir, "config.json").exists():
        raise FileNotFoundError(
            f"encoder.text_model_dir {text_model_dir}: no config.json; it must hold roberta-base's "
            "config and tokenizer files (save_pretrained of both)"
        )
    return str(text_model_dir)


def _text_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except OSError as e:
        raise OSError(
            f"CLAP text branch: cannot load the config of {source!r} ({e}). Offline, set "
            "encoder.text_model_dir to a local folder with roberta-base's config and tokenizer"
        ) from e


class ClapProcessor(Processor):
    """Audio: int16-quantised waveforms as laion_clap does; text: RoBERTa tokens (batch, 77)."""

    def __init__(
        self,
        amodel: str = "HTSAT-base",
        enable_fusion: bool = False,
        text_model_dir: str | None = None,
        tiny_text: bool = False,
        **_: Any,
    ) -> None:
        from transformers import AutoTokenizer

        self.audio_cfg = audio_config(amodel)
        self.enable_fusion = bool(enable_fusion)
        self.sample_rate = int(self.audio_cfg["sample_rate"])
        # Fusion embeds long audio whole (a global view plus 3 crops); otherwise one 10 s window.
        self.clip_samples = None if enable_fusion else int(self.audio_cfg["clip_samples"])
        if enable_fusion and importlib.util.find_spec("torchaudio") is None:
            raise ImportError(
                "laion_clap with enable_fusion computes mel features with torchaudio: "
                "pip install torchaudio"
            )
        source = _text_source(text_model_dir, tiny_text)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        expected = _text_config(source).vocab_size
        if len(self.tokenizer) != expected:
            # transformers returns an empty tokenizer offline instead of failing: refuse it.
            raise ValueError(
                f"CLAP tokenizer from {source!r} has {len(self.tokenizer)} tokens, but its text "
                f"model expects {expected}; point encoder.text_model_dir at a folder holding both"
            )

    def item(self, modality: str, raw: Any) -> Any:
        if modality != "audio":
            return raw
        wave = np.asarray(raw, dtype=np.float32)
        # laion_clap quantises to int16 and back before embedding; so do we, to match it.
        wave = torch.from_numpy((np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0)
        wave = wave.float()
        if not self.enable_fusion:
            return wave
        from laion_clap.training.data import get_audio_features

        return get_audio_features({}, wave, int(self.audio_cfg["clip_samples"]),
                                  data_truncating="fusion", data_filling="repeatpad",
                                  audio_cfg=self.audio_cfg)  # fmt: skip

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        if modality == "text":
            tokens = self.tokenizer(list(items), padding="max_length", truncation=True,
                                    max_length=CONTEXT, return_tensors="pt")  # fmt: skip
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if self.enable_fusion:
            return {k: torch.cat([x[k] for x in items]) if k == "longer"
                    else torch.stack([x[k] for x in items]) for k in items[0]}  # fmt: skip
        return torch.stack(list(items))


class _TextBranchFrom:
    """Stands in for transformers.RobertaModel inside laion_clap while it builds the model:
    its text branch is made from `source`'s config (the checkpoint supplies the weights)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def from_pretrained(self, name: str, *args: Any, **kwargs: Any):
        from transformers import RobertaModel

        return RobertaModel(_text_config(self.source))


@contextlib.contextmanager
def _text_branch_from(source: str) -> Iterator[None]:
    from laion_clap.clap_module import model as clap_model

    original = clap_model.RobertaModel
    clap_model.RobertaModel = _TextBranchFrom(source)
    try:
        yield
    finally:
        clap_model.RobertaModel = original


def load_clap_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A released CLAP checkpoint's state dict, keyed as laion_clap's CLAP module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable CLAP checkpoint ({e})") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a state dict (or {{'state_dict': ...}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # A buffer that transformers >= 4.31 no longer keeps in RoBERTa's state dict.
    state.pop("text_branch.embeddings.position_ids", None)
    return state


class ClapEncoder(Encoder):
    """A LAION-CLAP model: audio (batch, samples) at 48 kHz and RoBERTa tokens in."""

    @classmethod
    def build_processor(
        cls,
        amodel: str = "HTSAT-base",
        enable_fusion: bool = False,
        checkpoint: str | None = None,
        text_model_dir: str | None = None,
        tiny_text: bool = False,
        seed: int = 0,
    ) -> ClapProcessor:
        """The processor of this encoder config, without building the model."""
        return ClapProcessor(amodel, enable_fusion, text_model_dir, tiny_text)

    def __init__(
        self,
        dims: Mapping[str, int],
        amodel: str = "HTSAT-base",
        enable_fusion: bool = False,
        checkpoint: str | None = None,
        text_model_dir: str | None = None,
        tiny_text: bool = False,
        seed: int = 0,
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"laion_clap encoder embeds {MODALITIES}, not {unknown}")
        processor = ClapProcessor(amodel, enable_fusion, text_model_dir, tiny_text)
        super().__init__(dims, processor)
        from laion_clap.clap_module.factory import create_model

        self.checkpoint = checkpoint
        with seeded(seed), _text_branch_from(_text_source(text_model_dir, False)):
            self.model, _ = create_model(
                amodel, "roberta", precision="fp32", device="cpu", enable_fusion=enable_fusion,
                fusion_type="aff_2d" if enable_fusion else "None",
            )  # fmt: skip
        if checkpoint and load_weights:
            state = load_clap_checkpoint(checkpoint)
            try:
                self.model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(
                    f"{checkpoint}: does not fit laion_clap {amodel} (enable_fusion="
                    f"{enable_fusion}): {e}"
                ) from e
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        # Through forward(), which ZeRO-3 hooks (it gathers a module's parameters as it runs).
        model = self.model
        if modality == "text":
            return model(None, batch, device=batch["input_ids"].device)
        dtype = param_dtype(model)
        if isinstance(batch, Mapping):  # fusion features
            feats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            device = feats["waveform"].device
        else:
            device = batch.device
            longer = torch.zeros(len(batch), dtype=torch.bool, device=device)
            feats = {"waveform": batch.to(dtype), "longer": longer}
        return model(feats, None, device=device)

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's weights keyed as in this module (for ZeRO-3 loading)."""
        if not self.checkpoint:
            return None
        return {f"model.{k}": v for k, v in load_clap_checkpoint(self.checkpoint).items()}
