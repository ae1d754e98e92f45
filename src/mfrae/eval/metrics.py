"""Distribution metrics on feature vectors, one named function per metric:

* `frechet_distance` — FID when the features are the Inception pool features (Heusel et al., arXiv 1706.08500),
  its trace term from symmetric eigendecompositions (`trace_sqrt_product`); `frechet_distance_sqrtm` is the
  ADM evaluator's scipy `sqrtm` form of the same number;
* `sfid` — the same distance on the Inception spatial features (Nash et al., arXiv 2103.03841);
* `inception_score` — from class logits, with the ADM evaluator's splits (Salimans et al., arXiv 1606.03498);
* `precision_recall` — k-NN manifold precision / recall (Kynkäänniemi et al., arXiv 1904.06991);
* `class_accuracy`.

`FeatureStats` (mean, covariance) is built from a feature matrix or streamed batch by batch (`RunningStats`).
All functions take numpy arrays (any float dtype; computed in float64) and return Python floats.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.special

from mfrae.eval.conventions import ADM, PYTORCH_FID
from mfrae.eval.samples import npz_keys
from mfrae.fileio import commit, temp_path

# Diagonal offset added to both covariances when sqrtm(S1 S2) fails on a (near-)singular product.
SQRTM_EPS = 1e-6
# Relative residual ||X X - A||_F / ||A||_F above which a matrix square root is not trusted.
_SQRTM_MAX_RESIDUAL = 1e-5
# Imaginary parts of sqrtm's diagonal up to this fraction of its mean |real diagonal| are rounding noise.
_MAX_IMAG_FRACTION = 1e-3
# A covariance's asymmetry (relative to its largest entry) and negative eigenvalues (relative to its largest
# eigenvalue) up to these sizes are rounding noise; larger ones mean the matrix is not a covariance.
_MAX_ASYMMETRY = 1e-6
_MAX_NEGATIVE_EIGENVALUE = 1e-6


def _as_float64(name: str, value: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """scipy's matrix square root of `a` and its relative residual ||X X - a||_F / ||a||_F (inf if non-finite)."""
    with warnings.catch_warnings():
        # scipy warns on singular input; the residual below decides whether the root is usable.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return root, float("inf")
    scale = max(float(np.linalg.norm(a)), float(np.finfo(np.float64).tiny))
    return root, float(np.linalg.norm(root @ root - a)) / scale


# ---------------------------------------------------------------------------------- Fréchet distance


def _check_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1 = _as_float64("mu1", mu1, 1)
    mu2 = _as_float64("mu2", mu2, 1)
    sigma1 = _as_float64("sigma1", sigma1, 2)
    sigma2 = _as_float64("sigma2", sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}; expected ({d},) and ({d}, {d})")
    return mu1, sigma1, mu2, sigma2


def _check_symmetric(name: str, sigma: np.ndarray) -> None:
    scale = max(float(np.max(np.abs(sigma))), float(np.finfo(np.float64).tiny))
    asymmetry = float(np.max(np.abs(sigma - sigma.T)))
    if asymmetry > _MAX_ASYMMETRY * scale:
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {asymmetry:.3g}); not a covariance")


def _psd_eigen(name: str, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (negative rounding noise set to 0) and eigenvectors of the symmetric PSD matrix `sigma`
    (LAPACK's divide-and-conquer `syevd`); a ValueError naming it when it is not symmetric or has a clearly
    negative eigenvalue."""
    _check_symmetric(name, sigma)
    values, vectors = scipy.linalg.eigh(0.5 * (sigma + sigma.T), driver="evd", check_finite=False)
    if values[0] < -_MAX_NEGATIVE_EIGENVALUE * max(float(values[-1]), float(np.finfo(np.float64).tiny)):
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {values[0]:.3g}); not a covariance")
    return np.clip(values, 0.0, None), vectors


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^{1/2} for symmetric PSD S1, S2, from two symmetric eigendecompositions (float64):

        Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i),  lambda = eig(S1^{1/2} S2 S1^{1/2}),

    since S1 S2 = S1^{1/2} (S1^{1/2} S2) and S1^{1/2} S2 S1^{1/2} = (S1^{1/2} S2) S1^{1/2} have the same
    non-zero eigenvalues, and the symmetric product's are real and >= 0 (Dowson & Landau 1982; the same
    identity as in the FID derivation, Heusel et al., arXiv 1706.08500). Exact for singular covariances too,
    with no diagonal offset; negative eigenvalues of rounding size are taken as 0."""
    values, vectors = _psd_eigen("sigma1", sigma1)
    _check_symmetric("sigma2", sigma2)
    root = (vectors * np.sqrt(values)) @ vectors.T
    middle = root @ sigma2 @ root
    product = scipy.linalg.eigh(0.5 * (middle + middle.T), eigvals_only=True, driver="evd", check_finite=False)
    if product[0] < -_MAX_NEGATIVE_EIGENVALUE * max(float(product[-1]), float(np.finfo(np.float64).tiny)):
        # S1^{1/2} S2 S1^{1/2} is PSD whenever S2 is; a clearly negative eigenvalue means S2 is not.
        raise ValueError(f"sigma2 is not positive semi-definite (eigenvalue {product[0]:.3g} of "
                         "S1^1/2 S2 S1^1/2); not a covariance")
    return float(np.sum(np.sqrt(np.clip(product, 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) (FID: Heusel et al., arXiv 1706.08500),
    in float64:

        FD = ||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1 S2)^{1/2}

    with the trace term from symmetric eigendecompositions (`trace_sqrt_product`): the same number as the ADM
    evaluator's `scipy.linalg.sqrtm(S1 S2)` wherever that converges (`frechet_distance_sqrtm`), in seconds at
    2048-d, and exact for the singular covariances of fewer samples than dimensions. A negative total (only
    reachable through rounding, e.g. when the two Gaussians coincide) is returned as 0.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(fd, 0.0)


def frechet_distance_sqrtm(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                           eps: float = SQRTM_EPS) -> float:
    """The same distance computed as the ADM evaluator (`evaluations/evaluator.py`, `FIDStatistics.
    frechet_distance`) and pytorch-fid do: `scipy.linalg.sqrtm` of the non-symmetric product S1 S2, which can
    take minutes at 2048-d (kept as the reference for `frechet_distance` and for the benchmark).

    If the root fails on a (near-)singular product (non-finite result or a relative residual above 1e-5), it is
    recomputed on ((S1 + eps I)(S2 + eps I)). Small imaginary parts from rounding are dropped; a large imaginary
    part raises ValueError. A negative total is returned as 0.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    d = mu1.shape[0]
    covmean, residual = _sqrtm(sigma1 @ sigma2)
    if residual > _SQRTM_MAX_RESIDUAL:
        # (Near-)singular product: shift both covariances by eps I and take the best root we can get.
        offset = eps * np.eye(d)
        covmean, residual = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(residual):
            raise ValueError(f"matrix square root of S1 S2 is not finite even with a diagonal offset of {eps}")
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        tolerance = _MAX_IMAG_FRACTION * max(1.0, float(np.mean(np.abs(diag.real))))
        if np.max(np.abs(diag.imag)) > tolerance:
            raise ValueError(f"matrix square root of S1 S2 has a large imaginary part "
                             f"({np.max(np.abs(diag.imag)):.3g}); the covariances are probably not valid")
        covmean = covmean.real

    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


@dataclass(frozen=True)
class FeatureStats:
    """Mean, covariance and sample count of a feature set; `features` names the extractor (may be empty),
    `image_size` the (H, W) of the images (None: unknown) and `convention` the FID convention of Inception
    features (`mfrae.eval.conventions`; "" for other extractors).

    Saved as an .npz with keys `mu` [D], `sigma` [D, D], `n` (scalar), `features` (string) and, when known,
    `image_size` (int64 [2]) and `fid_convention` (string), so that `mfrae eval` can refuse samples of another
    resolution or statistics of another FID convention."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: str = ""
    image_size: tuple[int, int] | None = None
    convention: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, name: str = "") -> FeatureStats:
        """Sample mean and unbiased covariance (divide by N - 1) of `features` [N, D]; needs N >= 2."""
        feats = _as_float64("features", features, 2)
        if feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False).reshape(feats.shape[1], -1),
                   n=int(feats.shape[0]), features=name)

    def frechet_distance(self, other: FeatureStats) -> float:
        """FD between the Gaussians fitted to `self` and `other`."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike[str], spatial: FeatureStats | None = None) -> Path:
        """Write the stats to `path` (.npz; written to exactly this path even without the suffix). `spatial`
        stats go under the ADM evaluator's sFID keys `mu_s` / `sigma_s`."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "features": np.str_(self.features)}
        if self.image_size is not None:
            arrays["image_size"] = np.asarray(self.image_size, dtype=np.int64)
        if self.convention:
            arrays[CONVENTION_KEY] = np.str_(self.convention)
        if spatial is not None:
            arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
        tmp = temp_path(out)
        try:
            with open(tmp, "wb") as fh:  # a file handle keeps numpy from appending ".npz"
                np.savez(fh, **arrays)
            return commit(tmp, out)  # atomic: an existing file is replaced only by a complete one
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], suffix: str = "") -> FeatureStats:
        """Read stats written by `save` (or any .npz with `mu` and `sigma`; `n` and `features` optional).
        `suffix="_s"` reads the sFID statistics `mu_s` / `sigma_s` of an ADM reference batch instead.

        The FID convention is the file's `fid_convention`; a file without one is `stored_convention`'s guess:
        `pytorch-fid` for mfrae's Inception stats written before conventions had names, else `adm` (ADM's
        reference batches, made by the TF graph, carry neither `features` nor a convention)."""
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"feature stats file not found: {src}")
        mu_key, sigma_key = f"mu{suffix}", f"sigma{suffix}"
        npz_keys(src)  # an empty file, another format or a damaged archive: named with what it is
        try:
            with np.load(src, allow_pickle=False) as data:
                keys = set(data.files)
                arrays = {key: data[key] for key in (mu_key, sigma_key, "n", "features", "image_size", CONVENTION_KEY)
                          if key in keys}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:  # a damaged member
            raise ValueError(f"cannot read feature stats {src} ({type(err).__name__}: {err})") from err
        missing = [key for key in (mu_key, sigma_key) if key not in keys]
        if missing:
            raise ValueError(f"feature stats {src} lacks key(s) {missing} (has {sorted(keys)})")
        mu, sigma, size = arrays[mu_key], arrays[sigma_key], arrays.get("image_size")
        n = int(arrays["n"]) if "n" in arrays else 0
        name = str(arrays["features"]) if "features" in arrays else ""
        if size is not None and not (size.shape == (2,) and np.issubdtype(size.dtype, np.integer) and (size > 0).all()):
            raise ValueError(f"feature stats {src}: 'image_size' must be two positive integers (H, W), got {size!r}")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"feature stats {src}: '{mu_key}' has shape {mu.shape} and '{sigma_key}' {sigma.shape}; "
                             f"expected (D,) and (D, D)")
        if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
            raise ValueError(f"feature stats {src}: 'mu'/'sigma' must be floating point, "
                             f"got {mu.dtype}/{sigma.dtype}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"feature stats {src}: 'mu' or 'sigma' contains NaN or infinite values")
        recorded = str(arrays[CONVENTION_KEY]) if CONVENTION_KEY in arrays else None
        return cls(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n, features=name,
                   image_size=None if size is None else (int(size[0]), int(size[1])),
                   convention=stored_convention(recorded, "features" in arrays, name))


CONVENTION_KEY = "fid_convention"


def stored_convention(recorded: str | None, has_features_key: bool, features: str) -> str:
    """The FID convention of a stats file: the one it records; else `pytorch-fid` for an mfrae file of
    Inception features (`features` recorded as "inception": mfrae's only convention before they had names);
    "" for other mfrae features; `adm` for a file without a `features` key (ADM's reference batches, made by
    the TF graph)."""
    if recorded:
        return recorded
    if not has_features_key:
        return ADM
    return PYTORCH_FID if features == "inception" else ""


class RunningStats:
    """Mean and unbiased covariance accumulated batch by batch, so that a feature set need not be held.

    Sums are taken in float64 around a shift (the first batch's mean), which keeps the one-pass covariance
    (S_xx - s s^T / n) / (n - 1) accurate when the mean is large against the spread."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        feats = _as_float64("features", features, 2)
        if self._shift is None:
            self._shift = feats.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((feats.shape[1], feats.shape[1]))
        elif feats.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {feats.shape[1]}")
        centred = feats - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.n += feats.shape[0]

    def stats(self, name: str = "") -> FeatureStats:
        if self.n < 2 or self._shift is None or self._sum is None or self._outer is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mean = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return FeatureStats(mu=self._shift + mean, sigma=sigma, n=self.n, features=name)


def sfid(samples: FeatureStats, reference: FeatureStats) -> float:
    """sFID (Nash et al., arXiv 2103.03841): the Fréchet distance between Gaussians fitted to *spatial*
    Inception features — in the ADM evaluator, the first 7 channels of `mixed_6/conv` (17 x 17 x 7 = 2023-d) —
    which keep where things are in the image, where the pooled FID features do not."""
    return frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)


# ----------------------------------------------------------------------------------- Inception Score

# The ADM evaluator scores consecutive splits of this many samples (the last one may be shorter).
IS_SPLIT_SIZE = 5000


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score (Salimans et al., arXiv 1606.03498) of class logits [N, K], ADM evaluator convention:

        IS = mean over splits of exp( mean_i KL( p(y | x_i) || p(y) ) ),  p(y) = mean_i p(y | x_i) in the split,

    with p = softmax(logits) and consecutive splits of `split_size` samples (the last, shorter split counts as
    one). Computed with log-softmax in float64, so a probability that underflows contributes exactly 0.
    """
    z = _as_float64("logits", logits, 2)
    if z.shape[0] == 0:
        raise ValueError("inception_score needs at least one sample")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    log_p = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    scores = []
    for start in range(0, z.shape[0], split_size):
        part = log_p[start:start + split_size]
        log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(part) * (part - log_marginal[None, :]), axis=1)
        scores.append(float(np.exp(np.mean(kl))))
    return float(np.mean(scores))


# -------------------------------------------------------------------------------- precision / recall


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


# Pairwise-distance blocks hold at most this many float64 entries (2**24 -> 128 MiB).
_MAX_BLOCK_ELEMENTS = 2**24


def _squared_distance_block(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 for a block of rows `a` against all of `b` (b_sq = ||b_j||^2 precomputed)."""
    d2 = np.sum(a * a, axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)  # the expansion can dip below 0 by rounding


def _rows_per_block(n_cols: int) -> int:
    return max(1, _MAX_BLOCK_ELEMENTS // max(n_cols, 1))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest *other* row of `features` (k-NN ball radius^2)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} feature vectors, got k={k}")
    sq = np.sum(features * features, axis=1)
    radii = np.empty(n)
    step = _rows_per_block(n)
    for start in range(0, n, step):
        block = _squared_distance_block(features[start:start + step], features, sq)
        # Each row's own distance (0) is the smallest entry, so the k-th other neighbour sits at index k.
        radii[start:start + step] = np.partition(block, k, axis=1)[:, k]
    return radii


def manifold_coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of `queries` inside the union of balls B(manifold_i, sqrt(radii_i))."""
    m_sq = np.sum(manifold * manifold, axis=1)
    inside = 0
    step = _rows_per_block(manifold.shape[0])
    for start in range(0, queries.shape[0], step):
        block = _squared_distance_block(queries[start:start + step], manifold, m_sq)
        inside += int(np.count_nonzero((block <= radii[None, :]).any(axis=1)))
    return inside / queries.shape[0]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al., arXiv 1904.06991).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour within the set. precision = fraction of fake points inside the real manifold; recall = fraction
    of real points inside the fake manifold. Distances are Euclidean, computed in blocks to bound memory.
    """
    real = _as_float64("real_features", real_features, 2)
    fake = _as_float64("fake_features", fake_features, 2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return PrecisionRecall(precision=precision, recall=recall)


# ------------------------------------------------------------------------------------ class accuracy


def class_accuracy(pred_labels: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals the label they were generated for."""
    pred = np.asarray(pred_labels)
    true = np.asarray(labels)
    if pred.ndim != 1 or true.ndim != 1 or pred.shape != true.shape:
        raise ValueError(f"pred_labels and labels must be 1-D of equal length, got {pred.shape} and {true.shape}")
    if pred.size == 0:
        raise ValueError("class_accuracy needs at least one label")
    return float(np.mean(pred == true))
