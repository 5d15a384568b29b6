import math

import pytest
import torch
import torch.nn.functional as F

from sundae.eval.metrics import psnr
from sundae.vqgan import PRESETS, VQGAN, VectorQuantizer, pad_to_multiple


@pytest.mark.parametrize("name", ["tiny", "fashion"])
def test_shapes_and_round_trip(name):
    cfg = PRESETS[name]
    model = VQGAN(cfg).eval()
    x = torch.rand(2, cfg.in_channels, 32, 32) * 2 - 1
    x_hat, vq_loss, tokens = model(x)
    assert x_hat.shape == x.shape
    assert vq_loss.ndim == 0 and vq_loss.item() >= 0
    assert tokens.shape == (2, 32 // cfg.f, 32 // cfg.f) and tokens.dtype == torch.int64
    assert torch.equal(model.encode(x), tokens)
    decoded = model.decode(tokens)
    assert decoded.shape == x.shape and decoded.min() >= -1 and decoded.max() <= 1
    # decode(encode(x)) is the forward reconstruction, clamped.
    torch.testing.assert_close(decoded, x_hat.clamp(-1, 1))


def test_non_square_grid():
    model = VQGAN(PRESETS["tiny"]).eval()
    assert model.encode(torch.zeros(1, 3, 16, 40)).shape == (1, 4, 10)


def test_downsampling_factor_of_presets():
    assert PRESETS["ffhq256"].f == 16 and PRESETS["ffhq256"].codebook_size == 1024
    assert PRESETS["ffhq1024"].f == 32 and PRESETS["ffhq1024"].codebook_size == 8192
    assert PRESETS["ffhq1024"].resolution // PRESETS["ffhq1024"].f == 32


def test_bad_sizes_raise():
    model = VQGAN(PRESETS["tiny"])
    with pytest.raises(ValueError, match="multiple of"):
        model(torch.zeros(1, 3, 30, 32))  # training takes only multiples of f
    with pytest.raises(ValueError, match="does not match"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long), size=(40, 32))
    with pytest.raises(ValueError, match="channels|shape"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 2, 2), 64))


def test_quantizer_picks_nearest_code():
    vq = VectorQuantizer(3, 2, beta=0.25)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]))
    z = torch.tensor([[0.1, -0.1], [0.9, 1.2], [-1.5, 0.4], [0.6, 0.6]]).t().reshape(1, 2, 2, 2)
    tokens = vq.lookup(z)
    assert tokens.flatten().tolist() == [0, 1, 2, 1]


def test_quantizer_gradient_split():
    """Codebook term (weight 1) moves the codes; commitment term (weight beta) moves the encoder output.

    Expected gradients, from L = mean((sg[z] - e)^2) + beta * mean((z - sg[e])^2) over N values:
    dL/dz = 2 beta (z - e) / N and dL/de_k = sum over positions using code k of 2 (e_k - z) / N.
    """
    beta = 0.25
    vq = VectorQuantizer(4, 3, beta=beta)
    torch.manual_seed(0)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    z_q, loss, tokens = vq(z)
    loss.backward()
    e = vq.codebook.weight.detach()[tokens].permute(0, 3, 1, 2)
    n = z.numel()
    torch.testing.assert_close(z.grad, 2 * beta * (z.detach() - e) / n)
    expected = torch.zeros_like(vq.codebook.weight)
    flat_tokens = tokens.flatten()
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    expected.index_add_(0, flat_tokens, 2 * diff / n)
    torch.testing.assert_close(vq.codebook.weight.grad, expected)


def test_straight_through_passes_gradient_unchanged():
    vq = VectorQuantizer(8, 4, beta=0.25)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    z_q, _, tokens = vq(z)
    # Forward value is the code; the gradient of sum(w * z_q) w.r.t. z is w.
    torch.testing.assert_close(z_q, vq.embed(tokens))
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = VQGAN(PRESETS["tiny"])
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x = F.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # smooth images
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = psnr(model(x)[0].detach(), x)
    for _ in range(150):
        x_hat, vq_loss, _ = model(x)
        loss = (x - x_hat).abs().mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = psnr(model(x)[0].detach(), x)
    assert end > start + 6, (start, end)
    assert math.isfinite(end)


def test_any_size_round_trip_pads_by_edge_replication_and_crops_back():
    torch.manual_seed(0)
    model = VQGAN(PRESETS["tiny"]).eval()  # f = 4
    x = torch.rand(2, 3, 30, 17) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 5)  # ceil(30/4), ceil(17/4)
    # The padding is edge replication: the same as encoding a 32x20 image whose extra rows/columns
    # repeat the last real row/column, built here by indexing instead of F.pad.
    rows = torch.arange(32).clamp(max=29)
    cols = torch.arange(20).clamp(max=16)
    assert torch.equal(tokens, model.encode(x[:, :, rows][:, :, :, cols]))
    out = model.decode(tokens, size=(30, 17))
    assert out.shape == x.shape
    assert torch.equal(out, model.decode(tokens)[..., :30, :17])
    assert pad_to_multiple(x[:, :, :28, :16], 4).shape == (2, 3, 28, 16)  # already multiples: unchanged
