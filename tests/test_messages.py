"""Messages that name the real culprit, in one line, and refusals that write nothing (stats, eval, data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mfrae.cli import main
from mfrae.eval.judge import JUDGE_ENV, DigitsJudge
from mfrae.eval.samples import from_uint8_nhwc, save_adm_npz

TINY_ENCODER = "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}"


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "usage:" not in err and "%|" not in err, err  # no stray progress bar
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mfrae {command}: error: "), err
    return lines[0]


def test_eval_takes_the_digits_judge_as_a_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(JUDGE_ENV, raising=False)
    torch.manual_seed(0)
    judge = DigitsJudge().eval()
    path = judge.save(tmp_path / "judge.safetensors")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 24)
    save_adm_npz(tmp_path / "samples.npz", images, labels)
    save_adm_npz(tmp_path / "reference.npz", images[::-1].copy())
    base = ["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "reference.npz"),
            "--features", "digits_judge", "--no-progress", "--json", "--device", "cpu"]
    assert main([*base, "--judge", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = (judge.predict(from_uint8_nhwc(images)).numpy() == labels).mean()
    assert result["class_accuracy"] == pytest.approx(expected)
    assert main(base) == 2  # neither the flag nor the variable: the message names the flag
    assert "--judge FILE" in one_error_line(capsys, "eval")
    assert main([*base[:5], "--features", "pixels", "--judge", str(path)]) == 2
    assert "--judge is the classifier of --features digits_judge" in one_error_line(capsys, "eval")


def test_stats_refuses_max_images_zero_before_reading_anything(tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["stats", "--config", "digits", "--set", TINY_ENCODER, "--max-images", "0", "--out", str(out)]) == 2
    assert "--max-images must be >= 1, got 0" in one_error_line(capsys, "stats")
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_only_corrupt_images_is_named_with_the_count(tmp_path, capsys, workers):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.png").write_bytes(b"not a png")
    argv = ["stats", "--config", "digits", "--set", "data.kind=folder", "--set", f"data.options.root={root}",
            "--set", "data.options.image_size=32", "--set", f"data.num_workers={workers}", "--set", TINY_ENCODER,
            "--out", str(tmp_path / "stats")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mfrae stats: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mfrae stats: error: no readable images in {root} (3 skipped; e.g. {root}/a/")
    assert not (tmp_path / "stats").exists()


def test_pixel_features_rank_noisier_digits_worse_at_the_default_size(tmp_path, capsys):
    """The default `--pixels-size` must order sets by their known quality: digits plus more noise score worse."""
    from mfrae.data import DigitsDataset
    from mfrae.eval.cli import PIXELS_SIZE
    from mfrae.eval.samples import to_uint8_nhwc

    assert PIXELS_SIZE == 16
    digits = DigitsDataset()
    x = torch.stack([digits[i][0] for i in range(400)])
    save_adm_npz(tmp_path / "reference.npz", to_uint8_nhwc(x[:200]))
    generator = torch.Generator().manual_seed(0)
    distances = []
    for noise in (0.05, 0.2, 0.4):
        noisy = (x[200:] + noise * torch.randn(x[200:].shape, generator=generator)).clamp(0, 1)
        save_adm_npz(tmp_path / "samples.npz", to_uint8_nhwc(noisy))
        assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference",
                     str(tmp_path / "reference.npz"), "--features", "pixels", "--json", "--no-progress",
                     "--device", "cpu"]) == 0
        distances.append(json.loads(capsys.readouterr().out)["fd"])
    assert distances == sorted(distances) and distances[0] < distances[-1] / 3


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """`main` runs many times in one process; a log line must reach the current sys.stderr even after the one
    that was current at the first call has been closed."""
    import io
    import logging
    import sys

    from mfrae.cli import _log_to_stderr

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    _log_to_stderr()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("mfrae").warning("--resume: skipped step_6")
    assert "[mfrae] --resume: skipped step_6" in second.getvalue()
