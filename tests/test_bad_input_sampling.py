"""Bad input to `mfrae sample`, the image readers and `mfrae eval`: hand-built bad files and options.

Each case goes through the command line (`mfrae.cli.main`) where it can: a non-zero exit, one error line naming
the file, option or value, no traceback, and no output written from the bad input (what an earlier run wrote
stays as it was).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_sampling_models
from mfrae import sample_shards
from mfrae.checkpoint import load_dit_dh, load_vit_decoder, save_latent_stats, save_model
from mfrae.cli import main
from mfrae.data.folder import ImageFolderDataset
from mfrae.eval.features import (
    FeatureExtractor,
    FeatureOptions,
    register_feature_extractor,
    unregister_feature_extractor,
)
from mfrae.eval.metrics import FeatureStats
from mfrae.eval.samples import load_images, save_adm_npz, save_image_dir
from mfrae.models.rae import LatentStats

pytestmark = pytest.mark.usefixtures("one_thread")

NUM, SHARD, BATCH = 4, 2, 2


def error_line(capsys) -> str:
    """The command's one error line (stderr also holds the progress bar); fails on a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mfrae ")]
    assert len(lines) == 1, err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


#################################################################################
#                               mfrae sample                                    #
#################################################################################


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny MeanFlow student and teacher, a 32 px decoder and latent stats, plus bad versions of them."""
    root = tmp_path_factory.mktemp("bad_models")
    paths = {**save_tiny_sampling_models(root),
             "stats": save_latent_stats(LatentStats(torch.zeros(8, 4, 4), torch.ones(8, 4, 4)),
                                        root / "stats.safetensors")}
    with torch.no_grad():
        # one NaN weight: finite elsewhere, so only a check can tell
        nan_student = load_dit_dh(str(paths["student"]))
        list(nan_student.parameters())[-1].view(-1)[0] = float("nan")
        paths["nan_student"] = save_model(nan_student, root / "nan_student.safetensors")
        # finite weights, but 1e30 times too large: the network's output overflows to inf / NaN
        for name, key, loader in (("huge_student", "student", load_dit_dh), ("huge_decoder", "decoder",
                                                                             load_vit_decoder)):
            module = loader(str(paths[key]))
            for p in module.parameters():
                p.mul_(1e30)
            paths[name] = save_model(module, root / f"{name}.safetensors")
    mean = torch.zeros(8, 4, 4)
    mean[3, 1, 2] = float("nan")
    paths["nan_stats"] = save_latent_stats(LatentStats(mean, torch.ones(8, 4, 4)), root / "nan_stats.safetensors")
    return paths


def sample_argv(models, out: Path, *extra: str, ckpt: str = "student", decoder: str = "decoder") -> list[str]:
    return ["sample", "--ckpt", str(models[ckpt]), "--decoder", str(models[decoder]), "--num-samples", str(NUM),
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture()
def complete_run(models, tmp_path):
    """A finished run in tmp_path/run, and its files' digests."""
    out = tmp_path / "run"
    assert main(sample_argv(models, out)) == 0
    return out, files_under(out)


@pytest.mark.parametrize("bad,named", [(("--ckpt", "nan_student"), "nan_student.safetensors"),
                                       (("--stats", "nan_stats"), "nan_stats.safetensors")])
def test_nan_weights_or_stats_are_refused_and_an_earlier_run_stays_intact(models, complete_run, capsys, bad, named):
    out, before = complete_run
    capsys.readouterr()
    option, key = bad
    argv = [*sample_argv(models, out), option, str(models[key]), "--overwrite"]  # even --overwrite costs nothing
    assert main(argv) == 2
    line = error_line(capsys)
    assert named in line and "NaN" in line
    assert files_under(out) == before  # refused before the earlier run's files are touched
    fresh = out.parent / "fresh"
    assert main([*sample_argv(models, fresh), option, str(models[key])]) == 2
    assert not fresh.exists() or not any(fresh.rglob("*"))  # no black images, no npz


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_cfg_scale_is_refused_at_argument_checking(models, tmp_path, capsys, value):
    # A missing checkpoint would be the error if the files were read first: the option is checked before them.
    argv = sample_argv(models, tmp_path / "out", f"--cfg-scale={value}", ckpt="teacher")
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "missing.safetensors")
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--cfg-scale" in line and value in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad,stage,named", [
    ({"ckpt": "huge_student"}, "sampled latents are", "huge_student.safetensors"),
    ({"decoder": "huge_decoder"}, "decoded images (of finite latents) are", "huge_decoder.safetensors"),
])
def test_samples_that_overflow_are_refused_and_nothing_is_written(models, tmp_path, capsys, bad, stage, named):
    out = tmp_path / "out"
    assert main(sample_argv(models, out, **bad)) == 2
    line = error_line(capsys)
    assert f"{stage} not finite" in line and named in line
    assert not any(p.is_file() for p in out.rglob("*"))  # no black PNG, shard, npz or plan left behind


@pytest.mark.parametrize("option,values", [
    ("--batch-size", ["0"]), ("--num-samples", ["0"]), ("--steps", ["0"]), ("--shard-size", ["-1"]),
    ("--seed", ["-1"]), ("--shift", ["0"]), ("--shift", ["nan"]), ("--ag-scale", ["inf"]),
    ("--cfg-interval", ["0.8", "0.2"]), ("--cfg-interval", ["0", "nan"]),
])
def test_numeric_sample_options_are_checked(models, tmp_path, capsys, option, values):
    assert main([*sample_argv(models, tmp_path / "out"), option, *values]) == 2
    line = error_line(capsys)
    assert option in line and values[-1] in line
    assert not (tmp_path / "out").exists()


def test_resume_and_overwrite_together_are_refused(models, tmp_path, capsys):
    assert main(sample_argv(models, tmp_path / "out", "--resume", "--overwrite")) == 2
    line = error_line(capsys)
    assert "--resume" in line and "--overwrite" in line


def test_a_new_run_refuses_a_folder_with_another_runs_images(models, tmp_path, capsys):
    out = tmp_path / "out"
    old = np.full((6, 32, 32, 3), 7, dtype=np.uint8)  # another run's 6 images and npz, no plan.json
    save_image_dir(out / "images", old, labels=np.arange(6))
    save_adm_npz(out / "samples.npz", old)
    before = files_under(out)
    for extra in ([], ["--resume"]):
        assert main(sample_argv(models, out, "--no-png", *extra)) == 2
        line = error_line(capsys)
        assert str(out) in line and "--overwrite" in line
        assert files_under(out) == before

    assert main(sample_argv(models, out, "--no-png", "--overwrite")) == 0
    assert not (out / "images").exists()  # no stale image beside the new npz
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (NUM, 32, 32, 3) and not (data["arr_0"] == 7).all()
    # the same settings still resume (nothing left to generate), other settings do not
    assert main(sample_argv(models, out, "--no-png", "--resume")) == 0
    assert json.loads((out / "sampling.json").read_text())["generated"] == 0
    assert main(sample_argv(models, out, "--resume")) == 2
    assert "png was False, now True" in error_line(capsys)


def test_a_failing_shard_leaves_no_temporary_file_and_the_old_file_intact(tmp_path):
    path = tmp_path / "shard.npz"
    images, labels = np.zeros((2, 4, 4, 3), dtype=np.uint8), np.zeros(2, dtype=np.int64)
    sample_shards.write_adm_npz(path, 2, [(images, labels)])
    before = digest(path)

    def pieces():
        yield images[:1], labels[:1]
        raise ValueError("a bad batch")

    with pytest.raises(ValueError, match="a bad batch"):
        sample_shards.write_adm_npz(path, 2, pieces())
    assert digest(path) == before and [p.name for p in tmp_path.iterdir()] == ["shard.npz"]


#################################################################################
#                               16-bit images                                   #
#################################################################################


def _grey16(path: Path, value: int) -> Path:
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # Pillow reads it back as 16-bit grey ("I;16", older Pillow "I")
    return path


@pytest.mark.parametrize("value", [0, 32768, 65535])
def test_16_bit_grey_pngs_are_scaled_not_clipped(tmp_path, value):
    (tmp_path / "class_a").mkdir()
    _grey16(tmp_path / "class_a/img.png", value)
    expected = value / 65535  # mid-grey 32768 -> 0.5, not 1.0 (white)
    x, _ = ImageFolderDataset(tmp_path, 8, random_flip=False, on_error="raise")[0]
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, expected), atol=1 / 255)
    images = load_images(tmp_path / "class_a").images  # `mfrae eval`'s folder reader
    assert images.shape == (1, 8, 8, 3) and np.abs(images / 255.0 - expected).max() <= 1 / 255


#################################################################################
#                                 mfrae eval                                    #
#################################################################################


@pytest.fixture()
def good(tmp_path):
    rng = np.random.default_rng(0)
    return save_adm_npz(tmp_path / "good.npz", rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8))


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    files = {"empty": b"", "truncated": raw[: len(raw) // 2], "png": None, "npy": None}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.npz"
        if content is not None:
            paths[name].write_bytes(content)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    paths["png"].write_bytes((tmp_path / "img.png").read_bytes())  # a PNG renamed .npz
    with open(paths["npy"], "wb") as fh:
        np.save(fh, np.zeros((8, 4, 4, 3), dtype=np.uint8))  # a single array renamed .npz
    np.savez(tmp_path / "other.npz", images=np.zeros((8, 4, 4, 3), dtype=np.uint8))  # no expected array
    paths["other"] = tmp_path / "other.npz"
    return paths


@pytest.mark.parametrize("kind,says", [("empty", "empty"), ("truncated", "truncated"), ("png", "PNG image"),
                                       ("npy", ".npy"), ("other", "arr_0")])
@pytest.mark.parametrize("role", ["--samples", "--reference"])
def test_eval_names_an_unreadable_file(tmp_path, good, capsys, kind, says, role):
    bad = _bad_files(tmp_path, good)[kind]
    other = "--reference" if role == "--samples" else "--samples"
    assert main(["eval", role, str(bad), other, str(good), "--features", "pixels"]) == 2
    line = error_line(capsys)
    assert str(bad) in line and says in line


def test_feature_stats_name_an_unreadable_file(tmp_path, good):
    bad = _bad_files(tmp_path, good)
    for kind, says in (("empty", "empty"), ("truncated", "truncated"), ("png", "PNG image")):
        with pytest.raises(ValueError, match=says) as err:
            FeatureStats.load(bad[kind])
        assert str(bad[kind]) in str(err.value)


def test_eval_refuses_a_resolution_mismatch(tmp_path, capsys):
    rng = np.random.default_rng(1)
    small = save_adm_npz(tmp_path / "small.npz", rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8))
    large = save_adm_npz(tmp_path / "large.npz", rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    # `--pixels-size 4` gives both sets 48 features, so only the check can tell 4 px from 8 px images
    common = ["--features", "pixels", "--pixels-size", "4", "--json"]
    assert main(["eval", "--samples", str(small), "--reference", str(large), *common]) == 2
    line = error_line(capsys)
    assert "resolution" in line and "4x4" in line and "8x8" in line

    stats = tmp_path / "large_stats.npz"  # stats written by mfrae eval record the image size ...
    assert main(["eval", "--reference", str(large), "--save-reference-stats", str(stats), *common]) == 0
    capsys.readouterr()
    assert FeatureStats.load(stats).image_size == (8, 8)
    assert main(["eval", "--samples", str(small), "--reference", str(stats), *common]) == 2
    assert "8x8" in error_line(capsys)
    with np.load(stats) as data:  # ... others may not: then it is said that nothing was checked
        np.savez(tmp_path / "bare_stats.npz", mu=data["mu"], sigma=data["sigma"])
    assert main(["eval", "--samples", str(small), "--reference", str(tmp_path / "bare_stats.npz"), *common]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("resolution not checked" in note and "bare_stats.npz" in note for note in notes)


@pytest.mark.parametrize("option", ["--batch-size", "--k", "--is-split-size", "--encoder-image-size",
                                    "--pixels-size"])
def test_numeric_eval_options_are_checked(good, capsys, option):
    assert main(["eval", "--samples", str(good), "--reference", str(good), "--features", "pixels", option, "0"]) == 2
    assert option in error_line(capsys)


@pytest.fixture()
def three_classes():
    """A toy classifier of 3 classes: the brightest channel."""
    def factory(options: FeatureOptions) -> FeatureExtractor:
        return FeatureExtractor("brightest", lambda x: (x.flatten(1), x.mean(dim=(2, 3))),
                                batch_size=options.batch_size)

    register_feature_extractor("test-three-classes", factory)
    yield "test-three-classes"
    unregister_feature_extractor("test-three-classes")


@pytest.mark.parametrize("bad_label", [3, -1])
def test_eval_refuses_labels_outside_the_classifier_and_writes_nothing(tmp_path, capsys, three_classes, bad_label):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 2, 2, 3), dtype=np.uint8)
    labels = np.arange(8) % 3
    labels[5] = bad_label  # the classifier predicts 0, 1 or 2: this one could only count as a miss
    samples = save_adm_npz(tmp_path / "s.npz", images, labels)
    outputs = [tmp_path / "export.npz", tmp_path / "stats.npz"]
    assert main(["eval", "--samples", str(samples), "--reference", str(samples), "--features", three_classes,
                 "--export-adm", str(outputs[0]), "--save-sample-stats", str(outputs[1])]) == 2
    line = error_line(capsys)
    assert str(samples) in line and f"label {bad_label}" in line and "3 classes" in line
    assert not any(p.exists() for p in outputs) and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_eval_refuses_to_write_over_an_input(good, capsys):
    before = digest(good)
    assert main(["eval", "--reference", str(good), "--features", "pixels", "--save-reference-stats", str(good)]) == 2
    assert "--save-reference-stats" in error_line(capsys)
    assert digest(good) == before
