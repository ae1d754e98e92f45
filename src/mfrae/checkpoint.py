"""Loading the authors' released files and saving / loading mfrae's own model files.

Released files (`nyu-visionx/RAE-collections`, MF-RAE): torch pickles holding only tensors, read with
`torch.load(..., weights_only=True)` so no arbitrary object is ever unpickled.
    DiT^DH `stage2_model.pt`   flat state dict, or {"ema": ...} (also {"model": ...} training dicts)
    MF-RAE checkpoints         {"ema": ...} with the `r_embedder.*` interval embedding
    decoder `model.pt`         flat ViT decoder state dict (or an RAE state dict with `decoder.` keys)
    `stat.pt`                  {"mean": [C, g, g], "var": [C, g, g]}
Every load is strict: a missing, unexpected or mis-shaped key raises `CheckpointError` naming the file and
listing the keys. The one sanctioned exception is loading a teacher into a MeanFlow student, which leaves the
interval embedding `r_embedder.*` at its fresh initialisation (the official MF-RAE initialisation).
The released files' key layouts, the container forms accepted, and where the official loaders differ from
these (non-strict decoder loads, a decoder file without `trainable_cls_token`, the student's argument order)
are described in docs/checkpoints.md.

A file is named by a local path or by `hf://OWNER/REPO[@REVISION]/PATH/IN/REPO` (downloaded through
`huggingface_hub` when it is installed and the Hub is reachable).

mfrae's own model files are safetensors with the model kind and config in the metadata, so they rebuild
themselves: `save_model(model, path)` / `load_model(path)`.

Every loader also takes a model folder written by `mfrae export` (a local folder, or `hf://OWNER/NAME[@REV]`
downloaded whole): it reads the file of its kind named by the folder's config.json (`folder_file`).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from mfrae.config import from_dict
from mfrae.errors import CheckpointError, ConfigError
from mfrae.fileio import commit, temp_path
from mfrae.hub import download_model_folder, first_line as _first_line, hub_repo_id
from mfrae.layers import swiglu_hidden
from mfrae.models.dit_dh import DiTDH, DiTDHConfig
from mfrae.models.rae import LatentStats
from mfrae.models.vit_decoder import VIT_DECODER_SIZES, ViTDecoder, ViTDecoderConfig

log = logging.getLogger("mfrae")

OFFICIAL_HUB_REPO = "nyu-visionx/RAE-collections"
INTERVAL_PREFIX = "r_embedder."

#################################################################################
#                              Locating files                                   #
#################################################################################


def resolve_path(spec: str | Path) -> Path:
    """A local path as is, or `hf://owner/repo[@rev]/path` downloaded into the Hugging Face cache."""
    spec = str(spec)
    if not spec.startswith("hf://"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such file: {spec}")
        return path
    parts = spec[len("hf://") :].split("/")
    if len(parts) < 3:
        raise ValueError(f"a Hub file is named hf://OWNER/REPO[@REVISION]/PATH, got {spec!r}")
    repo, _, revision = f"{parts[0]}/{parts[1]}".partition("@")
    filename = "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f"{spec}: install `huggingface_hub` (pip install 'mfrae[hub]') to read Hub files") from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision or None))
    except Exception as err:  # offline, missing repo or file: one message that names the file
        raise FileNotFoundError(f"cannot download {spec}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


#################################################################################
#                          Reading tensor-only pickles                          #
#################################################################################


# The global torch's weights-only unpickler names when it blocks one: "GLOBAL posix.system whose module posix
# is blocked" or "Unsupported global: GLOBAL builtins.eval was not an allowed global".
_BLOCKED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def load_torch_file(spec: str | Path) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only), memory-mapped when possible.

    A pickle that would import a Python global (the way a pickle runs code) is refused, naming the global;
    nothing of it is executed. torch's advice to retry with weights_only=False is deliberately not passed on.
    """
    path = resolve_path(spec)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        blocked = _BLOCKED_GLOBAL.search(text)
        if blocked:
            raise CheckpointError(
                f"{spec}: refused to load a code-executing pickle: it imports the Python global {blocked.group(1)} "
                "(nothing of it was loaded or run; mfrae reads only tensors and plain containers, weights_only=True)"
            ) from None
        # Keep the unpickler's own diagnosis (e.g. "Unsupported operand 149"), never the surrounding advice.
        _, marker, detail = text.partition("WeightsUnpickler error:")
        reason = _first_line(detail) if marker else "not a pickle of tensors"
        raise CheckpointError(f"{spec}: not a readable torch checkpoint ({reason})") from None
    except EOFError:
        raise CheckpointError(f"{spec}: not a readable torch checkpoint (empty or truncated file)") from None
    except Exception as err:
        raise CheckpointError(f"{spec}: not a readable torch checkpoint ({type(err).__name__}: {_first_line(str(err))})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{spec}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict, source: str, prefix: str | None = None) -> dict[str, Tensor]:
    """The model weights of a checkpoint dict: `ema` if present, else `model`, else the dict itself.

    A DDP `module.` prefix is removed; with `prefix` (e.g. "decoder."), a dict whose keys carry it is narrowed
    to those keys.
    """
    if "ema" in obj and isinstance(obj["ema"], dict):
        state = obj["ema"]
    elif "model" in obj and isinstance(obj["model"], dict):
        log.info("%s: no 'ema' weights, using 'model'", source)
        state = obj["model"]
    else:
        state = obj
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _key_list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def load_state_dict_strict(
    module: nn.Module, state: dict[str, Tensor], source: str, allow_missing: tuple[str, ...] = ()
) -> list[str]:
    """Load `state` into `module`, every key used and none left over; shapes must match.

    Keys starting with a prefix in `allow_missing` may be absent (they keep their current values); the
    absent ones are returned. Anything else raises `CheckpointError` listing missing / unexpected / mis-shaped keys.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    tolerated = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match {type(module).__name__}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_key_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_key_list(mismatched)}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=not tolerated)
    return tolerated


#################################################################################
#                     Configs recovered from released weights                   #
#################################################################################


def _require(state: dict, key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}; is this the right kind of checkpoint?")
    return state[key]


def infer_dit_dh_config(state: dict[str, Tensor], source: str = "state dict") -> DiTDHConfig:
    """Rebuild the DiT^DH constructor arguments from tensor shapes (released files carry no config)."""
    head_w = _require(state, "x_embedder.proj.weight", source)
    enc_w = _require(state, "s_embedder.proj.weight", source)
    head_dim, channels, patch, _ = head_w.shape
    enc_dim = enc_w.shape[0]
    grid = math.isqrt(_require(state, "pos_embed", source).shape[1])
    if enc_dim == head_dim:
        raise CheckpointError(f"{source}: backbone and head have the same width; pass the model config explicitly")
    widths = {}
    for key, value in state.items():
        if key.startswith("blocks.") and key.endswith(".norm1.weight"):
            widths[int(key.split(".")[1])] = value.shape[0]
    enc_depth = sum(1 for w in widths.values() if w == enc_dim)
    head_depth = sum(1 for w in widths.values() if w == head_dim)
    enc_heads = enc_dim // _require(state, "enc_feat_rope.freqs_cos", source).shape[1]
    head_heads = head_dim // _require(state, "dec_feat_rope.freqs_cos", source).shape[1]
    hidden = _require(state, "blocks.0.mlp.w3.weight", source).shape[1]
    mlp_ratio = next((r for r in (4.0, 1.5 * hidden / enc_dim) if swiglu_hidden(enc_dim, r) == hidden), None)
    if mlp_ratio is None:
        raise CheckpointError(f"{source}: cannot recover mlp_ratio from a SwiGLU width of {hidden}")
    return DiTDHConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=(enc_dim, head_dim),
        depth=(enc_depth, head_depth),
        num_heads=(enc_heads, head_heads),
        mlp_ratio=mlp_ratio,
        num_classes=_require(state, "y_embedder.embedding_table.weight", source).shape[0] - 1,
        interval_embedding=any(k.startswith(INTERVAL_PREFIX) for k in state),
    )


def infer_vit_decoder_config(state: dict[str, Tensor], source: str = "state dict", num_heads: int | None = None) -> ViTDecoderConfig:
    """Rebuild the decoder config from tensor shapes; the head count comes from the released sizes by width."""
    embed = _require(state, "decoder_embed.weight", source)
    width, enc_width = embed.shape
    layers = len({k.split(".")[1] for k in state if k.startswith("decoder_layers.")})
    pred = _require(state, "decoder_pred.weight", source).shape[0]
    patch = math.isqrt(pred // 3)
    if num_heads is None:
        by_width = {w: h for w, _, h, _ in VIT_DECODER_SIZES.values()}
        if width not in by_width:
            raise CheckpointError(f"{source}: decoder width {width} is not a released size; pass num_heads")
        num_heads = by_width[width]
    return ViTDecoderConfig(
        encoder_hidden_size=enc_width,
        hidden_size=width,
        num_layers=layers,
        num_heads=num_heads,
        intermediate_size=_require(state, "decoder_layers.0.intermediate.dense.weight", source).shape[0],
        patch_size=patch,
        num_patches=_require(state, "decoder_pos_embed", source).shape[1] - 1,
    )


#################################################################################
#                               Public loaders                                  #
#################################################################################


# What each kind of file holds, in words (error messages), and a key only that kind of released file has.
KIND_NAMES = {
    "dit_dh": "DiT^DH model (teacher / MeanFlow student)",
    "vit_decoder": "ViT decoder",
    "latent_stats": "latent statistics",
    "small_vit": "small ViT encoder",
}
_KIND_KEYS = {"dit_dh": "x_embedder.proj.weight", "vit_decoder": "decoder_embed.weight", "latent_stats": "var"}


def _kind_name(kind: str | None) -> str:
    return KIND_NAMES.get(kind, repr(kind)) if kind else "unknown"


def found_kind(state: dict, meta: dict | None = None) -> str | None:
    """The kind of a file: its `mfrae.kind` metadata, else recognised from the keys of a released file."""
    if meta and meta.get("kind"):
        return meta["kind"]
    for container in ("ema", "model"):  # training dicts hold the weights one level down
        if isinstance(state.get(container), dict):
            state = state[container]
    keys = {k[len("module.") :] if k.startswith("module.") else k for k in state}
    keys |= {k[len("decoder.") :] for k in keys if k.startswith("decoder.")}
    return next((kind for kind, key in _KIND_KEYS.items() if key in keys), None)


def check_kind(spec: str | Path, state: dict, meta: dict, expected: str) -> None:
    """CheckpointError naming the file, the expected and the found kind unless the file is of kind `expected`
    (a file whose kind cannot be told is let through: its keys are checked strictly when it is loaded)."""
    found = found_kind(state, meta)
    if found is not None and found != expected:
        raise CheckpointError(f"{spec}: expected a {_kind_name(expected)} file, found a {_kind_name(found)} file")


def config_from_meta(spec: str | Path, meta: dict, config_cls):
    """The config dataclass stored in a file's `mfrae.config` metadata, every field checked; CheckpointError
    naming the file when the metadata does not describe a `config_cls`."""
    try:
        return from_dict(config_cls, meta["config"], "mfrae.config")  # lists become the tuples of the hints
    except ConfigError as err:
        raise CheckpointError(f"{spec}: bad mfrae.config metadata for a {config_cls.__name__} ({err})") from None


def _build(spec: str | Path, cls, config):
    """cls(config), with a config that type-checks but builds no network reported as bad metadata."""
    try:
        return cls(config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{spec}: its config does not build a {cls.__name__} ({_first_line(str(err))})") from None


def _read_weights(spec: str | Path, kind: str, prefix: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """(state dict, mfrae metadata or {}) from a safetensors file of ours or a released torch file, refused
    naming both kinds when it holds another kind of weights. A model folder gives its file of that kind."""
    spec = folder_file(spec, kind)
    path = resolve_path(spec)
    if path.suffix == ".safetensors":
        raw, meta = read_safetensors(path)
    else:
        raw, meta = load_torch_file(path), {}
    check_kind(spec, raw, meta, kind)
    return extract_state_dict(raw, str(spec), prefix), meta


def load_dit_dh(spec: str | Path, config: DiTDHConfig | None = None, meanflow: bool | None = None) -> DiTDH:
    """Build and strictly load a DiT^DH teacher or MeanFlow student.

    config: expected architecture; by default recovered from the file (metadata or tensor shapes).
    meanflow: True builds a student (a teacher file then initialises everything but `r_embedder`),
    False a teacher, None whatever the file holds.
    """
    state, meta = _read_weights(spec, "dit_dh")
    if config is None:
        config = config_from_meta(spec, meta, DiTDHConfig) if meta.get("config") else infer_dit_dh_config(state, str(spec))
    file_is_student = any(k.startswith(INTERVAL_PREFIX) for k in state)
    if meanflow is not None and meanflow != config.interval_embedding:
        config = DiTDHConfig(**{**config.to_dict(), "interval_embedding": meanflow})
    model = _build(spec, DiTDH, config)
    allow = (INTERVAL_PREFIX,) if config.interval_embedding and not file_is_student else ()
    fresh = load_state_dict_strict(model, state, str(spec), allow_missing=allow)
    if fresh:
        log.info(
            "%s: teacher weights loaded into a MeanFlow student; the interval embedding (%d tensors: %s) "
            "keeps its fresh initialisation, as in the official MF-RAE initialisation",
            spec, len(fresh), ", ".join(fresh),
        )
    return model


def load_vit_decoder(spec: str | Path, config: ViTDecoderConfig | None = None) -> ViTDecoder:
    """Build and strictly load a ViT decoder (a released `model.pt`, an RAE state dict, or our safetensors)."""
    state, meta = _read_weights(spec, "vit_decoder", prefix="decoder.")
    if config is None:
        config = config_from_meta(spec, meta, ViTDecoderConfig) if meta.get("config") else infer_vit_decoder_config(state, str(spec))
    model = _build(spec, ViTDecoder, config)
    if "trainable_cls_token" not in state:
        # Some converters tolerate files without it; the official module then keeps its zero init.
        log.info("%s: no trainable_cls_token, using zeros", spec)
        state = {**state, "trainable_cls_token": torch.zeros_like(model.trainable_cls_token)}
    load_state_dict_strict(model, state, str(spec))
    return model


def load_latent_stats(spec: str | Path, eps: float = 1e-5) -> LatentStats:
    """`stat.pt` ({"mean", "var"} of shape [C, g, g], a leading 1 tolerated) or our safetensors equivalent.

    Our files also name the encoder they were computed with ({"encoder": {"name", "fingerprint"}} in the
    metadata); an RAE built with another encoder refuses them. The authors' `stat.pt` names none and is trusted.
    A model folder gives its statistics file.
    """
    spec = folder_file(spec, "latent_stats")
    path = resolve_path(spec)
    obj, meta = read_safetensors(path) if path.suffix == ".safetensors" else (load_torch_file(path), {})
    check_kind(spec, obj, meta, "latent_stats")
    encoder = _stats_encoder(spec, meta)
    for key in ("mean", "var"):
        if key not in obj or not isinstance(obj[key], Tensor):
            raise CheckpointError(f"{spec}: latent statistics need a tensor {key!r}; found keys {sorted(obj)}")
    mean, var = obj["mean"], obj["var"]
    if mean.dim() == 4 and mean.shape[0] == 1:
        mean, var = mean[0], var[0]
    try:
        return LatentStats(mean, var, eps=eps, source=str(spec), **encoder)
    except ValueError as err:
        raise CheckpointError(f"{spec}: {err}") from None


def _stats_encoder(spec: str | Path, meta: dict) -> dict[str, str]:
    """{"encoder_name", "encoder_fingerprint"} of a statistics file's metadata ({} when it names none)."""
    config = meta.get("config")
    if config is None:
        return {}
    encoder = config.get("encoder") if isinstance(config, dict) else None
    if not (isinstance(encoder, dict) and all(isinstance(encoder.get(k), str) for k in ("name", "fingerprint"))):
        raise CheckpointError(f"{spec}: bad mfrae.config metadata for latent statistics (expected "
                              f"{{\"encoder\": {{\"name\": ..., \"fingerprint\": ...}}}}, got {config!r})")
    return {"encoder_name": encoder["name"], "encoder_fingerprint": encoder["fingerprint"]}


#################################################################################
#                          mfrae's own safetensors files                        #
#################################################################################

_KINDS = {"dit_dh": (DiTDH, DiTDHConfig), "vit_decoder": (ViTDecoder, ViTDecoderConfig)}


def _tuple_fields(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, {"kind", "config"}) of a safetensors file; CheckpointError naming the file if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    meta = {"kind": raw.get("mfrae.kind")}
    if "mfrae.config" in raw:
        try:
            meta["config"] = json.loads(raw["mfrae.config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: malformed mfrae.config metadata ({err})") from None
    return state, meta


def read_kind(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict]:
    """(tensors, config) of an mfrae file of the given kind (e.g. "small_vit"); CheckpointError otherwise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    state, meta = read_safetensors(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: not an mfrae {kind} file: expected a {_kind_name(kind)} file, "
                              f"found a {_kind_name(found_kind(state, meta))} file")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: a {_kind_name(kind)} file needs its config as a JSON object in the "
                              f"mfrae.config metadata, found {meta.get('config')!r}")
    return state, _tuple_fields(meta["config"])


def write_safetensors(state: dict[str, Tensor], path: str | Path, kind: str, config: dict | None = None) -> Path:
    """Write tensors and their kind / config atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"mfrae.kind": kind}
    if config is not None:
        metadata["mfrae.config"] = json.dumps(config)
    tmp = temp_path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    return commit(tmp, path)


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write a model's state dict and its config to safetensors (atomically)."""
    kind = next((k for k, (cls, _) in _KINDS.items() if isinstance(model, cls)), None)
    if kind is None:
        raise TypeError(f"save_model knows DiTDH and ViTDecoder, not {type(model).__name__}")
    return write_safetensors(model.state_dict(), path, kind, model.config.to_dict())


def load_model(spec: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_model` (kind and config from the file's metadata); a teacher / MeanFlow
    model folder gives its network."""
    spec = folder_file(spec, "dit_dh")
    path = resolve_path(spec)
    state, meta = read_safetensors(path)
    if meta.get("kind") not in _KINDS:
        expected = " or ".join(_kind_name(k) for k in _KINDS)
        raise CheckpointError(f"{spec}: expected an mfrae model file ({expected}), found a {_kind_name(found_kind(state, meta))} file")
    if "config" not in meta:
        raise CheckpointError(f"{spec}: no mfrae.config metadata, the {_kind_name(meta['kind'])} cannot be rebuilt")
    cls, config_cls = _KINDS[meta["kind"]]
    model = _build(spec, cls, config_from_meta(spec, meta, config_cls))
    load_state_dict_strict(model, state, str(spec))
    return model


def save_latent_stats(stats: LatentStats, path: str | Path) -> Path:
    """Write {"mean", "var"} atomically, with the encoder the statistics belong to when they name one."""
    encoder = {"name": stats.encoder_name, "fingerprint": stats.encoder_fingerprint}
    return write_safetensors(stats.to_dict(), path, "latent_stats", {"encoder": encoder} if stats.encoder_fingerprint else None)


#################################################################################
#                   Model folders (what `mfrae export` writes)                  #
#################################################################################

# A model folder holds config.json with "library": "mfrae" and the files it names, relative to the folder:
#   teacher / MeanFlow folder: {"kind": "teacher"|"meanflow", "weights": "model.safetensors", "rae": "rae", ...}
#   RAE folder:                {"kind": "rae", "decoder": "decoder.safetensors", "stats": ..., "encoder": {...}}
# Layout and rules: docs/huggingface.md, section 3.
FOLDER_CONFIG = "config.json"
FOLDER_LIBRARY = "mfrae"
def is_model_folder(path: str | Path) -> bool:
    """Whether `path` is a local folder with an mfrae config.json (written by `mfrae export`)."""
    config = Path(path) / FOLDER_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("library") == FOLDER_LIBRARY
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def read_model_folder(path: str | Path) -> dict:
    """A model folder's config.json, its file entries turned into absolute paths (checked to exist)."""
    folder = Path(path)
    file = folder / FOLDER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable model folder config ({_first_line(str(err))})") from None
    if not isinstance(config, dict) or config.get("library") != FOLDER_LIBRARY:
        raise CheckpointError(f"{file}: not an mfrae model folder (no \"library\": \"mfrae\")")
    if config.get("kind") not in ("teacher", "meanflow", "rae"):
        raise CheckpointError(f"{file}: unknown kind {config.get('kind')!r}; expected teacher, meanflow or rae")
    for key in ("weights", "decoder", "stats", "rae"):
        if config.get(key):
            target = folder / config[key]
            if not target.exists():
                raise FileNotFoundError(f"{file}: {key} names {config[key]}, which is not in the folder")
            config[key] = str(target)
    encoder = config.get("encoder") or {}
    options = encoder.get("options") or {}
    if encoder.get("file"):  # the encoder's weights travel with the folder (small_vit)
        options["path"] = str(folder / encoder.pop("file"))
    return config


def folder_file(spec: str | Path, kind: str) -> str | Path:
    """The file of kind `kind` ("dit_dh", "vit_decoder", "latent_stats") inside a model folder; any other
    spec unchanged. A teacher / MeanFlow folder gives its RAE's decoder and statistics from its `rae` folder."""
    spec_text = str(spec)
    if spec_text.startswith("hf://") and hub_repo_id(spec_text):
        spec = download_model_folder(hub_repo_id(spec_text))
    elif not Path(spec).is_dir() or not is_model_folder(spec):
        return spec
    config = read_model_folder(spec)
    if kind == "dit_dh":
        if config["kind"] == "rae":
            raise CheckpointError(f"{spec}: an RAE model folder holds no {_kind_name(kind)}")
        return config["weights"]
    if config["kind"] != "rae":
        if not config.get("rae"):
            raise CheckpointError(f"{spec}: this model folder carries no RAE folder")
        return folder_file(config["rae"], kind)
    key = {"vit_decoder": "decoder", "latent_stats": "stats"}.get(kind)
    if key is None or not config.get(key):
        raise CheckpointError(f"{spec}: the RAE model folder holds no {_kind_name(kind)}")
    return config[key]
