"""The README's ImageNet recipe, command by command, at digits scale: cache the latents, distil with torchrun
(CMT, then MFD from the cache), sample with torchrun, score against an ADM-layout reference with precomputed
statistics. The released teacher, decoder and statistics are replaced by tiny ones trained first, as the
recipe's inputs; everything after that is the recipe's own commands with digits-sized values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mfrae.cli import main
from mfrae.data import DigitsDataset
from mfrae.eval.metrics import FeatureStats
from mfrae.eval.samples import save_adm_npz, to_uint8_nhwc

TINY = [
    "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}",
    "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}",
    "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2", "train.sample_count=4", "train.sample_steps=4",
    "optim.warmup_steps=0", "train.steps=2",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def torchrun(*args: str) -> None:
    """`torchrun --nproc_per_node 2 -m mfrae ...` (gloo on CPU), as the README writes it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mfrae", *args]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Stand-ins for the authors' released files: decoder, latent statistics, flow-matching teacher."""
    root = tmp_path_factory.mktemp("released")
    decoder = ["model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
               "objective.discriminator=none"]
    assert main(["train", "decoder", "--config", "digits", "--out", str(root / "decoder"), *sets(*TINY, *decoder)]) == 0
    assert main(["stats", "--config", "digits", "--out", str(root / "stats"), *sets(TINY[0])]) == 0
    inputs = [f"rae.decoder={root / 'decoder'}", f"rae.stats={root / 'stats'}"]
    assert main(["train", "teacher", "--config", "digits", "--out", str(root / "teacher"), *sets(*TINY, *inputs)]) == 0
    return [*inputs, f"teacher={root / 'teacher'}"]


@pytest.mark.slow  # 40 s: the whole README recipe; `make test-all` runs it
def test_the_readme_recipe_at_digits_scale(released, tmp_path):
    # mfrae cache --config imagenet256-xl --out cache/in256
    assert main(["cache", "--config", "digits", "--out", str(tmp_path / "cache"), "--shard-size", "600", *sets(TINY[0])]) == 0
    latents = ["data.kind=latents", f"data.options={{cache_dir: {tmp_path / 'cache'}}}"]
    # torchrun ... train cmt / train mfd (MFD starts from CMT, as the preset's model.init says)
    cmt, mfd = tmp_path / "cmt", tmp_path / "mfd"
    small_cmt = ["objective.pairs_per_trajectory=2", "objective.grid_points=4"]
    torchrun("train", "cmt", "--config", "digits", "--out", str(cmt), *sets(*TINY, *released, *latents, *small_cmt))
    torchrun("train", "mfd", "--config", "digits", "--out", str(mfd), *sets(*TINY, *released, *latents, f"model.init={cmt}"))
    for run in (cmt, mfd):
        assert json.loads((run / "run.json").read_text())["launches"][0]["world_size"] == 2
    # torchrun ... sample --ckpt runs/.../mfd --steps 1 --num-samples 50000 --labels equal
    samples = tmp_path / "samples"
    torchrun("sample", "--ckpt", str(mfd), "--steps", "1", "--num-samples", "20", "--labels", "equal",
             "--batch-size", "8", "--out", str(samples))
    with np.load(samples / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # class-balanced
    # mfrae eval --samples .../samples.npz --reference VIRTUAL_imagenet256_labeled.npz: an ADM-layout reference,
    # whose precomputed statistics (here of other images than its arr_0) are the ones scored against
    test = DigitsDataset(split="test", image_size=32)
    real = to_uint8_nhwc(torch.stack([test[i][0] for i in range(40)]))
    stats_images = real[20:]
    reference = tmp_path / "reference.npz"
    save_adm_npz(reference, real[:20])
    from mfrae.eval.features import FeatureOptions, build_feature_extractor

    extractor = build_feature_extractor("pixels", FeatureOptions(pixels_size=4))
    precomputed = FeatureStats.from_features(extractor(stats_images), "pixels")
    with np.load(reference) as data:
        arrays = dict(data)
    np.savez(reference, **arrays, mu=precomputed.mu, sigma=precomputed.sigma)
    out = subprocess.run([sys.executable, "-m", "mfrae", "eval", "--samples", str(samples / "samples.npz"),
                          "--reference", str(reference), "--features", "pixels", "--pixels-size", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    fake = FeatureStats.from_features(extractor(images), "pixels")
    assert result["reference_stats"] == "precomputed"
    assert result["fd"] == pytest.approx(fake.frechet_distance(precomputed), rel=1e-6)
