"""Wrong and unusual inputs through the command line: sizes, masks, checkpoints, arguments, --debug.

The models are untrained tiny ones written with `save_checkpoint` (no training needed for these checks).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sundae.checkpoint import save_checkpoint
from cli_helpers import fails, run
from sundae.cli import UsageError, main
from sundae.hourglass import Hourglass
from sundae.hourglass import PRESETS as HG
from sundae.images import load_mask
from sundae.io import file_digest
from sundae.vqgan import PRESETS as VQ
from sundae.vqgan import VQGAN



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
    err = fails(capsys, "inpaint", *common, "--image", path, "--mask", tmp_path / "empty.png")
    assert "mask: cannot read image" in err
    err = fails(capsys, "inpaint", *common, "--image", path, "--mask", path, "--dilate", -1)
    assert "--dilate must be >= 0" in err
    assert "--passes must be >= 1, got 0" in fails(capsys, "inpaint", *common, "--image", path, "--mask", path,
                                                   "--passes", 0)


def test_checkpoint_errors(models, picture, tmp_path, capsys, image_folder):
    path, _ = picture
    tok, gen = models / "tok_a.pt", models / "gen.pt"
    out = ("--out", tmp_path / "o", "--device", "cpu")
    err = fails(capsys, "sample", "--generator", tok, *out)
    assert f"{tok} holds a tokenizer, but a generator was expected" in err
    assert f"{gen} holds a generator, but a tokenizer was expected" in fails(
        capsys, "reconstruct", "--tokenizer", gen, "--data", path, *out)
    assert f"{gen} holds a generator, but a tokenizer was expected" in fails(
        capsys, "sample", "--generator", gen, "--tokenizer", gen, *out)
    raw = gen.read_bytes()
    (tmp_path / "half.pt").write_bytes(raw[: len(raw) // 2])
    assert "half.pt is not a readable checkpoint (truncated, corrupt or not a checkpoint file)" in fails(
        capsys, "sample", "--generator", tmp_path / "half.pt", *out)
    ckpt = torch.load(gen, weights_only=True)
    ckpt["config"]["dim"] = 48  # the weights are 32 wide
    torch.save(ckpt, tmp_path / "mismatch.pt")
    assert "mismatch.pt: the weights do not match the config" in fails(
        capsys, "sample", "--generator", tmp_path / "mismatch.pt", *out)
    ckpt["config"]["dim"] = "wide"
    torch.save(ckpt, tmp_path / "badtype.pt")
    err = fails(capsys, "sample", "--generator", tmp_path / "badtype.pt", *out)
    assert "badtype.pt: invalid HourglassConfig" in err
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    err = fails(capsys, "sample", "--generator", tmp_path / "foreign.pt", *out)
    assert "foreign.pt is not a sundae checkpoint" in err
    # A token folder made by tokenizer A, decoded (training sample grids) with tokenizer B.
    run("tokenize", "--tokenizer", tok, "--data", image_folder, "--out", tmp_path / "tokens", "--device", "cpu")
    capsys.readouterr()
    err = fails(capsys, "train", "--tokens", tmp_path / "tokens", "--tokenizer", models / "tok_b.pt",
                "--preset", "tiny", "--out", tmp_path / "run", "--device", "cpu")
    assert f"the tokens in {tmp_path / 'tokens'} were made by {tok}, not by {models / 'tok_b.pt'}" in err
    # And a generator sampled with a tokenizer other than its own.
    err = fails(capsys, "sample", "--generator", gen, "--tokenizer", models / "tok_b.pt", *out)
    assert "is not the tokenizer" in err


def test_argument_errors(models, tmp_path, capsys):
    gen, uncond = models / "gen.pt", models / "gen_uncond.pt"
    out = ("--out", tmp_path / "o", "--device", "cpu")
    assert "steps must be >= 1, got 0" in fails(capsys, "sample", "--generator", gen, *out, "--steps", 0)
    assert "steps must be >= 1, got -3" in fails(capsys, "sample", "--generator", gen, *out, "--steps", -3)
    for value, shown in (("0", "(0.0, 0.0)"), ("1,-0.5", "(1.0, -0.5)"), ("inf", "(inf, inf)")):
        err = fails(capsys, "sample", "--generator", gen, *out, "--temperature", value)
        assert f"temperature must be finite and > 0, got {shown}" in err
    assert "--min-steps must be >= 0, got -1" in fails(capsys, "sample", "--generator", gen, *out, "--min-steps=-1")
    for value in ("0", "1.5", "0.5,0"):
        assert "update proportion must lie in (0, 1]" in fails(capsys, "sample", "--generator", gen, *out,
                                                               "--update-proportion", value)
    assert "--update-positions must be one of random, informed, got 'lowest'" in fails(
        capsys, "sample", "--generator", gen, *out, "--update-positions", "lowest")
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
    import sundae.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something inside torch\nwith a second line")

    monkeypatch.setattr(pipeline, "load_generator", broken)
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", tmp_path, "--device", "cpu")
    assert err == "sundae sample: error: something inside torch (RuntimeError; run with --debug for the traceback)"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_folder_that_cannot_be_created(models, tmp_path, capsys):
    """A folder on a file system that refuses it gets a one-line error naming the folder, before any work."""
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", "/proc/sundae_out", "--device", "cpu")
    assert err.startswith("sundae sample: error: --out /proc/sundae_out: cannot create the folder (")
    assert not Path("/proc/sundae_out").exists()
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", "/proc", "--device", "cpu")
    assert err.startswith("sundae sample: error: --out /proc: cannot write into the folder (")


def test_reconstruct_out_folder_and_debug_flags(models, picture, tmp_path, capsys):
    """reconstruct's --out is a file: its folder is checked. export and convert-taming take --debug too."""
    path, _ = picture
    err = fails(capsys, "reconstruct", "--tokenizer", models / "tok_a.pt", "--data", path, "--out", path / "r.png",
                "--device", "cpu")
    assert err == (f"sundae reconstruct: error: --out {path / 'r.png'}: its folder {path} is a file: expected a "
                   f"folder (it is created if missing)")
    with pytest.raises(UsageError, match="holds no generator.pt or tokenizer.pt"):  # raised, not one line
        main(["export", str(tmp_path), str(tmp_path / "x"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["convert-taming", "--checkpoint", str(tmp_path / "no.ckpt"), "--config", str(tmp_path / "no.yaml"),
              "--out", str(tmp_path / "t"), "--debug"])


def test_out_folder_check_is_safe_when_processes_run_it_at_once(tmp_path):
    """Every torchrun process checks --out: four threads checking each of 100 new folders at once must all
    pass and leave nothing behind (a check that made and removed the folder itself failed 122 of 400)."""
    from concurrent.futures import ThreadPoolExecutor
    from sundae.cli.outputs import check_out_folder

    targets = [tmp_path / f"run{i}" / "out" for i in range(100) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda out: check_out_folder(out, "--out"), targets)) == [None] * 400
    assert list(tmp_path.iterdir()) == []


def test_fresh_user_mistakes(models, picture, tmp_path, capsys):
    """What a new user tried: a file where a folder belongs, a file as --out."""
    path, _ = picture
    tok = models / "tok_a.pt"
    err = fails(capsys, "tokenize", "--tokenizer", tok, "--data", path, "--out", tmp_path / "t", "--device", "cpu")
    assert f"{path} is a file: expected a folder of images" in err
    assert not (tmp_path / "t").exists()  # the output folder check leaves nothing behind on failure
    err = fails(capsys, "tokenize", "--tokenizer", tok, "--data", tmp_path, "--out", path, "--device", "cpu")
    assert f"--out {path} is a file: expected a folder" in err
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", path / "a" / "b", "--device", "cpu")
    assert err == f"sundae sample: error: --out {path / 'a' / 'b'}: cannot create the folder, {path} is a file"
    err = fails(capsys, "export", models / "gen.pt", path)
    assert err == f"sundae export: error: out {path} is a file: expected a folder (it is created if missing)"
    empty, both = tmp_path / "empty_run", tmp_path / "both_run"
    empty.mkdir()
    both.mkdir()
    for name, kind in (("gen.pt", "generator"), ("tok_a.pt", "tokenizer")):
        (both / f"{kind}.pt").write_bytes((models / name).read_bytes())
    err = fails(capsys, "export", empty, tmp_path / "x")
    assert err.startswith(f"sundae export: error: {empty} holds no generator.pt or tokenizer.pt: pass a run folder")
    err = fails(capsys, "export", both, tmp_path / "x")
    assert err == f"sundae export: error: {both} holds both generator.pt and tokenizer.pt: pass the one to export"
    assert not (tmp_path / "x").exists()
    # A run folder or a quickstart folder where a checkpoint belongs: it means the generator inside it.
    quick = tmp_path / "quick"
    (quick / "generator").mkdir(parents=True)
    (quick / "generator" / "generator.pt").write_bytes((models / "gen.pt").read_bytes())
    grids = []
    for i, folder in enumerate((models / "gen.pt", both, quick)):
        run("sample", "--generator", folder, "--out", tmp_path / f"s{i}", "--num", 2, "--steps", 2, "--device", "cpu")
        grids.append((tmp_path / f"s{i}" / "grid.png").read_bytes())
    assert grids[1] == grids[0] and grids[2] == grids[0]
    err = fails(capsys, "inpaint", "--generator", models / "gen.pt", "--image", tmp_path / "nothere.png", "--mask",
                path, "--out", tmp_path / "o", "--class", 0, "--device", "cpu")
    assert f"image {tmp_path / 'nothere.png'} does not exist" in err


def test_images_of_a_size_off_the_token_grid_come_back_at_that_size(models, image_folder, tmp_path):
    # 30x30 crops at f=4: 8x8 tokens (padded); the generator's samples are cropped back to 30x30.
    run("tokenize", "--tokenizer", models / "tok_a.pt", "--data", image_folder, "--image-size", 30,
        "--out", tmp_path / "tokens", "--device", "cpu")
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["grid"] == [8, 8] and meta["image_size"] == [30, 30]
    run("train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "gen", "--preset", "tiny", "--set", "steps=1",
        "--set", "batch_size=4", "--set", "sample_every=100", "--device", "cpu")
    run("sample", "--generator", tmp_path / "gen" / "generator.pt", "--out", tmp_path / "s", "--num", 2,
        "--steps", 2, "--device", "cpu")
    assert Image.open(tmp_path / "s" / "samples" / "00000.png").size == (30, 30)


def test_empty_and_full_masks_warn(models, picture, tmp_path, capsys):
    path, pixels = picture
    for value, expected in ((0, "marks no pixel to regenerate"), (255, "marks every pixel")):
        Image.fromarray(np.full((30, 17), value, dtype=np.uint8)).save(tmp_path / "m.png")
        completions = _inpaint(models, path, tmp_path / "m.png", tmp_path / f"out{value}")
        assert expected in capsys.readouterr().err
        if value == 0:  # nothing regenerated: the input comes back exactly
            assert all(np.array_equal(c, pixels) for c in completions)
    assert not np.array_equal(completions[0], pixels)  # the full mask regenerated the image


def test_broken_token_folders_and_run_folders(models, image_folder, tmp_path, capsys):
    run("tokenize", "--tokenizer", models / "tok_a.pt", "--data", image_folder, "--out", tmp_path / "tokens",
        "--device", "cpu")
    capsys.readouterr()
    train = ("train", "--tokens", tmp_path / "tokens", "--out", tmp_path / "gen", "--preset", "tiny", "--device", "cpu")
    raw = (tmp_path / "tokens" / "tokens.npy").read_bytes()
    (tmp_path / "tokens" / "tokens.npy").write_bytes(raw[:100])
    assert f"cannot read the token files in {tmp_path / 'tokens'} (truncated?" in fails(capsys, *train)
    (tmp_path / "tokens" / "meta.json").write_text('{"grid": [8, 8], "codebook_size": "many"}')
    assert "'codebook_size' a positive integer" in fails(capsys, *train)
    # Run folders where a checkpoint file belongs: their checkpoints are meant.
    gen_dir, tok_dir = tmp_path / "run", tmp_path / "tok_run"
    for folder, name, kind in ((gen_dir, "gen.pt", "generator"), (tok_dir, "tok_a.pt", "tokenizer")):
        folder.mkdir()
        (folder / f"{kind}.pt").write_bytes((models / name).read_bytes())
    run("sample", "--generator", gen_dir, "--tokenizer", tok_dir, "--out", tmp_path / "s", "--num", 2, "--steps", 2,
        "--device", "cpu")
    assert len(list((tmp_path / "s" / "samples").glob("*.png"))) == 2
    err = fails(capsys, "sample", "--generator", tmp_path, "--out", tmp_path / "s2", "--device", "cpu")
    assert f"{tmp_path / 'config.json'} is missing: an exported model folder holds config.json" in err


def test_incomplete_checkpoint(models, tmp_path, capsys):
    ckpt = torch.load(models / "gen.pt", weights_only=True)
    del ckpt["model"]
    torch.save(ckpt, tmp_path / "nomodel.pt")
    err = fails(capsys, "sample", "--generator", tmp_path / "nomodel.pt", "--out", tmp_path / "s", "--device", "cpu")
    assert "nomodel.pt lacks a 'config' or 'model' entry" in err


def test_second_fresh_user_trial(models, picture, image_folder, tmp_path, capsys):
    """What the second fresh-user trial found: resume and --set surprises, outputs overwritten, messages."""
    path, _ = picture
    tok, tokens = models / "tok_a.pt", tmp_path / "tokens"
    run("tokenize", "--tokenizer", tok, "--data", image_folder, "--out", tokens, "--device", "cpu")
    capsys.readouterr()
    # An existing token folder is not replaced without --overwrite.
    err = fails(capsys, "tokenize", "--tokenizer", tok, "--data", image_folder, "--out", tokens, "--device", "cpu")
    assert "already holds the outputs of an earlier run" in err and "--overwrite" in err
    train = ("train", "--tokens", tokens, "--out", tmp_path / "gen", "--device", "cpu", "--set", "batch_size=4",
             "--set", "sample_every=100")
    # The token folder decides codebook_size and num_classes: a conflicting --set is an error, not ignored.
    assert "the token folder" in fails(capsys, *train, "--preset", "tiny", "--set", "codebook_size=32")
    # Its old name is no --set key (stored configs that use it still load).
    err = fails(capsys, *train, "--preset", "tiny", "--set", "vocab_size=32")
    assert "--set vocab_size: unknown key" in err and "codebook_size" in err
    # Tuples in the format the error message shows, and in Python's.
    run(*train, "--preset", "tiny", "--set", "steps=2", "--set", "depth=(1, 2, 1)")
    assert list(torch.load(tmp_path / "gen" / "generator.pt", weights_only=True)["config"]["depth"]) == [1, 2, 1]
    # Resuming: an architecture change is named; --preset is ignored with a warning; nothing left to train says so.
    err = fails(capsys, *train, "--resume", "--set", "dim=64")
    assert "dim: 32 in the run, 64 asked" in err
    # A run and a token folder written before the codebook size had one name (`vocab_size` in the stored
    # config, `n_codes` in the checkpoint's meta and in meta.json) resume as they are.
    ckpt = torch.load(tmp_path / "gen" / "generator.pt", weights_only=True)
    ckpt["config"]["vocab_size"] = ckpt["config"].pop("codebook_size")
    ckpt["meta"]["n_codes"] = ckpt["meta"].pop("codebook_size")
    torch.save(ckpt, tmp_path / "gen" / "generator.pt")
    meta = json.loads((tokens / "meta.json").read_text())
    meta["n_codes"] = meta.pop("codebook_size")
    (tokens / "meta.json").write_text(json.dumps(meta))
    run(*train, "--resume", "--preset", "fashion", "--set", "steps=2")
    err = capsys.readouterr().err
    assert "--preset fashion ignored" in err and "nothing to train" in err
    ckpt["meta"]["n_codes"] = 32  # the old key is read: another codebook size is noticed
    torch.save(ckpt, tmp_path / "gen" / "generator.pt")
    err = fails(capsys, *train, "--resume", "--set", "steps=3")
    assert "token grids of 32 codes" in err and "resume with the same token folder" in err
    ckpt["meta"]["n_codes"] = 64
    torch.save(ckpt, tmp_path / "gen" / "generator.pt")
    # A run that fails before writing anything leaves no run folder (nor the parents it created) behind.
    err = fails(capsys, *train, "--preset", "tiny", "--set", "lr=1e30", "--out", tmp_path / "nan" / "run")
    assert "nothing was saved for this step, the run has no checkpoint yet" in err
    assert not (tmp_path / "nan").exists()
    run(*train, "--resume", "--preset", "tiny", "--set", "depth=(1, 2, 1)", "--set", "steps=2")
    err = capsys.readouterr().err  # the preset with the run's own --set is the run's architecture: no warning
    assert "ignored" not in err and "nothing to train" in err
    run(*train, "--preset", "tiny", "--set", "steps=1", "--resume", "--out", tmp_path / "fresh")
    assert "no " in capsys.readouterr().err  # nothing to resume: a new run, said so
    # Resuming with the preset the run was trained with does not warn, although the token folder changed
    # the data-decided fields of that preset (here the number of classes).
    stored = torch.load(tmp_path / "fresh" / "generator.pt", weights_only=True)["config"]
    assert (stored["num_classes"], HG["tiny"].num_classes) == (2, 10)
    run(*train, "--preset", "tiny", "--set", "steps=1", "--resume", "--out", tmp_path / "fresh")
    err = capsys.readouterr().err
    assert "ignored" not in err and "nothing to train" in err
    # A token folder with another grid cannot continue the run.
    other = tmp_path / "tokens4"
    other.mkdir()
    np.save(other / "tokens.npy", np.zeros((4, 4, 4), dtype=np.uint16))
    np.save(other / "labels.npy", np.zeros(4, dtype=np.int64))
    meta = json.loads((tokens / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "grid": [4, 4]}))
    err = fails(capsys, "train", "--tokens", other, "--out", tmp_path / "gen", "--resume", "--set", "steps=3",
                "--device", "cpu")
    assert "resume with the same token folder" in err
    assert "is a file: expected a token folder" in fails(capsys, "train", "--tokens", tok, "--out", tmp_path / "x")
    # sample refuses to mix new samples with an earlier run's; --overwrite replaces them all.
    gen = tmp_path / "gen" / "generator.pt"
    sample = ("sample", "--generator", gen, "--out", tmp_path / "s", "--steps", 2, "--device", "cpu")
    run(*sample, "--num", 4)
    assert "--overwrite" in fails(capsys, *sample, "--num", 2)
    run(*sample, "--num", 2, "--overwrite")
    assert sorted(p.name for p in (tmp_path / "s" / "samples").iterdir()) == ["00000.png", "00001.png"]
    # reconstruct: --out must be a PNG file path; --split is for idx folders only.
    recon = ("reconstruct", "--tokenizer", tok, "--data", path, "--device", "cpu")
    assert "is a folder: expected the path of a PNG file" in fails(capsys, *recon, "--out", tmp_path)
    assert "must end in .png" in fails(capsys, *recon, "--out", tmp_path / "r.jpg")
    assert "--split applies to idx folders" in fails(capsys, *recon, "--out", tmp_path / "r.png", "--split", "test")
    # Checkpoint messages: a PNG is not a checkpoint, and torch's advice to load unsafely is never shown.
    err = fails(capsys, "sample", "--generator", gen, "--tokenizer", path, "--out", tmp_path / "s2")
    assert "is not a readable checkpoint" in err and "weights_only" not in err


def test_argument_types_explain_themselves(capsys):
    from sundae.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["demo", "--run", "q", "--max-pixels", "1024x768"]).max_pixels == 1024 * 768
    for argv, expected in ((["demo", "--run", "q", "--port", "99999"], "port number in 1..65535"),
                           (["sample", "--generator", "g", "--out", "o", "--temperature", "0.5,"], "START,END")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert expected in err and "_pair" not in err and "_positive" not in err


def test_failing_overwrite_keeps_the_earlier_outputs(models, picture, tmp_path, capsys):
    """--overwrite deletes the earlier outputs only once the inputs are validated: a run that fails on its
    arguments or inputs leaves the earlier run as it was."""
    path, _ = picture
    out = tmp_path / "s"
    sample = ("sample", "--generator", models / "gen_uncond.pt", "--out", out, "--steps", 2, "--num", 2,
              "--device", "cpu")
    run(*sample)
    before = sorted(p.name for p in (out / "samples").iterdir())
    assert before == ["00000.png", "00001.png"] and (out / "grid.png").is_file()
    assert "--prompt given" in fails(capsys, *sample, "--overwrite", "--prompt", "x")
    assert "--class given" in fails(capsys, *sample, "--overwrite", "--class", "1")
    gen = ("sample", "--generator", models / "gen.pt", "--out", out, "--steps", 2, "--device", "cpu", "--overwrite")
    assert "--guidance-scale nan: expected finite" in fails(capsys, *gen, "--guidance-scale", "nan")
    assert sorted(p.name for p in (out / "samples").iterdir()) == before and (out / "grid.png").is_file()
    inpaint = ("inpaint", "--generator", models / "gen.pt", "--image", path, "--class", 0, "--num", 1, "--steps", 2,
               "--out", out, "--device", "cpu")
    run(*inpaint, "--mask", path)
    capsys.readouterr()
    assert (out / "figure.png").is_file() and (out / "completion_00.png").is_file()
    fails(capsys, *inpaint, "--mask", tmp_path / "none.png", "--overwrite")  # the mask does not exist
    assert (out / "figure.png").is_file() and (out / "completion_00.png").is_file()


def test_guidance_scale_beyond_float32_names_the_flag(models, tmp_path, capsys):
    err = fails(capsys, "sample", "--generator", models / "gen.pt", "--out", tmp_path, "--guidance-scale", "1,1e300",
                "--device", "cpu")
    assert "--guidance-scale 1,1e300: too large for the float32 logits" in err
    assert "RuntimeError" not in err and not list(tmp_path.iterdir())


def test_text_encoder_on_an_uncaptioned_folder_warns(models, image_folder, tmp_path, capsys):
    run("tokenize", "--tokenizer", models / "tok_a.pt", "--data", image_folder, "--out", tmp_path / "t",
        "--text-encoder", "all-MiniLM-L6-v2", "--device", "cpu")
    err = capsys.readouterr().err
    assert "warning: --text-encoder all-MiniLM-L6-v2 given, but" in err and "has no captions" in err
    assert not (tmp_path / "t" / "captions.json").exists() and (tmp_path / "t" / "tokens.npy").is_file()
    run("tokenize", "--tokenizer", models / "tok_a.pt", "--data", image_folder, "--out", tmp_path / "u",
        "--device", "cpu")
    assert "--text-encoder" not in capsys.readouterr().err  # the default is not "given"


def test_argument_errors_are_one_line_naming_the_flag(models, tmp_path, capsys):
    # argparse's own errors (bad type, bad choice, missing flag) follow the CLI's one-line rule too.
    sample = ("sample", "--generator", models / "gen.pt", "--out", tmp_path, "--device", "cpu")
    err = fails(capsys, *sample, "--guidance-scale", "abc")
    assert err.startswith("sundae sample: error: argument --guidance-scale") and "sundae sample --help" in err
    assert "argument --num" in fails(capsys, *sample, "--num", "x")
    assert "invalid choice: 'foo'" in fails(capsys, "quickstart", "--dataset", "foo")
    assert "--generator" in fails(capsys, "sample", "--out", tmp_path)
    assert not list(tmp_path.iterdir())
