"""Evaluation library and `mfrae eval`: metrics against closed forms, image I/O, the FID Inception's structure,
and the ADM evaluator's protocol (precomputed reference statistics, Inception Score splits, sFID)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from mfrae.cli import main
from mfrae.eval import metrics
from mfrae.eval.features import (
    FeatureExtractor,
    FeatureOptions,
    build_feature_extractor,
    encoder_feature_extractor,
    register_feature_extractor,
    unregister_feature_extractor,
)
from mfrae.eval.inception import (
    FID_WEIGHTS_ENV,
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionE_1,
    FIDInceptionE_2,
    FIDInceptionV3,
    load_fid_inception,
)
from mfrae.eval.metrics import (
    FeatureStats,
    RunningStats,
    class_accuracy,
    frechet_distance,
    frechet_distance_sqrtm,
    inception_score,
    precision_recall,
)
from mfrae.eval.samples import ImageStream, load_images, open_images, save_adm_npz, save_image_dir, to_uint8_nhwc

# ------------------------------------------------------------------------------------ Fréchet distance


def _gauss_fd_commuting(mu1, mu2, a, b) -> float:
    """Closed form for S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: ||mu1 - mu2||^2 + sum(a + b - 2 sqrt(a b))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b)))


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(_gauss_fd_commuting(mu1, mu2, a, b), rel=1e-10)


def test_fd_commuting_nondiagonal_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(_gauss_fd_commuting(mu1, mu2, a, b), rel=1e-8)


def test_fd_non_commuting_2d_closed_form():
    # For a 2x2 matrix M with non-negative eigenvalues, (Tr M^{1/2})^2 = Tr M + 2 sqrt(det M).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_fd_singular_covariances():
    # Orthogonal rank-1 covariances: S1 S2 = 0, so FD = ||dmu||^2 + Tr S1 + Tr S2 = 0 + 1 + 1.
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0])) == pytest.approx(2.0)


def test_fd_sqrtm_falls_back_to_an_eps_offset(monkeypatch):
    # Force the retry path of the ADM evaluator's form: it takes sqrt((S1 + eps I)(S2 + eps I)) but keeps the
    # traces of S1 and S2.
    monkeypatch.setattr(metrics, "_SQRTM_MAX_RESIDUAL", -1.0)
    a, b, eps = np.array([1.0, 4.0, 0.0]), np.array([2.0, 0.5, 3.0]), 1e-3
    expected = np.sum(a + b - 2.0 * np.sqrt((a + eps) * (b + eps)))
    got = frechet_distance_sqrtm(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b), eps=eps)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    full = FeatureStats.from_features(rng.standard_normal((500, 10)))
    low_rank = FeatureStats.from_features(rng.standard_normal((20, 64)))  # N < D: singular covariance
    assert full.frechet_distance(full) == pytest.approx(0.0, abs=1e-9)
    assert low_rank.frechet_distance(low_rank) == pytest.approx(0.0, abs=1e-5)


def test_fd_of_sampled_gaussians_converges_to_closed_form():
    # 20k samples per side in 8-D; over 40 seeds the estimate's error had std 0.029 (bias 0.002), so a
    # tolerance of 0.15 is about 5 standard deviations around the exact 2.40.
    rng = np.random.default_rng(1234)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    mu1 = rng.standard_normal(8)
    mu2 = mu1 + 0.5
    x = rng.multivariate_normal(mu1, q @ np.diag(a) @ q.T, 20000)
    y = rng.multivariate_normal(mu2, q @ np.diag(b) @ q.T, 20000)
    got = FeatureStats.from_features(x).frechet_distance(FeatureStats.from_features(y))
    assert got == pytest.approx(_gauss_fd_commuting(mu1, mu2, a, b), abs=0.15)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    # Not a covariance: negative eigenvalue; in the sqrtm form, sqrt(diag(1, -1)) has a large imaginary part.
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance_sqrtm(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------- feature stats


def test_feature_stats_match_numpy_and_round_trip(tmp_path):
    feats = np.random.default_rng(3).standard_normal((40, 5))
    stats = FeatureStats.from_features(feats, name="pixels")
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0))
    np.testing.assert_allclose(stats.sigma, np.cov(feats.T))
    assert stats.n == 40
    path = stats.save(tmp_path / "ref_stats")  # no suffix: written to exactly this path
    assert path == tmp_path / "ref_stats" and path.is_file()
    with np.load(path) as data:
        assert {"mu", "sigma", "n"} <= set(data.files)
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.n, back.features) == (40, "pixels")


def test_feature_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"nosigma\.npz.*'sigma'"):
        FeatureStats.load(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "badshape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"badshape\.npz"):
        FeatureStats.load(tmp_path / "badshape.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"garbage\.npz"):
        FeatureStats.load(tmp_path / "garbage.npz")
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 3)))


def test_running_stats_match_numpy_with_a_large_mean():
    rng = np.random.default_rng(30)
    feats = rng.standard_normal((1000, 6)) * np.arange(1, 7) + 1e4  # mean far from 0 against the spread
    running = RunningStats()
    for start in range(0, 1000, 64):
        running.update(feats[start:start + 64])
    stats = running.stats("x")
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.T), rtol=1e-8, atol=1e-9)
    assert (stats.n, stats.features) == (1000, "x")
    with pytest.raises(ValueError, match="dimension changed"):
        running.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        RunningStats().stats()


def test_feature_stats_spatial_keys_round_trip(tmp_path):
    rng = np.random.default_rng(31)
    pool = FeatureStats.from_features(rng.standard_normal((20, 4)), name="inception")
    spatial = FeatureStats.from_features(rng.standard_normal((20, 3)), name="inception")
    path = pool.save(tmp_path / "ref.npz", spatial=spatial)
    with np.load(path) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)  # the ADM reference-batch keys
    np.testing.assert_array_equal(FeatureStats.load(path, suffix="_s").sigma, spatial.sigma)
    np.testing.assert_array_equal(FeatureStats.load(path).mu, pool.mu)


# ------------------------------------------------------------------------------------- Inception Score


def _confident_logits(classes: np.ndarray, num_classes: int, margin: float = 60.0) -> np.ndarray:
    """Logits whose softmax puts all but ~exp(-margin) of the mass on `classes[i]`."""
    logits = np.zeros((len(classes), num_classes))
    logits[np.arange(len(classes)), classes] = margin
    return logits


def test_inception_score_closed_forms():
    # Confident predictions spread evenly over K classes: KL(p(y|x) || p(y)) = log K for every x, IS = K.
    for k in (1, 4, 10):
        assert inception_score(_confident_logits(np.arange(1000) % k, 12)) == pytest.approx(k, rel=1e-9)
    # All predictions identical: p(y|x) = p(y), KL = 0, IS = 1 whatever the distribution.
    row = np.random.default_rng(32).standard_normal(1008)
    assert inception_score(np.tile(row, (300, 1))) == pytest.approx(1.0, abs=1e-12)
    # Half the mass on the true class, the rest uniform over the other K-1 (uniform marginal):
    # KL = log K + 0.5 log 0.5 + 0.5 log(0.5 / (K - 1)).
    k = 8
    probs = np.full((k * 50, k), 0.5 / (k - 1))
    probs[np.arange(k * 50), np.arange(k * 50) % k] = 0.5
    kl = np.log(k) + 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / (k - 1))
    assert inception_score(np.log(probs)) == pytest.approx(np.exp(kl), rel=1e-12)


def test_inception_score_uses_consecutive_splits_of_5000():
    # ADM evaluator: splits [0, 5000), [5000, 7000) scored separately, then averaged. The first holds
    # 10 evenly used classes (IS 10), the second 4 (IS 4): the mean is 7. Pooled, all 7000 would give
    # exp(H(marginal)) with marginal 5000/7000 spread over 10 and 2000/7000 over 4 other classes.
    first = _confident_logits(np.arange(5000) % 10, 20)
    second = _confident_logits(10 + np.arange(2000) % 4, 20)
    logits = np.concatenate([first, second])
    assert inception_score(logits) == pytest.approx(7.0, rel=1e-9)
    marginal = np.concatenate([np.full(10, 500 / 7000), np.full(4, 500 / 7000)])
    pooled = np.exp(-np.sum(marginal * np.log(marginal)))
    assert inception_score(logits, split_size=7000) == pytest.approx(pooled, rel=1e-9)
    assert inception_score(logits, split_size=1000) == pytest.approx((5 * 10 + 2 * 4) / 7, rel=1e-9)


def test_inception_score_is_finite_when_softmax_underflows():
    logits = _confident_logits(np.arange(100) % 5, 1008, margin=1e4)  # exp(-1e4) is 0 in float64
    assert inception_score(logits) == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(logits, split_size=0)


# ------------------------------------------------------------------------------------ precision / recall


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(4).standard_normal((200, 6))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


@pytest.mark.parametrize("block_elements", [2**24, 7])  # 7 forces one-row blocks
def test_precision_recall_hand_computed_line(monkeypatch, block_elements):
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ELEMENTS", block_elements)
    # Real: integers 0..99 (k=1 radius 1). Fake: 0.5..49.5 (radius 1) and 1000..1049 (far away).
    real = np.arange(100.0)[:, None]
    fake = np.concatenate([np.arange(50) + 0.5, np.arange(1000.0, 1050.0)])[:, None]
    pr = precision_recall(real, fake, k=1)
    assert pr.precision == pytest.approx(0.5)  # the 50 half-integers lie 0.5 from a real point
    assert pr.recall == pytest.approx(0.51)  # real 0..50 lie within 1 of a half-integer; 51.. do not


def test_precision_recall_matches_brute_force():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(5)
    real, fake, k = rng.standard_normal((150, 4)), rng.standard_normal((120, 4)) * 1.3 + 0.3, 3

    def coverage(manifold, queries):
        radius = NearestNeighbors(n_neighbors=k + 1).fit(manifold).kneighbors(manifold)[0][:, k]
        dist = np.linalg.norm(queries[:, None, :] - manifold[None, :, :], axis=-1)
        return float(np.mean((dist <= radius[None, :]).any(axis=1)))

    pr = precision_recall(real, fake, k=k)
    assert pr.precision == pytest.approx(coverage(real, fake), abs=1e-12)
    assert pr.recall == pytest.approx(coverage(fake, real), abs=1e-12)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


def test_class_accuracy():
    assert class_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError, match="equal length"):
        class_accuracy(np.array([1, 2]), np.array([1, 2, 3]))


# ----------------------------------------------------------------------------------------- image sets


def test_to_uint8_truncates():
    x = torch.tensor([0.0, 0.5, 1.0, -0.2, 1.3, 0.999, 0.0039]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8_nhwc(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    # 0.5 * 255 = 127.5 -> 127 and 0.999 * 255 = 254.7 -> 254: truncation, not rounding.
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 127, 255, 0, 255, 254, 0])


def test_adm_npz_layout_and_round_trip(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = save_adm_npz(tmp_path / "samples", images, labels)
    assert path == tmp_path / "samples"
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 4, 6, 3)  # NHWC
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    loaded = load_images(path)
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_image_dir_round_trip(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (12, 5, 5, 3), dtype=np.uint8)
    save_image_dir(tmp_path / "png", images, labels=np.arange(12) % 4)
    loaded = load_images(tmp_path / "png")
    np.testing.assert_array_equal(loaded.images, images)  # PNG is lossless; order is the sorted names
    np.testing.assert_array_equal(loaded.labels, np.arange(12) % 4)
    (tmp_path / "png" / "labels.txt").unlink()
    np.save(tmp_path / "png" / "labels.npy", np.arange(12)[::-1])
    np.testing.assert_array_equal(load_images(tmp_path / "png").labels, np.arange(12)[::-1])
    (tmp_path / "png" / "labels.txt").write_text("1\n" * 12)
    with pytest.raises(ValueError, match="both labels.npy and labels.txt"):
        load_images(tmp_path / "png")


def test_image_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_images(tmp_path / "nothing.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"float\.npz key 'arr_0'.*dtype float32"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "rgba.npz", arr_0=np.zeros((2, 4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"rgba\.npz.*shape \(2, 4, 4, 4\)"):
        load_images(tmp_path / "rgba.npz")
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"nokey\.npz has no key 'arr_0'"):
        load_images(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badlabels.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8), arr_1=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"badlabels\.npz key 'arr_1'"):
        load_images(tmp_path / "badlabels.npz")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png"):
        load_images(tmp_path / "mixed")


def test_open_images_streams_npz_and_folders(tmp_path):
    images = np.random.default_rng(33).integers(0, 256, (11, 4, 5, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "a.npz", images, np.arange(11))
    np.savez_compressed(tmp_path / "gray.npz", arr_0=images[..., 0])  # deflated member, grayscale
    save_image_dir(tmp_path / "png", images, labels=np.arange(11) % 3)
    for path, expected, labels in ((tmp_path / "a.npz", images, np.arange(11)),
                                   (tmp_path / "gray.npz", np.repeat(images[..., :1], 3, axis=-1), None),
                                   (tmp_path / "png", images, np.arange(11) % 3)):
        stream = open_images(path)
        batches = list(stream.batches(4))
        assert len(stream) == 11 and [b.shape[0] for b in batches] == [4, 4, 3], path
        np.testing.assert_array_equal(np.concatenate(batches), expected)
        np.testing.assert_array_equal(np.concatenate(list(stream.batches(100))), expected)  # re-readable
        if labels is None:
            assert stream.labels is None
        else:
            np.testing.assert_array_equal(stream.labels, labels)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"float\.npz key 'arr_0'.*dtype float32"):
        open_images(tmp_path / "float.npz")


def test_extraction_reads_npz_in_batches(tmp_path, monkeypatch):
    # The extractor sees at most batch_size images at a time, read straight from the zip member.
    images = np.random.default_rng(34).integers(0, 256, (10, 3, 3, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "a.npz", images)
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return x.flatten(1)

    stream = open_images(tmp_path / "a.npz")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("arr_0 must not be loaded whole"))
    out = FeatureExtractor("probe", forward, batch_size=4).extract(stream, progress="x")
    assert seen == [4, 4, 2]
    np.testing.assert_allclose(out.features, images.transpose(0, 3, 1, 2).reshape(10, -1) / 255.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------- features


def test_pixels_features_are_the_scaled_pixels():
    images = np.random.default_rng(8).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    feats = build_feature_extractor("pixels", FeatureOptions(batch_size=2))(images)
    assert feats.dtype == np.float64 and feats.shape == (3, 48)
    np.testing.assert_allclose(feats, images.transpose(0, 3, 1, 2).reshape(3, -1) / 255.0, rtol=1e-6)
    # 2x2 blocks of one colour, downsampled 8 -> 4: area averaging returns the block colours.
    blocks = images.repeat(2, axis=1).repeat(2, axis=2)
    small = build_feature_extractor("pixels", FeatureOptions(pixels_size=4))(blocks)
    np.testing.assert_allclose(small, feats, rtol=1e-6)


def test_encoder_extractor_pools_and_normalizes():
    images = np.random.default_rng(9).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    # Encoder = spatial mean as a [B, C, H, W] map (pooled by its mean): features = per-channel mean.
    extractor = encoder_feature_extractor(lambda x: x, image_size=None, mean=(0.0,) * 3, std=(1.0,) * 3,
                                          batch_size=2)
    expected = images.astype(np.float64).mean(axis=(1, 2)) / 255.0
    np.testing.assert_allclose(extractor(images), expected, rtol=1e-6)
    # Tokens [B, T, D]: the first (class) token is the feature.
    tokens = encoder_feature_extractor(lambda x: x.flatten(2).transpose(1, 2), image_size=None,
                                       mean=(0.0,) * 3, std=(1.0,) * 3)
    np.testing.assert_allclose(tokens(images), images[:, 0, 0, :] / 255.0, rtol=1e-6)


def test_feature_registry():
    with pytest.raises(ValueError, match="unknown features 'nope'.*pixels"):
        build_feature_extractor("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_feature_extractor("pixels", lambda options: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="need an encoder"):
        build_feature_extractor("encoder")


# ------------------------------------------------------------------------------------ FID Inception-v3


@pytest.fixture(scope="module")
def inception() -> FIDInceptionV3:
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    # Non-trivial BatchNorm statistics so that a bad load would show up in the outputs.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_inception_structure(inception):
    sd = inception.state_dict()
    convs = [m for m in inception.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Inception-v3 without the aux head has 94 conv layers: stem 5, 3 x A 7, B 4, 4 x C 10, D 6, 2 x E 9.
    assert len(convs) == 94 and len(bns) == 94
    assert all(m.bias is None for m in convs) and all(m.eps == 1e-3 for m in bns)
    assert len(sd) == 94 * 6 + 2  # conv weight + 5 BN entries per layer, plus fc weight and bias
    assert not any(k.startswith("AuxLogits") for k in sd)
    # torchvision's inception_v3 has 27,161,264 parameters; minus its aux head (3,326,696) and its
    # 1000-way fc (2,049,000) leaves 21,785,568 in the feature network.
    n_params = sum(p.numel() for name, p in inception.named_parameters() if not name.startswith("fc."))
    assert n_params == 21_785_568
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key


def _pool_branch_only(block: torch.nn.Module) -> torch.nn.Module:
    """Zero every conv except branch_pool, whose first output channel copies input channel 0."""
    for module in block.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
    block.branch_pool.conv.weight.data[0, 0] = 1.0
    return block.eval()


def test_inception_fid_pooling_variants():
    bn_scale = 1.0 / np.sqrt(1.0 + 1e-3)  # eval BatchNorm with default stats: x / sqrt(1 + eps)
    with torch.no_grad():
        # A (and C, E_1): a constant input stays constant at the borders -> padding is not counted.
        block_a = _pool_branch_only(FIDInceptionA(192, 32))
        out = block_a(torch.ones(1, 192, 5, 5))[:, -32]
        torch.testing.assert_close(out, torch.full_like(out, bn_scale))
        block_e1 = _pool_branch_only(FIDInceptionE_1(1280))
        out = block_e1(torch.ones(1, 1280, 4, 4))[:, -192]
        torch.testing.assert_close(out, torch.full_like(out, bn_scale))
        # E_2: a single spike spreads unchanged over its 3x3 neighbourhood -> max pooling.
        block_e2 = _pool_branch_only(FIDInceptionE_2(2048))
        x = torch.zeros(1, 2048, 5, 5)
        x[0, 0, 2, 2] = 9.0
        out = block_e2(x)[0, -192]
        expected = torch.zeros(5, 5)
        expected[1:4, 1:4] = 9.0 * bn_scale
        torch.testing.assert_close(out, expected)


def test_inception_output_and_input_size_independence(inception):
    x = torch.rand(1, 3, 64, 64)
    torch_fid = FIDInceptionV3(convention="pytorch-fid").eval()
    torch_fid.load_state_dict(inception.state_dict())
    with torch.inference_mode():
        feats = torch_fid(x)
        resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert feats.shape == (1, 2048)
        assert torch.isfinite(feats).all() and (feats >= 0).all()  # average of ReLU outputs
        # The net resizes every input to 299: a pre-resized input gives the same features.
        torch.testing.assert_close(torch_fid(resized), feats, atol=1e-5, rtol=1e-4)
        assert inception(torch.rand(1, 3, 17, 40)).shape == (1, 2048)


def test_inception_strict_loading(inception, tmp_path, monkeypatch):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception.state_dict(), path)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(load_fid_inception(path)(x), inception(x))
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(path))
    loaded = load_fid_inception()  # the path from the environment
    for key, value in inception.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_inception_weight_errors(inception, tmp_path, monkeypatch):
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_ENV) as err:
        load_fid_inception()
    assert FID_WEIGHTS_URL in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_fid_inception(tmp_path / "absent.pth")
    sd = inception.state_dict()
    sd.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*Mixed_7c\.branch_pool\.conv\.weight"):
        load_fid_inception(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        load_fid_inception(tmp_path / "junk.pth")


def test_inception_adm_outputs(inception):
    # forward_all: pool = forward(x); IS logits = pool @ W^T without the bias (the ADM evaluator's softmax
    # input); sFID features = Mixed_6d.branch1x1 (TF mixed_6/conv) channels 0..6, flattened as H, W, C.
    with torch.no_grad():
        inception.fc.bias.uniform_(5.0, 6.0)  # a bias that must not show up in the IS logits
    x = torch.rand(2, 3, 40, 40)
    with torch.inference_mode():
        out = inception.forward_all(x)
        torch.testing.assert_close(out.pool, inception(x))
        torch.testing.assert_close(out.logits, out.pool @ inception.fc.weight.T)
        assert not torch.allclose(out.logits, inception.logits(out.pool))
        h = inception._stem(inception.preprocess(x))
        for block in (inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a,
                      inception.Mixed_6b, inception.Mixed_6c):
            h = block(h)
        conv = inception.Mixed_6d.branch1x1(h)  # [2, 192, 17, 17]
    assert conv.shape == (2, 192, 17, 17) and out.spatial.shape == (2, 2023)
    spatial = out.spatial.view(2, 17, 17, 7)
    for row, col, channel in ((0, 0, 0), (3, 11, 6), (16, 16, 4)):
        torch.testing.assert_close(spatial[:, row, col, channel], conv[:, channel, row, col])


# --------------------------------------------------------------------------------------- `mfrae eval`


def _eval_json(capsys, *args: str) -> dict:
    assert main(["eval", "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def _gaussian_images(rng, mean: float, std: float, n: int) -> np.ndarray:
    # 2x2 RGB images: 12 independent N(mean, std^2) pixels, truncated to uint8 (no clipping happens
    # in practice: the means are >= 5 standard deviations inside [0, 255]).
    return np.clip(rng.normal(mean, std, (n, 2, 2, 3)), 0, 255).astype(np.uint8)


def test_cli_gaussian_images_match_closed_form(tmp_path, capsys):
    rng = np.random.default_rng(10)
    save_adm_npz(tmp_path / "samples.npz", _gaussian_images(rng, 130.0, 20.0, 2000))
    save_adm_npz(tmp_path / "reference.npz", _gaussian_images(rng, 100.0, 10.0, 2000))
    out = _eval_json(capsys, "--samples", tmp_path / "samples.npz", "--reference", tmp_path / "reference.npz",
                     "--features", "pixels")
    assert {"fd", "precision", "recall", "num_samples", "num_reference", "features"} <= set(out)
    assert (out["num_samples"], out["num_reference"], out["features"]) == (2000, 2000, "pixels")
    # Features are pixels / 255, so FD = 12 * ((30/255)^2 + (20/255 - 10/255)^2) = 0.18454 (truncation to
    # uint8 shifts both means equally and adds the same 1/12 variance). Over 40 seeds the estimate's error
    # had std 0.0012; the tolerance is 5 of those.
    assert out["fd"] == pytest.approx(12 * (30**2 + 10**2) / 255**2, abs=0.006)
    assert 0.0 <= out["precision"] <= 1.0 and 0.0 <= out["recall"] <= 1.0
    # The wider sample distribution covers the reference better than the reverse.
    assert out["recall"] > out["precision"]


def test_cli_shift_identical_and_disjoint_sets(tmp_path, capsys):
    rng = np.random.default_rng(11)
    base = rng.integers(0, 200, (60, 4, 4, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "base.npz", base)
    save_image_dir(tmp_path / "shifted", base + 7)
    save_image_dir(tmp_path / "same", base)
    far = rng.integers(0, 30, (60, 4, 4, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "far.npz", far)
    common = ["--features", "pixels", "--k", "3"]
    # A constant shift leaves the covariance unchanged: FD = D * (7/255)^2 with D = 48, exactly (up to the
    # float32 rounding of the pixel features).
    out = _eval_json(capsys, "--samples", tmp_path / "shifted", "--reference", tmp_path / "base.npz", *common)
    assert out["fd"] == pytest.approx(48 * (7 / 255) ** 2, rel=1e-5)
    out = _eval_json(capsys, "--samples", tmp_path / "same", "--reference", tmp_path / "base.npz", *common)
    assert out["fd"] == pytest.approx(0.0, abs=1e-9)
    assert (out["precision"], out["recall"]) == (1.0, 1.0)
    # `far` lies in [0, 30) and `base + 200` in [200, 230): every k-NN ball is smaller than the gap.
    save_adm_npz(tmp_path / "high.npz", far + 200)
    out = _eval_json(capsys, "--samples", tmp_path / "far.npz", "--reference", tmp_path / "high.npz", *common)
    assert (out["precision"], out["recall"]) == (0.0, 0.0)
    assert out["fd"] == pytest.approx(48 * (200 / 255) ** 2, rel=1e-5)


def test_cli_reference_stats_and_adm_export(tmp_path, capsys):
    rng = np.random.default_rng(12)
    ref = rng.integers(0, 256, (30, 3, 3, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (25, 3, 3, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "ref.npz", ref)
    save_image_dir(tmp_path / "samples", samples, labels=np.arange(25) % 5)
    stats_path = tmp_path / "ref_stats.npz"
    direct = _eval_json(capsys, "--samples", tmp_path / "samples", "--reference", tmp_path / "ref.npz",
                        "--features", "pixels", "--save-reference-stats", stats_path,
                        "--export-adm", tmp_path / "export.npz")
    stats = FeatureStats.load(stats_path)
    ref_feats = ref.transpose(0, 3, 1, 2).reshape(30, -1) / 255.0
    np.testing.assert_allclose(stats.mu, ref_feats.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(ref_feats.T), rtol=1e-5, atol=1e-9)
    assert (stats.n, stats.features) == (30, "pixels")
    with np.load(tmp_path / "export.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], samples)
        np.testing.assert_array_equal(data["arr_1"], np.arange(25) % 5)
    via_stats = _eval_json(capsys, "--samples", tmp_path / "samples", "--reference", stats_path,
                           "--features", "pixels")
    assert via_stats["fd"] == pytest.approx(direct["fd"], rel=1e-9)
    assert via_stats["precision"] is None and via_stats["recall"] is None
    assert any("precision/recall skipped" in note for note in via_stats["notes"])
    # Text output says so too.
    assert main(["eval", "--samples", str(tmp_path / "samples"), "--reference", str(stats_path),
                 "--features", "pixels"]) == 0
    text = capsys.readouterr().out
    assert "fd: " in text and "precision: skipped" in text


def test_cli_bare_export_needs_no_features(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)  # the default `inception` features are never built
    images = np.random.default_rng(15).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    save_image_dir(tmp_path / "png", images)
    out = _eval_json(capsys, "--samples", tmp_path / "png", "--export-adm", tmp_path / "out.npz")
    assert out["num_samples"] == 3 and "fd" not in out
    with np.load(tmp_path / "out.npz") as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], images)


def test_cli_class_accuracy_with_a_registered_classifier(tmp_path, capsys):
    # A toy classifier: the predicted class is the brightest channel.
    def factory(options: FeatureOptions) -> FeatureExtractor:
        return FeatureExtractor("brightest", lambda x: (x.flatten(1), x.mean(dim=(2, 3))),
                                batch_size=options.batch_size)

    register_feature_extractor("test-brightest", factory)
    try:
        images = np.zeros((8, 2, 2, 3), dtype=np.uint8)
        labels = np.arange(8) % 3
        images[np.arange(8), :, :, labels] = 200
        images[np.arange(8), :, :, (labels + 1) % 3] = np.arange(8)[:, None, None] * 3  # vary the features
        wrong = labels.copy()
        wrong[:2] = (wrong[:2] + 1) % 3  # 2 of 8 labels disagree with the brightest channel
        save_adm_npz(tmp_path / "s.npz", images, wrong)
        out = _eval_json(capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "s.npz",
                         "--features", "test-brightest")
        assert out["class_accuracy"] == pytest.approx(0.75)
    finally:
        unregister_feature_extractor("test-brightest")


def test_cli_errors(tmp_path, capsys, monkeypatch):
    save_adm_npz(tmp_path / "ok.npz", np.zeros((4, 2, 2, 3), dtype=np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "missing.npz"), "--reference", str(tmp_path / "ok.npz"),
                 "--features", "pixels"]) == 2
    assert "missing.npz" in capsys.readouterr().err
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 2, 2, 3), dtype=np.float32))
    assert main(["eval", "--samples", str(tmp_path / "float.npz"), "--reference", str(tmp_path / "ok.npz"),
                 "--features", "pixels"]) == 2
    assert "dtype float32" in capsys.readouterr().err
    FeatureStats.from_features(np.random.default_rng(0).standard_normal((5, 12)), name="pixels").save(
        tmp_path / "stats.npz")
    assert main(["eval", "--samples", str(tmp_path / "ok.npz"), "--reference", str(tmp_path / "stats.npz"),
                 "--features", "encoder"]) == 2
    assert "'pixels'" in capsys.readouterr().err
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    assert main(["eval", "--samples", str(tmp_path / "ok.npz"), "--reference", str(tmp_path / "ok.npz")]) == 2
    assert FID_WEIGHTS_URL in capsys.readouterr().err


def _hf_encoder_folder() -> Path | None:
    folder = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "rae_encoder_a" / "hf_encoder"
    return folder if (folder / "config.json").is_file() else None


@pytest.mark.skipif(_hf_encoder_folder() is None, reason="conformance HF encoder folder not present")
def test_cli_encoder_features_from_hf_folder(tmp_path, capsys):
    images = np.random.default_rng(13).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "a.npz", images)
    out = _eval_json(capsys, "--samples", tmp_path / "a.npz", "--reference", tmp_path / "a.npz", "--features",
                     "encoder", "--encoder", _hf_encoder_folder(), "--encoder-image-size", "16", "--k", "2")
    assert out["fd"] == pytest.approx(0.0, abs=1e-6)
    assert (out["precision"], out["recall"]) == (1.0, 1.0)


@pytest.mark.slow
def test_cli_inception_features_with_random_weights(inception, tmp_path, capsys):
    # 2048-d Fréchet distances and 299 px Inception passes. FD of a set with itself is 0.
    weights = tmp_path / "w.pth"
    torch.save(inception.state_dict(), weights)
    images = np.random.default_rng(14).integers(0, 200, (6, 32, 32, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "a.npz", images)
    out = _eval_json(capsys, "--samples", tmp_path / "a.npz", "--reference", tmp_path / "a.npz",
                     "--features", "inception", "--inception-weights", weights, "--k", "2", "--device", "cpu")
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(out)
    assert out["fid"] == out["fd"] == pytest.approx(0.0, abs=1e-4)
    assert out["sfid"] == pytest.approx(0.0, abs=1e-4)
    assert (out["precision"], out["recall"]) == (1.0, 1.0)
    # IS by hand from the network's bias-free logits: exp(mean KL(p(y|x) || p(y))) over the one split.
    with torch.inference_mode():
        pool = inception(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).double()
        p = torch.softmax(pool @ inception.fc.weight.double().T, dim=1).numpy()
    kl = np.sum(p * (np.log(p) - np.log(p.mean(axis=0, keepdims=True))), axis=1)
    assert out["inception_score"] == pytest.approx(float(np.exp(kl.mean())), rel=1e-4)


# ---------------------------------------------------------------------- the ADM evaluator's protocol


def _fd_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """FD written out independently of mfrae: ||dmu||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2.0 * covmean))


def _pixel_features(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(images.shape[0], -1) / 255.0  # the `pixels` features (NCHW)


def test_cli_adm_reference_batch_uses_its_precomputed_stats(tmp_path, capsys):
    rng = np.random.default_rng(40)
    samples = _gaussian_images(rng, 120.0, 15.0, 600)
    ref_images = _gaussian_images(rng, 100.0, 10.0, 500)
    # An ADM-layout reference batch whose mu / sigma are NOT its images' statistics.
    mu = np.full(12, 0.7)
    sigma = np.diag(np.linspace(0.001, 0.01, 12))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=np.zeros(3),
             sigma_s=np.eye(3))
    save_adm_npz(tmp_path / "samples.npz", samples)
    common = ["--samples", tmp_path / "samples.npz", "--reference", tmp_path / "VIRTUAL_ref.npz",
              "--features", "pixels"]
    s_feats, r_feats = _pixel_features(samples), _pixel_features(ref_images)
    s_mu, s_sigma = s_feats.mean(axis=0), np.cov(s_feats, rowvar=False)

    pre = _eval_json(capsys, *common)
    assert pre["reference_stats"] == "precomputed"
    assert pre["fd"] == pytest.approx(_fd_scipy(s_mu, s_sigma, mu, sigma), rel=1e-5)
    assert any("precomputed mu/sigma" in note for note in pre["notes"])
    assert pre["num_reference"] == 500  # the images are still read: precision / recall use them
    pr = precision_recall(r_feats, s_feats, k=3)
    assert (pre["precision"], pre["recall"]) == pytest.approx((pr.precision, pr.recall))

    imgs = _eval_json(capsys, *common, "--reference-images")
    assert imgs["reference_stats"] == "images"
    expected = _fd_scipy(s_mu, s_sigma, r_feats.mean(axis=0), np.cov(r_feats, rowvar=False))
    assert imgs["fd"] == pytest.approx(expected, rel=1e-5)
    assert abs(imgs["fd"] - pre["fd"]) > 0.5  # the two references really differ
    assert (imgs["precision"], imgs["recall"]) == (pre["precision"], pre["recall"])

    # A stats-only file still works; the text output says which statistics were used.
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "stats_only.npz"),
                 "--features", "pixels"]) == 0
    text = capsys.readouterr().out
    assert "reference_stats: precomputed" in text and f"fd: {pre['fd']:.6f}" in text
    assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "stats_only.npz"),
                 "--features", "pixels", "--reference-images"]) == 2
    assert "--reference-images needs" in capsys.readouterr().err


def _register_spatial_extractor(name: str) -> None:
    # Pooled features: the pixels; "spatial" features: the per-pixel channel mean, flattened (H * W dims).
    def factory(options: FeatureOptions) -> FeatureExtractor:
        return FeatureExtractor(name, lambda x: {"features": x.flatten(1), "spatial": x.mean(dim=1).flatten(1)},
                                batch_size=options.batch_size)

    register_feature_extractor(name, factory)


def test_cli_sfid_is_the_fd_of_the_spatial_features(tmp_path, capsys):
    rng = np.random.default_rng(41)
    samples = np.clip(rng.normal(140, 30, (400, 3, 3, 3)), 0, 255).astype(np.uint8)
    reference = np.clip(rng.normal(110, 20, (300, 3, 3, 3)), 0, 255).astype(np.uint8)
    save_adm_npz(tmp_path / "s.npz", samples)
    save_image_dir(tmp_path / "ref", reference)
    _register_spatial_extractor("test-spatial")
    try:
        out = _eval_json(capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "ref",
                         "--features", "test-spatial", "--batch-size", "7",
                         "--save-reference-stats", tmp_path / "ref_stats.npz")
        s_sp = samples.astype(np.float64).mean(axis=-1).reshape(400, -1) / 255.0
        r_sp = reference.astype(np.float64).mean(axis=-1).reshape(300, -1) / 255.0
        expected = _fd_scipy(s_sp.mean(axis=0), np.cov(s_sp, rowvar=False), r_sp.mean(axis=0),
                             np.cov(r_sp, rowvar=False))
        assert out["sfid"] == pytest.approx(expected, rel=1e-5)
        # The saved reference stats carry mu_s / sigma_s; scoring against them gives the same sFID.
        via_stats = _eval_json(capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "ref_stats.npz",
                               "--features", "test-spatial")
        assert via_stats["sfid"] == pytest.approx(out["sfid"], rel=1e-9)
        assert via_stats["fd"] == pytest.approx(out["fd"], rel=1e-9)
        # An ADM reference batch's mu_s / sigma_s are what sFID is measured against.
        mu_s, sigma_s = np.full(9, 0.2), np.eye(9) * 0.003
        r_feats = _pixel_features(reference)
        np.savez(tmp_path / "adm.npz", arr_0=reference, mu=r_feats.mean(axis=0), sigma=np.cov(r_feats.T),
                 mu_s=mu_s, sigma_s=sigma_s)
        adm = _eval_json(capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "adm.npz",
                         "--features", "test-spatial")
        assert adm["sfid"] == pytest.approx(_fd_scipy(s_sp.mean(axis=0), np.cov(s_sp, rowvar=False), mu_s, sigma_s),
                                            rel=1e-5)
        assert adm["fd"] == pytest.approx(out["fd"], rel=1e-6)
    finally:
        unregister_feature_extractor("test-spatial")


def test_cli_inception_score_from_score_logits(tmp_path, capsys):
    # A registered extractor whose IS logits put each image confidently in the class of its brightest
    # channel: 3 evenly used classes give IS = 3 (one split).
    def factory(options: FeatureOptions) -> FeatureExtractor:
        return FeatureExtractor("bright", lambda x: {"features": x.flatten(1), "score_logits": 80 * x.mean(dim=(2, 3))},
                                batch_size=options.batch_size)

    register_feature_extractor("test-bright", factory)
    try:
        images = np.zeros((30, 2, 2, 3), dtype=np.uint8)
        images[np.arange(30), :, :, np.arange(30) % 3] = 200
        images[:, 0, 0, :] += (np.arange(30) % 7).astype(np.uint8)[:, None]  # vary the features a little
        save_adm_npz(tmp_path / "s.npz", images)
        out = _eval_json(capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "s.npz",
                         "--features", "test-bright")
        assert out["inception_score"] == pytest.approx(3.0, rel=1e-6)
        assert out["inception_score_split_size"] == 5000
        assert "class_accuracy" not in out  # IS logits are not class predictions
    finally:
        unregister_feature_extractor("test-bright")


def test_image_stream_from_images():
    images = np.random.default_rng(42).integers(0, 256, (5, 2, 2), dtype=np.uint8)
    stream = ImageStream.from_images(images, np.arange(5))
    assert [b.shape for b in stream.batches(2)] == [(2, 2, 2, 3), (2, 2, 2, 3), (1, 2, 2, 3)]
