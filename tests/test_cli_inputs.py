"""Wrong and unusual inputs through the command line: sizes, masks, checkpoints, arguments, --debug.

The models are untrained tiny ones written with `save_checkpoint` (no training needed for these checks).
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sundae.checkpoint import save_checkpoint
from sundae.cli import file_digest, load_mask, main
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN


def run(*argv):
    main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """Run the CLI expecting a one-line error and exit status 2; returns the line."""
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny checkpoints: tokenizer A (f=4, 64 codes), tokenizer B (other weights), a generator
    with 2 classes trained "on" A's 8x8 grids, and an unconditional one."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("tok_a", 0), ("tok_b", 1)):
        torch.manual_seed(seed)
        model = VQGAN(VQ["tiny"])
        save_checkpoint(root / f"{name}.pt", "tokenizer", model.cfg, model, ema=None)
    meta = {"grid": [8, 8], "tokenizer": str(root / "tok_a.pt"), "tokenizer_sha256": file_digest(root / "tok_a.pt")}
    for name, classes in (("gen", 2), ("gen_uncond", 0)):
        torch.manual_seed(2)
        net = Hourglass(dataclasses.replace(HG["tiny"], num_classes=classes))
        save_checkpoint(root / f"{name}.pt", "generator", net.cfg, net, ema=None, meta=meta)
    return root


@pytest.fixture()
def picture(tmp_path):
    """A 30x17 (H x W) RGB picture: sides that are not multiples of f=4 (token grid 8x5, odd width)."""
    pixels = np.random.default_rng(0).integers(0, 256, (30, 17, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "picture.png")
    return tmp_path / "picture.png", pixels


def test_reconstruct_one_image_keeps_its_size(models, picture, tmp_path, capsys):
    path, _ = picture
    run("reconstruct", "--tokenizer", models / "tok_a.pt", "--data", path, "--out", tmp_path / "r.png",
        "--device", "cpu")
    # Input above reconstruction, 2-pixel pads: (2 + 30 + 2 + 30 + 2) x (2 + 17 + 2).
    assert Image.open(tmp_path / "r.png").size == (21, 66)
    assert "PSNR" in capsys.readouterr().out


def _inpaint(models, image, mask, out, *extra):
    run("inpaint", "--generator", models / "gen.pt", "--image", image, "--mask", mask, "--out", out, "--num", 2,
        "--class", 1, "--steps", 3, "--device", "cpu", *extra)
    return [np.asarray(Image.open(out / f"completion_{i:02d}.png")) for i in range(2)]


@pytest.mark.parametrize("dilate", [0, 1])
def test_inpaint_any_size_regenerates_exactly_the_touched_cells(models, picture, tmp_path, dilate, capsys):
    path, pixels = picture
    mask = np.zeros((30, 17), dtype=np.uint8)
    mask[29, 16] = 255  # the bottom-right pixel: cell (7, 4) of the 8x5 grid, which is cut to 2 x 1 pixels
    Image.fromarray(mask).save(tmp_path / "mask.png")
    completions = _inpaint(models, path, tmp_path / "mask.png", tmp_path / "out", "--dilate", dilate)
    regen = np.zeros((30, 17), dtype=bool)
    regen[28 - 4 * dilate:, 16 - 4 * dilate:] = True  # the cell, grown by one cell up and left with --dilate 1
    for c in completions:
        assert c.shape == (30, 17, 3)
        assert np.array_equal(c[~regen], pixels[~regen])
    # The trained grid is 8x8, this image gives 8x5: a warning, not an error.
    assert "trained on 8x8" in capsys.readouterr().err


def test_rgba_mask_transparent_means_regenerate(tmp_path):
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[2, 5, 3] = 0  # one transparent pixel; the colour is black everywhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", (8, 12)).nonzero().tolist() == [[0, 2, 5]]
    gray = np.zeros((8, 12), dtype=np.uint8)
    gray[2, 5] = 255  # white = regenerate: the same mask
    Image.fromarray(gray).save(tmp_path / "w.png")
    assert torch.equal(load_mask(tmp_path / "w.png", (8, 12)), load_mask(tmp_path / "m.png", (8, 12)))


def test_mask_and_image_errors(models, picture, tmp_path, capsys):
    path, _ = picture
    Image.fromarray(np.zeros((17, 30), dtype=np.uint8)).save(tmp_path / "rotated.png")
    gen = models / "gen.pt"
    common = ("--generator", gen, "--out", tmp_path / "o", "--class", 0, "--device", "cpu")
    err = fails(capsys, "inpaint", *common, "--image", path, "--mask", tmp_path / "rotated.png")
    assert "rotated.png is 17x30 (HxW), the image is 30x17: they must be the same size" in err
    (tmp_path / "empty.png").write_bytes(b"")
    assert f"cannot read image {tmp_path / 'empty.png'}: empty file" in fails(
        capsys, "inpaint", *common, "--image", tmp_path / "empty.png", "--mask", path)
    assert "mask: cannot read image" in fails(capsys, "inpaint", *common, "--image", path, "--mask", tmp_path / "empty.png")
    assert "--dilate must be >= 0" in fails(capsys, "inpaint", *common, "--image", path, "--mask", path, "--dilate", -1)


def test_checkpoint_errors(models, picture, tmp_path, capsys, image_folder):
    path, _ = picture
    tok, gen = models / "tok_a.pt", models / "gen.pt"
    out = ("--out", tmp_path / "o", "--device", "cpu")
    assert f"{tok} holds a tokenizer, but a generator was expected" in fails(capsys, "sample", "--generator", tok, *out)
    assert f"{gen} holds a generator, but a tokenizer was expected" in fails(
        capsys, "reconstruct", "--tokenizer", gen, "--data", path, *out)
    assert f"{gen} holds a generator, but a tokenizer was expected" in fails(
        capsys, "sample", "--generator", gen, "--tokenizer", gen, *out)
    raw = gen.read_bytes()
    (tmp_path / "half.pt").write_bytes(raw[: len(raw) // 2])
    assert "half.pt is not a readable checkpoint (truncated or corrupt?)" in fails(
        capsys, "sample", "--generator", tmp_path / "half.pt", *out)
    ckpt = torch.load(gen, weights_only=True)
    ckpt["config"]["dim"] = 48  # the weights are 32 wide
    torch.save(ckpt, tmp_path / "mismatch.pt")
    assert "mismatch.pt: the weights do not match the config" in fails(
        capsys, "sample", "--generator", tmp_path / "mismatch.pt", *out)
    ckpt["config"]["dim"] = "wide"
    torch.save(ckpt, tmp_path / "badtype.pt")
    assert "badtype.pt: invalid HourglassConfig" in fails(capsys, "sample", "--generator", tmp_path / "badtype.pt", *out)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    assert "foreign.pt is not a sundae checkpoint" in fails(capsys, "sample", "--generator", tmp_path / "foreign.pt", *out)
    # A token folder made by tokenizer A, decoded (training sample grids) with tokenizer B.
    run("tokenize", "--tokenizer", tok, "--data", image_folder, "--out", tmp_path / "tokens", "--device", "cpu")
    capsys.readouterr()
    err = fails(capsys, "train", "--tokens", tmp_path / "tokens", "--tokenizer", models / "tok_b.pt", "--preset", "tiny",
                "--out", tmp_path / "run", "--device", "cpu")
    assert f"the tokens in {tmp_path / 'tokens'} were made by {tok}, not by {models / 'tok_b.pt'}" in err
    # And a generator sampled with a tokenizer other than its own.
    assert "is not the tokenizer" in fails(capsys, "sample", "--generator", gen, "--tokenizer", models / "tok_b.pt", *out)


def test_argument_errors(models, tmp_path, capsys):
    gen, uncond = models / "gen.pt", models / "gen_uncond.pt"
    out = ("--out", tmp_path / "o", "--device", "cpu")
    assert "steps must be >= 1, got 0" in fails(capsys, "sample", "--generator", gen, *out, "--steps", 0)
    assert "steps must be >= 1, got -3" in fails(capsys, "sample", "--generator", gen, *out, "--steps", -3)
    assert "temperature must be > 0, got (0.0, 0.0)" in fails(capsys, "sample", "--generator", gen, *out,
                                                             "--temperature", 0)
    assert "temperature must be > 0, got (1.0, -0.5)" in fails(capsys, "sample", "--generator", gen, *out,
                                                              "--temperature", "1,-0.5")
    for value in ("0", "1.5", "0.5,0"):
        assert "update proportion must lie in (0, 1]" in fails(capsys, "sample", "--generator", gen, *out,
                                                               "--update-proportion", value)
    assert "--class 2 is outside the trained classes 0..1" in fails(capsys, "sample", "--generator", gen, *out,
                                                                    "--class", 2)
    assert "--class -1 is outside the trained classes 0..1" in fails(capsys, "sample", "--generator", gen, *out,
                                                                     "--class=-1")
    assert "--class given, but the generator is unconditional" in fails(capsys, "sample", "--generator", uncond,
                                                                        *out, "--class", 0)
    err = fails(capsys, "train-vqgan", "--data", tmp_path, "--out", tmp_path / "r", "--preset", "tiny",
                "--set", "learning_rate=1")
    assert "--set learning_rate: unknown key; valid keys:" in err and "lr" in err
    assert "--set expects key=value" in fails(capsys, "train-vqgan", "--data", tmp_path, "--out", tmp_path / "r",
                                              "--preset", "tiny", "--set", "steps")


def test_debug_shows_the_traceback(models, tmp_path):
    tok = models / "tok_a.pt"
    with pytest.raises(ValueError, match="but a generator was expected"):
        run("--debug", "sample", "--generator", tok, "--out", tmp_path, "--device", "cpu")
    with pytest.raises(ValueError, match="but a generator was expected"):
        run("sample", "--generator", tok, "--out", tmp_path, "--device", "cpu", "--debug")


def test_unexpected_errors_are_one_line_too(models, tmp_path, capsys, monkeypatch):
    import sundae.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("something inside torch\nwith a second line")

    monkeypatch.setattr(cli, "load_generator", broken)
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", tmp_path, "--device", "cpu")
    assert err == "sundae sample: error: something inside torch (RuntimeError; run with --debug for the traceback)"
