"""Sample-quality metrics over feature vectors: Frechet distance (FID) and k-NN precision/recall; and the
tokenizer's: PSNR, SSIM and codebook usage.

Everything here works on features `n d` (one row per image) from any extractor: Inception-V3 for the
standard FID, or the penultimate layer of a classifier trained on the dataset (`classifier_features`) for
an "Inception-free" FID that also works on 28x28 grayscale data where Inception's ImageNet features mean
little. Statistics and distances are computed in float64. Memory does not grow with the square of the set
sizes: k-NN distances are computed in blocks of at most `DISTANCE_BLOCK` entries, covariances `STATS_BLOCK`
rows at a time, SSIM `SSIM_BATCH` images at a time.

Why these are written here rather than taken from a library: torchmetrics' `FrechetInceptionDistance` is a
stateful metric that runs its own feature extractor over images, and its matrix square root takes the
eigenvalues of the non-symmetric product S_a S_b in whatever precision the caller's features have; we need the
distance between two feature sets or two Gaussians as plain functions (the benchmarks call them per sweep
point), and a square root that stays real and stable for rank-deficient covariances (fewer images than
feature dimensions). torchmetrics has no k-NN precision/recall, and torch-fidelity (which has it) needs
torchvision, which pins its own torch version. The tests check `frechet_distance` against torchmetrics' FID
and against closed forms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _checked_features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name}: expected features of shape (n, d), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if len(x) < 2:
        raise ValueError(f"{name}: need at least 2 feature vectors for a covariance, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return x.detach().cpu()


def _as_features(x: Tensor, name: str) -> Tensor:
    return _checked_features(x, name).to(torch.float64)


# Rows of features converted to float64 at a time by `gaussian_stats`: 60,000 Inception features (2048 wide)
# would be 0.9 GiB in float64, and torch.cov makes a centred copy of as much again.
STATS_BLOCK = 4096


def gaussian_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """(mean `d`, unbiased covariance `d d`) of features `n d` (any float dtype), float64, accumulated
    `STATS_BLOCK` rows at a time (the same values as torch.cov up to rounding). Raises ValueError for n < 2
    or non-finite values."""
    x = _checked_features(feats, "features")
    n, d = x.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, STATS_BLOCK):
        mean += x[i:i + STATS_BLOCK].to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, STATS_BLOCK):
        centred = x[i:i + STATS_BLOCK].to(torch.float64) - mean
        cov.addmm_(centred.T, centred)
    return mean, cov / (n - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition. Eigenvalues within
    rounding noise of 0 (below d * eps * the largest) are set to 0: the square root would blow noise of
    1e-16 up to 1e-8 per dimension in rank-deficient covariances."""
    # Small matrices single-threaded: OpenMP's thread hand-offs dominate there, and on busy cores they cost
    # far more than the work (a 128 x 128 eigh: 1.5 ms on one thread, 0.2-0.6 s on two loaded cores).
    threads = torch.get_num_threads()
    if len(m) <= 512:
        torch.set_num_threads(1)
    try:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    finally:
        torch.set_num_threads(threads)
    noise = len(m) * torch.finfo(m.dtype).eps * vals.abs().max().clamp(min=torch.finfo(m.dtype).tiny)
    vals = torch.where(vals > noise, vals, torch.zeros_like(vals))
    return (vecs * vals.sqrt()) @ vecs.T


def frechet_distance_gaussians(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b):

        |mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a^1/2 cov_b cov_a^1/2)^1/2)

    (Dowson & Landau 1982; the FID of Heusel et al. 2017, Eq. 6). tr((S_a S_b)^1/2) is computed as the trace
    of the square root of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2, which has the same eigenvalues as
    S_a S_b, so it stays real and exact for singular covariances. Means `d`, covariances `d d` (any float
    dtype; computed in float64). Raises ValueError for mismatched shapes. The result is >= 0 up to rounding.
    """
    mu_a, mu_b = (torch.as_tensor(t, dtype=torch.float64).cpu() for t in (mu_a, mu_b))
    cov_a, cov_b = (torch.as_tensor(t, dtype=torch.float64).cpu() for t in (cov_a, cov_b))
    d = mu_a.shape[0] if mu_a.dim() == 1 else -1
    if mu_a.dim() != 1 or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"expected means (d,) and covariances (d, d) of one d, got {tuple(mu_a.shape)}, "
                         f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a).trace()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID-style distance between two feature sets `n d` and `m d`: the Frechet distance between the Gaussians
    fitted to each (mean and unbiased covariance, float64; `frechet_distance_gaussians`). Depends on the
    sample sizes (a biased estimator: compare numbers only at equal n and m). Raises ValueError for sets of
    fewer than 2 rows, different widths, or non-finite values."""
    a, b = _checked_features(feats_a, "first feature set"), _checked_features(feats_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_gaussians(*gaussian_stats(a), *gaussian_stats(b))


# The k-NN metrics never hold more than this many pairwise distances at once (float64: 32 MiB, plus as much
# again for the k-th value's working copy), whatever the set sizes: a block is DISTANCE_BLOCK // m rows of the
# n x m distance matrix. A whole 60,000 x 60,000 matrix would be 27 GiB, and even a fixed 1024 rows of it
# 0.46 GiB before cdist's and kthvalue's temporaries.
DISTANCE_BLOCK = 1 << 22


def _block_rows(columns: int, chunk: int | None) -> int:
    return chunk if chunk else max(1, DISTANCE_BLOCK // max(columns, 1))


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int | None) -> Tensor:
    """Distance from each row of `x` (`n d`) to its k-th nearest other row: `n`."""
    rows = _block_rows(len(x), chunk)
    radii = torch.empty(len(x), dtype=x.dtype)
    for i in range(0, len(x), rows):
        dist = torch.cdist(x[i:i + rows], x)
        radii[i:i + rows] = dist.kthvalue(k + 1, dim=1).values  # k + 1: the row itself is at distance 0
        del dist  # before the next block's cdist allocates its own
    return radii


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int | None) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    rows = _block_rows(len(centres), chunk)
    inside = 0
    for i in range(0, len(points), rows):
        inside += int((torch.cdist(points[i:i + rows], centres) <= radii[None]).any(1).sum())
    return inside / len(points)


def knn_radii(feats: Tensor, k: int = 3, chunk: int | None = None) -> Tensor:
    """Distance from each feature vector (`n d`, n > k) to its k-th nearest other one: `n` float64 (Euclidean,
    the features' units). The real manifold's radii of `precision_recall`, computed once for a reference set
    that many sample sets are compared against (the n x n distances dominate the cost for a large reference).
    The distances are computed `chunk` rows at a time; by default as many rows as keep a block of the n x n
    matrix within `DISTANCE_BLOCK` entries, so memory does not grow with n^2 (the result does not depend on
    `chunk`). Raises ValueError for k < 1, at most k vectors, or non-finite features."""
    x = _as_features(feats, "features")
    if k < 1 or len(x) <= k:
        raise ValueError(f"need k >= 1 and more than k vectors, got k={k} and {len(x)} vectors")
    return _kth_neighbour_radii(x, k, chunk)


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, chunk: int | None = None,
                     real_radii: Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall of generated samples (Kynkaanniemi et al. 2019, Sec. 2).

    The real manifold is the union of balls around each real feature vector with radius the distance to its
    k-th nearest real neighbour; likewise the fake manifold. Precision = fraction of fake vectors inside the
    real manifold (how many samples look real); recall = fraction of real vectors inside the fake manifold (how
    much of the data the samples cover). A vector on a ball's boundary is inside. `real_feats` `n d`,
    `fake_feats` `m d`, n and m > k; distances Euclidean in float64, computed `chunk` rows at a time (default:
    blocks of at most `DISTANCE_BLOCK` distances, see `knn_radii`; the result does not depend on it). Returns
    (precision, recall), each in [0, 1]. Both are 1 for identical sets. `real_radii`: `knn_radii(real_feats, k)`
    computed beforehand (same result, without the n x n distances). Raises ValueError for k < 1, sets of at
    most k rows, different widths, or radii of another length.
    """
    real, fake = _as_features(real_feats, "real features"), _as_features(fake_feats, "fake features")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: {real.shape[1]} real vs {fake.shape[1]} fake")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} vectors in each set, got {len(real)} real and {len(fake)} fake")
    if real_radii is None:
        real_radii = _kth_neighbour_radii(real, k, chunk)
    elif real_radii.shape != (len(real),):
        raise ValueError(f"real_radii: expected {len(real)} radii, one per real vector, got {tuple(real_radii.shape)}")
    real_radii = real_radii.to("cpu", torch.float64)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    return _coverage(fake, real, real_radii, chunk), _coverage(real, fake, fake_radii, chunk)


@torch.no_grad()
def classifier_features(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Penultimate-layer features of a classifier (`SmallClassifier.features`) for `b c H W` images in
    [-1, 1], run in eval mode `batch_size` at a time on the model's device -> `b d` float32 on the CPU
    (d = 128 for `SmallClassifier`). Raises ValueError when the images' channels or size differ from the
    classifier's."""
    expected = getattr(model, "input_shape", None)
    if images.dim() != 4 or (expected is not None and tuple(images.shape[1:]) != tuple(expected)):
        raise ValueError(f"the classifier takes images of shape (b, {', '.join(map(str, expected or ('c', 'H', 'W')))}), "
                         f"got {tuple(images.shape)}")
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.features(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, 0)


def squared_error(x: Tensor, y: Tensor) -> float:
    """Sum of the squared differences of two image tensors of one shape (any shape, values clamped to
    [-1, 1]), accumulated in float64: the numerator of `psnr`'s mean squared error, for images measured a batch
    at a time (`psnr_of_mse(sum of the batches' squared_error / element count)`)."""
    return float((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).square().sum(dtype=torch.float64))


def psnr_of_mse(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error of images in [-1, 1] (peak-to-peak 2): inf for 0."""
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def psnr(x: Tensor, y: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    return psnr_of_mse(squared_error(x, y) / x.numel())


# Images per torchmetrics call in `ssim`: it pads and stacks five copies of its whole input and keeps several
# maps of it, about 0.4 MB per 32x32 grayscale image (4 GB for 10,000 images in one call).
SSIM_BATCH = 256


def ssim(x: Tensor, y: Tensor) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5) of `n c H W` images in [-1, 1] (data
    range 2), over the positions where the whole window lies inside the image, as Wang et al.'s reference code
    and scikit-image average. The SSIM map is torchmetrics'; its own mean also counts the 5-pixel border, where
    the window reaches reflected pixels (on 32x32 images that border is over half the map, and it moved the
    value by up to 0.07). Images of 10 pixels or less on a side are averaged whole. Computed `SSIM_BATCH`
    images at a time (every image has as many positions, so the mean of the batch means weighted by their
    sizes is the mean over all), so memory does not grow with n."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    total = 0.0
    for i in range(0, len(x), SSIM_BATCH):
        _, full = structural_similarity_index_measure(x[i:i + SSIM_BATCH].float().clamp(-1, 1),
                                                      y[i:i + SSIM_BATCH].float().clamp(-1, 1), data_range=2.0,
                                                      return_full_image=True)
        if min(full.shape[-2:]) > 10:
            full = full[..., 5:-5, 5:-5]
        total += float(full.mean(dtype=torch.float64)) * len(full)
    return total / len(x)


# Below this share of codes in use the codebook is collapsing: training and `evaluate` warn (healthy runs of
# the presets use 58-100% of their codes; collapsed ones 5-9%).
LOW_CODEBOOK_USAGE = 0.25


def codebook_usage(tokens: Tensor, codebook_size: int) -> float:
    """Fraction of the `codebook_size` codebook entries that occur at least once in `tokens` (any shape)."""
    return torch.unique(tokens).numel() / codebook_size
