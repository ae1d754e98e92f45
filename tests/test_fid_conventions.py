"""The three FID conventions against the peer libraries that define them, on identical random Inception weights
(the released weights cannot be downloaded here), and the Fréchet distance against scipy's `sqrtm` form.

* `adm`: torch-fidelity's `FeatureExtractorInceptionV3` (the TF graph's TF1 legacy bilinear resize and
  (x - 128) / 128; torch-fidelity states its resize is epsilon-exact to TensorFlow 1.x) at 32, 64, 256 and
  512 px input.
* `pytorch-fid`: pytorch-fid's `InceptionV3`.
* `clean`: clean-fid's `mode="clean"` resize and its `InceptionV3W` normalisation.

The peers are installed without their dependencies (they all require torchvision, which would pull a CUDA
torch), so only modules that need no torchvision are imported, with two stand-ins: torch-fidelity's package
`__init__` (which imports its datasets, hence torchvision) is skipped by importing its feature-extractor module
under an empty package, and pytorch-fid's base classes from `torchvision.models.inception` are given by
torch-fidelity's own Inception blocks (the same module names; pytorch-fid overrides the forward of every block
it patches, so all block code under test is the peers'). Each peer's network weights are loaded from the same
random state dict as mfrae's.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from mfrae.cli import main
from mfrae.eval.conventions import (
    ADM,
    CLEAN,
    FID_CONVENTIONS,
    PYTORCH_FID,
    fid_input,
    pil_resize_bicubic,
    tf1_resize_bilinear,
)
from mfrae.eval.features import FeatureExtractor
from mfrae.eval.inception import FIDInceptionV3, load_fid_inception
from mfrae.eval.metrics import FeatureStats, frechet_distance, frechet_distance_sqrtm, trace_sqrt_product
from mfrae.eval.samples import save_adm_npz
from mfrae.train.evaluation import fd_key, reference_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


def _site_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (the Makefile installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture
def fidelity(monkeypatch):
    """torch-fidelity's feature-extractor module, imported under an empty `torch_fidelity` package."""
    root = _site_package("torch_fidelity")
    for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    yield module
    for name in [n for n in sys.modules if n.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name, raising=False)


def _torchvision_stand_in(fidelity) -> types.ModuleType:
    """What pytorch-fid and clean-fid take from torchvision: the Inception-v3 base blocks and constructor (here
    torch-fidelity's blocks) and `transforms` (imported, unused by the functions under test)."""
    blocks = fidelity

    def inception_v3(num_classes=1000, aux_logits=True, init_weights=False, weights=None):  # noqa: ARG001
        net = torch.nn.Module()
        net.Conv2d_1a_3x3 = blocks.BasicConv2d(3, 32, kernel_size=3, stride=2)
        net.Conv2d_2a_3x3 = blocks.BasicConv2d(32, 32, kernel_size=3)
        net.Conv2d_2b_3x3 = blocks.BasicConv2d(32, 64, kernel_size=3, padding=1)
        net.Conv2d_3b_1x1 = blocks.BasicConv2d(64, 80, kernel_size=1)
        net.Conv2d_4a_3x3 = blocks.BasicConv2d(80, 192, kernel_size=3)
        net.Mixed_5b = blocks.InceptionA(192, pool_features=32)
        net.Mixed_5c = blocks.InceptionA(256, pool_features=64)
        net.Mixed_5d = blocks.InceptionA(288, pool_features=64)
        net.Mixed_6a = blocks.InceptionB(288)
        net.Mixed_6b = blocks.InceptionC(768, channels_7x7=128)
        net.Mixed_6c = blocks.InceptionC(768, channels_7x7=160)
        net.Mixed_6d = blocks.InceptionC(768, channels_7x7=160)
        net.Mixed_6e = blocks.InceptionC(768, channels_7x7=192)
        net.Mixed_7a = blocks.InceptionD(768)
        net.Mixed_7b = blocks.InceptionE_1(1280)
        net.Mixed_7c = blocks.InceptionE_2(2048)
        net.fc = torch.nn.Linear(2048, num_classes)
        return net

    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.20.0"
    torchvision.models = types.ModuleType("torchvision.models")
    torchvision.models.inception_v3 = inception_v3
    torchvision.models.inception = types.ModuleType("torchvision.models.inception")
    torchvision.models.inception.InceptionA = blocks.InceptionA
    torchvision.models.inception.InceptionC = blocks.InceptionC
    torchvision.models.inception.InceptionE = blocks.InceptionE_1
    torchvision.transforms = types.ModuleType("torchvision.transforms")
    torchvision.transforms.ToTensor = object
    return torchvision


@pytest.fixture
def torchvision_stand_in(fidelity, monkeypatch):
    _site_package("pytorch_fid")
    tv = _torchvision_stand_in(fidelity)
    for name, module in (("torchvision", tv), ("torchvision.models", tv.models),
                         ("torchvision.models.inception", tv.models.inception),
                         ("torchvision.transforms", tv.transforms)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith(("pytorch_fid", "cleanfid"))]:
        monkeypatch.delitem(sys.modules, name)
    yield tv
    for name in [n for n in sys.modules if n.startswith(("pytorch_fid", "cleanfid"))]:
        monkeypatch.delitem(sys.modules, name, raising=False)


def random_fid_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random FID Inception state dict whose BatchNorm statistics are those of its own activations on random
    images (one training-mode pass with momentum 1), so that features are O(1) through all 94 layers instead of
    vanishing; the classifier gets random weights and bias."""
    torch.manual_seed(seed)
    model = FIDInceptionV3(convention=PYTORCH_FID)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.1, 0.2)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 299, 299))
        torch.nn.init.normal_(model.fc.weight, std=0.05)
        torch.nn.init.normal_(model.fc.bias, std=0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid_weights") / "random_fid_inception.pth"
    torch.save(random_fid_weights(), path)
    return path


def _images(size: int | tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, like an image: the resize has something to interpolate.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 127.5 + 100 * np.sin(6 * xx[None, :, :, None] + 4 * yy[None, :, :, None] + rng.uniform(0, 6, (n, 1, 1, 3)))
    return np.clip(base + rng.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _assert_features_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal up to float32 rounding through the 94 layers: within 1e-5 of the largest feature."""
    scale = float(theirs.abs().max())
    assert scale > 1e-2  # features of a working network, not vanishing ones
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------ adm


@pytest.mark.parametrize("size", [32, 64, 256, 512, (40, 90)])
def test_tf1_resize_matches_torch_fidelity(fidelity, size):
    from_peer = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    values = torch.from_numpy(_images(size)).permute(0, 3, 1, 2).float()
    theirs = from_peer.interpolate_bilinear_2d_like_tensorflow1x(values, size=(299, 299), align_corners=False)
    ours = tf1_resize_bilinear(values, 299)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # 0..255 values: float32 rounding at most


def test_tf1_resize_closed_form():
    """Legacy TF1 sampling by hand: output i reads input i * in / out, no half-pixel shift; the last row /
    column repeats the edge."""
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # columns 0, 1, 2, 3
    out = tf1_resize_bilinear(x, 8)  # scale 1/2: positions 0, .5, 1, ..., 3, 3.5 -> clamped to 3
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    down = tf1_resize_bilinear(torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6), 3)  # positions 0, 2, 4
    torch.testing.assert_close(down[0, 0, 0], torch.tensor([0.0, 2.0, 4.0]))


@pytest.mark.parametrize("size", [32, 64, 256, 512])
def test_adm_features_match_torch_fidelity(fidelity, weights, size):
    """mfrae's default convention against torch-fidelity's TF-graph extractor on the same weights: pool_3
    features and the bias-free logits of the ADM evaluator's Inception Score."""
    images = _images(size)
    peer = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(weights))
    ours = load_fid_inception(weights)  # the default convention
    assert ours.convention == ADM
    with torch.inference_mode():
        pool, logits = peer(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        out = ours.forward_all(_unit(images), spatial=False)
    _assert_features_equal(out.pool, pool)
    _assert_features_equal(out.logits, logits)


# ---------------------------------------------------------------------------------------- pytorch-fid


def test_pytorch_fid_convention_matches_pytorch_fid(torchvision_stand_in, weights, monkeypatch):
    inception = importlib.import_module("pytorch_fid.inception")
    monkeypatch.setattr(inception, "load_state_dict_from_url",
                        lambda *a, **k: torch.load(weights, weights_only=True))
    peer = inception.InceptionV3([3]).eval()  # pool features, resize_input and normalize_input on
    ours = load_fid_inception(weights, convention=PYTORCH_FID)
    images = _images((48, 80))
    with torch.inference_mode():
        _assert_features_equal(ours(_unit(images)), peer(_unit(images))[0].flatten(1))


# ---------------------------------------------------------------------------------------------- clean


@pytest.mark.parametrize("size", [32, 512])
def test_clean_resize_matches_clean_fid(size):
    _site_package("cleanfid")
    from cleanfid.resize import build_resizer

    images = _images(size)
    theirs = np.stack([build_resizer("clean")(img) for img in images])  # HWC float32
    ours = pil_resize_bicubic(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    np.testing.assert_array_equal(ours.permute(0, 2, 3, 1).numpy(), theirs)


def test_clean_features_match_clean_fid(weights):
    """clean-fid's `mode="clean"` path (its resize, then `InceptionV3W.forward`'s normalisation into the graph's
    layers), with mfrae's network on the same weights in place of the downloaded TorchScript graph."""
    _site_package("cleanfid")
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    network = load_fid_inception(weights, convention=CLEAN)

    class Layers(torch.nn.Module):  # the graph's layers from the normalised 299 px input on
        def forward(self, x):
            return network.forward_network(x, spatial=False).pool

    peer = InceptionV3W.__new__(InceptionV3W)
    torch.nn.Module.__init__(peer)
    peer.layers, peer.resize_inside = Layers(), False
    images = _images(40)
    resized = np.stack([build_resizer("clean")(img) for img in images]).transpose(0, 3, 1, 2)
    with torch.inference_mode():
        theirs = peer(torch.from_numpy(np.ascontiguousarray(resized)))
        ours = network(_unit(images))
    _assert_features_equal(ours, theirs)


# ------------------------------------------------------------------------------- the conventions apart


def test_conventions_at_299_px_differ_only_in_normalisation():
    """No resize at 299 px: adm and clean feed the graph (u - 128) / 128, pytorch-fid 2 u / 255 - 1."""
    u = torch.arange(256.0).repeat(3 * 299 * 299 // 256 + 1)[: 3 * 299 * 299].view(1, 3, 299, 299)
    for convention in (ADM, CLEAN):
        torch.testing.assert_close(fid_input(u / 255.0, convention), (u - 128.0) / 128.0, rtol=0, atol=0)
    torch.testing.assert_close(fid_input(u / 255.0, PYTORCH_FID), 2.0 * (u / 255.0) - 1.0, rtol=0, atol=0)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="'tf2'.*adm, pytorch-fid, clean"):
        FIDInceptionV3(convention="tf2")
    assert FID_CONVENTIONS == ("adm", "pytorch-fid", "clean")


# ----------------------------------------------------------------------------------- Fréchet distance


def _fd_by_sqrtm(mu1, s1, mu2, s2) -> float:
    """FD written out as the ADM evaluator does: ||dmu||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("d, n", [(5, 400), (32, 1000), (64, 300)])
def test_fd_matches_scipy_sqrtm_on_well_conditioned_cases(d, n):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    y = 0.3 + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    expected = _fd_by_sqrtm(a.mu, a.sigma, b.mu, b.sigma)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_sqrtm(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(expected, rel=1e-9)


def test_fd_matches_the_peers_frechet_distance(torchvision_stand_in):
    fid_score = importlib.import_module("pytorch_fid.fid_score")
    clean = importlib.import_module("cleanfid.fid")
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((300, 24)), 1.5 * rng.standard_normal((300, 24)) + 0.2
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-9)
    assert ours == pytest.approx(clean.frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-9)


def test_trace_sqrt_product_of_singular_covariances_closed_form():
    """Few samples in many dimensions give singular covariances: with S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T
    (zeros in a and b), Tr (S1 S2)^{1/2} = sum sqrt(a b) exactly, with no diagonal offset."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    a, b = rng.uniform(0.1, 3.0, 200), rng.uniform(0.1, 3.0, 200)
    a[::3], b[1::4] = 0.0, 0.0
    got = trace_sqrt_product(q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T)
    # A zero eigenvalue comes out as rounding noise ~1e-16 * ||S1 S2|| ~ 1e-15, whose square root ~3e-8 adds up
    # over the ~100 zero eigenvalues: a few 1e-6 absolute on a trace of ~150.
    assert got == pytest.approx(float(np.sum(np.sqrt(a * b))), abs=2e-5)


def test_fd_refuses_matrices_that_are_not_covariances():
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))


# ----------------------------------------------------------- the convention recorded and enforced


def test_stats_files_record_their_convention(tmp_path):
    rng = np.random.default_rng(0)
    stats = FeatureStats.from_features(rng.standard_normal((10, 3)), name="inception")
    for convention in FID_CONVENTIONS:
        path = stats.__class__(stats.mu, stats.sigma, stats.n, "inception", convention=convention).save(
            tmp_path / f"{convention}.npz")
        with np.load(path) as data:
            assert str(data["fid_convention"]) == convention
        assert FeatureStats.load(path).convention == convention
    # ADM's reference batches hold mu / sigma from the TF graph and no other key; mfrae's files from before the
    # conventions had names hold `features` = "inception" and were made the pytorch-fid way.
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)
    np.savez(tmp_path / "old.npz", mu=stats.mu, sigma=stats.sigma, n=10, features="inception")
    np.savez(tmp_path / "pixels.npz", mu=stats.mu, sigma=stats.sigma, n=10, features="pixels")
    assert FeatureStats.load(tmp_path / "adm.npz").convention == ADM
    assert FeatureStats.load(tmp_path / "old.npz").convention == PYTORCH_FID
    assert FeatureStats.load(tmp_path / "pixels.npz").convention == ""


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_refuses_statistics_of_another_convention(tmp_path, capsys, weights):
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=_images(16, n=4), mu=mu, sigma=sigma)  # ADM: no convention key
    save_adm_npz(tmp_path / "samples.npz", _images(16, n=4, seed=2))
    FeatureStats(mu, sigma, 10, "inception", convention=CLEAN).save(tmp_path / "clean.npz")
    for reference, convention, recorded in (("VIRTUAL_ref.npz", PYTORCH_FID, ADM), ("VIRTUAL_ref.npz", CLEAN, ADM),
                                            ("clean.npz", ADM, CLEAN)):
        code, out, err = _eval(capsys, "--samples", tmp_path / "samples.npz", "--reference", tmp_path / reference,
                               "--inception-weights", weights, "--fid-convention", convention)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1
        assert f"{tmp_path / reference}" in err and f"'{recorded}', not '{convention}'" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--samples", str(tmp_path / "samples.npz"), "--fid-convention", "tf2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--fid-convention" in err and "tf2" in err


@pytest.mark.slow  # two 2048-d Fréchet distances: ~10 s on 2 idle cores, minutes on busy ones
def test_eval_records_the_convention_next_to_the_fid(tmp_path, capsys, weights):
    save_adm_npz(tmp_path / "a.npz", _images(16, n=3, seed=4))
    save_adm_npz(tmp_path / "b.npz", _images(16, n=3, seed=5))
    stats = tmp_path / "ref-clean.npz"
    code, out, _ = _eval(capsys, "--samples", tmp_path / "a.npz", "--reference", tmp_path / "b.npz", "--json",
                         "--inception-weights", weights, "--fid-convention", CLEAN, "--k", "2", "--device", "cpu",
                         "--no-progress", "--save-reference-stats", stats)
    assert code == 0
    result = json.loads(out)
    assert result["fid_convention"] == CLEAN and result["fid"] > 0
    assert FeatureStats.load(stats).convention == CLEAN
    assert FeatureStats.load(stats, suffix="_s").convention == CLEAN
    # the reference written under one convention is refused under another, before any feature is computed
    code, _, err = _eval(capsys, "--samples", tmp_path / "a.npz", "--reference", stats,
                         "--inception-weights", tmp_path / "absent.pth")
    assert code == 2 and f"'{CLEAN}', not '{ADM}'" in err


def test_training_evaluator_names_and_enforces_the_convention(tmp_path):
    stats = FeatureStats(np.zeros(4), np.eye(4), 10, "inception", convention=PYTORCH_FID)
    stats.save(tmp_path / "ref.npz")
    extractor = FeatureExtractor("inception", lambda x: x.flatten(1), convention=ADM)
    with pytest.raises(ValueError, match=r"ref\.npz.*'pytorch-fid'.*'adm'"):
        reference_statistics(str(tmp_path / "ref.npz"), extractor)
    assert reference_statistics(str(tmp_path / "ref.npz"),
                                FeatureExtractor("inception", lambda x: x, convention=PYTORCH_FID)).n == 10
    assert fd_key("1step", ADM) == "eval/fd_1step_fid-adm"
    assert fd_key("1step", "") == "eval/fd_1step"  # judge / pixel features: not a FID
