"""WavCaps audio-text retrieval encoders (the WavCaps repo's `ASE`: HTSAT + BERT), fully offline.

    encoder: {_target_: encoders.wavcaps.WavCapsEncoder, checkpoint: /path/to/HTSAT-BERT-PT.pt,
              text_model_dir: /path/to/bert-base-uncased}

The released checkpoints (HTSAT-BERT-PT.pt, HTSAT-BERT-FT-AudioCaps.pt, HTSAT-BERT-FT-Clotho.pt)
hold ASE's state dict under ckpt['model'], keyed `audio_encoder.audio_enc.*` (HTSAT, its mel
front end included), `text_encoder.text_encoder.*` (BERT without its pooler, plus the
position_ids buffer older transformers saved), `audio_proj.*`, `text_proj.*` and `temp`. The
HTSAT is laion_clap's, whose blocks WavCaps' copy shares name for name; only the front end is
renamed, and it takes waveforms. WavCaps builds BERT with `from_pretrained('bert-base-uncased')`
from the Hub; here it is built from the config in `text_model_dir` (a local folder holding
bert-base-uncased's config and tokenizer; null means the Hub id, which offline must be in the HF
cache), and the checkpoint supplies its weights. `tiny: true` builds a tiny HTSAT and writes a
tiny BERT config and WordPiece tokenizer into `text_model_dir` when missing (the tiny_wavcaps
smoke space). `checkpoint: null` means random weights drawn from `seed`.

Inputs as the OmniBind release prepares them: audio at 32 kHz mono, cut or padded to 10 s (the
release zero-pads: data.load.pad=zero; the readers resample with scipy, the release with
librosa), captions as given (WavCaps' training-time text_preprocess is not applied by the
release), tokenised padding to the batch's longest, truncated at 30 tokens.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from encoders.base import Encoder, Processor, param_dtype, seeded, write_folder_once

if TYPE_CHECKING:
    from transformers import BertConfig

MODALITIES = ("audio", "text")
HUB_TEXT_MODEL = "bert-base-uncased"
SAMPLE_RATE = 32000
CLIP_SAMPLES = 10 * SAMPLE_RATE  # the release pads or cuts every clip to 10 s
MAX_TOKENS = 30  # WavCaps' tokenizer: padding='longest', truncation, max_length=30
EMBED_SIZE = 1024
TEMP = 0.07
# WavCaps' settings yaml (audio_args): the mel front end of its HTSAT.
MEL = dict(sample_rate=SAMPLE_RATE, window_size=1024, hop_size=320, mel_bins=64, fmin=50,
           fmax=14000)  # fmt: skip
# WavCaps' HTSAT (audio_encoder.py) and the tiny smoke stand-in of the same architecture.
HTSAT = dict(spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=527, embed_dim=96,
             depths=[2, 2, 6, 2], num_heads=[4, 8, 16, 32], window_size=8)  # fmt: skip
TINY_HTSAT = {**HTSAT, "embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]}
TINY_EMBED_SIZE = 64
# A buffer that transformers >= 4.31 no longer keeps in BERT's state dict; the released
# checkpoints (saved with older transformers) hold it.
POSITION_IDS = "text_encoder.text_encoder.embeddings.position_ids"


def ensure_tiny_text_model(directory: str | Path) -> Path:
    """Write a tiny BERT config and lower-casing WordPiece tokenizer into `directory` if missing.

    2 layers, hidden size 32; the vocabulary is BERT's special tokens, single characters and
    their `##` continuations, so any ASCII caption tokenises. Written atomically.
    """
    from transformers import BertConfig, BertTokenizer

    def write(tmp: Path) -> None:
        chars = string.ascii_lowercase + string.digits + string.punctuation
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizer(str(tmp / "vocab.txt"), do_lower_case=True).save_pretrained(tmp)
        BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
        ).save_pretrained(tmp)  # fmt: skip

    return write_folder_once(directory, write)


def _text_source(text_model_dir: str | None, tiny: bool) -> str:
    if text_model_dir is None:
        if tiny:
            raise ValueError("encoder.tiny needs encoder.text_model_dir (where to write its BERT)")
        return HUB_TEXT_MODEL
    if tiny:
        ensure_tiny_text_model(text_model_dir)
    if not Path(text_model_dir, "config.json").exists():
        raise FileNotFoundError(
            f"encoder.text_model_dir {text_model_dir}: no config.json; it must hold "
            "bert-base-uncased's config and tokenizer files (save_pretrained of both)"
        )
    return str(text_model_dir)


def _text_config(source: str) -> BertConfig:
    from transformers import BertConfig

    try:
        return BertConfig.from_pretrained(source)
    except OSError as e:
        raise OSError(
            f"WavCaps text encoder: cannot load the config of {source!r} ({e}). Offline, set "
            "encoder.text_model_dir to a local folder with bert-base-uncased's config and tokenizer"
        ) from e


class WavCapsProcessor(Processor):
    """Audio: 10 s mono float32 waveforms at 32 kHz; text: BERT tokens as WavCaps tokenises."""

    sample_rate = SAMPLE_RATE
    clip_samples = CLIP_SAMPLES

    def __init__(self, text_model_dir: str | None = None, tiny: bool = False) -> None:
        from transformers import AutoTokenizer

        source = _text_source(text_model_dir, tiny)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        expected = _text_config(source).vocab_size
        if len(self.tokenizer) != expected:
            # transformers returns an empty tokenizer offline instead of failing: refuse it.
            raise ValueError(
                f"WavCaps tokenizer from {source!r} has {len(self.tokenizer)} tokens, but its "
                f"text model expects {expected}; point encoder.text_model_dir at a folder "
                "holding both"
            )

    def item(self, modality: str, raw: Any) -> Any:
        if modality != "audio":
            return raw
        wave = np.asarray(raw, dtype=np.float32)
        if wave.shape != (CLIP_SAMPLES,):
            raise ValueError(
                f"WavCaps takes mono waveforms of {CLIP_SAMPLES} samples (10 s at {SAMPLE_RATE} "
                f"Hz), got shape {wave.shape}; read files through encoders.readers.load_audio"
            )
        return torch.from_numpy(wave)

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        if modality == "text":
            # As WavCaps' TextEncoder: raw captions (the release applies no text_preprocess;
            # bert-base-uncased's tokenizer lower-cases), padded to the batch's longest.
            tokens = self.tokenizer(list(items), padding="longest", truncation=True,
                                    max_length=MAX_TOKENS, return_tensors="pt")  # fmt: skip
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        return torch.stack(list(items))


class MelFrontEnd(nn.Module):
    """WavCaps' AudioFeature: (batch, samples) -> (batch, 1, frames, mel_bins) log-mel."""

    def __init__(self, mel_trans: nn.Module, log_trans: nn.Module) -> None:
        super().__init__()
        self.mel_trans, self.log_trans = mel_trans, log_trans

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.log_trans(self.mel_trans(wave))


def build_htsat(arch: Mapping[str, Any]) -> nn.Module:
    """WavCaps' HTSAT (`audio_encoder.audio_enc`): laion_clap's HTSAT_Swin_Transformer, whose
    blocks WavCaps' code shares, with its mel front end under WavCaps' names and a
    waveform-in forward giving the pooled (batch, 8 * embed_dim) `embedding`."""
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer

    class WavCapsHTSAT(HTSAT_Swin_Transformer):
        def __init__(self) -> None:
            super().__init__(config=SimpleNamespace(**MEL), **arch)
            # laion_clap names these spectrogram_extractor / logmel_extractor; same settings.
            front = MelFrontEnd(self.spectrogram_extractor, self.logmel_extractor)
            del self.spectrogram_extractor, self.logmel_extractor
            self.audio_feats_extractor = front

        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            x = self.audio_feats_extractor(wave)
            x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
            return self.forward_features(self.reshape_wav2img(x))["embedding"]

    if torch.get_default_device().type != "meta":
        return WavCapsHTSAT()
    # laion_clap's constructor reads values (`.item()`; torchlibrosa fills its STFT and mel
    # weights from numpy), which a meta default device refuses: build it on the CPU (~110 MB
    # at full size) and move it, so the key listing still needs no real model.
    with torch.device("cpu"):
        return WavCapsHTSAT().to("meta")


def _projection(width: int, embed_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, embed_size), nn.ReLU(), nn.Linear(embed_size, embed_size))


class WavCapsASE(nn.Module):
    """WavCaps' ASE with the released checkpoints' module names; forward gives projections."""

    def __init__(self, text_config: BertConfig, htsat: Mapping[str, Any] = HTSAT,
                 embed_size: int = EMBED_SIZE) -> None:  # fmt: skip
        from transformers import BertModel

        super().__init__()
        audio_enc = build_htsat(htsat)
        self.audio_encoder = nn.ModuleDict({"audio_enc": audio_enc})
        text = BertModel(text_config, add_pooling_layer=False)
        self.text_encoder = nn.ModuleDict({"text_encoder": text})
        self.audio_proj = _projection(audio_enc.num_features, embed_size)
        self.text_proj = _projection(text_config.hidden_size, embed_size)
        self.temp = nn.Parameter(torch.tensor(TEMP))  # the contrastive temperature; unused here

    def forward(
        self, audio: torch.Tensor | None = None, text: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Waveforms (batch, samples) or tokens -> (batch, embed_size), not normalised."""
        if audio is not None:
            return self.audio_proj(self.audio_encoder["audio_enc"](audio))
        hidden = self.text_encoder["text_encoder"](
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        )[0]
        return self.text_proj(hidden[:, 0, :])  # the [CLS] token, as ASE.encode_text


def checkpoint_layout(model: WavCapsASE) -> dict[str, tuple[int, ...]]:
    """Every key a released checkpoint's ckpt['model'] holds for `model`, with its shape."""
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_shape"):  # partitioned by ZeRO-3: its local shard is empty
            layout[name] = tuple(p.ds_shape)
    positions = model.text_encoder["text_encoder"].config.max_position_embeddings
    layout[POSITION_IDS] = (1, positions)
    return layout


def load_wavcaps_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A released WavCaps checkpoint's state dict (ckpt['model']), exactly as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder.checkpoint {path}: no such file (expected a released WavCaps checkpoint, "
            "e.g. HTSAT-BERT-PT.pt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable WavCaps checkpoint ({e})") from e
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a dict with the ASE state dict under 'model'")
    return state


def check_layout(state: Mapping[str, torch.Tensor], model: WavCapsASE, path: str | Path) -> None:
    """Refuse a state dict whose keys or shapes are not the model's, naming the first mismatch."""
    layout = checkpoint_layout(model)
    missing = [k for k in layout if k not in state and k != POSITION_IDS]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {missing[0]!r} (shape {layout[missing[0]]})"
            f"{f' and {len(missing) - 1} more keys' if len(missing) > 1 else ''}"
        )
    extra = [k for k in state if k not in layout]
    if extra:
        raise ValueError(f"{path}: checkpoint has unexpected key {extra[0]!r}"
                         f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}; it is not "
                         "WavCaps' HTSAT-BERT ASE")  # fmt: skip
    for k, v in state.items():
        if tuple(v.shape) != layout[k]:
            raise ValueError(
                f"{path}: key {k!r} has shape {tuple(v.shape)}, the model expects {layout[k]}"
            )
    if POSITION_IDS in state and not torch.equal(
        state[POSITION_IDS].cpu().long(), torch.arange(layout[POSITION_IDS][1])[None]
    ):
        # BERT here always counts positions 0, 1, ...; other ids would embed differently.
        raise ValueError(f"{path}: {POSITION_IDS!r} is not 0, 1, 2, ... as BERT expects")


def model_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checked checkpoint's state dict as the module's (position_ids consumed)."""
    return {k: v for k, v in state.items() if k != POSITION_IDS}


class WavCapsEncoder(Encoder):
    """WavCaps' HTSAT-BERT: audio (batch, 320000) at 32 kHz and BERT tokens in."""

    @classmethod
    def build_processor(
        cls,
        checkpoint: str | None = None,
        text_model_dir: str | None = None,
        tiny: bool = False,
        seed: int = 0,
    ) -> WavCapsProcessor:
        """The processor of this encoder config, without building the model."""
        return WavCapsProcessor(text_model_dir, tiny)

    def __init__(
        self,
        dims: Mapping[str, int],
        checkpoint: str | None = None,
        text_model_dir: str | None = None,
        tiny: bool = False,
        seed: int = 0,
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"WavCaps encoder embeds {MODALITIES}, not {unknown}")
        embed_size = TINY_EMBED_SIZE if tiny else EMBED_SIZE
        wrong = {m: d for m, d in dims.items() if d != embed_size}
        if wrong:
            raise ValueError(
                f"WavCaps (tiny={tiny}) embeds to {embed_size}, the space says {wrong}"
            )
        if checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"encoder.checkpoint {checkpoint}: no such file (expected a released WavCaps "
                "checkpoint, e.g. HTSAT-BERT-PT.pt)"
            )
        super().__init__(dims, WavCapsProcessor(text_model_dir, tiny))
        self.checkpoint = checkpoint
        text_config = _text_config(_text_source(text_model_dir, False))
        with seeded(seed):
            self.model = WavCapsASE(text_config, TINY_HTSAT if tiny else HTSAT, embed_size)
        if checkpoint and load_weights:
            state = load_wavcaps_checkpoint(checkpoint)
            check_layout(state, self.model, checkpoint)
            self.model.load_state_dict(model_weights(state), strict=True)
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        # Through forward(), which ZeRO-3 hooks (it gathers a module's parameters as it runs).
        if modality == "text":
            return self.model(text=batch)
        if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or batch.shape[1] != CLIP_SAMPLES:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(
                f"WavCaps audio batches are (batch, {CLIP_SAMPLES}) waveforms (10 s at "
                f"{SAMPLE_RATE} Hz), got {shape}"
            )
        return self.model(audio=batch.to(param_dtype(self.model)))

    def pretrained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's weights keyed as in this module (for ZeRO-3 loading)."""
        if not self.checkpoint:
            return None
        state = load_wavcaps_checkpoint(self.checkpoint)
        check_layout(state, self.model, self.checkpoint)
        return {f"model.{k}": v for k, v in model_weights(state).items()}
