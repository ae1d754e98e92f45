"""Feature extractors by name: uint8 NHWC image batches -> float64 feature matrices [N, F].

Built-in names:
* `inception`: the FID Inception-v3 pool features (2048-d); needs the weights file (`inception_weights`
  option or `$MFRAE_FID_INCEPTION`). FD on these features is FID. The same pass gives the Inception Score
  logits (`score_logits`) and the sFID features (`mixed_6/conv[..., :7]`, 2023-d, kept as running stats).
  `fid_convention` (default `adm`, the ADM evaluator's; `mfrae.eval.conventions`) sets the resize to 299 and
  the normalisation; the extractor's `convention` records it.
* `encoder`: a frozen representation encoder; FD on its features is the FD-DINOv2-style metric. Either pass
  an in-memory module (`FeatureOptions.module`) or a local Hugging Face model folder (`FeatureOptions.encoder`,
  e.g. DINOv2); images are resized (bicubic, antialiased) to `encoder_image_size` and normalized with the
  ImageNet mean / std (or the folder's `preprocessor_config.json`). The feature is the class token after
  the final norm (HF `pooler_output`); see `pool_encoder_output` for other output shapes.
* `pixels`: the image itself, area-downsampled so that its longer side is at most `pixels_size`, flattened,
  in [0, 1]. Cheap and exact; meant for tests and tiny data.

Other code adds extractors with `register_feature_extractor(name, factory)`, where `factory(options)` returns
a `FeatureExtractor`. Its forward returns the features [B, F]; or (features, class logits [B, K]) to give
class predictions (class accuracy); or a dict with `features` and any of `logits` (class logits),
`score_logits` (Inception Score logits) and `spatial` (sFID features).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mfrae.eval.conventions import DEFAULT_FID_CONVENTION
from mfrae.eval.metrics import FeatureStats, RunningStats
from mfrae.eval.samples import ImageStream, from_uint8_nhwc

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A forward maps float images [B, 3, H, W] in [0, 1] (already on the device) to features [B, F], to
# (features [B, F], class logits [B, K]) when the extractor can also classify, or to a dict (module docstring).
ForwardFn = Callable[[Tensor], Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor]]
_OUTPUT_KEYS = ("features", "logits", "score_logits", "spatial")


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class FeatureOptions:
    """Everything a factory may need; each factory reads only its own fields."""

    device: str = "cpu"
    batch_size: int = 64
    inception_weights: str | None = None  # `inception`: weights file (else $MFRAE_FID_INCEPTION)
    fid_convention: str = DEFAULT_FID_CONVENTION  # `inception`: resize + normalisation (mfrae.eval.conventions)
    encoder: str | None = None  # `encoder`: local Hugging Face model folder
    module: Callable[[Tensor], Any] | None = None  # `encoder`: an in-memory encoder instead of a folder
    module_mean: tuple[float, ...] = IMAGENET_MEAN  # `module`'s input normalisation
    module_std: tuple[float, ...] = IMAGENET_STD
    encoder_image_size: int = 224
    pixels_size: int = 32  # `pixels`: longer side after downsampling
    extra: dict[str, Any] = field(default_factory=dict)  # for extractors registered elsewhere


class Extracted(NamedTuple):
    features: np.ndarray  # float64 [N, F]
    predictions: np.ndarray | None  # int64 [N] argmax of the class logits, when the extractor classifies
    score_logits: np.ndarray | None = None  # float32 [N, K] Inception Score logits, when the extractor has them
    spatial: FeatureStats | None = None  # mean / covariance of the sFID features, when the extractor has them
    num_classes: int | None = None  # K of the class logits [B, K]: `predictions` lie in [0, K)


def _unpack(name: str, out: Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor], batch: int) -> dict[str, Tensor]:
    """A forward's output as {key: tensor [B, ...]} over `_OUTPUT_KEYS`, shapes checked."""
    if isinstance(out, Tensor):
        parts = {"features": out}
    elif isinstance(out, tuple):
        parts = dict(zip(("features", "logits"), out, strict=True))
    elif isinstance(out, Mapping):
        parts = {key: value for key, value in out.items() if value is not None}
        unknown = set(parts) - set(_OUTPUT_KEYS)
        if "features" not in parts or unknown:
            raise ValueError(f"feature extractor '{name}' returned keys {sorted(out)}; expected 'features' and "
                             f"any of {', '.join(_OUTPUT_KEYS[1:])}")
    else:
        raise ValueError(f"feature extractor '{name}' returned {type(out).__name__}, expected a tensor")
    for key, value in parts.items():
        if value.ndim != 2 or value.shape[0] != batch:
            raise ValueError(f"feature extractor '{name}' returned {key} of shape {tuple(value.shape)}, "
                             f"expected [{batch}, F]")
    return parts


class FeatureExtractor:
    """Runs `forward` over uint8 NHWC images in batches under `torch.inference_mode`."""

    def __init__(self, name: str, forward: ForwardFn, device: str | torch.device = "cpu", batch_size: int = 64,
                 convention: str = "") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.convention = convention  # the FID convention of Inception features ("" for other extractors)
        self.forward = forward
        self.device = torch.device(device)
        self.batch_size = batch_size

    def extract(self, images: np.ndarray | ImageStream, progress: str | None = None) -> Extracted:
        """Features (and class predictions, IS logits, sFID stats where the extractor has them) of uint8 images
        [N, H, W, 3] or of a stream read batch by batch; `progress` labels a tqdm bar (None: no bar)."""
        stream = images if isinstance(images, ImageStream) else ImageStream.from_images(
            images, source=f"features '{self.name}'")
        collected: dict[str, list[np.ndarray]] = {"features": [], "predictions": [], "score_logits": []}
        spatial = RunningStats()
        num_classes = None
        with torch.inference_mode(), tqdm(total=stream.count, desc=progress, unit="img", disable=progress is None,
                                          dynamic_ncols=True) as bar:
            for batch in stream.batches(self.batch_size):
                parts = _unpack(self.name, self.forward(from_uint8_nhwc(batch, self.device)), batch.shape[0])
                collected["features"].append(parts["features"].double().cpu().numpy())
                if "logits" in parts:
                    collected["predictions"].append(parts["logits"].argmax(dim=1).cpu().numpy().astype(np.int64))
                    num_classes = int(parts["logits"].shape[1])
                if "score_logits" in parts:
                    collected["score_logits"].append(parts["score_logits"].float().cpu().numpy())
                if "spatial" in parts:
                    spatial.update(parts["spatial"].double().cpu().numpy())
                bar.update(batch.shape[0])
        predictions, score_logits = (np.concatenate(collected[k]) if collected[k] else None
                                     for k in ("predictions", "score_logits"))
        spatial_stats = replace(spatial.stats(self.name), convention=self.convention) if spatial.n >= 2 else None
        return Extracted(features=np.concatenate(collected["features"]), predictions=predictions,
                         score_logits=score_logits, spatial=spatial_stats, num_classes=num_classes)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.extract(images).features


FeatureFactory = Callable[[FeatureOptions], FeatureExtractor]
_REGISTRY: dict[str, FeatureFactory] = {}


def register_feature_extractor(name: str, factory: FeatureFactory, *, overwrite: bool = False) -> None:
    """Make `name` available to `build_feature_extractor` and `mfrae eval --features NAME`."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"feature extractor name must be alphanumeric (with - or _), got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"feature extractor {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def unregister_feature_extractor(name: str) -> None:
    """Remove `name` from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def available_feature_extractors() -> list[str]:
    return sorted(_REGISTRY)


def build_feature_extractor(name: str, options: FeatureOptions | None = None) -> FeatureExtractor:
    """The extractor registered as `name`, built with `options` (defaults if None)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown features {name!r}; available: {', '.join(available_feature_extractors())}")
    return _REGISTRY[name](options or FeatureOptions())


# ---------------------------------------------------------------------------------------------- built-ins


def _pixels_factory(options: FeatureOptions) -> FeatureExtractor:
    size = options.pixels_size
    if size < 1:
        raise ValueError(f"pixels_size must be >= 1, got {size}")

    def forward(x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        scale = size / max(h, w)
        if scale < 1.0:
            # Area averaging: each output pixel is the mean of the input pixels it covers (no aliasing).
            x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        return x.flatten(1)

    return FeatureExtractor("pixels", forward, device=options.device, batch_size=options.batch_size)


def _inception_factory(options: FeatureOptions) -> FeatureExtractor:
    from mfrae.eval.inception import load_fid_inception

    model = load_fid_inception(options.inception_weights, device=options.device, convention=options.fid_convention)

    def forward(x: Tensor) -> dict[str, Tensor]:
        out = model.forward_all(x)
        return {"features": out.pool, "score_logits": out.logits, "spatial": out.spatial}

    return FeatureExtractor("inception", forward, device=options.device, batch_size=options.batch_size,
                            convention=model.convention)


def pool_encoder_output(out: Any) -> Tensor:
    """Reduce an encoder output to [B, F]: HF outputs -> `pooler_output` (else the first token of
    `last_hidden_state`); [B, F] as is; tokens [B, T, D] -> first (class) token; maps [B, C, H, W] -> mean."""
    if not isinstance(out, Tensor):
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                raise ValueError(f"cannot take features from an encoder output of type {type(out).__name__}")
            pooled = hidden[:, 0]
        out = pooled
    if out.ndim == 2:
        return out
    if out.ndim == 3:
        return out[:, 0]
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    raise ValueError(f"cannot take features from an encoder output of shape {tuple(out.shape)}")


def encoder_feature_extractor(encoder: Callable[[Tensor], Any], *, image_size: int | None = 224,
                              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                              name: str = "encoder", device: str | torch.device = "cpu",
                              batch_size: int = 64) -> FeatureExtractor:
    """Wrap a frozen encoder: [0, 1] images -> resize to `image_size` (bicubic, antialiased; None keeps the
    size) -> (x - mean) / std -> encoder -> `pool_encoder_output`."""
    if isinstance(encoder, nn.Module):
        encoder = encoder.eval().requires_grad_(False).to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def forward(x: Tensor) -> Tensor:
        if image_size is not None and x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)  # bicubic overshoots; images stay in [0, 1]
        return pool_encoder_output(encoder((x - mean_t) / std_t)).float()

    return FeatureExtractor(name, forward, device=device, batch_size=batch_size)


class PixelValuesCall(nn.Module):
    """Hugging Face vision models take `pixel_values=`; this gives one a plain call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Any:
        return self.inner(pixel_values=x)


def _load_hf_encoder(folder: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder folder {path} has no config.json (expected a Hugging Face model folder)")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        config = json.loads(preprocessor.read_text())
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
    return PixelValuesCall(model), mean, std


def _encoder_factory(options: FeatureOptions) -> FeatureExtractor:
    if options.module is not None:
        encoder, mean, std = options.module, options.module_mean, options.module_std
    elif options.encoder is not None:
        encoder, mean, std = _load_hf_encoder(options.encoder)
    else:
        raise ValueError("features 'encoder' need an encoder: a local Hugging Face model folder (--encoder PATH) "
                         "or an in-memory module (FeatureOptions.module)")
    return encoder_feature_extractor(encoder, image_size=options.encoder_image_size, mean=mean, std=std,
                                     device=options.device, batch_size=options.batch_size)


register_feature_extractor("pixels", _pixels_factory)
register_feature_extractor("inception", _inception_factory)
register_feature_extractor("encoder", _encoder_factory)
