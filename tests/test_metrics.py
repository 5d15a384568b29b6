"""Metric code against known values: closed forms, an independent FID implementation, constructed manifolds."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from sundae.eval.classifier import SmallClassifier
from sundae.eval.metrics import (classifier_features, frechet_distance, frechet_distance_gaussians, knn_radii,
                                 precision_recall)


def _random_cov(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(frechet_distance(x, x)) < 1e-8
    # Fewer vectors than dimensions: a singular covariance, still exactly 0 against itself and finite.
    y = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    assert abs(frechet_distance(y, y)) < 1e-8
    assert math.isfinite(frechet_distance(y, torch.randn(12, 64)))


def test_gaussian_distance_with_diagonal_covariances_matches_hand_derivation():
    # Commuting (diagonal) covariances: tr((A B)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 1.0, 16.0])
    expected = (1 + 0 + 4) + ((2 - 1) ** 2 + 0 + (3 - 4) ** 2)
    assert frechet_distance_gaussians(mu_a, torch.diag(a), mu_b, torch.diag(b)) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance_gaussians(mu_a, torch.diag(a), mu_a, torch.diag(a)) == pytest.approx(0, abs=1e-10)


def test_gaussian_distance_with_full_covariances_matches_scipy_sqrtm():
    gen = torch.Generator().manual_seed(2)
    d = 6
    mu_a, mu_b = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    cov_a, cov_b = _random_cov(d, gen), _random_cov(d, gen)
    cross = np.real(scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())).trace()  # the textbook formula
    expected = ((mu_a - mu_b) ** 2).sum().item() + cov_a.trace().item() + cov_b.trace().item() - 2 * cross
    assert frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_fid_between_samples_of_two_gaussians_matches_the_closed_form():
    gen = torch.Generator().manual_seed(3)
    d, n = 4, 40000
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    cov_a, cov_b = _random_cov(d, gen), _random_cov(d, gen)
    xa = torch.distributions.MultivariateNormal(mu_a, cov_a).sample((n,))
    xb = torch.distributions.MultivariateNormal(mu_b, cov_b).sample((n,))
    exact = frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b)
    assert exact > 1
    assert frechet_distance(xa, xb) == pytest.approx(exact, rel=0.03)


def test_fid_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Flatten(torch.nn.Module):  # the "feature extractor": the images' 12 values are the features
        num_features = 12

        def forward(self, x):
            return x.flatten(1).double()

    gen = torch.Generator().manual_seed(4)
    real = torch.randn(500, 3, 2, 2, generator=gen)
    fake = torch.randn(400, 3, 2, 2, generator=gen) * 1.3 + 0.2
    fid = FrechetInceptionDistance(feature=Flatten(), normalize=True)
    fid.set_dtype(torch.float64)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert frechet_distance(real.flatten(1), fake.flatten(1)) == pytest.approx(fid.compute().item(), rel=1e-6)


def test_precision_recall_of_identical_sets_is_one():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(5))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_of_a_shifted_set_is_low():
    gen = torch.Generator().manual_seed(6)
    real, fake = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    p, r = precision_recall(real, fake)
    assert p > 0.8 and r > 0.8  # two samples of one distribution
    p, r = precision_recall(real, fake + 2.0)  # shifted by 2 per dimension: |shift| = 5.7 standard deviations
    assert p < 0.2 and r < 0.2
    p, r = precision_recall(real, fake + 100.0)
    assert (p, r) == (0.0, 0.0)


def test_precision_recall_of_samples_covering_half_the_data():
    # Real data: two far-apart clusters. Samples from one of them only: all samples look real (precision 1)
    # but they cover only that cluster (recall = its share of the real data, 0.5).
    gen = torch.Generator().manual_seed(7)
    centres = torch.tensor([[0.0] * 4, [50.0] * 4])
    real = torch.cat([torch.randn(150, 4, generator=gen) + centres[0], torch.randn(150, 4, generator=gen) + centres[1]])
    fake = torch.randn(150, 4, generator=gen) * 0.7 + centres[0]
    p, r = precision_recall(real, fake, k=5)
    assert p > 0.95  # a sample may fall just outside the real balls at the cluster's edge
    assert 0.4 < r <= 0.5


def test_precomputed_real_radii_give_the_same_precision_recall():
    # Radii of points on a line at 0, 1, 3, 6, 10: the k = 1 neighbour distances are 1, 1, 2, 3, 4.
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(line, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(200, 4, generator=gen), torch.randn(50, 4, generator=gen) + 0.5
    assert precision_recall(real, fake, real_radii=knn_radii(real)) == precision_recall(real, fake)
    with pytest.raises(ValueError, match="one per real vector"):
        precision_recall(real, fake, real_radii=knn_radii(real[:100]))


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 2), float("nan")), torch.randn(4, 2))


def test_classifier_features_are_the_input_of_the_last_layer():
    torch.manual_seed(0)
    model = SmallClassifier(1, 10, size=32).eval()
    images = torch.rand(7, 1, 32, 32) * 2 - 1
    feats = classifier_features(model, images, batch_size=3)
    assert feats.shape == (7, 128) and feats.dtype == torch.float32 and (feats >= 0).all()  # after a ReLU
    with torch.no_grad():
        torch.testing.assert_close(model.net[-1](feats), model(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(b, 1, 32, 32\)"):
        classifier_features(model, torch.zeros(2, 3, 32, 32))


def test_ssim_averages_wang_et_al_valid_region_as_scikit_image():
    from skimage.metrics import structural_similarity

    from sundae.eval.metrics import ssim
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    for y in (x + 0.3 * torch.randn_like(x), 0.2 + 0.05 * torch.randn_like(x)):
        y = y.clamp(-1, 1)
        expected = np.mean([structural_similarity(x[i].numpy(), y[i].numpy(), data_range=2.0, channel_axis=0,
                                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                            for i in range(3)])
        assert ssim(x, y) == pytest.approx(expected, abs=1e-5)


def _brute_force_knn(real: np.ndarray, fake: np.ndarray, k: int,
                     inside=np.less_equal) -> tuple[np.ndarray, float, float]:
    """Integer points: squared distances are exact integers, so ties and boundaries are decided exactly.
    Returns (squared k-NN radii of `real`, precision, recall); `inside(distance^2, radius^2)` decides
    membership (a point on a ball's boundary is inside for the metric's `<=`)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii2(x):  # column k of each sorted row: index 0 is the point itself (distance 0)
        return np.sort(sq(x, x), axis=1)[:, k]

    r_real, r_fake = radii2(real), radii2(fake)
    precision = inside(sq(fake, real), r_real[None]).any(1).mean()
    recall = inside(sq(real, fake), r_fake[None]).any(1).mean()
    return r_real, precision, recall


def test_knn_metrics_on_a_lattice_with_ties_match_brute_force_for_every_block_size():
    # Points on a 5x5x5 integer lattice, drawn with repeats: many equal distances, duplicates at distance 0 and
    # samples lying exactly on a ball's boundary. Every squared distance is a small integer, exact in float64.
    rng = np.random.default_rng(0)
    real, fake = rng.integers(0, 5, (301, 3)), rng.integers(0, 5, (157, 3))
    for k in (1, 3, 7):
        r2, precision, recall = _brute_force_knn(real, fake, k)
        _, strict_precision, strict_recall = _brute_force_knn(real, fake, k, inside=np.less)
        assert strict_precision < precision and strict_recall < recall  # the boundary cases decide the values
        r, f = torch.tensor(real, dtype=torch.float32), torch.tensor(fake, dtype=torch.float32)
        radii = torch.tensor(r2, dtype=torch.float64).sqrt()  # torch's sqrt, as cdist's (numpy's can differ by 1 ulp)
        for chunk in (None, 1, 7, 100, 301, 1000):  # 7 and 100 do not divide 301 or 157
            assert torch.equal(knn_radii(r, k, chunk=chunk), radii)
            assert precision_recall(r, f, k, chunk=chunk) == (precision, recall)


def test_knn_metrics_do_not_depend_on_the_block_size():
    gen = torch.Generator().manual_seed(8)
    real, fake = torch.randn(1000, 16, generator=gen), torch.randn(777, 16, generator=gen) * 1.1 + 0.1
    whole_radii = knn_radii(real, 3, chunk=len(real))  # the whole n x n matrix in one block
    whole = precision_recall(real, fake, 3, chunk=max(len(real), len(fake)))
    exact = np.sort(scipy.spatial.distance.cdist(real.double().numpy(), real.double().numpy()), axis=1)[:, 3]
    np.testing.assert_allclose(whole_radii.numpy(), exact, rtol=1e-12)  # an independent distance computation
    assert 0.3 < whole[0] < 1 and 0.3 < whole[1] < 1
    for chunk in (None, 1, 7, 333, 999):
        torch.testing.assert_close(knn_radii(real, 3, chunk=chunk), whole_radii, rtol=1e-13, atol=0)
        assert precision_recall(real, fake, 3, chunk=chunk) == whole


def test_knn_distance_blocks_stay_within_the_bound(monkeypatch):
    """Memory: no distance block holds more than DISTANCE_BLOCK entries, whatever the set sizes (a fixed
    1024 rows of 60,000 reference features would be 0.5 GB of float64 distances)."""
    import sundae.eval.metrics as metrics

    gen = torch.Generator().manual_seed(9)
    real, fake = torch.randn(900, 8, generator=gen), torch.randn(400, 8, generator=gen)
    expected_radii, expected = knn_radii(real, 3, chunk=900), precision_recall(real, fake, 3, chunk=900)
    blocks = []
    cdist = torch.cdist

    def recording_cdist(a, b):
        blocks.append(len(a) * len(b))
        return cdist(a, b)

    monkeypatch.setattr(metrics, "DISTANCE_BLOCK", 5000)
    monkeypatch.setattr(metrics.torch, "cdist", recording_cdist)
    torch.testing.assert_close(knn_radii(real, 3), expected_radii, rtol=1e-13, atol=0)
    assert precision_recall(real, fake, 3) == expected
    # Blocks of 5 rows of 900 columns and 12 rows of 400: the radii of real (900 rows) in 180 blocks, then
    # those of real again and of fake (34), fake against real (80) and real against fake (75).
    assert max(blocks) <= 5000 and max(blocks) == 12 * 400 and len(blocks) == 180 + (180 + 34 + 80 + 75)


def test_gaussian_stats_accumulated_in_blocks_match_numpy(monkeypatch):
    import sundae.eval.metrics as metrics

    x = torch.randn(103, 5, generator=torch.Generator().manual_seed(10)) * 4 + 2
    monkeypatch.setattr(metrics, "STATS_BLOCK", 7)  # 103 = 14 blocks of 7 and one of 5
    mean, cov = metrics.gaussian_stats(x)
    assert mean.dtype == cov.dtype == torch.float64 and cov.shape == (5, 5)
    np.testing.assert_allclose(mean.numpy(), x.double().numpy().mean(0), rtol=1e-13)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_psnr_and_ssim_of_batches_equal_those_of_the_whole_set(monkeypatch):
    from skimage.metrics import structural_similarity

    import sundae.eval.metrics as metrics
    # PSNR by hand: every pixel off by 0.5 -> MSE 0.25, 10 log10(4 / 0.25) = 10 log10(16) dB.
    assert metrics.psnr(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)) == pytest.approx(10 * math.log10(16))
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(7, 1, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(7, 1, 32, 32, generator=gen)).clamp(-1, 1)
    squared = sum(metrics.squared_error(x[i:i + 3], y[i:i + 3]) for i in range(0, 7, 3))
    assert metrics.psnr_of_mse(squared / x.numel()) == pytest.approx(metrics.psnr(x, y), rel=1e-12)
    expected = np.mean([structural_similarity(x[i, 0].numpy(), y[i, 0].numpy(), data_range=2.0,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                        for i in range(7)])
    whole = metrics.ssim(x, y)
    monkeypatch.setattr(metrics, "SSIM_BATCH", 3)  # 7 images: batches of 3, 3 and 1
    assert metrics.ssim(x, y) == pytest.approx(whole, abs=1e-7) and whole == pytest.approx(expected, abs=1e-5)
