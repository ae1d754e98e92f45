"""FLOP and parameter accounting reproduces the papers' per-image figures (docs/checkpoints.md, sections 8-9)."""

from __future__ import annotations

import json

import pytest

from mfrae.cli import main
from mfrae.flops import cost_report


def _close(value, paper, rel=0.01):
    return abs(value - paper) <= rel * paper


def test_imagenet256_xl_matches_papers():
    one = cost_report("imagenet256-xl", steps=1, meanflow=False)
    assert _close(one.backbone_gmacs, 156.8) and _close(one.decoder_gmacs, 106.6)
    assert _close(one.total_gmacs, 263) and _close(cost_report("imagenet256-xl", steps=2).total_gmacs, 420)
    # true FLOPs include attention: 161.58 and 110.82 GMACs with attention, x2 (docs/checkpoints.md, section 9)
    assert _close(one.backbone_gflops_true, 323.16) and _close(one.decoder_gflops_true, 221.65)
    assert one.backbone_params == 838_675_796 and one.decoder_trainable_params == 415_056_640


def test_imagenet512_xl_matches_measured_reference():
    report = cost_report("imagenet512-xl", steps=1, meanflow=False)
    assert _close(report.backbone_gmacs, 626.6) and _close(report.decoder_gmacs, 425.0)
    assert _close(report.backbone_gflops_true, 2 * 702.82) and _close(report.decoder_gflops_true, 2 * 492.79)


@pytest.mark.parametrize("preset,gmacs", [("imagenet256-s", 47.33), ("imagenet256-b", 63.95), ("imagenet256-l", 119.79)])
def test_smaller_backbones(preset, gmacs):
    assert _close(cost_report(preset, meanflow=False).backbone_gmacs, gmacs)


def test_flops_cli_json(capsys):
    assert main(["flops", "--preset", "imagenet256-xl", "--steps", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("backbone_gmacs", "decoder_gmacs", "total_gmacs", "backbone_gflops_true", "decoder_gflops_true",
                "total_gflops_true", "backbone_params", "decoder_params"):
        assert key in data
    assert data["backbone_params"] == 840_595_284  # the MeanFlow student by default
    assert _close(data["total_gmacs"], data["decoder_gmacs"] + 2 * data["backbone_gmacs"], 1e-9)


def test_flops_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["flops", "--preset", "imagenet999-xl"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["flops", "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
