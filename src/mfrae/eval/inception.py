"""The Inception-v3 that FID is defined with, as a plain `torch.nn` module (no torchvision).

FID uses the TensorFlow Inception graph of 2015-12-05 (`pool_3`, 2048 features). The standard PyTorch port
(pytorch-fid) converted those weights into a torchvision-style `Inception3` state dict with 1008 classes and
no auxiliary head, and patched four block types so that the port matches the TF graph:

* `Mixed_5b/5c/5d` (A) and `Mixed_6b..6e` (C): the pooling branch averages with `count_include_pad=False`;
* `Mixed_7b` (E, first): the same average pooling;
* `Mixed_7c` (E, second): the pooling branch is a 3x3 *max* pool (stride 1, padding 1).

`FIDInceptionV3` rebuilds that network with the same module names, so the released weights file
`pt_inception-2015-12-05-6726825d.pth` loads with `strict=True`. Its forward takes images in [0, 1] (NCHW,
8-bit values / 255), resizes them to 299x299 and normalises them as its FID convention says
(`mfrae.eval.conventions`: `adm`, the default, is the TF graph's own TF1 bilinear resize and (x - 128) / 128;
`pytorch-fid` and `clean` by name) and returns the adaptive-average-pooled 2048-d features. Every
`BasicConv2d` is conv (no bias) -> BatchNorm(eps=0.001) -> ReLU.

For the ADM evaluator's protocol (`forward_all`) the same pass also gives:

* the sFID features: the first 7 channels of the TF graph's `mixed_6/conv` (= `Mixed_6d.branch1x1` here; the
  TF blocks `mixed, mixed_1, ..., mixed_10` are `Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c`), a 17x17
  map flattened in TF's NHWC order: 17 * 17 * 7 = 2023 features;
* the Inception Score logits: pool features times the 1008-way `softmax/weights` *without* the bias, as the
  ADM evaluator takes them (it imports `softmax/logits/MatMul` and multiplies by that op's weight input).

The weights cannot be downloaded at run time; `load_fid_inception(path)` reads them from a local file
(argument, or the environment variable `MFRAE_FID_INCEPTION`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfrae.eval.conventions import FID_INPUT_SIZE  # noqa: F401 (re-exported: the network input side)
from mfrae.eval.conventions import DEFAULT_FID_CONVENTION, check_fid_convention, fid_input

FID_WEIGHTS_ENV = "MFRAE_FID_INCEPTION"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_FEATURE_DIM = 2048
FID_NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 classes + 8 unused)
SFID_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
SFID_GRID = 17  # mixed_6/conv is a 17x17 map at the 299x299 input
SFID_FEATURE_DIM = SFID_GRID * SFID_GRID * SFID_CHANNELS  # 2023

_Size = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as in the TF graph) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size, stride: int = 1,
                 padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's "SAME" average pooling divides by the number of valid (non-padded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1. Output 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2. Output 384 + 96 + in_channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (1x7 / 7x1). Output 4 x 192 = 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2. Output 320 + 192 + in_channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class _FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs: 320 + 2*384 + 2*384 + 192 = 2048 channels.

    The two FID variants differ only in the pooling branch (`_pool`)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def _pool(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        bp = self.branch_pool(self._pool(x))
        return torch.cat([b1, b3, b3d, bp], dim=1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801 (name kept from the reference port)
    """`Mixed_7b`: average pooling that ignores padding."""

    def _pool(self, x: Tensor) -> Tensor:
        return _avg_pool_3x3(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    """`Mixed_7c`: the TF graph max-pools here (stride 1, padding 1)."""

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 with the FID block variants; `forward` gives the 2048-d pool features.

    The `fc` layer (2048 -> 1008) is kept only so the released state dict loads strictly (and for
    `logits`); it is not used for FID features.
    """

    def __init__(self, resize_input: bool = True, normalize_input: bool = True,
                 convention: str = DEFAULT_FID_CONVENTION) -> None:
        super().__init__()
        self.convention = check_fid_convention(convention)
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(FID_FEATURE_DIM, FID_NUM_CLASSES)

    def preprocess(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the network input [B, 3, 299, 299] under `self.convention` (each step only if
        enabled; `mfrae.eval.conventions.fid_input`)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FID Inception expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        return fid_input(x, self.convention, resize=self.resize_input, normalize=self.normalize_input)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> pool features [B, 2048]."""
        return self.forward_all(x, spatial=False).pool

    def forward_all(self, x: Tensor, spatial: bool = True) -> InceptionOutputs:
        """Images [B, 3, H, W] in [0, 1] -> pool features [B, 2048], IS logits [B, 1008] (bias-free, as in the
        ADM evaluator) and, if `spatial`, the sFID features [B, 2023] (`mixed_6/conv[..., :7]`, NHWC order)."""
        return self.forward_network(self.preprocess(x), spatial=spatial)

    def forward_network(self, x: Tensor, spatial: bool = True) -> InceptionOutputs:
        """`forward_all` from the network input on (already resized and normalised, `preprocess`)."""
        x = self._stem(x)
        sfid = None
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        if spatial:
            sfid = self.Mixed_6d.branch1x1(x)[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return InceptionOutputs(pool=pool, logits=self.score_logits(pool), spatial=sfid)

    def logits(self, features: Tensor) -> Tensor:
        """Pool features [B, 2048] -> 1008-way logits of the TF graph, bias included (`softmax/biases`)."""
        return self.fc(features)

    def score_logits(self, features: Tensor) -> Tensor:
        """Pool features [B, 2048] -> the logits the ADM evaluator's Inception Score uses: `features @ W^T`,
        no bias (its softmax graph is `pool_3 @ softmax/weights`)."""
        return features @ self.fc.weight.t()


class InceptionOutputs(NamedTuple):
    pool: Tensor  # [B, 2048], the FID features (`pool_3`)
    logits: Tensor  # [B, 1008], bias-free logits for the Inception Score
    spatial: Tensor | None  # [B, 2023], the sFID features (`mixed_6/conv[..., :7]`, flattened H, W, C)


def resolve_fid_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file: `path` if given, else `$MFRAE_FID_INCEPTION`; it must exist."""
    if path is None:
        path = os.environ.get(FID_WEIGHTS_ENV) or None
    if path is None:
        raise FileNotFoundError(
            f"FID Inception weights not given: pass a path (--inception-weights) or set ${FID_WEIGHTS_ENV} to a "
            f"local copy of {FID_WEIGHTS_NAME} (download it elsewhere from {FID_WEIGHTS_URL})")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"FID Inception weights file not found: {resolved} (expected {FID_WEIGHTS_NAME}, "
            f"available from {FID_WEIGHTS_URL})")
    return resolved


def load_fid_inception(path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                       convention: str = DEFAULT_FID_CONVENTION) -> FIDInceptionV3:
    """Build `FIDInceptionV3` with the FID `convention`, load the weights strictly from `path` (or
    `$MFRAE_FID_INCEPTION`), eval mode, gradients off. Raises FileNotFoundError / ValueError naming the file
    when it is absent or does not fit."""
    check_fid_convention(convention)
    weights = resolve_fid_weights(path)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; report them all as bad input
        detail = " ".join(str(err).split())
        raise ValueError(f"cannot read FID Inception weights {weights}: {detail}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"FID Inception weights {weights} are not a state dict of tensors")
    model = FIDInceptionV3(convention=convention)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch's message spans lines; the CLI prints one
        raise ValueError(f"FID Inception weights {weights} do not match the FID Inception-v3 "
                         f"(expected {FID_WEIGHTS_NAME}): {detail}") from err
    model.eval().requires_grad_(False)
    return model.to(device)
