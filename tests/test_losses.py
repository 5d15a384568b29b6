import math

import pytest
import torch
from torch import nn

from sundae.losses import LPIPS, PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss


def test_hinge_losses():
    # Confident and correct discriminator: no loss; undecided (0, 0): 0.5 * (1 + 1) = 1.
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_discriminator_is_patchgan():
    d = PatchDiscriminator(3, filters=8, n_layers=3)
    out = d(torch.randn(2, 3, 64, 64))
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, kernel 4, padding 1): a 6x6 grid of patch logits.
    assert out.shape == (2, 1, 6, 6)


def _last_layer_setup():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    return layer, layer(x)


def test_adaptive_weight_is_gradient_norm_ratio():
    layer, y = _last_layer_setup()
    rec, gan = (y**2).mean(), -(3 * y).mean()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0].norm()
    w = adaptive_weight(rec, gan, layer.weight, disc_weight=0.5)
    torch.testing.assert_close(w, (g_rec / (g_gan + 1e-4)) * 0.5)
    assert not w.requires_grad


def test_adaptive_weight_finite_when_a_gradient_is_zero():
    layer, y = _last_layer_setup()
    rec = (y**2).mean()
    zero_gan = (y * 0).sum()
    w = adaptive_weight(rec, zero_gan, layer.weight, disc_weight=1.0)
    assert math.isfinite(w.item()) and 0 < w.item() <= 1e4  # eps keeps it finite, the clamp bounds it
    w = adaptive_weight((y * 0).sum(), -(y.mean()), layer.weight, disc_weight=1.0)
    assert w.item() == 0.0
    # A GAN loss that does not touch the layer at all counts as a zero gradient.
    unrelated = nn.Parameter(torch.ones(()))
    w = adaptive_weight(rec, unrelated * 2, layer.weight, disc_weight=1.0)
    assert math.isfinite(w.item())


def test_lpips_missing_weights_message(tmp_path):
    missing = tmp_path / "nope" / "vgg16.pth"
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(missing)
    assert str(missing) in str(err.value) and "vgg16-397923af.pth" in str(err.value)


def _torchvision_vgg16_state() -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict with random weights: `features.N.*` for every conv."""
    torch.manual_seed(0)
    state, c_in, idx = {}, 3, 0
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(item, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{idx}.bias"] = torch.zeros(item)
        c_in, idx = item, idx + 2
    state["classifier.0.weight"] = torch.zeros(1)  # ignored
    return state


def test_lpips_garbage_weights_are_named(tmp_path, monkeypatch):
    # A text file saved where the weights belong ($SUNDAE_HOME/vgg16.pth): torch.load raises KeyError.
    monkeypatch.setenv("SUNDAE_HOME", str(tmp_path))
    (tmp_path / "vgg16.pth").write_text("error: 404 not found\n")
    with pytest.raises(ValueError) as err:
        LPIPS()
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'vgg16.pth'} is not a readable PyTorch weights file")
    assert "vgg16-397923af.pth layout" in msg and "features.N.weight" in msg
    # Readable, but not a state dict / wrong keys / wrong shapes: each named.
    bad = tmp_path / "bad.pth"
    torch.save([1, 2], bad)
    with pytest.raises(ValueError, match=r"bad.pth holds a list, not a state dict of tensors: expected torchvision"):
        LPIPS(bad)
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ValueError, match=r"bad.pth is not a state dict of tensors \('epoch' holds a int\)"):
        LPIPS(bad)
    state = _torchvision_vgg16_state()
    torch.save({k.replace("features.", "backbone."): v for k, v in state.items()}, bad)
    # 13 convs x (weight, bias) = 26 keys missing; the first four are listed.
    with pytest.raises(ValueError, match=r"bad.pth is not torchvision's VGG16 weights \(vgg16-397923af.pth layout.*"
                                         r"missing key\(s\) features.0.weight, features.0.bias, features.2.weight, "
                                         r"features.2.bias, ... \(26 in all\)$"):
        LPIPS(bad)
    state["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"wrong shape features.28.weight \(512, 512, 1, 1\) "
                                         r"\(want \(512, 512, 3, 3\)\)$"):
        LPIPS(bad)
    # The optional linear heads get the same care.
    good = tmp_path / "good.pth"
    torch.save(_torchvision_vgg16_state(), good)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match=r"bad.pth is not LPIPS's linear heads .*missing key\(s\) lin1.model.1.weight"):
        LPIPS(good, bad)


def test_lpips_loads_torchvision_layout(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(), path)
    lpips = LPIPS(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    gray = torch.rand(2, 1, 32, 32)
    assert lpips(gray, gray * 0.5).shape == (2,)
    assert not any(p.requires_grad for p in lpips.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lpips_finite_under_half_precision_autocast(tmp_path, dtype):
    weights = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(), weights)
    lpips = LPIPS(weights)
    torch.manual_seed(0)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    for x, y in ((real, real.clone()), (torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)),
                 (real, torch.zeros(2, 3, 32, 32))):
        y = y.requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            d = lpips(x, y)
        d.sum().backward()
        assert d.dtype == torch.float32 and d.isfinite().all() and y.grad.isfinite().all(), (d, dtype)
        if torch.equal(x, y.detach()):
            assert d.abs().max().item() < 1e-3


def test_lpips_refuses_images_outside_minus_one_to_one(tmp_path):
    weights = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(), weights)
    lpips = LPIPS(weights)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="float images in \\[-1, 1\\], got x of dtype torch.uint8"):
        lpips(x.to(torch.uint8), x)
    with pytest.raises(ValueError, match=r"real images x in \[-1, 1\], got values in \[0, 255\]"):
        lpips(x + 255 * (torch.arange(32) % 2).float(), x)
