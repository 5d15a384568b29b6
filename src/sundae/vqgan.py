"""VQ-GAN tokenizer: conv encoder, vector quantizer, conv decoder (Esser et al., arXiv 2012.09841).

Reads top to bottom: building blocks, encoder, quantizer, decoder, the `VQGAN` that ties them, presets.
Training-only pieces (perceptual loss, discriminator) live in `sundae.losses`.

The layers are those of the taming-transformers VQModel the paper's 256x256 tokenizers come from (GroupNorm
with eps 1e-6, single-head attention scaled by 1/sqrt(c), right/bottom padding before each strided conv,
nearest upsampling), so their weights load by renaming alone (`sundae.convert`; `tests/test_convert.py`
checks the outputs against the reference code). Only the quantizer loss's beta placement differs (see
`VectorQuantizer`), which matters for training, not for encoding or decoding.

Shapes: images `b c H W` float in [-1, 1]; latents `b d h w`; tokens `b h w` int64 in [0, codebook_size).
The downsampling factor is f = 2 ** (len(ch_mult) - 1), so h = H / f and w = W / f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of the tokenizer; defaults are the paper's 256x256 FFHQ model.

    `resolution` (pixels) only decides at which levels self-attention sits (`attn_resolutions`);
    the network itself accepts any H, W divisible by f.
    """

    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    beta: float = 0.25  # commitment weight, on the encoder side only (van den Oord et al. eq. 3)
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if (not self.ch_mult or min(self.ch_mult) < 1
                or min(self.ch, self.codebook_size, self.embed_dim, self.z_channels) < 1):
            raise ValueError(f"VQGANConfig needs a non-empty ch_mult and positive widths, got {self}")

    @property
    def f(self) -> int:
        """Downsampling factor in pixels per token side."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(cfg: VQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(cfg.norm_groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, 3x3 conv, twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, cfg: VQGANConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cfg, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(cfg, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all `h w` positions of a feature map, residual."""

    def __init__(self, cfg: VQGANConfig, c: int):
        super().__init__()
        self.norm = _norm(cfg, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W (padding right/bottom only, so even sizes halve exactly)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(cfg: VQGANConfig, c: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(cfg, c, c), AttnBlock(cfg, c), ResnetBlock(cfg, c, c))


class Encoder(nn.Module):
    """`b c H W` images -> `b embed_dim h w` continuous latents (before quantization)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        layers: list[nn.Module] = []
        c, res = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(cfg, c, cfg.ch * mult))
                c = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cfg, c))
            if level != len(cfg.ch_mult) - 1:
                layers.append(Downsample(c))
                res //= 2
        self.down = nn.Sequential(*layers)
        self.mid = _mid(cfg, c)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    """`b embed_dim h w` quantized latents -> `b c H W` images (unbounded; trained towards [-1, 1])."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.f
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(cfg, c)
        layers: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(cfg, c, cfg.ch * cfg.ch_mult[level]))
                c = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cfg, c))
            if level != 0:
                layers.append(Upsample(c))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(self.post_quant_conv(z))))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient (van den Oord et al. 2017).

    The loss is ``||sg[z] - e||^2 + beta * ||z - sg[e]||^2``: the codebook term (weight 1) moves the codes,
    the commitment term (weight beta) moves the encoder. taming-transformers' legacy default swaps the
    weights; we follow the paper.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def lookup(self, z: Tensor) -> Tensor:
        """`b d h w` float latents -> `b h w` int64 indices of the nearest code by L2 distance, computed in
        float32 also under autocast (which would run the matmul in bf16/fp16 and pick wrong codes)."""
        with torch.autocast(z.device.type, enabled=False):
            flat = rearrange(z, "b d h w -> (b h w) d").float()
            e = self.codebook.weight.float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, tokens: Tensor) -> Tensor:
        """`b h w` int64 tokens -> `b d h w` codebook vectors, contiguous.

        Contiguous, not the channels-last view the permutation gives: a channels-last input would carry that
        memory format through the whole decoder, whose GroupNorm then takes a CPU path with about 4x the
        fp32 rounding error (measured against float64 in tests/test_convert.py's parity setting).
        """
        return rearrange(self.codebook(tokens), "b h w d -> b d h w").contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize `z` (`b d h w`).

        Returns (z_q straight-through `b d h w`, VQ loss scalar = codebook + beta * commitment,
        tokens `b h w` int64).
        """
        tokens = self.lookup(z)
        e = self.embed(tokens)
        codebook_loss = F.mse_loss(e, z.detach())
        commitment_loss = F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()
        return z_q, codebook_loss + self.beta * commitment_loss, tokens


def token_grid(height: int, width: int, f: int) -> tuple[int, int]:
    """Token grid (h, w) for an H x W image: ceil(H / f) x ceil(W / f) (the padding policy of `VQGAN.encode`)."""
    return -(-height // f), -(-width // f)


def pad_to_multiple(x: Tensor, f: int) -> Tensor:
    """Pad `b c H W` on the right and bottom, replicating the edge pixels, to the next multiple of f.

    Replicated edges (not zeros) keep the padded cells close to real image content, so the codes of the
    real border cells are not pulled towards black. Works for any H, W >= 1; `crop` undoes it.
    """
    h, w = token_grid(x.shape[-2], x.shape[-1], f)
    pad_h, pad_w = h * f - x.shape[-2], w * f - x.shape[-1]
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


class VQGAN(nn.Module):
    """The tokenizer: `encode` images to tokens, `decode` tokens to images (Esser et al. section 3).

    Size policy: `encode` takes any H x W, padding right and bottom by edge replication to multiples of f
    (`pad_to_multiple`), and `decode(tokens, size=(H, W))` crops the decoded image back, so a round trip
    returns the input size. The training `forward` takes only multiples of f (raises ValueError otherwise).
    """

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta)
        self.decoder = Decoder(cfg)

    def _check(self, x: Tensor, multiple: bool = True) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images of shape (b, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.cfg.f
        if multiple and (x.shape[2] % f or x.shape[3] % f):
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the tokenizer's f={f}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`b c H W` in [-1, 1] -> (reconstruction `b c H W`, VQ loss scalar, tokens `b h w`)."""
        self._check(x)
        z_q, vq_loss, tokens = self.quantizer(self.encoder(x))
        return self.decoder(z_q), vq_loss, tokens

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """`b c H W` float images in [-1, 1], any H, W -> `b h w` int64 tokens, h = ceil(H/f), w = ceil(W/f).

        Sides that are not multiples of f are padded first (`pad_to_multiple`).
        Raises ValueError for a wrong channel count.
        """
        self._check(x, multiple=False)
        return self.quantizer.lookup(self.encoder(pad_to_multiple(x, self.cfg.f)))

    @torch.no_grad()
    def decode(self, tokens: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """`b h w` int64 tokens -> `b c H W` float images clamped to [-1, 1].

        H, W = `size` (pixels; the image size given to `encode`, cropped from the top left) or h*f, w*f.
        Raises ValueError for ids outside [0, codebook_size) or a `size` that does not fit the token grid.
        """
        if size is not None and token_grid(*size, self.cfg.f) != tuple(tokens.shape[-2:]):
            raise ValueError(f"image size {size[0]}x{size[1]} does not match a {tokens.shape[-2]}x{tokens.shape[-1]} "
                             f"token grid at f={self.cfg.f}")
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens of shape (b, h, w), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.codebook_size}), "
                             f"got [{tokens.min()}, {tokens.max()}]")
        images = self.decoder(self.quantizer.embed(tokens)).clamp(-1, 1)
        return images if size is None else images[..., :size[0], :size[1]]

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's final conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight


PRESETS: dict[str, VQGANConfig] = {
    # For tests: f=4, a few thousand parameters.
    "tiny": VQGANConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                        z_channels=16, embed_dim=16, codebook_size=64, norm_groups=8),
    # Quickstart on Fashion-MNIST (28x28 padded to 32x32, grayscale): f=4, 8x8 tokens.
    "fashion": VQGANConfig(in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                           resolution=32, z_channels=32, embed_dim=32, codebook_size=256, norm_groups=8),
    "ffhq256": VQGANConfig(),
    # The paper's megapixel tokenizer: f=32, 8192 codes, 32x32 tokens.
    "ffhq1024": VQGANConfig(ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(64,),
                            resolution=1024, codebook_size=8192),
}
