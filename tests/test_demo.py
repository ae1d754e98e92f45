"""`mfrae demo --fast`: every stage runs, the report holds the promised fields, and the images are sane."""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pytest
from PIL import Image

from mfrae.cli import main

FIELDS = [
    "fd_floor", "fd_reconstruction", "fd_teacher", "fd_cmt_1step", "fd_mfd_1step", "fd_mfd_2step", "fd_mft_1step",
    "fd_mft_2step", "class_acc_teacher", "class_acc_mfd_1step", "class_acc_mft_1step", "teacher_nfe", "seconds_total",
    "seconds_per_stage", "images_per_second",
]


@pytest.fixture(scope="module")
def demo(fast_demo):
    return fast_demo


def test_report_has_every_field_with_measured_values(demo):
    report = json.loads((demo / "report.json").read_text())
    for key in FIELDS:
        assert key in report, key
    for key in FIELDS[:-4]:
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, key
    for key in ("class_acc_teacher", "class_acc_mfd_1step", "class_acc_mft_1step"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["seconds_per_stage"]) == {"encoder", "decoder", "judge", "teacher", "cmt", "mfd", "mft", "sampling",
                                               "evaluation"}
    assert sum(report["seconds_per_stage"].values()) <= report["seconds_total"]
    speed = report["images_per_second"]
    assert set(speed) == {"teacher", "1step", "2step"} and all(v > 0 for v in speed.values())
    # one network evaluation is cheaper than many: the 1-step sampler must outrun the teacher
    assert speed["1step"] > speed["teacher"]
    # the floor compares real digits with real digits: no generator may beat it by much
    assert report["fd_floor"] < report["fd_teacher"] * 1.5 + 1.0


def test_report_html_and_sample_grids(demo):
    html = (demo / "report.html").read_text()
    assert len(list(demo.glob("report_*.png"))) >= 5  # the curves and timings, also as PNG files
    assert html.count("<img") >= 7  # samples, reconstructions, curves, cost plots, timings
    for stage in ("decoder", "teacher", "cmt", "mfd", "mft"):
        grids = sorted((demo / stage / "samples").glob("*.png"))
        assert grids, stage
        image = np.asarray(Image.open(grids[-1]).convert("RGB"))
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 1.0, f"{stage}: a constant grid"


def test_latent_stages_log_their_fd_during_training_and_the_report_plots_it(demo):
    keys = {"teacher": "eval/fd_16nfe", "cmt": "eval/fd_1step", "mfd": "eval/fd_1step", "mft": "eval/fd_2step"}
    for stage, key in keys.items():
        records = [json.loads(line) for line in (demo / stage / "metrics.jsonl").read_text().splitlines()]
        values = [r[key] for r in records if key in r]
        assert len(values) >= 2 and all(math.isfinite(v) and v >= 0 for v in values), stage
        assert records[-1].get(key) is not None, f"{stage}: the last step is evaluated"
    html = (demo / "report.html").read_text()
    for stage in keys:
        assert f"{stage}: FD of EMA samples during training" in html, stage
    assert "decoder: FD of EMA samples" not in html  # the decoder stage measures no samples


def test_every_stage_is_a_normal_run_directory(demo):
    for stage in ("decoder", "teacher", "cmt", "mfd", "mft"):
        assert (demo / stage / "config.yaml").is_file() and (demo / stage / "metrics.jsonl").is_file()
    assert (demo / "encoder.safetensors").is_file() and (demo / "stats" / "stats.safetensors").is_file()


def test_running_again_reuses_finished_stages(demo, capsys):
    before = (demo / "teacher" / "metrics.jsonl").read_text()
    assert main(["demo", "--fast", "--out", str(demo)]) == 0
    out = capsys.readouterr().out
    assert out.count("reused") >= 5
    assert (demo / "teacher" / "metrics.jsonl").read_text() == before


def test_stage_check_says_when_a_stage_leaves_the_one_step_model_worse():
    from mfrae.demo import stage_check

    metrics = {"cmt_1step": {"fd": 40.0}, "mfd_1step": {"fd": 42.5}, "mft_1step": {"fd": 42.5}}
    mfd, mft = stage_check(metrics)
    assert (mfd["stage"], mfd["init"], mfd["worse"]) == ("mfd", "cmt", True)
    assert "worse by 2.5" in mfd["text"] and "docs/study.md" in mfd["text"]
    assert mft["worse"] is False and mft["text"].endswith("not worse.")  # equal is not worse
    metrics["mft_1step"]["fd"] = math.nan  # a missing number is never passed as fine
    assert stage_check(metrics)[1]["worse"] is True


def test_report_checks_every_meanflow_stage_against_its_init(demo):
    report = json.loads((demo / "report.json").read_text())
    rows = {row["stage"]: row for row in report["stage_check"]}
    assert set(rows) == {"mfd", "mft"}
    assert rows["mfd"]["init_fd_1step"] == report["fd_cmt_1step"] and rows["mfd"]["fd_1step"] == report["fd_mfd_1step"]
    assert rows["mfd"]["worse"] == (report["fd_mfd_1step"] > report["fd_cmt_1step"])
    assert html.escape(rows["mfd"]["text"]) in (demo / "report.html").read_text()
