"""Per-image compute of every pipeline preset (`mfrae.flops.PIPELINES`), next to the papers' figures.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/flops.py            # table (about 40 s on one CPU core; nothing is allocated)
    .venv/bin/python benchmarks/flops.py --json     # one JSON object
    .venv/bin/python benchmarks/flops.py --presets imagenet256-xl
    .venv/bin/python benchmarks/flops.py --presets imagenet256-s --json   # one preset, a few seconds

Everything is counted by `mfrae.flops.cost_report` on the meta device:
  * GMACs, the papers' convention: multiply-adds of Linear / Conv layers, attention products excluded;
  * true GFLOPs: 2 per multiply-add of every matrix product, attention included (torch.utils.flop_counter).
Per image: backbone = one DiT^DH forward of the MeanFlow student (the teacher, without the interval embedding,
is listed separately), decoder = one ViT-XL decoder forward; N-step total = decoder + N x backbone; teacher50 =
the released 50-point Euler grid, 49 teacher evaluations + decoder.

Reference figures:
  [MEAS] the official RAE model classes (github bytetriper/RAE; RAE is arXiv 2510.11690) instantiated with random
         weights and counted with torch.utils.flop_counter (GMACs without attention; the "with attention" value
         x 2 is the true-FLOP reference);
  [PAGE] the RAE project page; [MF-RAE] the MF-RAE paper (arXiv 2511.13019).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Official-class measurements [MEAS]: DiT^DH backbones and ViT-XL decoders, GMACs excl. / incl. attention.
MEAS_BACKBONE = {  # (excl. attention, incl. attention)
    "imagenet256-s": (47.33, 48.47), "imagenet256-b": (63.95, 65.69),
    "imagenet256-l": (119.79, 123.55), "imagenet256-xl": (156.81, 161.58),
    "imagenet512-s": (189.29, 207.54), "imagenet512-b": (255.66, 283.57),
    "imagenet512-l": (478.72, 538.85), "imagenet512-xl": (626.58, 702.82),
}
MEAS_DECODER = {256: (106.56, 110.82), 512: (425.01, 492.79)}  # ViT-XL, 256 / 1024 tokens
# Figures quoted by the papers (the papers' "GFLOPs" are multiply-adds: they match the MAC counts above).
PAPER = {
    "imagenet256-xl": {"backbone": (157.0, "MF-RAE"), "decoder": (106.0, "MF-RAE; 106.7 PAGE"),
                       "total_1step": (263.0, "MF-RAE")},
}
BASELINES = [  # SD-VAE pipelines, as quoted (not computed here)
    ("SD-VAE decoder", 310.4, "PAGE (MF-RAE: 310)"),
    ("SD-VAE MeanFlow 1-step (DiT-XL/2 + SD-VAE decoder)", 424.0,
     "MF-RAE; the sum 118.6 + 310.4 of the two quoted parts is 429"),
    ("DiT-XL/2 backbone (SD-VAE latents)", 118.6, "DiT paper, incl. attention"),
]


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rel(value: float, ref: float | None) -> float | None:
    return None if ref is None else (value - ref) / ref


def measure(presets: list[str]) -> dict:
    _import_mfrae()
    import torch

    from mfrae.flops import cost_report

    torch.set_num_threads(1)
    rows = {}
    for preset in presets:
        student = cost_report(preset, steps=1, meanflow=True)
        teacher = cost_report(preset, steps=1, meanflow=False)
        res = 256 if preset.startswith("imagenet256") else 512
        bb, dec = student.backbone_gmacs, student.decoder_gmacs
        meas_bb, meas_dec = MEAS_BACKBONE.get(preset), MEAS_DECODER.get(res)
        row = {
            "backbone_gmacs": bb, "teacher_backbone_gmacs": teacher.backbone_gmacs, "decoder_gmacs": dec,
            "total_1step_gmacs": dec + bb, "total_2step_gmacs": dec + 2 * bb,
            "teacher50_gmacs": dec + 49 * teacher.backbone_gmacs,
            "backbone_gflops_true": student.backbone_gflops_true, "decoder_gflops_true": student.decoder_gflops_true,
            "teacher_backbone_gflops_true": teacher.backbone_gflops_true,
            "total_1step_gflops_true": student.backbone_gflops_true + student.decoder_gflops_true,
            "backbone_params": student.backbone_params, "teacher_params": teacher.backbone_params,
            "decoder_params": student.decoder_params,
            "reference": {
                "teacher_backbone_gmacs_meas": meas_bb[0] if meas_bb else None,
                "teacher_backbone_gflops_true_meas": 2 * meas_bb[1] if meas_bb else None,
                "decoder_gmacs_meas": meas_dec[0] if meas_dec else None,
                "decoder_gflops_true_meas": 2 * meas_dec[1] if meas_dec else None,
                **{f"{k}_paper": v for k, (v, _) in PAPER.get(preset, {}).items()},
                **{f"{k}_paper_source": s for k, (_, s) in PAPER.get(preset, {}).items()},
            },
        }
        ref = row["reference"]
        row["deviation"] = {
            "teacher_backbone_vs_meas": _rel(teacher.backbone_gmacs, ref["teacher_backbone_gmacs_meas"]),
            "decoder_vs_meas": _rel(dec, ref["decoder_gmacs_meas"]),
            "teacher_backbone_true_vs_meas": _rel(teacher.backbone_gflops_true,
                                                  ref["teacher_backbone_gflops_true_meas"]),
            "decoder_true_vs_meas": _rel(student.decoder_gflops_true, ref["decoder_gflops_true_meas"]),
            "backbone_vs_paper": _rel(teacher.backbone_gmacs, ref.get("backbone_paper")),
            "decoder_vs_paper": _rel(dec, ref.get("decoder_paper")),
            "total_1step_vs_paper": _rel(dec + bb, ref.get("total_1step_paper")),
        }
        rows[preset] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    _import_mfrae()
    from mfrae.flops import PIPELINES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PIPELINES), help="comma-separated subset of the presets")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = sorted(set(presets) - set(PIPELINES))
    if unknown or not presets:
        parser.error(f"unknown presets {unknown}; choose from {sorted(PIPELINES)}")
    start = time.perf_counter()
    rows = measure(presets)
    report = {"convention": "GMACs = Linear/Conv multiply-adds, attention excluded (papers); "
                            "true GFLOPs = 2 x all matmul multiply-adds incl. attention",
              "presets": rows, "baselines_quoted": [{"name": n, "gmacs": v, "source": s} for n, v, s in BASELINES],
              "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(report))
        return 0

    def pct(x):
        return "" if x is None else f"{100 * x:+.2f}%"

    print("Per-image GMACs (papers' convention: Linear/Conv multiply-adds, attention excluded); MeanFlow student")
    print(f"{'preset':<16}{'backbone':>10}{'teacher bb':>12}{'decoder':>9}{'1-step':>9}{'2-step':>9}"
          f"{'teacher50':>11}{'true GFLOPs bb/dec/1-step':>28}{'params bb / dec':>20}")
    for preset, r in rows.items():
        true = f"{r['backbone_gflops_true']:.1f}/{r['decoder_gflops_true']:.1f}/{r['total_1step_gflops_true']:.1f}"
        params = f"{r['backbone_params'] / 1e6:.1f}M / {r['decoder_params'] / 1e6:.1f}M"
        print(f"{preset:<16}{r['backbone_gmacs']:>10.2f}{r['teacher_backbone_gmacs']:>12.2f}{r['decoder_gmacs']:>9.2f}"
              f"{r['total_1step_gmacs']:>9.1f}{r['total_2step_gmacs']:>9.1f}{r['teacher50_gmacs']:>11.0f}"
              f"{true:>28}{params:>20}")
    print()
    print("Against the reference figures (teacher backbone and decoder vs the official classes [MEAS];"
          " papers' quotes)")
    print(f"{'preset':<16}{'teacher bb':>11}{'[MEAS]':>9}{'dev':>9}{'decoder':>9}{'[MEAS]':>9}{'dev':>9}"
          f"{'true tbb':>9}{'[MEAS]x2':>10}{'dev':>9}  papers")
    for preset, r in rows.items():
        ref, dev = r["reference"], r["deviation"]
        papers = []
        for key in ("backbone", "decoder", "total_1step"):
            if f"{key}_paper" in ref:
                ours = {"backbone": r["teacher_backbone_gmacs"], "decoder": r["decoder_gmacs"],
                        "total_1step": r["total_1step_gmacs"]}[key]
                papers.append(f"{key} {ours:.1f} vs {ref[f'{key}_paper']:g} ({ref[f'{key}_paper_source']})")
        fmt = lambda v: "" if v is None else f"{v:.2f}"
        print(f"{preset:<16}{r['teacher_backbone_gmacs']:>11.2f}{fmt(ref['teacher_backbone_gmacs_meas']):>9}"
              f"{pct(dev['teacher_backbone_vs_meas']):>9}{r['decoder_gmacs']:>9.2f}{fmt(ref['decoder_gmacs_meas']):>9}"
              f"{pct(dev['decoder_vs_meas']):>9}{r['teacher_backbone_gflops_true']:>9.1f}"
              f"{fmt(ref['teacher_backbone_gflops_true_meas']):>10}{pct(dev['teacher_backbone_true_vs_meas']):>9}  "
              + "; ".join(papers))
    print()
    print("SD-VAE baselines as quoted (GMACs per image):")
    for name, value, source in BASELINES:
        print(f"  {name:<52}{value:>7.1f}   [{source}]")
    if "imagenet256-xl" in rows:
        r = rows["imagenet256-xl"]
        total, dec = r["total_1step_gmacs"], r["decoder_gmacs"]
        print(f"  MF-RAE 1-step here: {total:.1f} GMACs = {total / 424.0:.2f} x the quoted SD-VAE MeanFlow 424; "
              f"decoder {dec:.1f} = {dec / 310.4:.2f} x SD-VAE's 310.4")
    print(f"({report['seconds']:.0f} s on the meta device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
