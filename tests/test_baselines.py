"""The benchmark's reference generators (benchmarks/baselines.py): MaskGIT-style and autoregressive."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from baselines import (Autoregressive, MaskGIT, autoregressive_loss, autoregressive_sample,  # noqa: E402
                       cosine_mask_ratio, mask_schedule, maskgit_sample, masked_token_loss, matching_layers)
from sundae.hourglass import PRESETS, Hourglass  # noqa: E402

TINY = PRESETS["tiny"]  # v = 64, d = 32, 10 classes


def test_mask_schedule_follows_the_cosine():
    # gamma(r) = cos(pi r / 2); for n = 64, T = 4: 64 cos(pi/8) = 59.13, 64 cos(pi/4) = 45.25,
    # 64 cos(3 pi/8) = 24.49, then 0.
    assert mask_schedule(64, 4) == [59, 45, 24, 0]
    assert mask_schedule(64, 1) == [0]
    assert float(cosine_mask_ratio(0.0)) == 1.0 and abs(float(cosine_mask_ratio(1.0))) < 1e-12
    # T = n: the cosine would decide nothing at the first steps (floor(64 cos(pi/128)) = 63, then 63 again);
    # the clamp decides exactly one token per step.
    assert mask_schedule(64, 64) == list(range(63, -1, -1))
    for bad in (0, 65):
        with pytest.raises(ValueError, match="steps"):
            mask_schedule(64, bad)


@pytest.mark.parametrize("n", [16, 64])
def test_mask_schedule_decides_at_least_one_token_every_step(n):
    for steps in range(1, n + 1):
        schedule = mask_schedule(n, steps)
        assert len(schedule) == steps and schedule[-1] == 0
        assert all(a > b for a, b in zip([n] + schedule, schedule)), (steps, schedule)


@pytest.mark.parametrize("steps", range(1, 17))
def test_maskgit_makes_one_call_per_step_and_unmasks_the_scheduled_count(steps):
    torch.manual_seed(0)
    net = MaskGIT(TINY).eval()
    h = w = 4
    seen = []

    def logits_fn(z):
        seen.append(z.clone())
        return net(z)

    with torch.no_grad():
        z, calls = maskgit_sample(logits_fn, (3, h, w), TINY.codebook_size, steps,
                                  generator=torch.Generator().manual_seed(0))
    schedule = mask_schedule(h * w, steps)
    assert calls == len(seen) == steps  # T steps are T network calls, also at T = n = 16
    mask_id = TINY.codebook_size
    # Each call sees exactly the count the schedule left masked before it, in every sample.
    for inputs, count in zip(seen, [h * w] + schedule[:-1]):
        assert ((inputs == mask_id).flatten(1).sum(1) == count).all()
    # Decided tokens never change afterwards.
    for a, b in zip(seen, seen[1:] + [z]):
        decided = a != mask_id
        assert torch.equal(a[decided], b[decided])
    assert z.shape == (3, h, w) and (z < TINY.codebook_size).all() and (z >= 0).all()


def test_maskgit_refuses_more_steps_than_tokens():
    with pytest.raises(ValueError, match="steps"):
        maskgit_sample(lambda z: torch.zeros(*z.shape, TINY.codebook_size), (1, 4, 4), TINY.codebook_size, 17)


def test_maskgit_unmasks_the_most_confident_first_without_noise():
    v, n = 8, 16
    # Position p puts probability rising with p on token p % v: the most confident positions are the last.
    peak = torch.arange(1, n + 1, dtype=torch.float32).view(1, 4, 4)

    def logits_fn(z):
        logits = torch.zeros(*z.shape, v)
        logits.scatter_(-1, (torch.arange(n) % v).view(1, 4, 4, 1).expand(z.shape[0], 4, 4, 1),
                        peak[..., None].expand(z.shape[0], 4, 4, 1))
        return logits

    seen = []
    z, _ = maskgit_sample(lambda x: (seen.append(x.clone()), logits_fn(x))[1], (1, 4, 4), v, steps=4,
                          temperature=1e-4, choice_temperature=0.0)
    assert torch.equal(z.flatten(), torch.arange(n) % v)
    # After step 1 the schedule keeps floor(16 cos(pi/8)) = 14 masked: positions 14 and 15 were decided.
    assert (seen[1].flatten() != v).nonzero().flatten().tolist() == [14, 15]


def test_masked_token_loss_counts_only_masked_positions():
    torch.manual_seed(0)
    tokens = torch.randint(0, TINY.codebook_size, (64, 4, 4))
    inputs = []
    # A "network" that is certain of the right token wherever it sees a clean one and uniform at [MASK]:
    # the loss over masked positions alone is exactly ln(v).
    def logits_fn(z):
        inputs.append(z)
        return torch.where((z == TINY.codebook_size)[..., None], torch.zeros(*z.shape, TINY.codebook_size),
                           torch.nn.functional.one_hot(tokens, TINY.codebook_size).float() * 1e4)

    loss = masked_token_loss(logits_fn, tokens, TINY.codebook_size, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(TINY.codebook_size), rel=1e-5)
    counts = (inputs[0] == TINY.codebook_size).flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= 16 and counts.float().std() > 0  # ratios vary per sample


def test_maskgit_network_takes_the_mask_id_and_predicts_only_real_tokens():
    torch.manual_seed(0)
    net = MaskGIT(TINY)
    hourglass = sum(p.numel() for p in Hourglass(TINY).parameters())
    assert sum(p.numel() for p in net.parameters()) == hourglass + TINY.dim  # one extra embedding row
    logits = net(torch.full((2, 4, 4), TINY.codebook_size), torch.tensor([0, 1]))
    assert logits.shape == (2, 4, 4, TINY.codebook_size)


def _ar(seed=0):
    torch.manual_seed(seed)
    return Autoregressive(TINY, layers=2, grid=(4, 4)).eval()


def test_autoregressive_is_causal_in_raster_order():
    net = _ar()
    tokens = torch.randint(0, TINY.codebook_size, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(tokens, torch.tensor([2])).flatten(1, 2)
        for j in (0, 5, 15):
            changed = tokens.clone().flatten(1)
            changed[0, j] = (changed[0, j] + 1) % TINY.codebook_size
            diff = (net(changed.view(1, 4, 4), torch.tensor([2])).flatten(1, 2) - ref).abs().amax(-1)[0]
            # Logits at positions <= j predict tokens <= j: they may not see token j.
            assert diff[:j + 1].max() == 0
            if j < 15:
                assert (diff[j + 1:] > 1e-6).all()
        # The label reaches every position, through the start token.
        assert ((net(tokens, torch.tensor([3])).flatten(1, 2) - ref).abs().amax(-1) > 1e-6).all()


def test_kv_cached_decoding_gives_the_full_forward_logits():
    net = _ar()
    tokens = torch.randint(0, TINY.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        full = net(tokens, labels).flatten(1, 2)
        cache = [[] for _ in net.blocks]
        x = net.start(labels, 2)
        stepwise = []
        for i in range(16):
            stepwise.append(net.run(x, i, cache)[:, -1])
            x = net.token_embedding(tokens.flatten(1)[:, i])[:, None]
        torch.testing.assert_close(torch.stack(stepwise, 1), full, rtol=1e-5, atol=1e-5)
        # A chunk of several positions after a cached prefix works the same way.
        cache = [[] for _ in net.blocks]
        inputs = torch.cat([net.start(labels, 2), net.token_embedding(tokens.flatten(1)[:, :-1])], 1)
        first, rest = net.run(inputs[:, :5], 0, cache), net.run(inputs[:, 5:], 5, cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_autoregressive_sampler_draws_from_the_cached_logits():
    net = _ar()
    labels = torch.tensor([0, 4, 9])
    z = autoregressive_sample(net, 3, labels, temperature=1e-4)  # ~greedy: argmax at every step
    assert z.shape == (3, 4, 4) and z.dtype == torch.long
    with torch.no_grad():
        logits = net(z, labels)
    # Teacher-forcing the sample reproduces its choices: each token was the argmax given its prefix.
    assert torch.equal(logits.argmax(-1), z)
    same = autoregressive_sample(net, 3, labels, generator=torch.Generator().manual_seed(5))
    again = autoregressive_sample(net, 3, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, again)


def test_autoregressive_loss_starts_near_uniform_and_params_match_the_hourglass():
    net = _ar()
    tokens = torch.randint(0, TINY.codebook_size, (8, 4, 4))
    loss = autoregressive_loss(net, tokens, torch.zeros(8, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(TINY.codebook_size), abs=0.1)  # small init: near-uniform logits
    fashion = PRESETS["fashion"]
    layers = matching_layers(fashion, (8, 8))
    ar = sum(p.numel() for p in Autoregressive(fashion, layers, (8, 8)).parameters())
    hg = sum(p.numel() for p in Hourglass(fashion).parameters())
    block = sum(p.numel() for p in Autoregressive(fashion, 1, (8, 8)).parameters()) - \
        sum(p.numel() for p in Autoregressive(fashion, 0, (8, 8)).parameters())
    assert abs(ar - hg) <= block / 2
    with pytest.raises(ValueError, match="8x8 grid"):
        Autoregressive(fashion, 1, (8, 8))(torch.zeros(1, 4, 4, dtype=torch.long))
