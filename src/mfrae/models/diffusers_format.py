"""The diffusers `AutoencoderRAE` folder format (diffusers >= 0.37), read and written without diffusers.

A folder holds `config.json` (`"_class_name": "AutoencoderRAE"`) and `diffusion_pytorch_model.safetensors` (or
shards listed in `diffusion_pytorch_model.safetensors.index.json`). Its weight keys:

    encoder.*                 the transformers vision model (Dinov2WithRegisters / SiglipVision / ViTMAE), in the
                              key layout of the transformers version that wrote it; no final-LayerNorm affine
    decoder.*                 the ViT-MAE decoder; attention as `attention.to_q / to_k / to_v / to_out.0`
                              (mfrae: `attention.attention.query / key / value`, `attention.output.dense`); the
                              fixed sin-cos `decoder_pos_embed` is rebuilt, not stored
    encoder_mean, encoder_std [1, 3, 1, 1] pixel normalisation of the encoder input
    _latents_mean, _latents_std  latent statistics, shaped as the config's `latents_mean` / `latents_std` lists

diffusers builds the encoder from four numbers (type, width, patch size, depth; heads = width / 64, the rest the
transformers defaults, DINOv2 at 518 px, SigLIP at 256 px, MAE at 224 px), normalises latents as
`(z - mean) / (std + 1e-5) * scaling_factor` and resizes images to `encoder_input_size` with bicubic
interpolation, as `RAE` does. This module turns such a folder into mfrae's encoder, decoder and statistics
tensors and back; `RAE.from_pretrained` / `RAE.save_pretrained` assemble them (docs/huggingface.md, section 1).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mfrae.errors import CheckpointError
from mfrae.fileio import atomic_write_text, commit, temp_path
from mfrae.hub import download_model_folder, first_line, hub_repo_id
from mfrae.models.encoders import DINOv2Encoder, MAEEncoder, SigLIP2Encoder, TransformersEncoder
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

CLASS_NAME = "AutoencoderRAE"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
LATENT_STD_EPS = 1e-5  # diffusers: (z - mean) / (std + 1e-5)
HEAD_DIM = 64  # diffusers: heads = width / 64 for every encoder
WRITTEN_DIFFUSERS_VERSION = "0.37.0"  # the first release with AutoencoderRAE
# The final LayerNorm, stored without its affine (transformers 5.x layouts, and SigLIP's 4.x nesting).
FINAL_NORMS = ("layernorm", "post_layernorm", "vision_model.post_layernorm")


def _is_final_norm(key: str) -> bool:
    return key.rpartition(".")[0] in FINAL_NORMS


@dataclass(frozen=True)
class EncoderType:
    encoder: type[TransformersEncoder]
    config_class: str  # transformers config class
    image_size: int  # the size diffusers builds the position embeddings for
    extra: tuple[tuple[str, object], ...] = ()  # further config fields diffusers sets


ENCODER_TYPES: dict[str, EncoderType] = {
    "dinov2": EncoderType(DINOv2Encoder, "Dinov2WithRegistersConfig", 518),
    "siglip2": EncoderType(SigLIP2Encoder, "SiglipVisionConfig", 256),
    "mae": EncoderType(MAEEncoder, "ViTMAEConfig", 224, (("mask_ratio", 0.0),)),
}


#################################################################################
#                                  Reading                                      #
#################################################################################


def locate(spec: str | Path) -> Path:
    """The local folder of `spec`: a folder, or a Hub id / `hf://owner/name[@rev]` downloaded whole."""
    path = Path(str(spec))
    if path.is_dir():
        return path
    repo = hub_repo_id(str(spec))
    if repo is None or path.exists():
        raise FileNotFoundError(f"{spec}: not a diffusers AutoencoderRAE folder or Hub id")
    return download_model_folder(repo)


def read_config(folder: Path) -> dict:
    file = folder / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; a diffusers AutoencoderRAE folder has one") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({first_line(str(err))})") from None
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{file}: _class_name is {found!r}, expected {CLASS_NAME!r}")
    if config.get("encoder_type", "dinov2") not in ENCODER_TYPES:
        raise CheckpointError(f"{file}: encoder_type {config.get('encoder_type')!r} is not one of {sorted(ENCODER_TYPES)}")
    if not config.get("reshape_to_2d", True):
        raise CheckpointError(f"{file}: reshape_to_2d=false (token latents) is not supported; mfrae works on grids")
    return config


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of the folder's safetensors file, or of its shards."""
    from safetensors.torch import load_file

    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{index}: unreadable shard index ({first_line(str(err))})") from None
        files = [folder / name for name in shards]
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (nor {INDEX_NAME})")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # a truncated or foreign file: one line naming it
            raise CheckpointError(f"{file}: unreadable safetensors ({first_line(str(err))})") from None
    return state


def num_patches(config: dict) -> int:
    grid = int(config.get("encoder_input_size", 224)) // int(config.get("encoder_patch_size", 14))
    return grid * grid


def decoder_config(config: dict) -> ViTDecoderConfig:
    """mfrae's decoder config for a diffusers config (defaults: diffusers' own)."""
    return ViTDecoderConfig(
        encoder_hidden_size=int(config.get("encoder_hidden_size", 768)),
        hidden_size=int(config.get("decoder_hidden_size", 512)),
        num_layers=int(config.get("decoder_num_hidden_layers", 8)),
        num_heads=int(config.get("decoder_num_attention_heads", 16)),
        intermediate_size=int(config.get("decoder_intermediate_size", 2048)),
        patch_size=int(config.get("patch_size", 16)),
        num_patches=num_patches(config),
        num_channels=int(config.get("num_channels", 3)),
    )


# mfrae decoder key part -> diffusers decoder key part (everything else keeps its name)
_DECODER_ATTENTION = {
    "attention.attention.query.": "attention.to_q.",
    "attention.attention.key.": "attention.to_k.",
    "attention.attention.value.": "attention.to_v.",
    "attention.output.dense.": "attention.to_out.0.",
}
_NOT_STORED = ("decoder_pos_embed",)  # rebuilt from the grid size


def decoder_key_to_diffusers(key: str) -> str:
    for ours, theirs in _DECODER_ATTENTION.items():
        key = key.replace(ours, theirs)
    return key


def decoder_from_state(config: dict, state: dict[str, Tensor], source: str) -> ViTDecoder:
    """The decoder with the `decoder.*` weights of a diffusers file, strictly (names and shapes)."""
    decoder = ViTDecoder(decoder_config(config))
    ours = {k: v for k, v in decoder.state_dict().items() if k not in _NOT_STORED}
    expected = {"decoder." + decoder_key_to_diffusers(k): k for k in ours}
    found = {k for k in state if k.startswith("decoder.") and k[len("decoder."):] not in _NOT_STORED}
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: decoder keys do not match the config's decoder; missing "
                              f"{_few(missing)}, unexpected {_few(unexpected)}")
    loaded = {}
    for theirs, key in expected.items():
        if state[theirs].shape != ours[key].shape:
            raise CheckpointError(f"{source}: {theirs} has shape {tuple(state[theirs].shape)}, the config's decoder "
                                  f"needs {tuple(ours[key].shape)}")
        loaded[key] = state[theirs]
    decoder.load_state_dict(loaded, strict=False)  # decoder_pos_embed keeps its rebuilt value
    return decoder


def transformers_config(config: dict):
    """The transformers config diffusers builds its encoder from."""
    import transformers

    kind = ENCODER_TYPES[config.get("encoder_type", "dinov2")]
    hidden = int(config.get("encoder_hidden_size", 768))
    return getattr(transformers, kind.config_class)(
        hidden_size=hidden, patch_size=int(config.get("encoder_patch_size", 14)), image_size=kind.image_size,
        num_attention_heads=hidden // HEAD_DIM, num_hidden_layers=int(config.get("encoder_num_hidden_layers", 12)),
        **dict(kind.extra))


def encoder_from_state(config: dict, state: dict[str, Tensor], source: str) -> TransformersEncoder:
    """The frozen encoder with the `encoder.*` weights of a diffusers file.

    The weights go through transformers' own `from_pretrained` (from a temporary folder), which renames the key
    layouts of older transformers versions (e.g. `attention.attention.query` -> `attention.q_proj` in 5.x);
    only the final LayerNorm's affine, which the RAE strips, may be absent."""
    import transformers
    from safetensors.torch import save_file

    kind = ENCODER_TYPES[config.get("encoder_type", "dinov2")]
    weights = {k[len("encoder."):]: v.contiguous() for k, v in state.items() if k.startswith("encoder.")}
    if not weights:
        raise CheckpointError(f"{source}: no encoder.* weights")
    model_class = getattr(transformers, kind.encoder.model_class)
    with tempfile.TemporaryDirectory(prefix="mfrae-rae-encoder-") as tmp:
        transformers_config(config).save_pretrained(tmp)
        save_file(weights, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = model_class.from_pretrained(tmp, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not _is_final_norm(k)]
    problems = {"missing": missing, "unexpected": list(info.get("unexpected_keys", [])),
                "mismatched": [str(m[0]) if isinstance(m, (tuple, list)) else str(m)
                               for m in info.get("mismatched_keys", [])]}
    if any(problems.values()):
        detail = ", ".join(f"{what} {_few(sorted(keys))}" for what, keys in problems.items() if keys)
        raise CheckpointError(f"{source}: encoder keys do not match a {config.get('encoder_type', 'dinov2')} encoder "
                              f"of the config: {detail}")
    mean, std = pixel_normalisation(config, state)
    return kind.encoder(path=source, input_size=int(config.get("encoder_input_size", 224)),
                        image_mean=mean, image_std=std, model=model)


def pixel_normalisation(config: dict, state: dict[str, Tensor]) -> tuple[list[float], list[float]]:
    """The encoder-input mean / std: the stored buffers (what diffusers uses once loaded), else the config's."""
    mean = state.get("encoder_mean", torch.tensor(config.get("encoder_norm_mean") or [0.485, 0.456, 0.406]))
    std = state.get("encoder_std", torch.tensor(config.get("encoder_norm_std") or [0.229, 0.224, 0.225]))
    return [float(v) for v in mean.flatten()], [float(v) for v in std.flatten()]


def latent_normalisation(config: dict, state: dict[str, Tensor], shape: tuple[int, int, int],
                         source: str) -> tuple[Tensor, Tensor, float] | None:
    """(mean, std, scaling_factor) as [C, g, g] tensors, or None when the folder normalises nothing."""
    scaling = float(config.get("scaling_factor", 1.0))
    stored = [state.get("_latents_mean"), state.get("_latents_std")]
    listed = [config.get("latents_mean"), config.get("latents_std")]
    tensors = []
    for name, value, fallback, default in zip(("latents_mean", "latents_std"), stored, listed, (0.0, 1.0)):
        tensor = value if value is not None else (torch.tensor(fallback, dtype=torch.float32)
                                                  if fallback is not None else torch.full((1,), default))
        while tensor.dim() > 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        try:
            tensors.append(torch.broadcast_to(tensor.float(), shape).clone())
        except RuntimeError:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, which does not broadcast to "
                                  f"the latents {shape}") from None
    mean, std = tensors
    if scaling == 1.0 and not mean.any() and bool((std == 1).all()):
        return None
    if not (math.isfinite(scaling) and scaling > 0) or (std + LATENT_STD_EPS <= 0).any():
        raise CheckpointError(f"{source}: latents_std + 1e-5 and scaling_factor must be > 0")
    return mean, std, scaling


def check_keys(state: dict[str, Tensor], source: str) -> None:
    """Refuse keys of no known part (a file of another model class)."""
    known = ("encoder.", "decoder.")
    buffers = ("encoder_mean", "encoder_std", "_latents_mean", "_latents_std")
    unknown = sorted(k for k in state if not k.startswith(known) and k not in buffers)
    if unknown:
        raise CheckpointError(f"{source}: keys of no AutoencoderRAE part: {_few(unknown)}")


def _few(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


#################################################################################
#                                  Writing                                      #
#################################################################################


def encoder_type_of(encoder: nn.Module) -> str:
    for name, kind in ENCODER_TYPES.items():
        if type(encoder) is kind.encoder:
            return name
    raise ValueError(f"diffusers' AutoencoderRAE supports the encoders {sorted(ENCODER_TYPES)}, not "
                     f"{getattr(encoder, 'name', type(encoder).__name__)!r}")


def encoder_fields(encoder: TransformersEncoder) -> dict:
    """The config fields that make diffusers rebuild this encoder; ValueError when it cannot (other widths of
    heads or MLP, another position-embedding size, ...): every weight must keep its shape."""
    cfg = encoder.model.config
    fields = {"encoder_type": encoder_type_of(encoder), "encoder_hidden_size": int(cfg.hidden_size),
              "encoder_patch_size": int(cfg.patch_size), "encoder_num_hidden_layers": int(cfg.num_hidden_layers),
              "encoder_input_size": int(encoder.input_size)}
    import transformers

    rebuilt_class = getattr(transformers, encoder.model_class)
    with torch.device("meta"):
        rebuilt = rebuilt_class(transformers_config(fields)).state_dict()
    ours = encoder.model.state_dict()
    differ = [k for k in ours if k not in rebuilt or rebuilt[k].shape != ours[k].shape]
    differ += [k for k in rebuilt if k not in ours and not _is_final_norm(k)]
    if int(cfg.num_attention_heads) != int(cfg.hidden_size) // HEAD_DIM:  # changes no weight shape, but the maps
        differ.append(f"num_attention_heads={cfg.num_attention_heads}")
    if differ:
        raise ValueError(f"diffusers would rebuild this {fields['encoder_type']} encoder differently "
                         f"(heads = width / {HEAD_DIM}, transformers' default sizes): {_few(sorted(differ))} differ")
    return fields


def write_folder(directory: str | Path, config: dict, state: dict[str, Tensor]) -> Path:
    """config.json + diffusion_pytorch_model.safetensors in `directory` (created; files replaced whole)."""
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    tmp = temp_path(weights)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    commit(tmp, weights)
    header = {"_class_name": CLASS_NAME, "_diffusers_version": WRITTEN_DIFFUSERS_VERSION}
    atomic_write_text(folder / CONFIG_NAME, json.dumps({**header, **config}, indent=2) + "\n")
    return folder
