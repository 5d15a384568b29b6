import math

import pytest
import torch
import torch.nn.functional as F

from sundae.hourglass import PRESETS, Hourglass
from sundae.sundae import (corrupt, fill_masked, linear_schedule, sample, sample_logits, token_keep_mask,
                           unrolled_loss)

V = 16


def test_corruption_rate_is_per_sample_uniform():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.zeros(4000, 8, 8, dtype=torch.long)
    z0 = corrupt(tokens, V, gen)
    assert z0.min() >= 0 and z0.max() < V
    changed = (z0 != tokens).float().flatten(1).mean(1)
    # A token changes with probability a * (V - 1) / V, a ~ U(0, 1): the mean is (V - 1) / (2V).
    assert changed.mean().item() == pytest.approx((V - 1) / (2 * V), abs=0.01)
    # Rates differ between samples and cover (0, 1): some samples barely change, some nearly all.
    assert (changed < 0.1).any() and (changed > 0.85).any()
    # Replacement tokens are uniform over the codebook (token 0 included).
    replaced = z0[z0 != 0]
    counts = torch.bincount(replaced, minlength=V)[1:].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05


def test_sample_logits_follows_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 3)
    freq = torch.bincount(sample_logits(logits, 1.0, gen), minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    # Temperature 0.5 squares the probabilities (then renormalises).
    p = torch.tensor([0.49, 0.04, 0.01]) / 0.54
    freq = torch.bincount(sample_logits(logits, 0.5, gen), minlength=3).float() / 20000
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    net = Hourglass(cfg)
    tokens = torch.randint(0, cfg.codebook_size, (8, 8, 8))
    loss, per_step = unrolled_loss(lambda z: net(z, None), tokens, cfg.codebook_size, unroll_steps=2)
    assert len(per_step) == 2
    assert loss.item() == pytest.approx(math.log(cfg.codebook_size), rel=0.05)


def test_unrolled_loss_averages_each_step_and_feeds_samples_forward():
    calls = []
    tokens = torch.randint(0, V, (2, 4, 4))
    weight = torch.zeros(V, requires_grad=True)

    def logits_fn(z):
        calls.append(z.clone())
        return F.one_hot(z, V).float() * 5 + weight  # predicts its input back

    loss, per_step = unrolled_loss(logits_fn, tokens, V, unroll_steps=3, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 3 and len(per_step) == 3
    expected = [F.cross_entropy((F.one_hot(z, V).float() * 5).flatten(0, 2), tokens.flatten()) for z in calls]
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    # Step t+1 sees a sample from step t's logits (not the clean tokens, not step t's input verbatim
    # everywhere: with a peaked but soft distribution some tokens move).
    assert not torch.equal(calls[1], tokens) or not torch.equal(calls[0], tokens)
    loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        unrolled_loss(logits_fn, tokens, V, unroll_steps=0)


def test_overfit_one_batch():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    net = Hourglass(cfg)
    tokens = torch.randint(0, cfg.codebook_size, (4, 4, 4))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = unrolled_loss(lambda z: net(z, labels), tokens, cfg.codebook_size, 2, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # From ln(64) = 4.16 at init to memorised: the class label alone identifies each grid.
    assert loss.item() < 0.5
    with torch.no_grad():
        z, _ = sample(lambda z, rows, step: net(z, labels[rows]), (4, 4, 4), cfg.codebook_size, steps=30, min_steps=30,
                      temperature=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    assert (z == tokens).float().mean() > 0.9


def test_linear_schedule_hits_both_ends():
    s = linear_schedule(1.0, 0.7, 100)
    assert len(s) == 100 and s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.7)
    assert torch.all(s[1:] <= s[:-1])
    assert linear_schedule(0.5, 0.9, 1).tolist() == [0.5]


def _copy_logits(z, rows, step=0):
    """A denoiser that is certain the current tokens are right: a step changes nothing."""
    return F.one_hot(z, V).float() * 100.0


def test_early_stop_respects_min_steps():
    calls = []

    def fn(z, rows, step):
        calls.append(len(rows))
        return _copy_logits(z, rows, step)

    tokens, taken = sample(fn, (3, 4, 4), V, steps=50, min_steps=7, generator=torch.Generator().manual_seed(0),
                           compact_every=1)
    assert taken.tolist() == [7, 7, 7] and len(calls) == 7
    calls.clear()
    # Compacting every 4 steps: all finish at step 7, the batch empties at step 8.
    _, taken = sample(fn, (3, 4, 4), V, steps=50, min_steps=7, generator=torch.Generator().manual_seed(0),
                      compact_every=4)
    assert taken.tolist() == [7, 7, 7] and len(calls) == 8
    calls.clear()
    _, taken = sample(fn, (3, 4, 4), V, steps=5, min_steps=10, generator=torch.Generator().manual_seed(0))
    assert taken.tolist() == [5, 5, 5] and len(calls) == 5


def test_finished_samples_leave_the_batch():
    seen = []

    def fn(z, rows, step):
        # Row 1 is settled from the start; the others keep changing (uniform logits).
        seen.append(rows.tolist())
        logits = torch.zeros(len(rows), *z.shape[1:], V)
        settled = rows == 1
        logits[settled] = _copy_logits(z[settled], rows[settled])
        return logits

    tokens, taken = sample(fn, (3, 8, 8), V, steps=20, min_steps=4, update_proportion=(1.0, 1.0),
                           generator=torch.Generator().manual_seed(0), compact_every=1)
    assert seen[3] == [0, 1, 2] and seen[4] == [0, 2]
    assert taken.tolist() == [20, 4, 20]
    seen.clear()
    again, taken = sample(fn, (3, 8, 8), V, steps=20, min_steps=4, update_proportion=(1.0, 1.0),
                          generator=torch.Generator().manual_seed(0), compact_every=5)
    assert seen[4] == [0, 1, 2] and seen[5] == [0, 2]  # row 1 finished at step 4, left at the step-5 compaction
    assert taken.tolist() == [20, 4, 20] and torch.equal(again, tokens)


def test_results_do_not_depend_on_when_others_leave_the_batch():
    confidence = torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # per sample: how much it prefers its tokens

    def fn(z, rows, step):
        return F.one_hot(z, V).float() * confidence[rows, None, None, None]

    runs = [sample(fn, (6, 3, 3), V, steps=40, min_steps=2, generator=torch.Generator().manual_seed(1),
                   compact_every=k) for k in (1, 3, 100)]
    taken = runs[0][1]
    assert taken[0] == 40 and len(set(taken[1:].tolist())) > 1  # they stopped at different steps
    for tokens, taken in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and torch.equal(taken, runs[0][1])


def test_schedules_reach_the_sampler():
    props = []

    def fn(z, rows, step):
        return torch.zeros(*z.shape, V)

    # Record the update proportion actually used: with uniform logits, a token changes with prob p * (V-1)/V.
    gen = torch.Generator().manual_seed(0)
    z_prev = None

    def recording(z, rows, step):
        nonlocal z_prev
        if z_prev is not None:
            props.append((z != z_prev).float().mean().item() * V / (V - 1))
        z_prev = z.clone()
        return fn(z, rows, step)

    sample(recording, (64, 16, 16), V, steps=11, min_steps=11, update_proportion=(0.1, 0.9), generator=gen)
    # props[i] is the proportion of step i (0-based): 0.1 + 0.08 i.
    for i, p in enumerate(props):
        assert p == pytest.approx(0.1 + 0.08 * i, abs=0.02)


def test_keep_mask_tokens_never_change_and_same_seed_same_sample():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    net = Hourglass(cfg).eval()
    init = torch.randint(0, cfg.codebook_size, (4, 6, 6))
    keep = torch.rand(4, 6, 6) < 0.5
    labels = torch.tensor([1, 2, 3, 4])

    def run(seed):
        with torch.no_grad():
            return sample(lambda z, rows, step: net(z, labels[rows]), (4, 6, 6), cfg.codebook_size, steps=20, init=init,
                          keep=keep, generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[keep], init[keep])
    assert torch.equal(a, b)
    assert not torch.equal(a[~keep], c[~keep])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        sample(_copy_logits, (1, 2, 2), V, steps=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(_copy_logits, (1, 2, 2), V, temperature=(0.0, 1.0))
    with pytest.raises(ValueError, match="update proportion"):
        sample(_copy_logits, (1, 2, 2), V, update_proportion=(0.5, 1.5))


def test_token_keep_mask_cells():
    f = 4
    mask = torch.zeros(1, 1, 16, 12)
    mask[0, 0, 5, 10] = 1  # one pixel in cell (1, 2)
    keep = token_keep_mask(mask, f)
    assert keep.shape == (1, 4, 3)
    assert (~keep).nonzero().tolist() == [[0, 1, 2]]
    mask[0, 0, 8:16, 0:4] = 1  # two whole cells
    assert (~token_keep_mask(mask, f)).sum().item() == 3

def test_token_keep_mask_any_size_and_dilation():
    # 10x13 pixels at f=4: a 3x4 grid (the tokenizer pads right/bottom); the padded pixels count as known.
    mask = torch.zeros(1, 1, 10, 13)
    assert token_keep_mask(mask, 4).shape == (1, 3, 4) and bool(token_keep_mask(mask, 4).all())
    mask[0, 0, 9, 12] = 1  # the bottom-right real pixel lies in cell (2, 3)
    assert (~token_keep_mask(mask, 4)).nonzero().tolist() == [[0, 2, 3]]
    # Dilation by one cell, 8-neighbourhood: the corner cell (2, 3) grows to rows 1-2, columns 2-3.
    assert (~token_keep_mask(mask, 4, dilate=1)).nonzero().tolist() == [[0, 1, 2], [0, 1, 3], [0, 2, 2], [0, 2, 3]]
    centre = torch.zeros(1, 1, 16, 16)
    centre[0, 0, 5, 6] = 1  # cell (1, 1) of a 4x4 grid
    grown = ~token_keep_mask(centre, 4, dilate=1)
    assert grown[0, :3, :3].all() and grown.sum() == 9  # the 3x3 cells around (1, 1)
    assert (~token_keep_mask(centre, 4, dilate=2)).sum() == 16
    with pytest.raises(ValueError, match="dilate"):
        token_keep_mask(centre, 4, dilate=-1)


def test_cosine_corruption_weights_heavy_rates():
    from sundae.sundae import corruption_rate
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    a = corruption_rate(u, "cosine")
    assert a.min() >= 0 and a.max() <= 1
    assert a.mean().item() == pytest.approx(2 / math.pi, abs=0.005)
    assert (a > 0.9).float().mean().item() == pytest.approx(2 / math.pi * math.acos(0.9), abs=0.005)
    assert (corruption_rate(u, "uniform") > 0.9).float().mean().item() == pytest.approx(0.1, abs=0.005)
    # The share of replaced tokens follows the rate: a fully random start is seen ~3x as often.
    tokens = torch.zeros(4000, 8, 8, dtype=torch.long)
    z = corrupt(tokens, 1_000_000, torch.Generator().manual_seed(1), corruption="cosine")
    changed = (z != 0).float().mean((1, 2))
    assert changed.mean().item() == pytest.approx(2 / math.pi, abs=0.02)
    with pytest.raises(ValueError, match="corruption must be one of"):
        corruption_rate(u, "linear")


def test_unroll_share_runs_later_steps_on_a_share_and_adds_up_over_micro_batches():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    net = Hourglass(cfg).eval()
    tokens = torch.randint(0, cfg.codebook_size, (12, 4, 4))
    labels = torch.arange(12) % 10
    calls = []

    def fn(z, rows=None):
        calls.append(len(z))
        return net(z, labels if rows is None else labels[rows])

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(12)]
    full, _ = unrolled_loss(lambda z: net(z, labels), tokens, cfg.codebook_size, 2, gens())
    same, _ = unrolled_loss(fn, tokens, cfg.codebook_size, 2, gens(), unroll_share=1.0)
    assert same.item() == full.item() and calls == [12, 12]
    calls.clear()
    loss, steps = unrolled_loss(fn, tokens, cfg.codebook_size, 3, gens(), unroll_share=0.5)
    assert calls[0] == 12 and 0 < calls[1] < 12 and calls[1] == calls[2]
    # Micro-batches of 4 with their own samples' generators: the per-step losses add up to the whole batch's.
    g = gens()
    parts = [unrolled_loss(lambda z, rows=None, s=s: net(z, labels[s] if rows is None else labels[s][rows]),
                           tokens[s], cfg.codebook_size, 3, g[s], unroll_share=0.5)[1]
             for s in (slice(0, 4), slice(4, 8), slice(8, 12))]
    for t in range(3):
        torch.testing.assert_close(sum(p[t] for p in parts) / 3, steps[t], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unroll_share"):
        unrolled_loss(fn, tokens, cfg.codebook_size, 2, unroll_share=0.0)


def test_a_temperature_that_overflows_float32_draws_greedily():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -4.0, -6.0]])
    for tau in (1e-38, 1e-45):
        assert sample_logits(logits, tau, torch.Generator().manual_seed(0)).tolist() == [1, 1]
    # Still a draw where nothing overflows: tau 1 on flat logits gives more than one value.
    draws = sample_logits(torch.zeros(1000, 3), 1.0, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def test_seeds_outside_the_generator_range_are_refused():
    from sundae.pipeline import SundaePipeline
    assert SundaePipeline.seeds(2**64 - 3, 3) == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    for seed, num in ((-1, 1), (2**64 - 2, 3), ([0, -5], 2), ([2**64], 1)):
        with pytest.raises(ValueError, match=r"seeds must lie in \[0, 2\*\*64 - 1\]"):
            SundaePipeline.seeds(seed, num)


def test_fill_masked_is_a_function_of_the_visible_pixels_only():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 30, 17) * 2 - 1
    mask = torch.zeros(2, 1, 30, 17)
    mask[0, :, 5:20, 3:11] = 1
    mask[1, :, :, 9:] = 1  # the whole right side
    other = torch.where(mask.bool(), torch.rand_like(image) * 2 - 1, image)  # differs only under the mask
    filled = fill_masked(image, mask)
    assert torch.equal(filled, fill_masked(other, mask))  # bit-identical: nothing under the mask gets through
    assert torch.equal(filled[~mask.bool().expand_as(image)], image[~mask.bool().expand_as(image)])
    # A fill is made of averages of visible pixels: inside their range, and a constant stays that constant.
    for b in range(2):
        seen = image[b][:, ~mask[b, 0].bool()]
        hole = filled[b][:, mask[b, 0].bool()]
        assert (hole >= seen.amin(1, keepdim=True) - 1e-6).all() and (hole <= seen.amax(1, keepdim=True) + 1e-6).all()
    flat = torch.full((1, 1, 9, 9), 0.25)
    hole = torch.zeros(1, 1, 9, 9)
    hole[..., 2:7, 1:8] = 1
    assert torch.allclose(fill_masked(flat, hole), flat)
    assert torch.equal(fill_masked(flat, torch.ones(1, 1, 9, 9)), torch.zeros(1, 1, 9, 9))  # nothing visible
    with pytest.raises(ValueError, match="does not fit"):
        fill_masked(image, mask[..., :10])


def _informed_logits(score, seen):
    """Logits whose draw is always z + 1 (mod V) and whose probability of the current token is ordered by
    `score` (`h w`, per position): lower score = the current token less likely. Records each z in `seen`."""
    def fn(z, rows, step):
        seen.append(z.clone())
        logits = torch.full((*z.shape, V), -30.0)
        logits.scatter_(-1, ((z + 1) % V)[..., None], 10.0)
        logits.scatter_(-1, z[..., None], score.expand_as(z)[..., None].float())
        return logits
    return fn


def test_informed_update_positions_take_the_least_likely_current_tokens():
    score = torch.randperm(16, generator=torch.Generator().manual_seed(0)).float().view(4, 4) - 20.0  # distinct
    init = torch.randint(0, V, (3, 4, 4))
    keep = torch.zeros(3, 4, 4, dtype=torch.bool)
    keep[2, :2] = True  # sample 2: 8 known tokens, 8 free; samples 0 and 1 all free
    for p in (0.25, 0.5, 1.0):
        seen = []
        out, _ = sample(_informed_logits(score, seen), (3, 4, 4), V, steps=1, update_proportion=p, init=init,
                        keep=keep, update_positions="informed", generator=torch.Generator().manual_seed(0))
        changed = out != seen[0]
        for i, free in ((0, ~keep[0]), (1, ~keep[1]), (2, ~keep[2])):
            k = round(p * int(free.sum()))  # exactly round(p * free) positions: the lowest-scored free ones
            assert not changed[i][~free].any() and changed[i].sum() == k
            assert torch.equal(changed[i][free], score[free] <= score[free].sort().values[k - 1])
    with pytest.raises(ValueError, match="update_positions"):
        sample(_copy_logits, (1, 2, 2), V, update_positions="lowest")


def test_informed_update_positions_are_per_sample_whatever_the_batch():
    net = Hourglass(PRESETS["tiny"]).eval()
    labels = torch.tensor([0, 3, 5])
    v = PRESETS["tiny"].codebook_size

    def run(idx):
        gens = [torch.Generator().manual_seed(10 + i) for i in idx]
        with torch.no_grad():
            return sample(lambda z, rows, step: net(z, labels[idx][rows]), (len(idx), 4, 4), v, steps=12, min_steps=3,
                          update_proportion=(1.0, 0.3), update_positions="informed", generator=gens)
    both, taken = run([0, 1, 2])
    for i in range(3):
        alone, alone_taken = run([i])
        assert torch.equal(alone[0], both[i]) and alone_taken[0] == taken[i]
    random_positions, _ = sample(lambda z, rows, step: net(z, labels[rows]), (3, 4, 4), v, steps=12, min_steps=3,
                                 update_proportion=(1.0, 0.3),
                                 generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    assert not torch.equal(random_positions, both)  # the rule changes which draws are taken
