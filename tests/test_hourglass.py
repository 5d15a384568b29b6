import dataclasses

import pytest
import torch

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sundae.hourglass import PRESETS, Hourglass, HourglassConfig, apply_rotary, forward_flops, rotary_angles

TINY = PRESETS["tiny"]


def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return Hourglass(cfg).eval()


def test_logits_shape_and_dtype():
    model = _model()
    tokens = torch.randint(0, TINY.codebook_size, (3, 6, 8))
    logits = model(tokens, torch.tensor([0, 1, 9]))
    assert logits.shape == (3, 6, 8, TINY.codebook_size) and logits.dtype == torch.float32


@pytest.mark.parametrize("name,expected", [("ffhq256", 178e6), ("ffhq1024", 671e6), ("imagenet256", 200e6)])
def test_paper_parameter_counts(name, expected):
    with torch.device("meta"):
        model = Hourglass(PRESETS[name])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.005, count  # the paper rounds to whole millions


def _analytic_parameters(cfg: HourglassConfig) -> int:
    """Parameter count from the architecture description (design.md), independent of the module code."""
    d, i, m, k = cfg.dim, cfg.heads * cfg.head_dim, cfg.mlp_ratio * cfg.dim, cfg.shorten_factor**2
    attention = d * i + 2 * d * i + i * d + d  # q, kv (no bias), out (+ bias)
    mlp = d * m + m + m * d + d
    block = 2 * 2 * d + attention + mlp  # two LayerNorms
    resample = 3 * 2 * d + attention + mlp  # norms of queries, keys/values and before the MLP
    embeddings = cfg.codebook_size * d + ((cfg.num_classes + 1) * d if cfg.num_classes else 0)  # + null class
    resampling = (k * d * d + d) + (d * k * d + k * d) + 2 * resample
    return embeddings + sum(cfg.depth) * block + resampling + 2 * d + d * cfg.codebook_size + cfg.codebook_size


@pytest.mark.parametrize("name", ["tiny", "ffhq256", "ffhq1024", "imagenet256"])
def test_parameter_count_matches_the_analytic_count(name):
    with torch.device("meta"):  # nothing is allocated
        model = Hourglass(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == _analytic_parameters(PRESETS[name])


def test_forward_flops_match_a_counted_forward_pass():
    cfg = HourglassConfig(codebook_size=64, dim=64, heads=2, head_dim=16, depth=(1, 2, 1))
    tokens = torch.randint(0, 64, (2, 8, 12))
    # The math attention backend is plain matmuls, which FlopCounterMode counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        Hourglass(cfg)(tokens)
    assert forward_flops(cfg, 8, 12, batch=2) == counter.get_total_flops()


def test_bf16_autocast_logits_are_fp32_and_close():
    model = _model()
    tokens = torch.randint(0, TINY.codebook_size, (2, 4, 4))
    with torch.no_grad():
        ref = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_cpu_autocast_runs_attention_in_float32(monkeypatch):
    # The CPU bf16 flash-attention backward is slower than float32 (hourglass.Attention): under CPU autocast
    # every attention call gets float32 inputs, while the linear layers around it still run in bf16.
    import torch.nn.functional as F
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model()
    tokens = torch.randint(0, TINY.codebook_size, (2, 4, 4))
    projected = []
    model.pre[0].attn.to_q.register_forward_hook(lambda module, args, out: projected.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens)
    low.float().sum().backward()
    assert seen and all(d == (torch.float32, torch.float32, torch.float32, False) for d in seen)
    assert projected == [torch.bfloat16]  # autocast still reaches the projections
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    seen.clear()
    model(tokens)  # without autocast the inputs are the float32 tensors as they come
    assert seen and all(d[:3] == (torch.float32,) * 3 for d in seen)


def test_paper_presets_have_paper_shapes():
    assert PRESETS["ffhq1024"].dim == 2048 and PRESETS["ffhq1024"].depth == (2, 10, 2)
    assert PRESETS["ffhq1024"].codebook_size == 8192 and PRESETS["ffhq256"].heads == 8
    assert PRESETS["imagenet256"].depth == (2, 12, 2) and PRESETS["imagenet256"].num_classes == 1000


def test_non_causal():
    model = _model()
    tokens = torch.randint(0, TINY.codebook_size, (1, 4, 4))
    changed = tokens.clone()
    changed[0, 3, 3] = (changed[0, 3, 3] + 1) % TINY.codebook_size
    with torch.no_grad():
        # The first position sees a change at the last one.
        assert not torch.allclose(model(tokens)[0, 0, 0], model(changed)[0, 0, 0])


def _influence(fn, x, position):
    """Which output grid cells change when input cell `position` of `x` (`b h w d`) changes."""
    y = x.clone()
    # A random direction, not a constant: LayerNorm would erase a constant shift.
    y[(0, *position)] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (fn(x) - fn(y)).abs().amax(-1)[0]
    return {tuple(p) for p in (diff > 1e-6).nonzero().tolist()}


def test_shortening_merges_exactly_one_2x2_patch():
    model = _model()
    x = torch.randn(1, 4, 6, TINY.dim)
    # Token (2, 3) belongs to patch (1, 1): it must reach valley cell (1, 1) only.
    assert _influence(model.shorten_grid, x, (2, 3)) == {(1, 1)}
    # And valley cell (1, 1) depends on exactly the tokens {(2,2), (2,3), (3,2), (3,3)}.
    sources = {(i, j) for i in range(4) for j in range(6) if (1, 1) in _influence(model.shorten_grid, x, (i, j))}
    assert sources == {(2, 2), (2, 3), (3, 2), (3, 3)}


def test_upsampling_returns_into_the_same_patch():
    model = _model()
    z = torch.randn(1, 2, 3, TINY.dim)
    residual = torch.randn(1, 4, 6, TINY.dim)
    up_from_valley = _influence(lambda v: model.upsample_grid(v, residual), z, (1, 2))
    assert up_from_valley == {(2, 4), (2, 5), (3, 4), (3, 5)}
    # The resampling attention mixes a residual token only with the tokens of its own patch.
    up_from_residual = _influence(lambda r: model.upsample_grid(z, r), residual, (0, 1))
    assert up_from_residual == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_default_shortening_is_the_papers_2d_patch():
    assert HourglassConfig().shorten_mode == "2d" and TINY.patch == (2, 2)
    with pytest.raises(ValueError, match="shorten_mode"):
        HourglassConfig(shorten_mode="3d")


ONE_D = dataclasses.replace(TINY, shorten_mode="1d")


def test_1d_shortening_merges_four_consecutive_tokens_of_one_row():
    assert ONE_D.patch == (1, 4)
    model = _model(ONE_D)
    x = torch.randn(1, 3, 8, TINY.dim)
    # The original hourglass: row-major runs of k = 4 tokens, so a 3x8 grid becomes 3x2 and token (1, 6)
    # belongs to valley cell (1, 1) together with (1, 4), (1, 5), (1, 7): one row, no neighbour above or below.
    assert _influence(model.shorten_grid, x, (1, 6)) == {(1, 1)}
    sources = {(i, j) for i in range(3) for j in range(8) if (1, 1) in _influence(model.shorten_grid, x, (i, j))}
    assert sources == {(1, 4), (1, 5), (1, 6), (1, 7)}
    z = torch.randn(1, 3, 2, TINY.dim)
    assert _influence(lambda v: model.upsample_grid(v, torch.zeros(1, 3, 8, TINY.dim)), z, (2, 0)) == \
        {(2, 0), (2, 1), (2, 2), (2, 3)}


def test_1d_and_2d_shortening_have_the_same_weights_but_different_logits():
    two_d, one_d = _model(), _model(ONE_D)
    one_d.load_state_dict(two_d.state_dict())  # raises unless the parameter shapes match: k = 4 either way
    tokens = torch.randint(0, TINY.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(one_d(tokens), two_d(tokens), atol=1e-4)


def test_1d_shortening_pads_the_width_to_whole_runs_invisibly():
    model = _model(ONE_D)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.codebook_size, (2, 3, 5), generator=g)
    with torch.no_grad():
        ref = model(tokens)
        assert ref.shape == (2, 3, 5, TINY.codebook_size) and torch.isfinite(ref).all()
        big = torch.randint(0, TINY.codebook_size, (2, 4, 13), generator=g)  # 13: whole padded runs too
        big[:, :3, :5] = tokens
        torch.testing.assert_close(model(big, grid=(3, 5)), ref, rtol=1e-5, atol=1e-5)


def test_rotary_reaches_every_head():
    cfg = HourglassConfig(codebook_size=8, dim=64, heads=4, head_dim=16, depth=(1, 1, 1))
    angles = rotary_angles(4, 4, cfg.head_dim, cfg.rotary_base)
    q = torch.randn(1, 1, 1, cfg.head_dim).expand(1, cfg.heads, 16, cfg.head_dim)
    rotated = apply_rotary(q, angles)
    for head in range(cfg.heads):
        # Position 0 is unrotated; every other position is rotated, in every head.
        torch.testing.assert_close(rotated[0, head, 0], q[0, head, 0])
        for pos in range(1, 16):
            assert not torch.allclose(rotated[0, head, pos], q[0, head, pos])


@pytest.mark.parametrize("compiling", [False, True])  # the complex (eager) and the real (torch.compile) form
def test_rotary_rotates_each_channel_pair_by_its_angle(compiling, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    # Reference in float64: channels (2j, 2j + 1) of a position turn by angle j of that position.
    torch.manual_seed(0)
    angles = rotary_angles(3, 5, 16, 10000.0)  # 15 positions, 8 angles each
    x = torch.randn(2, 4, 15, 16)
    a, x64 = angles.double(), x.double()
    ref = torch.empty_like(x64)
    ref[..., 0::2] = x64[..., 0::2] * a.cos() - x64[..., 1::2] * a.sin()
    ref[..., 1::2] = x64[..., 0::2] * a.sin() + x64[..., 1::2] * a.cos()
    torch.testing.assert_close(apply_rotary(x, angles).double(), ref, rtol=1e-5, atol=1e-5)
    # A float32 view like the attention's k (an offset into the kv projection, heads moved forward).
    kv = torch.cat([x, x], -1).transpose(1, 2).contiguous().transpose(1, 2)[..., 16:]
    assert not kv.is_contiguous() and kv.storage_offset() == 16
    torch.testing.assert_close(apply_rotary(kv, angles).double(), ref, rtol=1e-5, atol=1e-5)
    # A non-contiguous bf16 input (as the attention passes it) keeps its dtype, and the gradient flows.
    xb = x.transpose(1, 2).to(torch.bfloat16).requires_grad_(True)
    out = apply_rotary(xb.transpose(1, 2), angles)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    out.float().pow(2).sum().backward()  # a rotation keeps norms: d|Rx|^2/dx = 2x
    torch.testing.assert_close(xb.grad.float(), 2 * xb.detach().float(), rtol=3e-2, atol=3e-2)


def test_rotary_scores_depend_on_relative_2d_offset_only():
    head_dim = 16
    angles = rotary_angles(6, 6, head_dim, 10000.0).reshape(6, 6, -1)
    torch.manual_seed(0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(pq, pk):
        rq = apply_rotary(q[None, None, None], angles[pq][None])
        rk = apply_rotary(k[None, None, None], angles[pk][None])
        return (rq * rk).sum().item()

    # Same offset (+1 row, +2 cols) at two places: same score. A row offset differs from a column offset.
    assert score((0, 0), (1, 2)) == pytest.approx(score((3, 2), (4, 4)), abs=1e-5)
    assert score((0, 0), (1, 0)) != pytest.approx(score((0, 0), (0, 1)), abs=1e-3)


def test_rotary_is_used_inside_attention():
    model = _model()
    tokens = torch.zeros(1, 4, 4, dtype=torch.long)  # identical tokens: only positions tell them apart
    with torch.no_grad():
        logits = model(tokens)
    assert not torch.allclose(logits[0, 0, 0], logits[0, 2, 3])


def test_class_embedding_changes_logits_and_checks_input():
    model = _model()
    tokens = torch.randint(0, TINY.codebook_size, (2, 4, 4))
    with torch.no_grad():
        a = model(tokens, torch.tensor([0, 0]))
        b = model(tokens, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    unconditional = _model(HourglassConfig(codebook_size=8, dim=32, heads=2, head_dim=16, depth=(1, 1, 1)))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([1]))


@pytest.mark.parametrize("h,w", [(7, 7), (15, 17), (1, 3), (6, 5)])
def test_any_grid_padding_never_changes_real_logits(h, w):
    model = _model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.codebook_size, (2, h, w), generator=g)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(tokens, labels)
        assert ref.shape == (2, h, w, TINY.codebook_size) and torch.isfinite(ref).all()
        # Padding of any content and any amount (also whole padded patches) leaves the real logits alone.
        for extra_h, extra_w in [(1, 0), (0, 1), (1, 1), (3, 5), (4, 4)]:
            for _ in range(2):
                big = torch.randint(0, TINY.codebook_size, (2, h + extra_h, w + extra_w), generator=g)
                big[:, :h, :w] = tokens
                torch.testing.assert_close(model(big, labels, grid=(h, w)), ref, rtol=1e-5, atol=1e-5)
        # The same extra tokens counted as real do change the logits: the masking is what hides them.
        assert not torch.allclose(model(big, labels)[:, :h, :w], ref, atol=1e-4)


def test_grid_must_fit_the_tokens():
    with pytest.raises(ValueError, match="does not fit"):
        _model()(torch.zeros(1, 4, 4, dtype=torch.long), grid=(5, 4))


def test_labels_outside_the_classes_are_refused_by_the_network():
    net = Hourglass(PRESETS["tiny"]).eval()  # 10 classes; index 10 is the null class
    z = torch.zeros(2, 4, 4, dtype=torch.long)
    null = net(z, None)
    assert torch.equal(net(z, torch.tensor([3, 3]), drop=torch.tensor([True, True])), null)
    for bad in ([0, 10], [-1, 2]):
        with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
            net(z, torch.tensor(bad))
