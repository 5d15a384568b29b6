"""Non-causal 2D hourglass transformer: the SUNDAE denoiser (Nawrot et al. 2021, McKinney & Willcocks 2022).

Reads top to bottom: config, 2D axial rotary embedding, attention, blocks, the hourglass, presets.

The hourglass runs `pre` blocks on the full `h x w` token grid, shortens it by merging s x s *spatial*
patches (s = `shorten_factor`, 2 in the paper, so k = 4 tokens merge), runs the `valley` blocks on the
`h/s x w/s` grid, upsamples back into the same patches, adds the pre-shortening residual and runs the
`post` blocks. The 1D original merges k raster-consecutive tokens, i.e. pixels of one row; McKinney &
Willcocks section 3.2 merge square patches instead; `shorten_mode="1d"` keeps the original for the
ablation (s*s consecutive tokens of one row, a `h x w/(s*s)` valley). Both resampling steps are followed
by an attention block restricted to the tokens of one patch.

Any `h x w` grid works: it is padded right and bottom to multiples of the patch sides, and the padding is
invisible to the real positions (masked as attention keys, zero in the patch merge), so their logits depend
neither on what the padding holds nor on how much of it there is.

Shapes: tokens `b h w` int64 in [0, v); labels `b` int64; logits `b h w v` float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sundae.conditioning import ClassEmbedding, TextConditioning


@dataclass(frozen=True)
class HourglassConfig:
    """Architecture of the denoiser; defaults are the paper's FFHQ256 model (about 178M parameters)."""

    codebook_size: int = 1024
    dim: int = 1024
    heads: int = 8
    head_dim: int = 64
    depth: tuple[int, int, int] = (2, 10, 2)  # (pre, valley, post) blocks
    mlp_ratio: int = 4
    shorten_factor: int = 2  # tokens per patch side; s * s tokens merge into one
    shorten_mode: str = "2d"  # "2d": s x s spatial patches (the paper); "1d": s*s raster-consecutive tokens
    num_classes: int = 0  # 0: unconditional
    text_dim: int = 0  # width of the text encoder's features; 0: no text conditioning
    rotary_base: float = 10000.0

    def __post_init__(self) -> None:
        if len(self.depth) != 3 or min(self.depth) < 0:
            raise ValueError(f"depth must be three block counts (pre, valley, post), got {self.depth}")
        if min(self.codebook_size, self.dim, self.heads, self.head_dim, self.shorten_factor) < 1:
            raise ValueError("codebook_size, dim, heads, head_dim and shorten_factor must be positive")
        if self.num_classes < 0 or self.text_dim < 0:
            raise ValueError("num_classes and text_dim must be >= 0")
        if self.shorten_mode not in ("2d", "1d"):
            raise ValueError(f"shorten_mode must be '2d' or '1d', got {self.shorten_mode!r}")

    @property
    def patch(self) -> tuple[int, int]:
        """(rows, columns) of the tokens merged into one valley token: (s, s), or (1, s*s) for "1d"."""
        s = self.shorten_factor
        return (s, s) if self.shorten_mode == "2d" else (1, s * s)


def rotary_angles(h: int, w: int, head_dim: int, base: float, stride: float | tuple[float, float] = 1.0,
                  device: torch.device | None = None) -> Tensor:
    """2D axial rotary angles, `(h w) head_dim/2` float32 in radians (Su et al. 2021, made axial).

    The first half of the rotated channel pairs turns with the row, the second half with the column.
    `stride` is the distance between grid points in full-resolution tokens, so a valley token sits at
    the centre of the patch it came from; a (rows, columns) pair for patches that are not square.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2D rotary embeddings, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    stride_r, stride_c = stride if isinstance(stride, tuple) else (stride, stride)
    rows = torch.arange(h, device=device, dtype=torch.float32) * stride_r + (stride_r - 1) / 2
    cols = torch.arange(w, device=device, dtype=torch.float32) * stride_c + (stride_c - 1) / 2
    ang_r = (rows[:, None] * freqs)[:, None, :].expand(h, w, quarter)
    ang_c = (cols[:, None] * freqs)[None, :, :].expand(h, w, quarter)
    return rearrange(torch.cat([ang_r, ang_c], -1), "h w n -> (h w) n")


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs of `x` (`b heads n head_dim`) by `angles` (`n head_dim/2`), in every head.

    Pair (x1, x2) becomes (x1 cos - x2 sin, x1 sin + x2 cos), in float32. Run eagerly it is one complex
    product (x1 + i x2) * e^(i angle): on the CPU its forward and backward take a fifth of the time of the
    real form, whose strided slices and stack cost 10% of a quickstart training step (one thread, the Xeon
    of benchmarks/RESULTS.md). Under `torch.compile` the real form is used: inductor fuses it into one
    kernel but generates no code for complex operators.
    """
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head softmax attention, no QKV bias; queries from `x`, keys and values from `context`."""

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads = cfg.heads
        self.to_q = nn.Linear(cfg.dim, inner, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.dim)

    def forward(self, x: Tensor, context: Tensor, angles: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """`b n d` queries, `b m d` context, optional rotary `angles` (needs n = m) -> `b n d`.

        `mask`: bool, broadcastable to `b heads n m`, True = the key may be attended to; every query row
        needs at least one True (a fully masked row would be NaN).
        """
        q = rearrange(self.to_q(x), "b n (heads e) -> b heads n e", heads=self.heads)
        k, v = rearrange(self.to_kv(context), "b m (two heads e) -> two b heads m e", two=2, heads=self.heads)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Under CPU autocast attention runs in float32: the bf16 flash-attention backward on CPU took 8x
            # the float32 one (torch 2.13, measured on the quickstart generator), more than autocast saves.
            # Two bf16 matrix products around a float32 softmax made a training step 1.12x faster but tied
            # or lost on classifier-FID (benchmarks/RESULTS.md, "The quickstart, fifth round").
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(out, "b heads n e -> b n (heads e)"))


def _mlp(cfg: HourglassConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                         nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN x), [x + CrossAttn(LN x, text) for text models], x + MLP(LN x).

    The cross-attention (Vaswani et al. 2017 encoder-decoder attention, as in Imagen's text conditioning)
    reads the `b m d` text context under its key mask `b 1 1 m` (True = attend).
    """

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg)
        self.norm_cross, self.cross = (nn.LayerNorm(cfg.dim), Attention(cfg)) if cfg.text_dim else (None, None)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), _mlp(cfg)

    def forward(self, x: Tensor, angles: Tensor, mask: Tensor | None = None,
                text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, angles, mask)
        if self.cross is not None and text is not None:
            x = x + self.cross(self.norm_cross(x), text[0], mask=text[1])
        return x + self.mlp(self.norm2(x))


class ResampleBlock(nn.Module):
    """Attention resampling (Nawrot et al. section 3.3): queries attend to the tokens of their own patch.

    `x` is `n q d` (one row per patch), `patch` is `n k d` with the k = s*s tokens of that patch.
    """

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.norm_q, self.norm_kv, self.attn = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim), Attention(cfg)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), _mlp(cfg)

    def forward(self, x: Tensor, patch: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(patch), mask=mask)
        return x + self.mlp(self.norm2(x))


class Hourglass(nn.Module):
    """The denoiser f(z) of SUNDAE: `b h w` tokens (+ `b` labels) -> `b h w v` float32 logits, any h, w."""

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.cfg = cfg
        s2 = cfg.shorten_factor**2
        self.token_embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.class_embedding = ClassEmbedding(cfg.num_classes, cfg.dim) if cfg.num_classes else None
        self.text_embedding = TextConditioning(cfg.text_dim, cfg.dim) if cfg.text_dim else None
        self.pre = nn.ModuleList(Block(cfg) for _ in range(cfg.depth[0]))
        self.shorten = nn.Linear(s2 * cfg.dim, cfg.dim)
        self.down_resample = ResampleBlock(cfg)
        self.valley = nn.ModuleList(Block(cfg) for _ in range(cfg.depth[1]))
        self.upsample = nn.Linear(cfg.dim, s2 * cfg.dim)
        self.up_resample = ResampleBlock(cfg)
        self.post = nn.ModuleList(Block(cfg) for _ in range(cfg.depth[2]))
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _patch_valid(self, valid: Tensor | None, b: int) -> Tensor | None:
        """`H W` bool real positions -> `(b H/p1 W/p2) (p1 p2)` bool, the real tokens of each patch."""
        if valid is None:
            return None
        p1, p2 = self.cfg.patch
        return rearrange(valid, "(h p1) (w p2) -> (h w) (p1 p2)", p1=p1, p2=p2).repeat(b, 1)

    @staticmethod
    def _key_mask(patch_valid: Tensor | None) -> Tensor | None:
        """Per-patch key mask for the resample attention, `n 1 1 k`. A patch with no real token (only with
        extra padding through `grid`) may attend to all of its own keys: its output is never used by a real
        position, and a row with no key at all would be NaN, which would leak through 0 * NaN."""
        if patch_valid is None:
            return None
        return (patch_valid | ~patch_valid.any(-1, keepdim=True))[:, None, None, :]

    def shorten_grid(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """`b h w d` -> `b h/p1 w/p2 d`: linear merge of each p1 x p2 patch (`cfg.patch`), then attention
        within the patch.

        `valid` (`h w` bool, True = real token) zeroes padding in the merge and hides it from the attention.
        """
        p1, p2 = self.cfg.patch
        patch = rearrange(x, "b (h p1) (w p2) d -> (b h w) (p1 p2) d", p1=p1, p2=p2)
        patch_valid = self._patch_valid(valid, x.shape[0])
        merged = patch if patch_valid is None else patch * patch_valid[..., None].to(patch.dtype)
        z = self.shorten(rearrange(merged, "n k d -> n 1 (k d)"))
        z = self.down_resample(z, patch, self._key_mask(patch_valid))
        return rearrange(z, "(b h w) 1 d -> b h w d", b=x.shape[0], h=x.shape[1] // p1)

    def upsample_grid(self, z: Tensor, residual: Tensor, valid: Tensor | None = None) -> Tensor:
        """`b h/p1 w/p2 d` valley + `b h w d` residual -> `b h w d`: split each token back into its patch,
        add the residual, then attention among the tokens of that patch (real ones only, by `valid`)."""
        return self._upsample_grid(z, [residual], valid)

    def _upsample_grid(self, z: Tensor, residual: list[Tensor], valid: Tensor | None) -> Tensor:
        """`upsample_grid`, taking the one residual out of `residual` so that nothing outside holds it: it is
        freed once added, as is the valley output `z` once upsampled, and the pre-attention patches once the
        attention output is added. Without grad this keeps no more full-resolution tensors alive than a flat
        block's MLP does, so the hourglass's peak inference memory is not above a flat transformer's. The up
        `ResampleBlock` is run step by step for that: called as a module, its arguments (the pre-attention
        patches) would stay alive until it returns."""
        p1, p2 = self.cfg.patch
        b, h = z.shape[:2]
        u = rearrange(self.upsample(z), "b h w (k d) -> (b h w) k d", k=p1 * p2)
        del z  # forward passes the valley output as a temporary, so this frees it
        u = u + rearrange(residual.pop(), "b (h p1) (w p2) d -> (b h w) (p1 p2) d", p1=p1, p2=p2)
        block, mask = self.up_resample, self._key_mask(self._patch_valid(valid, b))
        u = u + block.attn(block.norm_q(u), block.norm_kv(u), mask=mask)
        u = u + block.mlp(block.norm2(u))
        return rearrange(u, "(b h w) (p1 p2) d -> b (h p1) (w p2) d", b=b, h=h, p1=p1)

    def _valley(self, x: Tensor, valid: Tensor | None, angles: Tensor, mask: Tensor | None,
                context: Tensor | None) -> Tensor:
        """`b h w d` -> `b h/p1 w/p2 d`: the shortening, then the valley blocks at the coarse resolution."""
        z = self.shorten_grid(x, valid)
        height = z.shape[1]
        z = rearrange(z, "b h w d -> b (h w) d")
        for block in self.valley:
            z = block(z, angles, mask, context)
        return rearrange(z, "b (h w) d -> b h w d", h=height)

    def forward(self, tokens: Tensor, labels: Tensor | None = None, grid: tuple[int, int] | None = None,
                drop: Tensor | None = None, text: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """`b H W` int64 tokens in [0, v) (+ `b` int64 labels) -> `b h w v` float32 logits.

        `text` (models with `text_dim`): the text encoder's (features `b n text_dim` float, mask `b n` bool,
        True = real text token, pooled `b text_dim` float), see `sundae.text`; None = the null text.
        `drop` (`b` bool, conditional models only): True rows get the null condition instead of theirs (the
        null class, the null text), for condition dropout in training and classifier-free guidance
        (Ho & Salimans 2022).

        Only the top-left `grid` = (h, w) tokens are real (default: all, h, w = H, W); the rest, and the
        padding up to multiples of the patch sides, is masked out: never an attention key at full resolution
        or in the resample attention, zero in the patch merge, and a valley key only if its patch holds a real
        token.
        Raises ValueError for a `grid` larger than the tokens or labels given to an unconditional model.
        """
        b, height, width = tokens.shape
        h, w = grid if grid is not None else (height, width)
        if not (1 <= h <= height and 1 <= w <= width):
            raise ValueError(f"grid {h}x{w} does not fit the {height}x{width} tokens")
        if labels is not None and self.class_embedding is None:
            raise ValueError("labels given to an unconditional model (num_classes=0)")
        if text is not None and self.text_embedding is None:
            raise ValueError("text given to a model without text conditioning (text_dim=0)")
        if drop is not None and self.class_embedding is None and self.text_embedding is None:
            raise ValueError("drop (null condition) given to an unconditional model: it has no condition to drop")
        p1, p2 = self.cfg.patch
        height, width = -(-height // p1) * p1, -(-width // p2) * p2
        tokens = F.pad(tokens, (0, width - tokens.shape[2], 0, height - tokens.shape[1]))  # id 0, masked anyway
        valid = coarse_valid = None
        if (h, w) != (height, width):
            rows, cols = torch.arange(height, device=tokens.device), torch.arange(width, device=tokens.device)
            valid = (rows[:, None] < h) & (cols[None, :] < w)
            coarse_valid = rearrange(valid, "(h p1) (w p2) -> (h w) (p1 p2)", p1=p1, p2=p2).any(-1)
        x = self.token_embedding(tokens)
        if self.class_embedding is not None:
            x = x + self.class_embedding(labels, b, drop)[:, None, None, :]
        context = None
        if self.text_embedding is not None:
            pooled, context = self.text_embedding(text, b, drop)
            x = x + pooled[:, None, None, :]
        fine = rotary_angles(height, width, self.cfg.head_dim, self.cfg.rotary_base, device=tokens.device)
        coarse = rotary_angles(height // p1, width // p2, self.cfg.head_dim, self.cfg.rotary_base, (p1, p2),
                               tokens.device)
        # Key masks broadcast to `b heads n m`; a valley without wholly padded patches needs none.
        fine_mask = None if valid is None else valid.flatten()[None, None, None, :]
        padded_patches = height - h >= p1 or width - w >= p2
        coarse_mask = coarse_valid[None, None, None, :] if padded_patches else None

        x = rearrange(x, "b h w d -> b (h w) d")
        for block in self.pre:
            x = block(x, fine, fine_mask, context)
        residual = [rearrange(x, "b (h w) d -> b h w d", h=height)]  # handed over to _upsample_grid
        del x
        x = self._upsample_grid(self._valley(residual[0], valid, coarse, coarse_mask, context), residual, valid)
        x = rearrange(x, "b h w d -> b (h w) d")
        for block in self.post:
            x = block(x, fine, fine_mask, context)
        logits = self.to_logits(self.norm(x)).float()
        return rearrange(logits, "b (h w) v -> b h w v", h=height)[:, :h, :w]


def forward_flops(cfg: HourglassConfig, h: int, w: int, batch: int = 1, text_len: int = 0) -> int:
    """Analytic FLOPs of one `Hourglass` forward pass over a `batch h w` token grid (one sampling step).

    Counts the matrix multiplications (2 FLOPs per multiply-add): the linear layers, q k^T and
    attention-weighted values, the shorten/upsample linears and the logits. Norms, activations, rotary
    and softmax are left out (a few percent at the paper's widths). h and w are the grid the network
    runs on (multiples of the shorten factor). `text_len`: the text tokens n of a text model (its context
    holds n + 2 keys: a kept register and the null text). Units: FLOPs (not FLOP/s).
    """
    d, inner, hidden, v = cfg.dim, cfg.heads * cfg.head_dim, cfg.mlp_ratio * cfg.dim, cfg.codebook_size
    k = cfg.shorten_factor**2
    n, n_c = h * w, h * w // k  # full-resolution and valley tokens

    def block(tokens: int, keys_per_query: int) -> int:
        return 8 * tokens * d * inner + 4 * tokens * keys_per_query * inner + 4 * tokens * d * hidden

    pre_post = (cfg.depth[0] + cfg.depth[2]) * block(n, n)
    valley = cfg.depth[1] * block(n_c, n_c)
    # Down-resampling: n_c queries attend to their patch of k; keys and values come from all n tokens.
    down = 2 * n_c * d * inner + 4 * n * d * inner + 2 * n_c * inner * d + 4 * n_c * k * inner + 4 * n_c * d * hidden
    up = block(n, k)  # every token attends to the k tokens of its own patch
    resample_linears = 2 * (2 * n_c * k * d * d)
    logits = 2 * n * d * v
    text = 0
    if cfg.text_dim:
        m = text_len + 2
        text = 2 * text_len * cfg.text_dim * d + 2 * cfg.text_dim * d  # feature and pooled projections
        # Per block: q over the grid, k and v over the context, q k^T and weights x values, output projection.
        cross = (lambda t: 2 * t * d * inner + 4 * m * d * inner + 4 * t * m * inner + 2 * t * inner * d)
        text += (cfg.depth[0] + cfg.depth[2]) * cross(n) + cfg.depth[1] * cross(n_c)
    return batch * (pre_post + valley + down + up + resample_linears + logits + text)


PRESETS: dict[str, HourglassConfig] = {
    "tiny": HourglassConfig(codebook_size=64, dim=32, heads=2, head_dim=16, depth=(1, 1, 1), num_classes=10),
    # Quickstart: class-conditional over the `fashion` tokenizer's 8x8 grid of 256 codes.
    "fashion": HourglassConfig(codebook_size=256, dim=128, heads=4, head_dim=32, depth=(1, 2, 1), num_classes=10),
    "ffhq256": HourglassConfig(),
    "ffhq1024": HourglassConfig(codebook_size=8192, dim=2048),
    "imagenet256": HourglassConfig(depth=(2, 12, 2), num_classes=1000),
}
