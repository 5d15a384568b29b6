"""Numerics at the edges: the adaptive GAN weight with zero gradients, attention with huge logits in half precision."""

import math

import pytest
import torch
from einops import rearrange
from torch import nn

from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Attention, Hourglass
from sundae.losses import adaptive_weight
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def test_adaptive_weight_with_zero_gradients_has_the_limit_values():
    layer = nn.Linear(4, 3)
    y = layer(torch.randn(5, 4))
    rec = (y**2).mean()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm().item()
    # Zero GAN gradient: ||g_rec|| / eps, clamped to max_weight, times disc_weight.
    w = adaptive_weight(rec, (y * 0).sum(), layer.weight, disc_weight=0.5, eps=1e-4, max_weight=1e4)
    assert math.isclose(w.item(), 0.5 * min(g_rec / 1e-4, 1e4), rel_tol=1e-5)
    w = adaptive_weight(rec, (y * 0).sum(), layer.weight, disc_weight=1.0, eps=1.0, max_weight=1e4)
    assert math.isclose(w.item(), g_rec / 1.0, rel_tol=1e-5)  # an eps that does not hit the clamp
    # Zero reconstruction gradient: weight 0; both zero: 0 / eps = 0, never NaN.
    assert adaptive_weight((y * 0).sum(), -y.mean(), layer.weight, 1.0).item() == 0.0
    assert adaptive_weight((y * 0).sum(), (y * 0).sum(), layer.weight, 1.0).item() == 0.0


def _autocast_or_skip(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 1, 2, 4),) * 3)
    except RuntimeError as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"CPU autocast to {dtype} not supported here: {err}")
    return torch.autocast("cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_with_logits_beyond_fp16_range_stays_finite(dtype):
    cfg = HG["tiny"]
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        attn.to_q.weight.mul_(1000)
        attn.to_kv.weight[: cfg.heads * cfg.head_dim].mul_(1000)  # keys only; values stay moderate
    x = torch.randn(2, 16, cfg.dim)
    with torch.no_grad():
        q = rearrange(attn.to_q(x), "b n (heads e) -> b heads n e", heads=cfg.heads)
        k = rearrange(attn.to_kv(x)[..., : cfg.heads * cfg.head_dim], "b n (heads e) -> b heads n e", heads=cfg.heads)
        logits = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        # The premise: these logits overflow float16, and q and k themselves do not.
        assert logits.abs().max() > 10 * FP16_MAX and max(q.abs().max(), k.abs().max()) < FP16_MAX
        mask = torch.ones(16, dtype=torch.bool)
        mask[-5:] = False  # the padding path too
        with _autocast_or_skip(dtype):
            for m in (None, mask[None, None, None, :]):
                assert torch.isfinite(attn(x, x, mask=m).float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_networks_under_autocast_with_large_attention_weights_stay_finite(dtype):
    torch.manual_seed(0)
    net = Hourglass(HG["tiny"]).eval()
    vq = VQGAN(VQ["tiny"]).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Attention):
                m.to_q.weight.mul_(300)
                m.to_kv.weight.mul_(300)
        for name, p in vq.named_parameters():
            if "qkv" in name:
                p.mul_(300)
        with _autocast_or_skip(dtype):
            logits = net(torch.randint(0, 64, (2, 7, 9)), torch.tensor([1, 2]))  # odd grid: masked attention
            images = vq.decode(vq.encode(torch.rand(2, 3, 30, 17) * 2 - 1), size=(30, 17))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert images.shape == (2, 3, 30, 17) and torch.isfinite(images).all()
