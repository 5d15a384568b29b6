"""Training-only losses of the VQ-GAN tokenizer (Esser et al., arXiv 2012.09841, section 3.1).

LPIPS perceptual loss (a VGG16 read from a local file, the learned heads shipped with the package), the
PatchGAN discriminator, hinge losses and the adaptive weight that balances the GAN term against
reconstruction. None of this ships in a tokenizer checkpoint.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's `features`


def _load_tensors(path: Path, expected: str) -> dict[str, Tensor]:
    """A state dict of tensors from `path`; ValueError naming the file and `expected` for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False, which would run the file's code
        try:
            refused = ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))) or "unnamed"
        except Exception:
            refused = "unnamed"
        raise ValueError(f"{path}: refused: it holds pickled objects beyond tensors ({refused}), and loading "
                         f"those could run code: expected {expected}") from None
    except Exception as err:  # KeyError on text files, EOFError, RuntimeError on zip damage, ...
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(err).__name__}: {err}): "
                         f"expected {expected}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: expected {expected}")
    other = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if other is not None:
        raise ValueError(f"{path} is not a state dict of tensors ({other!r} holds a {type(state[other]).__name__}): "
                         f"expected {expected}")
    return state


def _check_keys(path: Path, state: dict[str, Tensor], want: dict[str, torch.Size], expected: str) -> None:
    """ValueError naming `path`, the missing keys and the wrong shapes unless `state` has every key of `want`
    with its shape (extra keys are allowed)."""
    missing = [k for k in want if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} (want {tuple(v)})" for k, v in want.items()
             if k in state and state[k].shape != v]

    def listed(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    parts = [f"missing key(s) {listed(missing)}"] if missing else []
    parts += [f"wrong shape {listed(wrong)}"] if wrong else []
    if parts:
        raise ValueError(f"{path} is not {expected}: {'; '.join(parts)}")


def default_vgg16_path() -> Path:
    """Where the perceptual loss looks for VGG16 weights: $SUNDAE_HOME (default ~/.cache/sundae)/vgg16.pth."""
    return Path(os.environ.get("SUNDAE_HOME", Path.home() / ".cache" / "sundae")) / "vgg16.pth"


# LPIPS's learned linear heads for VGG, shipped with the package: the `lpips` package's weights/v0.1/vgg.pth,
# unchanged, under its BSD-2-Clause licence (weights/LICENSE-lpips.txt beside it).
LPIPS_HEADS_PATH = Path(__file__).parent / "weights" / "lpips_vgg_v0.1.pth"
_STAGE_WIDTHS = (64, 128, 256, 512, 512)
# Released key -> ours. The released heads are nn.Sequential(Dropout, Conv2d): the conv is `model.1`.
_HEAD_KEYS = {f"lin{i}.model.1.weight": f"heads.{i}.weight" for i in range(len(_STAGE_WIDTHS))}


class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018), as published: a frozen VGG16 backbone and the learned
    linear heads.

    d(x, y) = sum over the 5 stages s of mean over positions of sum_c w_s[c] * (fx_s - fy_s)[c]^2, where
    fx_s (`b c_s h_s w_s`) is stage s's relu output (relu1_2 .. relu5_3) unit-normalised over channels and
    w_s the head of stage s, a 1x1 convolution without bias from c_s = 64, 128, 256, 512, 512 channels to 1
    (`heads[s]`, weight `1 c_s 1 1`, every entry >= 0 as released). These heads are what the VQ-GAN loss
    weights (perceptual 1.0) were tuned with (taming-transformers' LPIPS loads the same file). The "baseline"
    variant with every channel weighted 1 is not offered: the released weights average 0.07 to 0.11 per
    channel in each stage, so it gives values roughly 10x larger and upsets that balance.

    `vgg16_path` (default `default_vgg16_path()`) holds torchvision's VGG16 state dict (`features.N.weight`
    keys); it is not shipped and never downloaded at run time. `heads_path` (default `LPIPS_HEADS_PATH`, the
    released v0.1 heads shipped with sundae) holds the heads in the released layout (`linK.model.1.weight`).

    Raises FileNotFoundError naming the expected path and where to get the file; ValueError naming the file
    when it is not readable PyTorch weights or lacks a key (or has one of another shape) of that layout.
    """

    def __init__(self, vgg16_path: str | Path | None = None, heads_path: str | Path | None = None):
        super().__init__()
        path = Path(vgg16_path) if vgg16_path else default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual loss needs VGG16 weights at {path}: download {VGG16_URL} and save it there "
                f"(or pass vgg16_path=...), or set perceptual_weight=0 to train without it"
            )
        layers: list[nn.Module] = []
        c_in = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, int(item), 3, padding=1), nn.ReLU()]
                c_in = int(item)
        self.features = nn.Sequential(*layers)
        expected = (f"torchvision's VGG16 weights ({VGG16_URL.rsplit('/', 1)[1]} layout: features.N.weight and "
                    f"features.N.bias for its 13 conv layers), from {VGG16_URL}")
        state = _load_tensors(path, expected)
        want = {f"features.{k}": v.shape for k, v in self.features.state_dict().items()}
        _check_keys(path, state, want, expected)
        self.features.load_state_dict({k.removeprefix("features."): state[k] for k in want})

        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _STAGE_WIDTHS)
        heads_path = Path(heads_path) if heads_path else LPIPS_HEADS_PATH
        heads_expected = "LPIPS's linear heads for VGG (lin0..lin4.model.1.weight of shape 1 c 1 1, c = 64 .. 512)"
        if not heads_path.is_file():
            hint = " (shipped with sundae: reinstall the package)" if heads_path == LPIPS_HEADS_PATH else ""
            raise FileNotFoundError(f"LPIPS linear heads {heads_path} do not exist{hint}: expected {heads_expected}")
        released = _load_tensors(heads_path, heads_expected)
        _check_keys(heads_path, released, {k: torch.Size((1, c, 1, 1)) for k, c in zip(_HEAD_KEYS, _STAGE_WIDTHS)},
                    heads_expected)
        self.heads.load_state_dict({ours.removeprefix("heads."): released[theirs].float()
                                    for theirs, ours in _HEAD_KEYS.items()})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.requires_grad_(False).eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """`b c H W` float images (c = 1 or 3) -> `b` float32 distances, 0 for identical inputs.

        `x` is the real image and must lie in [-1, 1] (uint8 or [0, 255] input raises ValueError; [0, 1]
        floats cannot be told apart and give other numbers); `y`, a reconstruction, may leave the range.
        Features are unit-normalised per position in float32 with x * rsqrt(|x|^2 + 1e-20), which stays
        finite, with a finite gradient, for all-zero feature vectors and under fp16/bf16 autocast (an eps
        of 1e-10 added to the norm rounds to 0 in fp16 and gave NaN); the heads run in float32 too.
        """
        for name, t in (("x", x), ("y", y)):
            if not t.is_floating_point():
                raise ValueError(f"LPIPS expects float images in [-1, 1], got {name} of dtype {t.dtype}")
        lo, hi = x.min().item(), x.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"LPIPS expects the real images x in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        for head, fx, fy in zip(self.heads, self._taps(x), self._taps(y)):
            fx, fy = fx.float(), fy.float()
            fx = fx * torch.rsqrt(fx.square().sum(1, keepdim=True) + 1e-20)
            fy = fy * torch.rsqrt(fy.square().sum(1, keepdim=True) + 1e-20)
            with torch.autocast(x.device.type, enabled=False):  # autocast would run the 1x1 conv in fp16/bf16
                dist = dist + head((fx - fy).square()).mean((1, 2, 3))
        return dist


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): `b c H W` images -> `b 1 h' w'` real/fake logits."""

    def __init__(self, in_channels: int = 3, filters: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, filters, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(filters * prev, filters * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(filters * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(filters * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: -mean D(x_hat)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float,
                    eps: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_L(rec)|| / (||grad_L(gan)|| + eps), clamped to [0, max_weight], detached, times
    `disc_weight` (Esser et al. eq. 7), where L is the decoder's last layer weight.

    Finite whenever the gradients are: a zero (or absent) gradient counts as norm 0, and eps keeps the
    denominator positive.
    """
    def grad_norm(loss: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        return last_layer.new_zeros(()) if g is None else g.float().norm()

    weight = grad_norm(rec_loss) / (grad_norm(g_loss) + eps)
    return weight.clamp(0.0, max_weight).detach() * disc_weight
