"""FID conventions: how 8-bit images reach the FID Inception network, by name.

The network (the 2015-12-05 TensorFlow Inception graph, `mfrae.eval.inception.FIDInceptionV3`) is the same in
every convention; what differs is the resize to 299 x 299 and the input normalisation:

* `adm` (default): what the ADM evaluator (`openai/guided-diffusion`, `evaluations/evaluator.py`) computes. It
  feeds the uint8 images as float32 0..255 values to the graph's `ExpandDims:0`; the graph then resizes with
  TensorFlow 1's `ResizeBilinear` (`align_corners=False`, `half_pixel_centers=False`: `tf1_resize_bilinear`) and
  normalises with `(x - 128) / 128` (`graph_normalize`). ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`)
  carry `mu` / `sigma` made this way, and so do the published FIDs of MF-RAE, iMF, DMF, MeanFlow.
* `pytorch-fid`: pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` on x / 255: torch's
  half-pixel bilinear resize (`torch_resize_bilinear`) and `2 x - 1` (`unit_normalize`). mfrae's only behaviour
  before conventions had names.
* `clean`: clean-fid's `mode="clean"`: each channel resized as a float image by PIL's bicubic filter (which
  antialiases when downsampling; `pil_resize_bicubic`), clipped to 0..255, then `(x - 128) / 128`.

`fid_input(x, convention)` gives the network input of images in [0, 1] that come from 8-bit values (every mfrae
path decodes uint8 with x / 255; `adm` and `clean` round 255 x back to those integers).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

ADM, PYTORCH_FID, CLEAN = "adm", "pytorch-fid", "clean"
FID_CONVENTIONS = (ADM, PYTORCH_FID, CLEAN)
DEFAULT_FID_CONVENTION = ADM
FID_INPUT_SIZE = 299


def check_fid_convention(name: str) -> str:
    """`name` if it is one of `FID_CONVENTIONS`; a ValueError naming the choices otherwise."""
    if name not in FID_CONVENTIONS:
        raise ValueError(f"unknown FID convention {name!r}; choose one of {', '.join(FID_CONVENTIONS)}")
    return name


def _tf1_source_index(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """TF1's legacy sampling grid along one axis: source position out_index * (in / out) in float32, its
    floor (lower neighbour), its ceiling clamped to the last pixel (upper neighbour) and the fractional part."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)  # float(in) / out, rounded to float32 as TF does
    position = torch.arange(out_size, dtype=torch.float32) * scale
    lower = position.floor().long()
    upper = position.ceil().long().clamp_max(in_size - 1)
    return lower.to(device), upper.to(device), (position - lower.float()).to(device)


def tf1_resize_bilinear(x: Tensor, size: int = FID_INPUT_SIZE) -> Tensor:
    """TensorFlow 1's `ResizeBilinear` with `align_corners=False`, `half_pixel_centers=False` (the op inside the
    2015 Inception graph; TF's `resize_bilinear_op.cc` / `image_resizer_state.h`): output pixel i samples the
    input at i * in / out (no half-pixel offset, so the image shifts by up to half a pixel), neighbours
    floor(.) and min(ceil(.), in - 1), and the TF kernel's order of operations
    top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx, out = top + (bottom - top) * dy, in float32.
    x: [B, C, H, W] float -> [B, C, size, size]."""
    x = x.float()
    h, w = x.shape[-2:]
    y0, y1, dy = _tf1_source_index(size, h, x.device)
    x0, x1, dx = _tf1_source_index(size, w, x.device)
    top_rows, bottom_rows = x[:, :, y0], x[:, :, y1]
    top = top_rows[..., x0] + (top_rows[..., x1] - top_rows[..., x0]) * dx
    bottom = bottom_rows[..., x0] + (bottom_rows[..., x1] - bottom_rows[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def torch_resize_bilinear(x: Tensor, size: int = FID_INPUT_SIZE) -> Tensor:
    """pytorch-fid's resize (`pytorch_fid.inception.InceptionV3.forward`): torch bilinear with half-pixel
    centres (`align_corners=False`), no antialiasing."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def pil_resize_bicubic(values: Tensor, size: int = FID_INPUT_SIZE) -> Tensor:
    """clean-fid's `mode="clean"` resize (`cleanfid.resize.make_resizer("PIL", False, "bicubic", ...)`): each
    channel of each image as a 32-bit float PIL image ("F"), resized with PIL's bicubic filter (support scaled
    with the downsampling factor, i.e. antialiased), then clipped to [0, 255]. values: [B, C, H, W] 0..255 ->
    float32 [B, C, size, size] (computed on the CPU, returned on `values`' device)."""
    arrays = values.detach().float().cpu().numpy()
    out = np.empty((*arrays.shape[:2], size, size), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c in range(arrays.shape[1]):
            image = Image.fromarray(np.ascontiguousarray(arrays[b, c]), mode="F")
            out[b, c] = np.asarray(image.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(np.clip(out, 0.0, 255.0)).to(values.device)


def graph_normalize(values: Tensor) -> Tensor:
    """The TF Inception graph's input normalisation on 0..255 values: (x - 128) / 128 (the graph's `Sub` and
    `Mul` by 1/128, a power of two, so the division is exact)."""
    return (values - 128.0) / 128.0


def unit_normalize(x: Tensor) -> Tensor:
    """pytorch-fid's normalisation of [0, 1] images: 2 x - 1 (= (255 x - 127.5) / 127.5, not the graph's)."""
    return 2.0 * x - 1.0


def fid_input(x: Tensor, convention: str = DEFAULT_FID_CONVENTION, resize: bool = True,
              normalize: bool = True) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] (8-bit values / 255) -> the network input under `convention` (module
    docstring); `resize` / `normalize` switch the two steps off (pytorch-fid's `resize_input` /
    `normalize_input`). Without normalisation `adm` and `clean` return 0..255 values."""
    check_fid_convention(convention)
    if convention == PYTORCH_FID:
        if resize:
            x = torch_resize_bilinear(x)
        return unit_normalize(x) if normalize else x
    values = torch.round(x * 255.0)  # the uint8 values the ADM / clean-fid pipelines feed as floats
    if resize and values.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):  # both resizes are the identity at 299
        values = tf1_resize_bilinear(values) if convention == ADM else pil_resize_bicubic(values)
    return graph_normalize(values) if normalize else values
