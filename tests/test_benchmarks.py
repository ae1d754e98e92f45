"""The benchmark scripts (benchmarks/*.py) import and run end to end at tiny sizes, so an API change in the library
cannot silently break them. Each smoke run takes seconds; the checks are invariants of the reports (ratios against
the reference variant, totals that are sums of their parts, the official classes' MAC counts), not timings."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# torch.func.jvp loads its decompositions with torch.jit.script on first use (torch-internal deprecation).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, argv: list[str], capsys) -> dict:
    module = _load(name)
    assert module.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("teacher", [False, True])
def test_train_step_benchmark_runs_every_variant(capsys, teacher):
    argv = ["--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
            "--in-process"] + (["--teacher"] if teacher else [])
    report = _run("train_step", argv, capsys)
    module = _load("train_step")
    assert list(report["variants"]) == list(module.VARIANTS)
    assert report["teacher"] is teacher and report["batch"] == 4
    for variant in report["variants"].values():
        assert variant["ms_per_step"] > 0 and math.isfinite(variant["ms_per_step"])
        assert variant["samples_per_s"] == pytest.approx(4 * 1e3 / variant["ms_per_step"])
    assert report["variants"]["fd"]["time_vs_fd"] == 1.0
    for name in ("jvp", "jvp_full_batch", "fused"):
        assert report["summary"][f"speedup_vs_{name}"] == pytest.approx(report["variants"][name]["time_vs_fd"])


def test_sampling_benchmark_runs_every_variant(capsys):
    report = _run("sampling", ["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads",
                               "1", "--device", "cpu"], capsys)
    variants = report["variants"]
    assert list(variants) == ["mf1", "mf2", "teacher50"]
    g = report["gmacs"]
    for name, nfe in (("mf1", 1), ("mf2", 2), ("teacher50", 49)):
        v = variants[name]
        assert v["nfe"] == nfe and v["images_per_s"] > 0
        backbone = g["teacher"] if name == "teacher50" else g["student"]
        assert v["gmacs_per_image"] == pytest.approx(nfe * backbone + g["decoder"])
        assert 0.0 <= v["decoder_share"] <= 1.0 and 0.0 <= v["network_share"] <= 1.0
    assert variants["teacher50"]["speedup_vs_teacher50"] == 1.0


def test_flops_benchmark_matches_the_official_counts(capsys):
    report = _run("flops", ["--presets", "imagenet256-s"], capsys)
    row = report["presets"]["imagenet256-s"]
    assert row["total_1step_gmacs"] == pytest.approx(row["backbone_gmacs"] + row["decoder_gmacs"])
    assert row["teacher50_gmacs"] == pytest.approx(row["decoder_gmacs"] + 49 * row["teacher_backbone_gmacs"])
    # the official RAE classes, counted the same way: DiT^DH-S 47.33 and ViT-XL 106.56 GMACs per image
    assert abs(row["deviation"]["teacher_backbone_vs_meas"]) < 1e-3
    assert abs(row["deviation"]["decoder_vs_meas"]) < 1e-3


def test_sample_memory_benchmark_reports_each_size(capsys):
    report = _run("sample_memory", ["--sizes", "40,200", "--batch-size", "16", "--shard-size", "32"], capsys)
    rows = report["sizes"]
    assert list(rows) == ["40", "200"] and report["num_ratio_largest_vs_smallest"] == 5
    for row in rows.values():
        assert row["peak_rss_mb"] > 0 and row["images_per_s"] > 0 and row["npz_mb"] >= row["uint8_mb"]
    assert report["peak_ratio_largest_vs_smallest"] == pytest.approx(rows["200"]["peak_rss_mb"] / rows["40"]["peak_rss_mb"])
