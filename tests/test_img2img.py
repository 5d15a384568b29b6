"""img2img and outpainting (issue 18, item 2): the fixed-share corruption, the sampler's tail and init start,
`SundaePipeline.img2img` / `.outpaint`, and the `sundae img2img` / `sundae outpaint` verbs."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import fails, run
from sundae import SamplerConfig, SundaePipeline
from sundae.checkpoint import save_checkpoint
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.images import image_to_tensor, tensor_to_image
from sundae.io import file_digest
from sundae.sundae import corrupt_share, sample
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = SamplerConfig(steps=6, min_steps=2)
V = 64  # the tiny presets' codebook


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A quickstart-like folder of untrained tiny checkpoints (tokenizer f=4, generator with 2 classes, 8x8
    grid), as tests/test_pipeline.py builds it."""
    root = tmp_path_factory.mktemp("qs")
    torch.manual_seed(0)
    vq = VQGAN(VQ["tiny"])
    (root / "tokenizer").mkdir()
    tok = root / "tokenizer" / "tokenizer.pt"
    save_checkpoint(tok, "tokenizer", vq.cfg, vq, ema=None)
    meta = {"grid": [8, 8], "tokenizer": str(tok), "tokenizer_sha256": file_digest(tok), "class_names": ["a", "b"]}
    net = Hourglass(dataclasses.replace(HG["tiny"], num_classes=2))
    (root / "generator").mkdir()
    save_checkpoint(root / "generator" / "generator.pt", "generator", net.cfg, net, ema=None, meta=meta, step=1)
    return root


@pytest.fixture(scope="module")
def pipe(models):
    return SundaePipeline.from_pretrained(models)


def _image(seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """A random image `3 H W` on the 8-bit levels (so a PNG of it reads back exactly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float() / 127.5 - 1


# ---- the method: a fixed share of the tokens, the schedule's tail, a start from init ----------------------

@pytest.mark.parametrize("share, grid, expected", [(0.25, (8, 8), 16), (0.3, (8, 8), 19), (0.3375, (8, 5), 14),
                                                   (1.0, (8, 5), 40), (0.0, (8, 8), 0), (0.004, (8, 8), 0)])
def test_corrupt_share_replaces_exactly_k_positions_per_sample(share, grid, expected):
    # expected = share * h * w rounded, halves up: 16, 19.2 -> 19, 13.5 -> 14, 40, 0, 0.256 -> 0
    tokens = torch.randint(0, V, (200, *grid), generator=torch.Generator().manual_seed(0))
    out, chosen = corrupt_share(tokens, share, V, [torch.Generator().manual_seed(i) for i in range(200)])
    assert chosen.flatten(1).sum(1).tolist() == [expected] * 200
    assert torch.equal(out[~chosen], tokens[~chosen])  # the rest untouched
    changed = (out != tokens).sum().item()
    # A replacement is uniform over the codebook: it keeps the old token 1 time in V (binomial, 6 sigma).
    n = 200 * expected
    mean, sigma = n * (V - 1) / V, math.sqrt(n * (V - 1) / V ** 2)
    assert changed <= n and abs(changed - mean) <= 6 * sigma + 1e-9
    if expected:  # the positions are spread: every position is chosen in some sample
        assert chosen.any(0).all()


def test_corrupt_share_of_a_sample_does_not_depend_on_its_batch():
    tokens = torch.randint(0, V, (4, 8, 8), generator=torch.Generator().manual_seed(1))
    batch, chosen = corrupt_share(tokens, 0.5, V, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    alone, alone_chosen = corrupt_share(tokens[2:3], 0.5, V, [torch.Generator().manual_seed(12)])
    assert torch.equal(alone[0], batch[2]) and torch.equal(alone_chosen[0], chosen[2])
    for bad in (-0.1, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"share must be a number in \[0, 1\]"):
            corrupt_share(tokens, bad, V)


def test_sampler_tail_is_the_last_steps_of_the_schedule():
    full = SamplerConfig(steps=10, temperature=(1.0, 0.7), update_proportion=(0.9, 0.5), min_steps=8)
    for k in (1, 4, 10):
        tail = full.tail(k)
        assert tail.steps == k and tail.min_steps == max(0, 8 - (10 - k))
        assert tail.temperatures() == pytest.approx(full.temperatures()[10 - k:], abs=1e-6)
        assert tail.update_proportions() == pytest.approx(full.update_proportions()[10 - k:], abs=1e-6)
    assert full.tail(10) == full
    for bad in (0, 11):
        with pytest.raises(ValueError, match="tail steps must lie in 1..10"):
            full.tail(bad)


def test_sample_starts_from_init_without_a_keep_mask():
    init = torch.randint(0, V, (3, 4, 5), generator=torch.Generator().manual_seed(2))

    def stay(z, rows, step):  # every position overwhelmingly prefers its current token
        return torch.nn.functional.one_hot(z, V).float() * 1e4
    z, taken = sample(stay, (3, 4, 5), V, FAST, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, init) and taken.tolist() == [FAST.min_steps] * 3  # nothing changes: early stop
    with pytest.raises(ValueError, match=r"init has shape \(3, 4, 5\)"):
        sample(stay, (2, 4, 5), V, FAST, init=init)


# ---- the pipeline ---------------------------------------------------------------------------------------

def test_img2img_strength_0_is_the_reconstruction_and_1_ignores_the_image(pipe):
    image = _image(0, 30, 17)  # not multiples of f = 4: padded, cropped back
    out = pipe.img2img(image, 0.0, num=2, class_labels=1, sampler=FAST, seed=3, output_type="pt")
    assert torch.equal(out.tokens, pipe.encode(image[None]).expand(2, -1, -1))
    assert torch.equal(out.images, pipe.reconstruct(image[None]).expand(2, -1, -1, -1))
    assert out.steps.tolist() == [0, 0] and out.images.shape == (2, 3, 30, 17)
    ones = [pipe.img2img(_image(s, 30, 17), 1.0, num=2, class_labels=1, sampler=FAST, seed=3, output_type="pt")
            for s in (1, 2)]
    assert not torch.equal(pipe.encode(_image(1, 30, 17)[None]), pipe.encode(_image(2, 30, 17)[None]))
    assert torch.equal(ones[0].tokens, ones[1].tokens) and torch.equal(ones[0].images, ones[1].images)
    assert (ones[0].steps <= FAST.steps).all() and (ones[0].steps >= FAST.min_steps).all()


def test_img2img_changes_the_share_of_starting_tokens_and_runs_the_share_of_steps(pipe, monkeypatch):
    image = _image(4)
    starts = []
    original = pipe.logits_fn

    def spy(*args, **kwargs):  # the sampler's first call sees the starting tokens
        fn = original(*args, **kwargs)

        def logits_fn(z, rows, step):
            if step == 0:
                starts.append(z.clone())
            return fn(z, rows, step)
        return logits_fn
    monkeypatch.setattr(pipe, "logits_fn", spy)
    sampler = SamplerConfig(steps=10, min_steps=10)  # no early stop within the tail: every tail step runs
    out = pipe.img2img(image, 0.5, num=8, class_labels=0, sampler=sampler, seed=0, output_type="pt")
    encoded = pipe.encode(image[None])
    (start,) = starts
    changed = (start != encoded).flatten(1).sum(1)
    k = 32  # 0.5 * 8 * 8 positions replaced by uniform codes, each the old one 1 time in 64
    assert (changed <= k).all() and changed.sum() >= 8 * k * (V - 1) / V - 6 * math.sqrt(8 * k / V)
    assert out.steps.tolist() == [5] * 8  # round(0.5 * 10): the last 5 steps of the schedule
    assert not torch.equal(out.tokens, start)  # and they sample every position


def test_img2img_and_outpaint_of_a_seed_do_not_depend_on_the_batch(pipe):
    image = _image(5)
    batch = pipe.img2img(image, 0.6, num=3, class_labels=0, sampler=FAST, seed=7, output_type="pt")
    alone = pipe.img2img(image, 0.6, num=1, class_labels=0, sampler=FAST, seed=9, output_type="pt")
    assert torch.equal(alone.images[0], batch.images[2]) and torch.equal(alone.tokens[0], batch.tokens[2])
    assert len({tuple(t.flatten().tolist()) for t in batch.tokens}) == 3  # three seeds, three variations
    batch = pipe.outpaint(image, (4, 0, 8, 0), num=3, class_labels=1, sampler=FAST, seed=7, output_type="pt")
    alone = pipe.outpaint(image, (4, 0, 8, 0), num=1, class_labels=1, sampler=FAST, seed=9, output_type="pt")
    assert torch.equal(alone.images[0], batch.images[2])


@pytest.mark.parametrize("extend", [(3, 0, 5, 2), (8, 4, 0, 12), (0, 1, 0, 0)])
def test_outpaint_keeps_the_image_exactly_and_grows_the_canvas(pipe, extend):
    image = _image(6, 30, 17)
    left, top, right, bottom = extend
    out = pipe.outpaint(image, extend, num=2, class_labels=0, sampler=FAST, seed=1, output_type="pt")
    assert out.images.shape == (2, 3, top + 30 + bottom, left + 17 + right)
    assert torch.equal(out.images[:, :, top:top + 30, left:left + 17], image[None].expand(2, -1, -1, -1))
    border = torch.ones(top + 30 + bottom, left + 17 + right, dtype=torch.bool)
    border[top:top + 30, left:left + 17] = False
    assert (out.images[:, :, border] != 0).any()  # generated, not the canvas's grey
    pil = pipe.outpaint(tensor_to_image(image), extend, num=1, class_labels=0, sampler=FAST, seed=1)
    assert np.array_equal(np.asarray(pil.images[0]), np.asarray(tensor_to_image(out.images[0])))


def test_bad_inputs_are_value_errors(pipe):
    image = _image(0)
    for strength in (-0.1, 1.5, float("nan"), None):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            pipe.img2img(image, strength, num=1, class_labels=0, sampler=FAST)
    for extend in ((-1, 0, 0, 0), (0, 0, 0, 0), (1, 2, 3), (0.5, 0, 0, 0), None, 4, (float("nan"), 0, 0, 0), ("a", 0, 0, 0)):
        with pytest.raises(ValueError, match="extend must be four integers >= 0"):
            pipe.outpaint(image, extend, num=1, class_labels=0, sampler=FAST)
    with pytest.raises(ValueError, match="would be 40x32 = 1280 pixels; the limit is 1024 pixels"):
        pipe.outpaint(image, (8, 0, 0, 0), num=1, class_labels=0, sampler=FAST, max_pixels=1024)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe.img2img(image, 0.5, num=1, sampler=FAST)
    with pytest.raises(ValueError, match="num must be >= 1"):
        pipe.outpaint(image, (4, 0, 0, 0), num=0, class_labels=0, sampler=FAST)


# ---- the command line -----------------------------------------------------------------------------------

def _png(path, image: torch.Tensor):
    tensor_to_image(image).save(path)
    return path


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_img2img_verb(models, pipe, tmp_path):
    common = ["--generator", models, "--class", "1", "--steps", "6", "--min-steps", "2", "--device", "cpu"]
    a = _png(tmp_path / "a.png", _image(1, 30, 17))
    _png(tmp_path / "b.png", _image(2, 30, 17))
    run("img2img", "--image", a, "--strength", "0", "--num", "2", "--out", tmp_path / "zero", *common)
    expected = np.asarray(tensor_to_image(pipe.reconstruct(image_to_tensor(Image.open(a))[None])[0]))
    assert all(np.array_equal(_read(tmp_path / "zero" / f"output_{i:02d}.png"), expected) for i in range(2))
    assert _read(tmp_path / "zero" / "figure.png").shape == (2 + 32, 2 + 3 * 19, 3)  # input + 2 outputs, 30x17
    for name in ("a", "b"):
        run("img2img", "--image", tmp_path / f"{name}.png", "--strength", "1", "--num", "2", "--out",
            tmp_path / f"one_{name}", *common)
    assert all(np.array_equal(_read(tmp_path / "one_a" / f"output_{i:02d}.png"),
                              _read(tmp_path / "one_b" / f"output_{i:02d}.png")) for i in range(2))
    run("img2img", "--image", a, "--strength", "0.4", "--num", "3", "--seed", "5", "--out", tmp_path / "three",
        *common)
    run("img2img", "--image", a, "--strength", "0.4", "--num", "1", "--seed", "7", "--out", tmp_path / "alone",
        *common)
    assert np.array_equal(_read(tmp_path / "three" / "output_02.png"), _read(tmp_path / "alone" / "output_00.png"))


def test_outpaint_verb(models, tmp_path):
    common = ["--generator", models, "--class", "0", "--steps", "6", "--min-steps", "2", "--device", "cpu"]
    pixels = np.random.default_rng(0).integers(0, 256, (30, 17, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    run("outpaint", "--image", tmp_path / "in.png", "--extend", "3,0,6,5", "--num", "2", "--out", tmp_path / "o",
        *common)
    for i in range(2):
        out = _read(tmp_path / "o" / f"output_{i:02d}.png")
        assert out.shape == (35, 26, 3) and np.array_equal(out[0:30, 3:20], pixels)


def test_edit_verbs_bad_inputs_are_one_line_errors(models, tmp_path, capsys):
    image = _png(tmp_path / "in.png", _image(0))
    common = ["--generator", models, "--image", image, "--out", tmp_path / "out", "--device", "cpu"]
    for value in ("1.5", "-0.1", "nan", "half"):
        assert f"argument --strength: expected a number in [0, 1], got '{value}'" in fails(
            capsys, "img2img", *common, "--class", "0", "--strength", value)
    for value in ("-1,0,0,0", "1,2,3", "a,b,c,d", "1,2,3,4,5"):
        assert "argument --extend: expected four integers >= 0 LEFT,TOP,RIGHT,BOTTOM" in fails(
            capsys, "outpaint", *common, "--class", "0", f"--extend={value}")  # "=": "-1,..." is no flag
    assert "'0,0,0,0' adds no pixels" in fails(capsys, "outpaint", *common, "--class", "0", "--extend", "0,0,0,0")
    err = fails(capsys, "outpaint", *common, "--class", "0", "--extend", "0,0,0,200000")
    assert err.endswith("to 32x200032 = 6401024 pixels; the limit is 4194304 (--max-pixels)")  # 2048x2048
    err = fails(capsys, "outpaint", *common, "--class", "0", "--extend", "0,0,32,0", "--max-pixels", "32x32")
    assert err.endswith(f"--extend 0,0,32,0 grows {image} to 64x32 = 2048 pixels; the limit is 1024 (--max-pixels)")
    assert "class-conditional: pass --class" in fails(capsys, "img2img", *common, "--strength", "0.5")
    assert not (tmp_path / "out").exists()  # nothing written, no folder left behind
