"""Compute and parameter accounting per generated image, on the meta device (no weights are allocated).

Two conventions are reported:
  * GMACs, the papers' convention: multiply-adds of Linear and Conv layers only; the attention products
    Q K^T and A V are excluded. At 256 px this gives DiT^DH-XL 156.8 and ViT-XL decoder 106.6, the papers'
    157 (MF-RAE, arXiv 2511.13019) and 106.7 (RAE, arXiv 2510.11690, Table 1b); see docs/checkpoints.md,
    section 9.
  * true GFLOPs: 2 FLOPs per multiply-add of every matrix product, attention included
    (`torch.utils.flop_counter`).
An N-step generation costs decoder + N x backbone (the encoder is not used at sampling time).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfrae.models.dit_dh import DIT_DH_SIZES, DiTDH, dit_dh_config
from mfrae.models.vit_decoder import ViTDecoder, vit_decoder_config

# Pipeline presets: (DiT^DH size, latent grid, decoder size, decoder tokens). Encoder DINOv2-B: 768 channels.
PIPELINES: dict[str, tuple[str, int, str, int]] = {
    f"imagenet{res}-{size.lower()}": (size, grid, "XL", grid * grid)
    for res, grid in ((256, 16), (512, 32))
    for size in DIT_DH_SIZES
}


def count_linear_macs(model: nn.Module, *inputs) -> int:
    """Multiply-adds of every nn.Linear and nn.Conv2d call during one forward."""
    total = 0

    def linear_hook(module: nn.Linear, args, output):
        nonlocal total
        total += args[0].numel() * module.out_features

    def conv_hook(module: nn.Conv2d, args, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [
        m.register_forward_hook(linear_hook if isinstance(m, nn.Linear) else conv_hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def count_true_flops(model: nn.Module, *inputs) -> int:
    """All matrix-product FLOPs (2 per multiply-add), attention included."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


@dataclass
class CostReport:
    preset: str
    steps: int
    backbone_gmacs: float
    decoder_gmacs: float
    total_gmacs: float
    backbone_gflops_true: float
    decoder_gflops_true: float
    total_gflops_true: float
    backbone_params: int
    decoder_params: int
    backbone_trainable_params: int
    decoder_trainable_params: int


def _params(model: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def cost_report(preset: str, steps: int = 1, meanflow: bool = True) -> CostReport:
    """Per-image cost of an N-step generation for a pipeline preset (see `PIPELINES`)."""
    if preset not in PIPELINES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PIPELINES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size, grid, dec_size, tokens = PIPELINES[preset]
    with torch.device("meta"):
        backbone = DiTDH(dit_dh_config(size, input_size=grid, interval_embedding=meanflow)).eval()
        decoder = ViTDecoder(vit_decoder_config(dec_size, num_patches=tokens)).eval()
        x = torch.zeros(1, *backbone.latent_shape)
        t, y = torch.ones(1), torch.zeros(1, dtype=torch.long)
        extra = (torch.zeros(1),) if meanflow else ()
        backbone_inputs = (x, t, y, *extra)
        tokens_in = torch.zeros(1, tokens, decoder.config.encoder_hidden_size)
        bb_macs = count_linear_macs(backbone, *backbone_inputs)
        bb_flops = count_true_flops(backbone, *backbone_inputs)
        dec_macs = count_linear_macs(decoder, tokens_in)
        dec_flops = count_true_flops(decoder, tokens_in)
    g = 1e-9
    bb_all, bb_train = _params(backbone)
    dec_all, dec_train = _params(decoder)
    return CostReport(
        preset=preset,
        steps=steps,
        backbone_gmacs=bb_macs * g,
        decoder_gmacs=dec_macs * g,
        total_gmacs=(dec_macs + steps * bb_macs) * g,
        backbone_gflops_true=bb_flops * g,
        decoder_gflops_true=dec_flops * g,
        total_gflops_true=(dec_flops + steps * bb_flops) * g,
        backbone_params=bb_all,
        decoder_params=dec_all,
        backbone_trainable_params=bb_train,
        decoder_trainable_params=dec_train,
    )


#################################################################################
#                                   CLI                                         #
#################################################################################


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagenet256-xl", choices=sorted(PIPELINES), help="pipeline preset")
    parser.add_argument("--steps", type=int, default=1, help="backbone evaluations per image (default 1)")
    parser.add_argument("--teacher", action="store_true", help="count the flow-matching teacher (no interval embedding)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    report = cost_report(args.preset, args.steps, meanflow=not args.teacher)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    model = "DiT^DH teacher" if args.teacher else "MeanFlow DiT^DH"
    print(f"{report.preset}: {model} + ViT decoder, {report.steps}-step generation, per image")
    print(f"{'':16}{'GMACs (papers)':>16}{'GFLOPs (true)':>16}{'params':>16}")
    for name, macs, flops, params in (
        ("backbone", report.backbone_gmacs, report.backbone_gflops_true, f"{report.backbone_params:,}"),
        ("decoder", report.decoder_gmacs, report.decoder_gflops_true, f"{report.decoder_params:,}"),
        (f"total ({report.steps} step{'s' if report.steps > 1 else ''})", report.total_gmacs, report.total_gflops_true, ""),
    ):
        print(f"{name:16}{macs:16.1f}{flops:16.1f}{params:>16}")
    return 0
