"""The benchmark scripts (benchmarks/*.py) import and run end to end at tiny sizes, so an API change in the library
cannot silently break them: every variant of each, their table output, train_step.py's child processes, and the
GPU check's CPU-safe parts (argument parsing, the JSON schema, the skip / error / budget logic, and every
measurement path on tiny CPU models). Each smoke run takes seconds; the checks are invariants of the reports
(ratios against the reference variant, totals that are sums of their parts, the official classes' MAC counts),
not timings."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# torch.func.jvp loads its decompositions with torch.jit.script on first use (torch-internal deprecation).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def test_derivative_accuracy_benchmark_reports_every_strategy_and_precision(capsys):
    report = _run("derivative_accuracy", ["--tiny", "--threads", "1"], capsys)
    steps = report["steps"]
    assert steps == [1e-4, 1e-3, 5e-3, 1e-2] and report["precisions"] == ["float32", "tf32_emulated", "bfloat16"]
    assert list(report["testbeds"]) == ["mixture-2d", "mixture-8d", "dit-tiny"]
    expected = {"jvp"} | {f"{m} h={h:g}" for m in ("finite_difference", "finite_difference_fused") for h in steps}
    for name, testbed in report["testbeds"].items():
        f32, bf16 = (testbed["precisions"][p]["errors"] for p in ("float32", "bfloat16"))
        assert set(f32) == set(bf16) == expected, name
        assert all(math.isfinite(e) and e > 0 for e in [*f32.values(), *bf16.values()]), name
        assert testbed["u_rms"] > 0 and testbed["dudt_rms"] > 0
        for h in steps:  # the library stencil runs in float32 under any autocast; the fused one does not
            assert bf16[f"finite_difference h={h:g}"] == f32[f"finite_difference h={h:g}"], name
            assert bf16[f"finite_difference_fused h={h:g}"] > f32[f"finite_difference_fused h={h:g}"], name
        assert f32["jvp"] < 1e-4, name  # float32 forward-mode AD against the float64 one
        tf32 = testbed["precisions"]["tf32_emulated"]["errors"]  # no library stencil: it turns TF32 off
        assert set(tf32) == expected - {f"finite_difference h={h:g}" for h in steps}, name
        for h in steps:
            key = f"finite_difference_fused h={h:g}"
            assert f32[key] < tf32[key] < bf16[key], name
    assert report["testbeds"]["dit-tiny"]["u_rms"] == pytest.approx(1.0, rel=1e-3)  # --u-rms


def test_frechet_benchmark_times_both_forms_of_the_same_number(capsys):
    report = _run("frechet", ["--dim", "48", "--samples", "20,300"], capsys)
    assert list(report["cases"]) == ["20", "300"] and report["dim"] == 48
    for case in report["cases"].values():
        assert case["relative_difference"] < 1e-6  # eigh and sqrtm give one FD
        assert case["ratio_old_vs_new"] == pytest.approx(case["seconds_sqrtm"] / case["seconds_eigh"])
    assert _load("frechet").main(["--dim", "8", "--samples", "5,50"]) == 0
    assert "old/new" in capsys.readouterr().out


@pytest.mark.slow  # 2048-d Fréchet distances and 299 px Inception passes: ~40 s on 2 busy cores
def test_fid_conventions_benchmark_reports_every_convention(capsys, tmp_path):
    argv = ["--sizes", "8", "--num", "3", "--workdir", str(tmp_path)]
    report = _run("fid_conventions", argv, capsys)
    row = report["sizes"]["8"]
    assert list(row["conventions"]) == ["adm", "pytorch-fid", "clean"]
    adm = row["conventions"]["adm"]
    for values in row["conventions"].values():
        assert values["ratio_real_vs_adm"] == pytest.approx(values["fid_real"] / adm["fid_real"])
        assert values["ratio_degraded_vs_adm"] == pytest.approx(values["fid_degraded"] / adm["fid_degraded"])
    mixed = row["mixed"]
    assert mixed["ratio_mixed_vs_adm"] == pytest.approx(mixed["fid_degraded_pytorch_fid_vs_adm_reference"]
                                                        / adm["fid_degraded"])
    assert mixed["fid_reference_pytorch_fid_vs_adm_reference"] > 0  # the same images, two conventions


def test_train_step_default_invocation_runs_its_child_processes(tmp_path):
    """`python benchmarks/train_step.py` as a user runs it: fresh timing and memory children, the table, the target
    lines (tiny size and two variants to keep it short; every variant runs in-process above)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "train_step.py"), "--preset", "tiny", "--batch", "4",
                           "--steps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--variants", "fd,fm"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert {"fd", "fm"} <= rows


@pytest.mark.parametrize("name, argv, expected", [
    ("sampling", ["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                  "--device", "cpu"], ("mf1", "mf2", "teacher50", "mf1 images/s vs teacher50")),
    ("flops", ["--presets", "imagenet256-s"], ("imagenet256-s", "SD-VAE baselines")),
    ("sample_memory", ["--sizes", "40,80", "--batch-size", "16", "--shard-size", "32"], ("peak RSS ratio",)),
    ("derivative_accuracy", ["--tiny", "--no-dit", "--toy-dims", "2", "--threads", "1"],
     ("command: .venv/bin/python benchmarks/derivative_accuracy.py --tiny", "mixture-2d", "finite_difference h=0.0001",
      "bfloat16", "tf32_emulated", "n/a", "wall time")),
])
def test_benchmark_tables_print(capsys, name, argv, expected):
    """The default (table) output of each benchmark, not only its --json report."""
    assert _load(name).main(argv) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


#################################################################################
#                     benchmarks/gpu_check.sh and gpu_check.py                  #
#################################################################################

# What the GPU check must report (the list), independent of the script's own tables: every section and,
# per section, the measurements it owes.
GPU_SECTIONS = {
    "cuda_tests": {"total", "passed", "failed", "skipped"},
    "matmul_peak": {"bf16_tflops"},
    "train_step": {"ms_per_step", "samples_per_s", "peak_memory_gib", "mfu"},
    "train_step_compiled": {"ms_per_step", "samples_per_s", "mfu"},
    "sampling_256": {f"mf{k}_{p}_images_per_s" for k in (1, 2) for p in ("bf16", "fp32")},
    "sampling_256_compiled_bf16": {"mf1_bf16_images_per_s", "mf2_bf16_images_per_s"},
    "sampling_256_compiled_fp32": {"mf1_fp32_images_per_s", "mf2_fp32_images_per_s"},
    "sampling_512": {"mf1_bf16_images_per_s"},
    "derivative_accuracy": {f"{m}_{p}" for m in ("jvp", "fd_h1e-4", "fd_h5e-3", "fused_h1e-4", "fused_h5e-3")
                            for p in ("fp32", "tf32", "bf16")} | {"jvp_tf32emu", "fused_h1e-4_tf32emu"},
}
SECTION_KEYS = {"status", "reason", "error", "seconds", "timeout_s", "values", "details"}


def _check_schema(report: dict) -> None:
    assert report["schema"] == "mfrae-gpu-check/1"
    assert report["targets"] == {"train_mfu": 0.45, "mf1_256_images_per_s": 725.0}
    assert set(report["sections"]) == set(GPU_SECTIONS)
    for name, section in report["sections"].items():
        assert set(section) == SECTION_KEYS, name
        assert section["status"] in ("ok", "error", "timeout", "skipped"), name
        assert GPU_SECTIONS[name] <= set(section["values"]), name
    for key in ("train_mfu", "train_mfu_target_met", "mf1_256_images_per_s", "mf1_256_target_met", "statuses"):
        assert key in report["summary"]
    assert {"python", "modules", "missing_required", "cuda_available"} <= set(report["environment"])


def _gpu_check(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    rc = _load("gpu_check").main(["--out", str(tmp_path), *argv])
    return rc, json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_shell_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "--out"),
    (["--out", "x", "--budget-s", "-1"], "--budget-s"),
    (["--out", "x", "--sections", "matmul_peak,warp_drive"], "warp_drive"),
    (["--out", "x", "--train-batches", "32,0"], "--train-batches"),
    (["--out", "x", "--device", "cpu"], "--tiny"),
    (["--out", "x", "--device", "tpu"], "--device"),
])
def test_gpu_check_rejects_bad_arguments_naming_them(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _load("gpu_check").parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_check_arguments_parse():
    args = _load("gpu_check").parse_args(["--out", "x", "--train-batches", "16,32", "--sections",
                                          "train_step,sampling_512", "--budget-s", "300"])
    assert args.train_batches == (16, 32) and args.sections == ("train_step", "sampling_512")
    assert args.budget_s == 300 and args.device == "cuda" and not args.dry_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_gpu_check_dry_run_reports_every_section_skipped_without_cuda(tmp_path):
    rc, report = _gpu_check(tmp_path, "--dry-run")
    assert rc == 0
    _check_schema(report)
    assert report["mode"] == "dry-run" and report["environment"]["cuda_available"] is False
    for name in GPU_SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "skipped", name
        assert name == "cuda_tests" or "no CUDA" in section["reason"], name
        assert all(v is None for v in section["values"].values()), name
    assert report["summary"]["train_mfu"] is None and report["summary"]["mf1_256_target_met"] is None
    assert (tmp_path / "gpu_check.log").read_text().strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_gpu_check_without_cuda_measures_nothing_and_fails(tmp_path):
    rc, report = _gpu_check(tmp_path)
    assert rc == 1 and report["sections"]["train_step"]["reason"] == "no CUDA device"


def test_gpu_check_budget_exhausted_skips_sections(tmp_path):
    rc, report = _gpu_check(tmp_path, "--tiny", "--device", "cpu", "--budget-s", "0")
    assert rc == 0
    _check_schema(report)
    for name in GPU_SECTIONS.keys() - {"cuda_tests"}:
        assert report["sections"][name]["status"] == "skipped"
        assert report["sections"][name]["reason"].startswith("budget exhausted"), name


@pytest.mark.slow  # 17 s; the tiny end-to-end gpu_check runs by default
def test_gpu_check_failures_are_recorded_and_the_rest_goes_on(tmp_path):
    """A failing configuration (batch 1: the prefix layout cannot give 25 % of one row r != t) keeps the section's
    other configurations; a section failing as a whole (an unknown compile backend) is recorded; the others still
    run."""
    rc, report = _gpu_check(tmp_path, "--tiny", "--device", "cpu", "--threads", "1", "--train-batches", "1,4",
                            "--train-steps", "1", "--compile-backend", "no_such_backend",
                            "--sections", "train_step,sampling_256_compiled_bf16,sampling_512")
    assert rc == 1
    sections = report["sections"]
    train = sections["train_step"]
    # batches 1 (fails) and 4 at the engine's float32 setting, then TF32 at the largest batch that ran
    assert train["status"] == "error" and train["error"].startswith("1 of 3 measurements failed")
    assert "fraction_r_neq_t" in train["error"]
    assert [(c["batch"], c["matmul_precision"]) for c in train["details"]["configs"]] == [
        (1, "float32 (engine default)"), (4, "float32 (engine default)"), (4, "tf32")]
    assert train["values"]["batch"] == 4 and train["values"]["ms_per_step"] > 0
    assert sections["sampling_256_compiled_bf16"]["status"] == "error"
    assert "no_such_backend" in sections["sampling_256_compiled_bf16"]["error"]
    assert sections["sampling_512"]["status"] == "ok"
    assert sections["sampling_512"]["values"]["mf1_bf16_images_per_s"] > 0
    assert sections["matmul_peak"]["reason"] == "not selected (--sections)"
    assert report["summary"]["statuses"]["sampling_512"] == "ok"


# The default run takes one section of each kind (matmul, training step, compiled sampling); `slow` runs them all.
QUICK_SECTIONS = ("matmul_peak", "train_step", "sampling_256_compiled_bf16")


ALL_MEASURED = tuple(GPU_SECTIONS.keys() - {"cuda_tests"})


@pytest.mark.parametrize("sections", [QUICK_SECTIONS, pytest.param(ALL_MEASURED, marks=pytest.mark.slow)])
def test_gpu_check_tiny_cpu_run_measures_every_section(tmp_path, sections):
    """The measurement paths of the GPU check on a CPU with tiny models (the `eager` compile backend stands in
    for inductor: dynamo still traces and wraps the models)."""
    rc, report = _gpu_check(tmp_path, "--tiny", "--device", "cpu", "--threads", "1", "--compile-backend", "eager",
                            "--sample-repeats", "1", "--train-steps", "1", "--train-warmup", "1",
                            "--sections", ",".join(sections))
    assert rc == 0, report["summary"]["statuses"]
    _check_schema(report)
    sections_ = report["sections"]
    for name in sections:
        assert sections_[name]["status"] == "ok", (name, sections_[name]["error"])
        for key in GPU_SECTIONS[name] - {"peak_memory_gib"}:  # no allocator statistics on a CPU
            assert sections_[name]["values"][key] > 0, (name, key)
    peak = sections_["matmul_peak"]["values"]["bf16_tflops"]
    for config in sections_["train_step"]["details"]["configs"]:
        # samples/s and MFU are what the step time and the counted FLOPs say
        assert config["samples_per_s"] == pytest.approx(config["batch"] * 1e3 / config["ms_per_step"])
        assert config["mfu"] == pytest.approx(config["flops_per_step"] / (config["ms_per_step"] / 1e3) / 1e12 / peak)
        # FLOPs counted over the executed step vs B (3 f_s + f_t) + 2 k f_s from per-sample forward counts: the
        # backward skips the input gradients of the first layers, a few % of this tiny model
        assert 0.9 < config["flops_per_step"] / config["flops_per_step_analytic"] <= 1.0
        assert config["gap_rows"] == round(0.25 * config["batch"])
    sampling = [n for n in sections if n.startswith("sampling")]
    for name in sampling:
        per_image = sections_[name]["details"]["true_gflops_per_image"]
        for variant in sections_[name]["details"]["variants"].values():
            assert variant["true_gflops_per_image"] == pytest.approx(variant["nfe"] * per_image["backbone"]
                                                                     + per_image["decoder"])
    mfus = [sections_[name]["values"]["mfu"] for name in ("train_step", "train_step_compiled") if name in sections]
    assert report["summary"]["train_mfu"] == pytest.approx(max(mfus))  # the best of eager and compiled
    assert report["summary"]["train_mfu_target_met"] is (max(mfus) >= 0.45)


@pytest.mark.slow  # a child process, ~30 s on 2 cores; the tiny benchmark above covers the same code by default
def test_gpu_check_derivative_accuracy_section_on_cpu(tmp_path):
    """The derivative-accuracy section on a tiny DiT^DH: every strategy, step and precision measured; the library
    stencil's error is the same under bf16 autocast (it runs in float32), the fused stencil's is not."""
    rc, report = _gpu_check(tmp_path, "--tiny", "--device", "cpu", "--threads", "1", "--sections",
                            "derivative_accuracy")
    assert rc == 0, report["summary"]["statuses"]
    _check_schema(report)
    section = report["sections"]["derivative_accuracy"]
    assert section["status"] == "ok", section["error"]
    values = section["values"]
    assert all(v is not None and math.isfinite(v) and v > 0 for v in values.values())
    for h in ("1e-4", "1e-3", "5e-3", "1e-2"):
        assert values[f"fd_h{h}_bf16"] == values[f"fd_h{h}_fp32"]
        assert values[f"fused_h{h}_bf16"] > values[f"fused_h{h}_fp32"]
        # on a CPU the TF32 flags change nothing; the emulation rounds to 10 mantissa bits, less than bf16's 7
        assert values[f"fused_h{h}_tf32"] == values[f"fused_h{h}_fp32"]
        assert values[f"fused_h{h}_fp32"] < values[f"fused_h{h}_tf32emu"] < values[f"fused_h{h}_bf16"]
    assert values["jvp_fp32"] < values["jvp_tf32emu"] < values["jvp_bf16"]
    assert [c["precision"] for c in section["details"]["configs"]] == ["float32", "tf32", "tf32_emulated", "bfloat16"]


def test_gpu_check_script_end_to_end_without_cuda(tmp_path):
    """gpu_check.sh on this machine: the CUDA tests are collected and skipped, the report and the logs written."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(tmp_path), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    _check_schema(report)
    tests = report["sections"]["cuda_tests"]
    cuda_tests = ast.parse((BENCHMARKS.parent / "tests" / "test_cuda.py").read_text())
    functions = [n for n in cuda_tests.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert tests["values"]["total"] >= len(functions) and tests["values"]["skipped"] == tests["values"]["total"]
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu_check.json", "gpu_check.log", "cuda_tests.log",
                                                    "cuda_tests.xml"}
