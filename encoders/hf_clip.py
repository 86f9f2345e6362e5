"""Image-text encoders read from a local Hugging Face folder through transformers (SigLIP).

    encoder: {_target_: encoders.hf_clip.HFClipEncoder,
              checkpoint: /path/to/siglip-so400m-patch14-384, max_length: 64, padding: max_length}

`checkpoint` is a folder as `save_pretrained` writes it (or a Hub repository as downloaded):
config.json and its weights, one model.safetensors / pytorch_model.bin or shards listed by their
index json. The model is `AutoModel.from_pretrained(checkpoint)`, the path the official release
embeds SigLIP with; `trust_remote_code: null` turns the folder's own code on only when its
config.json names it (`auto_map`). Images go through the folder's image processor and captions
through its tokenizer (`processor`, or `image_processor` and `tokenizer` apart, name other
folders); `max_length`, `padding` and `attention_mask` are the text settings of the release.
`image_backend: pil` keeps the PIL image processors transformers 4 used by default (transformers
5 picks torchvision ones, whose resizing differs slightly).

Loading is strict: a checkpoint key the model lacks, a model key the checkpoint lacks, or a
reshaped key is refused, naming the key and the file that holds (or should hold) it. The folder
readers here (`checkpoint_files`, `read_checkpoint`, `check_state`) serve encoders/eva_clip.py too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.base import Encoder, Processor, param_dtype

MODALITIES = ("image", "text")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def dtype_of(precision: str) -> torch.dtype:
    """torch dtype of an `encoder.precision` name."""
    if precision not in DTYPES:
        raise ValueError(f"encoder.precision {precision!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[precision]


def checkpoint_folder(path: str | Path | None, key: str, expected: str) -> Path:
    """`path` as a folder, or FileNotFoundError naming the config key and what it should hold."""
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"encoder.{key} {path}: no such folder; expected {expected}")
    return Path(path)


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: its index's shards, or its one weights file."""
    for name in INDEXES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / name} lists {missing[0]}, which is not there")
            return [folder / s for s in shards]
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{folder}: no weights; expected one of {list(SINGLE_FILES)} or an index "
        f"({' / '.join(INDEXES)}) with its shards"
    )


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # mmap: a 10 GB fp32 shard is paged in tensor by tensor as it is cast, not read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only files in torch's legacy (pre-zip) format cannot be mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(
    folder: Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a folder's weight files (floats cast to `dtype` shard by shard, so that only
    one shard is ever held in its stored precision), and the file each key came from."""
    state, source = {}, {}
    for path in checkpoint_files(folder):
        for key, value in _load_file(path).items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key], source[key] = value, path
    return state, source


def check_state(
    expected: Mapping[str, Sequence[int]],
    state: Mapping[str, torch.Tensor],
    source: Mapping[str, Path],
    folder: Path,
    what: str,
) -> None:
    """Refuse a state dict whose keys or shapes differ from `expected`, naming the first such key
    (missing, unexpected, then reshaped, each in key order) and the file concerned."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{folder}: does not fit {what}: missing key {missing[0]!r} (shape "
            f"{tuple(expected[missing[0]])}; {len(missing)} missing in all)"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{source.get(unexpected[0], folder)}: does not fit {what}: unexpected key "
            f"{unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    for key in sorted(state):
        have, want = tuple(state[key].shape), tuple(expected[key])
        if have != want:
            raise ValueError(
                f"{source.get(key, folder)}: does not fit {what}: key {key!r} has shape {have} "
                f"in the checkpoint, {want} in the model"
            )


def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of `module`, full-size even when ZeRO-3 has partitioned it."""
    return {k: tuple(getattr(v, "ds_shape", v.shape))
            for k, v in module.state_dict(keep_vars=True).items()}  # fmt: skip


def _config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"encoder.checkpoint {folder}: no config.json")
    return json.loads(path.read_text())


def _remote_code(folder: Path, trust_remote_code: bool | None) -> bool:
    needs = "auto_map" in _config_json(folder)
    if trust_remote_code is None:
        return needs
    if needs and not trust_remote_code:
        raise ValueError(
            f"{folder}/config.json builds its model with the folder's own code (auto_map); "
            "set encoder.trust_remote_code: true to run it"
        )
    return bool(trust_remote_code)


def load_model(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool | None, load_weights: bool = True
) -> nn.Module:
    """`AutoModel` of a local folder in `dtype`, its weights loaded strictly (or, with
    load_weights=False, the architecture alone from config.json, for ZeRO-3)."""
    from transformers import AutoConfig, AutoModel

    remote = _remote_code(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    if not load_weights:
        from transformers.initialization import no_init_weights

        # Initialising would be wasted (the weights are loaded afterwards), and transformers'
        # initialisers fail on the empty tensors of parameters zero.Init has partitioned.
        with no_init_weights():
            return AutoModel.from_config(config, trust_remote_code=remote, dtype=dtype)
    files = checkpoint_files(folder)  # a clear error before transformers' own
    model, info = AutoModel.from_pretrained(
        folder, config=config, dtype=dtype, trust_remote_code=remote, output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below with both shapes, instead of raised
    )  # fmt: skip
    what = f"transformers {type(model).__name__}"
    if info["missing_keys"]:
        key = sorted(info["missing_keys"])[0]
        where = file_of(folder, files, key)
        raise ValueError(f"{where}: does not fit {what}: missing key {key!r}")
    if info["unexpected_keys"]:
        key = sorted(info["unexpected_keys"])[0]
        where = file_of(folder, files, key)
        raise ValueError(f"{where}: does not fit {what}: unexpected key {key!r}")
    if info["mismatched_keys"]:
        key, have, want = sorted(info["mismatched_keys"])[0]
        where = file_of(folder, files, key)
        raise ValueError(f"{where}: does not fit {what}: key {key!r} has shape {tuple(have)} "
                         f"in the checkpoint, {tuple(want)} in the model")  # fmt: skip
    if info.get("error_msgs"):
        raise ValueError(f"{folder}: {what} did not load: {info['error_msgs'][0]}")
    return model


def file_of(folder: Path, files: Sequence[Path], key: str) -> Path:
    """The weight file holding `key` (for a key the folder lacks: its index, or its one file)."""
    for name in INDEXES:
        if (folder / name).is_file():
            shard = json.loads((folder / name).read_text())["weight_map"].get(key)
            return folder / (shard or name)
    return files[0]


def output_dims(config: Any) -> dict[str, int]:
    """Embedding dims of a transformers image-text config: CLIP-style `projection_dim`, else the
    vision width and the text head's size (SigLIP)."""
    if getattr(config, "projection_dim", None):
        return {m: int(config.projection_dim) for m in MODALITIES}
    text = config.text_config
    return {"image": int(config.vision_config.hidden_size),
            "text": int(getattr(text, "projection_size", None) or text.hidden_size)}  # fmt: skip


def features(out: Any) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` result (transformers 5 returns model outputs)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _folder_with(path: str | Path, names: Sequence[str], key: str) -> str:
    folder = Path(path)
    if not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(
            f"encoder.{key} {folder}: expected a folder with one of {list(names)}"
        )
    return str(folder)


class HFClipProcessor(Processor):
    """A transformers image processor (per item) and tokenizer (per batch of captions)."""

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        max_length: int,
        padding: str | bool = "max_length",
        attention_mask: bool = False,
    ) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.max_length, self.padding = int(max_length), padding
        self.inputs = ["input_ids", "attention_mask"] if attention_mask else ["input_ids"]

    def item(self, modality: str, raw: Any) -> Any:
        if modality != "image":
            return raw
        return self.image_processor(images=raw, return_tensors="pt")["pixel_values"][0]

    def batch(self, modality: str, items: Sequence[Any]) -> Any:
        if modality == "text":
            tokens = self.tokenizer(list(items), padding=self.padding, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")  # fmt: skip
            return {k: tokens[k] for k in self.inputs}
        return torch.stack(list(items))


def clip_processor(
    image_processor: Any,
    tokenizer: Any,
    max_length: int | None,
    padding: str | bool,
    attention_mask: bool,
    context: int,
    vocab_size: int,
    where: str,
) -> HFClipProcessor:
    """An HFClipProcessor whose token ids and lengths fit a text model of `vocab_size` tokens
    and `context` positions (transformers hands back an empty tokenizer offline without failing)."""
    if len(tokenizer) == 0 or len(tokenizer) > vocab_size:
        raise ValueError(
            f"encoder.tokenizer {where}: {len(tokenizer)} tokens, but the text model has "
            f"{vocab_size}; point it at the tokenizer files of this model"
        )
    length = int(max_length or min(tokenizer.model_max_length, context))
    if length > context:
        raise ValueError(f"encoder.max_length {length}: the text model has {context} positions")
    return HFClipProcessor(image_processor, tokenizer, length, padding, attention_mask)


def build_processor(
    checkpoint: str,
    processor: str | None = None,
    image_processor: str | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
    padding: str | bool = "max_length",
    attention_mask: bool = False,
    image_backend: str = "pil",
    trust_remote_code: bool | None = None,
    **_: Any,
) -> HFClipProcessor:
    """The processor of an HFClipEncoder config, without loading the model."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    expected = "a transformers model folder (config.json and its weights)"
    folder = checkpoint_folder(checkpoint, "checkpoint", expected)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=_remote_code(
        folder, trust_remote_code))  # fmt: skip
    key = "image_processor" if image_processor else "processor" if processor else "checkpoint"
    images = _folder_with(image_processor or processor or folder,
                          ["preprocessor_config.json", "processor_config.json"], key)  # fmt: skip
    key = "tokenizer" if tokenizer else "processor" if processor else "checkpoint"
    names = ["tokenizer_config.json", "tokenizer.json", "vocab.json"]
    texts = _folder_with(tokenizer or processor or folder, names, key)
    text_cfg = config.text_config
    return clip_processor(
        AutoImageProcessor.from_pretrained(images, backend=image_backend),
        AutoTokenizer.from_pretrained(texts), max_length, padding, attention_mask,
        int(text_cfg.max_position_embeddings), int(text_cfg.vocab_size), texts,
    )  # fmt: skip


class HFClipEncoder(Encoder):
    """A transformers image-text model: pixel_values (batch, 3, H, W) and token ids in."""

    @classmethod
    def build_processor(
        cls,
        checkpoint: str,
        processor: str | None = None,
        image_processor: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        padding: str | bool = "max_length",
        attention_mask: bool = False,
        image_backend: str = "pil",
        trust_remote_code: bool | None = None,
        precision: str = "fp32",
    ) -> HFClipProcessor:
        """The processor of this encoder config, without loading the model."""
        return build_processor(
            checkpoint, processor, image_processor, tokenizer, max_length, padding,
            attention_mask, image_backend, trust_remote_code,
        )  # fmt: skip

    def __init__(
        self,
        dims: Mapping[str, int],
        checkpoint: str,
        processor: str | None = None,
        image_processor: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        padding: str | bool = "max_length",
        attention_mask: bool = False,
        image_backend: str = "pil",
        trust_remote_code: bool | None = None,
        precision: str = "fp32",
        load_weights: bool = True,
    ) -> None:
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown:
            raise ValueError(
                f"transformers encoder {checkpoint} embeds {MODALITIES}, not {unknown}"
            )
        super().__init__(dims, build_processor(
            checkpoint, processor, image_processor, tokenizer, max_length, padding,
            attention_mask, image_backend, trust_remote_code,
        ))  # fmt: skip
        self.folder = Path(checkpoint)
        self.model = load_model(self.folder, dtype_of(precision), trust_remote_code, load_weights)
        have = output_dims(self.model.config)
        wrong = {m: d for m, d in dims.items() if d != have[m]}
        if wrong:
            raise ValueError(f"{checkpoint} embeds {have}, but the space says {wrong}")
        self.freeze()

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        # get_*_features run the towers' and projections' forwards, which ZeRO-3 hooks to gather.
        if modality == "image":
            pixels = batch.to(param_dtype(self.model))
            return features(self.model.get_image_features(pixel_values=pixels))
        return features(self.model.get_text_features(**batch))

    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        """The folder's weights keyed as in this module, checked against it (for ZeRO-3)."""
        state, source = read_checkpoint(self.folder, param_dtype(self.model))
        check_state(module_shapes(self.model), state, source, self.folder,
                    f"transformers {type(self.model).__name__}")  # fmt: skip
        return {f"model.{k}": v for k, v in state.items()}
