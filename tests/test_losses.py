import hashlib
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sundae.losses import LPIPS, LPIPS_HEADS_PATH, PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss


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
    # Heads other than the shipped ones get the same care.
    good = tmp_path / "good.pth"
    torch.save(_torchvision_vgg16_state(), good)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match=r"bad.pth is not LPIPS's linear heads .*missing key\(s\) lin1.model.1.weight"):
        LPIPS(good, bad)
    with pytest.raises(FileNotFoundError, match=r"LPIPS linear heads .*nope.pth do not exist: expected LPIPS's"):
        LPIPS(good, tmp_path / "nope.pth")


def _released_heads() -> dict[str, torch.Tensor]:
    return torch.load(LPIPS_HEADS_PATH, map_location="cpu", weights_only=True)


def test_shipped_heads_are_lpips_v0_1_with_their_licence():
    # sha256 of weights/v0.1/vgg.pth in the lpips 0.1.4 wheel on PyPI; its md5, d507d734..., is the one
    # taming-transformers checks for its "vgg_lpips" download: the heads the paper's VQ-GAN was trained with.
    data = LPIPS_HEADS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
    assert hashlib.md5(data).hexdigest() == "d507d7349b931f0638a25a48a722f98a"
    notice = (LPIPS_HEADS_PATH.parent / "LICENSE-lpips.txt").read_text()
    assert "Copyright (c) 2018, Richard Zhang, Phillip Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang" in notice
    assert "Redistributions in binary form must reproduce the above copyright notice" in notice


def test_lpips_heads_load_into_our_module(tmp_path):
    weights = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(), weights)
    lpips = LPIPS(weights)
    released = _released_heads()
    assert len(lpips.heads) == 5
    for i, (head, width) in enumerate(zip(lpips.heads, (64, 128, 256, 512, 512))):
        assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.bias is None
        assert (head.in_channels, head.out_channels) == (width, 1)
        # Our key names, the released values: lin{i}.model.1.weight -> heads.{i}.weight.
        assert torch.equal(lpips.state_dict()[f"heads.{i}.weight"], released[f"lin{i}.model.1.weight"])
        assert head.weight.min() >= 0 and head.weight.sum() > 0  # as released: non-negative, not all zero
        assert not head.weight.requires_grad


def _lpips_by_hand(state: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """LPIPS-VGG written from the paper's definition in float64, independently of sundae.losses: VGG16's
    relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 outputs (conv 2, 4, 7, 10, 13 of torchvision's layout),
    each divided by its channel norm (+1e-10, as the lpips package), squared differences weighted by the
    head, summed over channels, averaged over positions, summed over the stages."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.")})
    pools_after = {1, 3, 6, 9}  # a 2x2 max-pool follows conv 2, 4, 7 and 10 (0-based 1, 3, 6, 9)
    taps = {1, 3, 6, 9, 12}

    def stages(img: torch.Tensor) -> list[torch.Tensor]:
        h, out = (img.double() - shift) / scale, []
        for n, idx in enumerate(convs):
            h = F.relu(F.conv2d(h, state[f"features.{idx}.weight"].double(), state[f"features.{idx}.bias"].double(),
                                padding=1))
            if n in taps:
                out.append(h)
            if n in pools_after:
                h = F.max_pool2d(h, 2)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for s, (fx, fy) in enumerate(zip(stages(x), stages(y))):
        fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{s}.model.1.weight"].double().view(1, -1, 1, 1)
        total += (w * (fx - fy) ** 2).sum(1).mean((1, 2))
    return total


def test_lpips_value_equals_the_formula_by_hand(tmp_path):
    state = _torchvision_vgg16_state()  # random backbone fixed by seed 0
    weights = tmp_path / "vgg16.pth"
    torch.save(state, weights)
    lpips = LPIPS(weights)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(-1, 1)
    expected = _lpips_by_hand(state, _released_heads(), x, y)
    got = lpips(x, y)
    assert got.dtype == torch.float32 and (expected > 0).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    # The heads matter: with every channel weighted 1 (the unweighted baseline) the value is another one.
    ones = {k: torch.ones_like(v) for k, v in _released_heads().items()}
    assert (_lpips_by_hand(state, ones, x, y) > 3 * expected).all()


def test_lpips_loads_torchvision_layout(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(), path)
    lpips = LPIPS(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))  # identical features: every squared difference is 0
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


def test_wheel_ships_the_heads_and_their_licence(tmp_path):
    # Built from a copy of the sources, so the checkout gets no build/ or egg-info folders.
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(tmp_path)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sundae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"sundae/weights/lpips_vgg_v0.1.pth", "sundae/weights/LICENSE-lpips.txt"} <= set(names)
