"""End-to-end: every verb of the `sundae` command on the tiny presets, and its one-line errors."""

import argparse
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import SET_TINY_VQ, fails, run
from sundae.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]




def test_train_vqgan_writes_checkpoint_log_and_grids(pipeline):
    tok = pipeline / "tok"
    ckpt = torch.load(tok / "tokenizer.pt", weights_only=True)
    assert ckpt["kind"] == "tokenizer" and ckpt["step"] == 6
    log = [json.loads(line) for line in (tok / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 6]
    assert log[-1]["adaptive_weight"] > 0  # the GAN term is on after disc_start=3
    assert sorted(p.name for p in (tok / "samples").iterdir()) == ["step_0000006.png"]


def test_tokenize_writes_memmap_and_meta(pipeline, image_folder):
    tokens = np.load(pipeline / "tokens" / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and tokens.shape == (24, 8, 8)
    assert tokens.max() < 64
    labels = np.load(pipeline / "tokens" / "labels.npy")
    assert labels.tolist() == [0] * 12 + [1] * 12
    meta = json.loads((pipeline / "tokens" / "meta.json").read_text())
    assert meta["codebook_size"] == 64 and meta["grid"] == [8, 8] and meta["f"] == 4 and meta["num_classes"] == 2
    assert meta["class_names"] == ["circles", "squares"]
    assert Path(meta["tokenizer"]) == (pipeline / "tok" / "tokenizer.pt").resolve()
    assert len(meta["tokenizer_sha256"]) == 64


def test_tokenize_takes_the_tokenizer_run_folder(pipeline, image_folder, tmp_path):
    run("tokenize", "--tokenizer", pipeline / "tok", "--data", image_folder, "--out", tmp_path / "t", "--device", "cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "t" / "tokens.npy"), np.load(pipeline / "tokens" / "tokens.npy"))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert Path(meta["tokenizer"]) == (pipeline / "tok" / "tokenizer.pt").resolve()


def test_train_writes_generator_and_sample_grids(pipeline):
    ckpt = torch.load(pipeline / "gen" / "generator.pt", weights_only=True)
    assert ckpt["kind"] == "generator" and ckpt["config"]["num_classes"] == 2 and ckpt["config"]["codebook_size"] == 64
    assert sorted(p.name for p in (pipeline / "gen" / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]


def test_sample_grid_previews_a_bounded_number_of_samples(pipeline, tmp_path, monkeypatch, capsys):
    import sundae.cli.sampling as sampling
    monkeypatch.setattr(sampling, "GRID_MAX", 3)
    run("sample", "--generator", pipeline / "gen", "--out", tmp_path / "a", "--num", 5, "--steps", 2,
        "--class", "1", "--batch-size", 2, "--nrow", 3, "--device", "cpu")
    assert len(list((tmp_path / "a" / "samples").iterdir())) == 5
    assert len((tmp_path / "a" / "samples.jsonl").read_text().splitlines()) == 5
    # Three 32x32 images in one row of three, 2-pixel padding: the grid holds the first GRID_MAX only.
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 + 3 * 34, 2 + 34)
    out = capsys.readouterr().out
    assert "5 samples in" in out and "grid.png shows the first 3" in out


def test_sample(pipeline, tmp_path):
    gen = pipeline / "gen" / "generator.pt"
    run("sample", "--generator", gen, "--out", tmp_path / "a", "--num", 5, "--steps", 4, "--class", "1",
        "--temperature", "1.0,0.7", "--device", "cpu")
    files = sorted((tmp_path / "a" / "samples").iterdir())
    assert len(files) == 5 and Image.open(files[0]).size == (32, 32)
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 32
    run("sample", "--generator", gen, "--out", tmp_path / "b", "--num", 5, "--steps", 4, "--class", "1",
        "--temperature", "1.0,0.7", "--device", "cpu")
    # Same seed, same config: the same images.
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    run("sample", "--generator", gen, "--out", tmp_path / "c", "--num", 5, "--steps", 4, "--class", "1",
        "--temperature", "1.0,0.7", "--device", "cpu", "--precision", "bf16")
    assert len(list((tmp_path / "c" / "samples").iterdir())) == 5
    run("sample", "--generator", gen, "--out", tmp_path / "d", "--num", 5, "--steps", 4, "--class", "1",
        "--temperature", "1.0,0.7", "--device", "cpu", "--update-positions", "informed")
    assert (tmp_path / "a" / "grid.png").read_bytes() != (tmp_path / "d" / "grid.png").read_bytes()


def test_sample_image_i_redrawn_alone_and_every_verb_takes_a_run_folder_or_bundle(pipeline, image_folder, tmp_path,
                                                                                   capsys):
    common = ("--steps", 4, "--class", "0,1", "--device", "cpu")
    run("sample", "--generator", pipeline / "gen", "--out", tmp_path / "all", "--num", 5, "--batch-size", 2,
        "--seed", 10, *common)
    records = [json.loads(line) for line in (tmp_path / "all" / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [10, 11, 12, 13, 14] and [r["class"] for r in records] == [0, 1, 0, 1, 0]
    run("sample", "--generator", pipeline / "gen", "--out", tmp_path / "one", "--num", 1, "--seed", 13,
        "--steps", 4, "--class", "1", "--device", "cpu")
    assert ((tmp_path / "one" / "samples" / "00000.png").read_bytes()
            == (tmp_path / "all" / "samples" / "00003.png").read_bytes())
    # A bundle copied elsewhere, the original tokenizer run out of reach: sample and inpaint take it.
    run("export", pipeline / "gen", tmp_path / "bundle")
    shutil.copytree(tmp_path / "bundle", tmp_path / "copy" / "model")
    assert "trained for 6 steps" in (tmp_path / "copy" / "model" / "README.md").read_text()
    run("sample", "--generator", tmp_path / "copy" / "model", "--out", tmp_path / "from_bundle", "--num", 1,
        "--seed", 13, "--steps", 4, "--class", "1", "--device", "cpu")
    assert ((tmp_path / "from_bundle" / "samples" / "00000.png").read_bytes()
            == (tmp_path / "one" / "samples" / "00000.png").read_bytes())
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for generator in (pipeline / "gen", tmp_path / "copy" / "model"):
        run("inpaint", "--generator", generator, "--image", image_folder / "circles" / "00.png", "--mask",
            tmp_path / "mask.png", "--out", tmp_path / "inpaint", "--num", 2, "--overwrite", *common)
        assert len(list((tmp_path / "inpaint").glob("completion_*.png"))) == 2
    assert "already holds an export: pass --overwrite" in fails(capsys, "export", pipeline / "gen", tmp_path / "bundle")


def test_inpaint_completions_know_nothing_of_the_masked_pixels(pipeline, image_folder, tmp_path):
    """Issue 19: two images equal outside the mask give bit-identical completions for the same seed."""
    original = np.asarray(Image.open(image_folder / "circles" / "00.png"))
    hidden = original.copy()
    hidden[8:24, 8:24] = 255 - hidden[8:24, 8:24]
    Image.fromarray(hidden).save(tmp_path / "hidden.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    outs = []
    for name, image in (("a", image_folder / "circles" / "00.png"), ("b", tmp_path / "hidden.png")):
        run("inpaint", "--generator", pipeline / "gen" / "generator.pt", "--image", image, "--mask",
            tmp_path / "mask.png", "--out", tmp_path / name, "--num", 2, "--class", 0, "--steps", 5, "--seed", 4,
            "--device", "cpu")
        outs.append([np.asarray(Image.open(tmp_path / name / f"completion_{i:02d}.png")) for i in range(2)])
    assert all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))


def test_inpaint_keeps_pixels_outside_the_mask(pipeline, image_folder, tmp_path):
    image = image_folder / "circles" / "00.png"
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[9:13, 20:30] = 255  # touches token rows 2-3, columns 5-7
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run("inpaint", "--generator", pipeline / "gen" / "generator.pt", "--image", image, "--mask",
        tmp_path / "mask.png", "--out", tmp_path / "out", "--num", 3, "--class", 0, "--steps", 5, "--device", "cpu")
    original = np.asarray(Image.open(image))
    regen = np.zeros((32, 32), dtype=bool)
    regen[8:16, 20:32] = True  # the whole f x f cells the mask touches
    completions = [np.asarray(Image.open(tmp_path / "out" / f"completion_{i:02d}.png")) for i in range(3)]
    for c in completions:
        assert np.array_equal(c[~regen], original[~regen])
    # Different completions inside the regenerated cells.
    assert not np.array_equal(completions[0][regen], completions[1][regen])
    assert (tmp_path / "out" / "figure.png").is_file()


def test_guidance_flags(pipeline, image_folder, tmp_path, capsys):
    gen = pipeline / "gen" / "generator.pt"
    args = ["--num", 3, "--steps", 4, "--class", "1", "--device", "cpu"]
    run("sample", "--generator", gen, "--out", tmp_path / "plain", *args)
    for name, scale in (("two", "2"), ("ramp", "1,3")):
        run("sample", "--generator", gen, "--out", tmp_path / name, *args, "--guidance-scale", scale)
    grids = {name: (tmp_path / name / "grid.png").read_bytes() for name in ("plain", "two", "ramp")}
    assert grids["two"] != grids["plain"] and grids["ramp"] != grids["two"]
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    run("inpaint", "--generator", gen, "--image", image_folder / "circles" / "00.png", "--mask", tmp_path / "mask.png",
        "--out", tmp_path / "inpaint", *args, "--guidance-scale", "3")
    assert len(list((tmp_path / "inpaint").glob("completion_*.png"))) == 3
    capsys.readouterr()
    run("train", "--tokens", pipeline / "tokens", "--out", tmp_path / "uncond", "--preset", "tiny", "--set", "steps=1",
        "--set", "batch_size=4", "--set", "num_classes=0", "--device", "cpu")
    capsys.readouterr()
    assert "unconditional" in fails(capsys, "sample", "--generator", tmp_path / "uncond" / "generator.pt", "--out",
                                    tmp_path / "y", "--guidance-scale", "2", "--device", "cpu")


def test_reconstruct(pipeline, image_folder, tmp_path, capsys):
    run("reconstruct", "--tokenizer", pipeline / "tok" / "tokenizer.pt", "--data", image_folder, "--num", 4,
        "--out", tmp_path / "r.png", "--device", "cpu")
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "r.png").is_file()


def test_one_line_errors(pipeline, image_folder, tmp_path, capsys):
    gen, tok = pipeline / "gen" / "generator.pt", pipeline / "tok" / "tokenizer.pt"
    assert "unknown key" in fails(capsys, "train", "--tokens", pipeline / "tokens", "--out", tmp_path,
                                  "--preset", "tiny", "--set", "bogus=1")
    assert "expected a value" in fails(capsys, "train", "--tokens", pipeline / "tokens", "--out", tmp_path,
                                       "--preset", "tiny", "--set", "steps=many")
    assert "unknown generator preset" in fails(capsys, "train", "--tokens", pipeline / "tokens", "--out", tmp_path,
                                               "--preset", "huge")
    assert "outside the trained classes" in fails(capsys, "sample", "--generator", gen, "--out", tmp_path,
                                                  "--class", "7")
    assert "steps must be >= 1" in fails(capsys, "sample", "--generator", gen, "--out", tmp_path, "--steps", "0")
    assert "but a generator was expected" in fails(capsys, "sample", "--generator", tok, "--out", tmp_path)
    assert "does not exist" in fails(capsys, "train-vqgan", "--data", tmp_path / "nothing", "--out", tmp_path,
                                     "--preset", "tiny")
    assert "pass --resume" in fails(capsys, "train", "--tokens", pipeline / "tokens", "--out", pipeline / "gen",
                                    "--preset", "tiny")
    moved = tmp_path / "moved.pt"
    shutil.copy(gen, moved)
    ckpt = torch.load(moved, weights_only=True)
    ckpt["meta"]["tokenizer"] = str(tmp_path / "gone" / "tokenizer.pt")
    torch.save(ckpt, moved)
    assert "pass --tokenizer" in fails(capsys, "sample", "--generator", moved, "--out", tmp_path)
    assert "depth must be three" in fails(capsys, "train", "--tokens", pipeline / "tokens", "--out", tmp_path / "d",
                                          "--preset", "tiny", "--set", "depth=1,1")
    assert "temperature" in fails(capsys, "sample", "--generator", gen, "--out", tmp_path, "--temperature", "nan")
    assert "integers" in fails(capsys, "sample", "--generator", gen, "--out", tmp_path, "--class", "x")
    other_tok = tmp_path / "other_tok.pt"
    ckpt = torch.load(tok, weights_only=True)
    ckpt["step"] += 1  # same weights, different file: not the tokenizer the generator recorded
    torch.save(ckpt, other_tok)
    assert "sha256" in fails(capsys, "sample", "--generator", gen, "--tokenizer", other_tok, "--out", tmp_path)
    small = np.zeros((16, 16), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small_mask.png")
    assert "mask" in fails(capsys, "inpaint", "--generator", gen, "--image", image_folder / "circles" / "00.png",
                           "--mask", tmp_path / "small_mask.png", "--out", tmp_path, "--class", "0")


def test_quickstart_without_data_says_how_to_get_it(tmp_path, capsys):
    err = fails(capsys, "quickstart", "--data", tmp_path / "empty", "--out", tmp_path / "qs", "--preset", "tiny")
    assert "apt-get install dataset-fashion-mnist" in err and str(tmp_path / "empty") in err


def test_every_verb_has_help():
    for verb in ("train-vqgan", "convert-taming", "reconstruct", "tokenize", "train", "sample", "inpaint", "img2img",
                 "outpaint", "export", "demo", "quickstart"):
        result = subprocess.run([sys.executable, "-m", "sundae", verb, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: sundae" in result.stdout


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_quickstart_tiny_console_script(tmp_path, monkeypatch):
    exe = shutil.which("sundae") or f"{sys.executable} -m sundae"
    cmd = exe.split() + ["quickstart", "--preset", "tiny", "--out", str(tmp_path / "quickstart"), "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "quickstart" / "metrics.json").read_text())
    assert metrics["samples"]["count"] == 20
    assert metrics["classifier"]["train_images"] == 128 and metrics["dataset"]["train_images"] == 256
    # With the progress bars off, stdout still says what runs, and ends with the key figures.
    lines = result.stdout.splitlines()
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert f"samples judged their class {metrics['samples']['class_accuracy']:.3f}" in result.stdout
    assert lines[-1].startswith("quickstart done in")
    assert 0.0 <= metrics["samples"]["class_accuracy"] <= 1.0
    assert metrics["inpainting"]["known_tokens_kept"] is True
    assert metrics["inpainting"]["mean_pairwise_l2_inside_mask"] > 0
    for name in ("reconstructions.png", "samples_by_class.png", "inpainting.png"):
        assert Image.open(tmp_path / "quickstart" / name).size[0] > 32
    # The README's example of loading the quickstart's checkpoints, run where it expects them.
    from test_readme import python_examples
    monkeypatch.chdir(tmp_path)
    exec(compile(python_examples()[0], "README.md", "exec"), {})
    assert Image.open(tmp_path / "trouser.png").size == (32, 32)


def test_resume_continues_with_the_stored_settings(image_folder, tmp_path):
    out = tmp_path / "tok"
    run("train-vqgan", "--data", image_folder, "--out", out, *SET_TINY_VQ[:2], "--set", "steps=3",
        "--set", "batch_size=4", "--set", "save_every=1", "--device", "cpu")
    ckpt = torch.load(out / "tokenizer.pt", weights_only=True)
    ckpt["step"] = 2  # as if interrupted after step 2
    torch.save(ckpt, out / "tokenizer.pt")
    # No --set: steps=3 and batch_size=4 come from the checkpoint, not from the preset (20 and 8).
    run("train-vqgan", "--data", image_folder, "--out", out, "--preset", "tiny", "--resume", "--device", "cpu")
    resumed = torch.load(out / "tokenizer.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["train"]["batch_size"] == 4


def test_overwrite_starts_over_and_is_never_implicit(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "tok"
    tiny = ("--data", image_folder, "--out", out, *SET_TINY_VQ[:2], "--set", "batch_size=4", "--device", "cpu")
    run("train-vqgan", *tiny, "--set", "steps=3", "--set", "save_every=1", "--set", "log_every=1")
    assert len(list((out / "checkpoints").glob("step_*.pt"))) == 3
    run("plot", out)
    assert (out / "curves.png").is_file()
    before = (out / "tokenizer.pt").read_bytes()
    capsys.readouterr()
    assert "--overwrite" in fails(capsys, "train-vqgan", *tiny, "--set", "steps=2")
    assert (out / "tokenizer.pt").read_bytes() == before  # refused: nothing touched
    assert "pass one of them" in fails(capsys, "train-vqgan", *tiny, "--resume", "--overwrite")
    run("train-vqgan", *tiny, "--set", "steps=2", "--set", "save_every=5", "--overwrite")
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 2
    assert [p.name for p in (out / "checkpoints").glob("step_*.pt")] == ["step_0000002.pt"]  # old ones gone
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and max(steps) == 2  # the old run's log (to step 3) is gone
    assert not (out / "curves.png").exists()  # and its plot, which no longer matched the log


def test_full_disk_fails_in_one_line_and_keeps_the_last_checkpoint(image_folder, tmp_path, capsys, monkeypatch,
                                                                   full_disk):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "tok"
    tiny = ("--data", image_folder, "--out", out, *SET_TINY_VQ[:2], "--set", "batch_size=4", "--device", "cpu")
    run("train-vqgan", *tiny, "--set", "steps=2", "--set", "save_every=1")
    full_disk(1000)  # the step-3 checkpoint (no log record before step 5) meets a full disk after 1000 bytes
    capsys.readouterr()
    err = fails(capsys, "train-vqgan", *tiny, "--set", "steps=4", "--set", "save_every=1", "--resume")
    assert err == (f"sundae train-vqgan: error: cannot write {out / 'tokenizer.pt'}: No space left on device "
                   f"(the file there is unchanged)")
    full_disk(None)
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 2  # the last good checkpoint
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))
    run("train-vqgan", *tiny, "--set", "steps=4", "--set", "save_every=1", "--resume")
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 4


def test_full_disk_on_a_real_file_system_during_training(image_folder, small_tmpfs, capsys, monkeypatch):
    """A real ENOSPC (torch's writer turns it into a RuntimeError naming no file) during a resumed run: one
    line naming the file, the run's checkpoint intact, and the run resumes once there is space, each step
    once in its log (step 3's record, which fits the log's last page, is dropped on resume)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = small_tmpfs.path / "tok"
    tiny = ("--data", image_folder, "--out", out, *SET_TINY_VQ[:2], "--set", "batch_size=4", "--set", "log_every=1",
            "--set", "sample_every=100", "--device", "cpu")
    run("train-vqgan", *tiny, "--set", "steps=2", "--set", "save_every=2")
    filler = small_tmpfs.fill()
    err = fails(capsys, "train-vqgan", *tiny, "--set", "steps=4", "--set", "save_every=2", "--resume")
    assert err == (f"sundae train-vqgan: error: cannot write {out / 'tokenizer.pt'}: No space left on device "
                   f"(the file there is unchanged)")
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in out.rglob(".*")) == []  # no temporary files
    filler.unlink()
    run("train-vqgan", *tiny, "--set", "steps=4", "--set", "save_every=2", "--resume")
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 4
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_export_on_a_full_disk_fails_in_one_line(pipeline, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "exported"
    err = fails(capsys, "export", pipeline / "gen", out)
    written = out / "tokenizer" / "model.safetensors"  # a generator's bundle: its tokenizer is written first
    assert err == f"sundae export: error: cannot write {written}: No space left on device"
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no temporary file left


def test_export_folders_load_and_sample_like_the_checkpoints(pipeline, tmp_path, capsys):
    run("export", pipeline / "gen", tmp_path / "gen")  # a run folder: its generator.pt
    run("export", pipeline / "tok" / "tokenizer.pt", tmp_path / "tok")
    info = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert info["kind"] == "generator" and info["weights"] == "ema" and info["meta"]["grid"] == [8, 8]
    from safetensors.torch import load_file
    ema = torch.load(pipeline / "gen" / "generator.pt", weights_only=True)["ema"]
    exported = load_file(tmp_path / "gen" / "model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    common = ["--num", 4, "--steps", 4, "--class", "1", "--device", "cpu"]
    run("sample", "--generator", pipeline / "gen" / "generator.pt", "--out", tmp_path / "a", *common)
    run("sample", "--generator", tmp_path / "gen", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "b", *common)
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    capsys.readouterr()
    assert "holds a generator, but a tokenizer" in fails(capsys, "reconstruct", "--tokenizer", tmp_path / "gen",
                                                         "--data", tmp_path, "--out", tmp_path / "c.png")
    (tmp_path / "gen" / "model.safetensors").unlink()
    assert "model.safetensors is missing" in fails(capsys, "sample", "--generator", tmp_path / "gen", "--out",
                                                   tmp_path / "c")


def test_the_models_recorded_sampler_is_the_default_of_every_verb(pipeline, tmp_path, capsys):
    from sundae.checkpoint import bundle_info
    from sundae.pipeline import SundaePipeline
    from sundae.sundae import SamplerConfig
    ckpt = torch.load(pipeline / "gen" / "generator.pt", weights_only=True)
    recorded = SamplerConfig(steps=3, temperature=(1.0, 0.9), update_proportion=0.7, min_steps=0, early_stop=False,
                             update_positions="informed")
    ckpt["meta"]["sampler"] = dataclasses.asdict(recorded)
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "generator.pt")
    assert SundaePipeline.from_pretrained(tmp_path / "run").sampler == recorded
    capsys.readouterr()
    run("sample", "--generator", tmp_path / "run", "--out", tmp_path / "a", "--num", 2, "--class", "1")
    assert "(mean 3.0 steps)" in capsys.readouterr().out  # no early stop, T=3: the recorded sampler
    run("sample", "--generator", tmp_path / "run", "--out", tmp_path / "b", "--num", 2, "--class", "1", "--steps", 2)
    assert "(mean 2.0 steps)" in capsys.readouterr().out  # a flag given wins
    run("export", tmp_path / "run", tmp_path / "bundle")
    assert SamplerConfig(**bundle_info(tmp_path / "bundle")["sampler"]) == recorded
    assert SundaePipeline.from_pretrained(tmp_path / "bundle").sampler == recorded


def test_version_names_the_package_version_and_where_it_runs_from(capsys):
    import sundae

    wanted = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    with pytest.raises(SystemExit) as exit_:
        run("--version")
    assert exit_.value.code == 0
    assert capsys.readouterr().out == (f"sundae {wanted} from {Path(sundae.__file__).parent} (torch "
                                       f"{torch.__version__}, Python {platform.python_version()})\n")


def test_version_in_a_source_checkout_comes_from_pyproject(monkeypatch, tmp_path):
    import sundae

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    wanted = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert sundae._package_version(ROOT) == wanted
    assert sundae._package_version(tmp_path) == "unknown"  # neither installed nor beside a pyproject.toml


def _verb_help(capsys, verb: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(verb, "--help")
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone


def test_an_error_line_is_one_write(tmp_path, monkeypatch):
    # The ranks of a torchrun job share stderr: a line written in two pieces (print's text, then its newline)
    # interleaved with the other rank's (seen in CI as "...--outsundae train: error: ...").
    from sundae.cli import main

    class Recorder(io.StringIO):
        writes: list = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)
    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit):
        main(["tokenize", "--tokenizer", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--out",
              str(tmp_path / "t")])
    errors = [w for w in Recorder.writes if ": error: " in w]
    assert len(errors) == 1 and errors[0].startswith("sundae tokenize: error: ") and errors[0].endswith("\n")
    assert errors[0].count("\n") == 1


def test_every_option_of_every_verb_has_help_text():
    from sundae.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [(verb, a.option_strings[0]) for verb, p in sub.choices.items() for a in p._actions
            if a.option_strings and not a.help]
    assert bare == []


def test_help_of_every_verb_taking_a_generator_names_every_kind(capsys, monkeypatch):
    from sundae.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    verbs = [verb for verb, p in sub.choices.items() if "--generator" in p._option_string_actions]
    assert sorted(verbs) == ["demo", "evaluate", "img2img", "inpaint", "outpaint", "sample"]
    for verb in verbs:
        text = _verb_help(capsys, verb)
        # The kinds test_every_kind_of_generator_the_help_names_loads loads.
        for kind in ("bundle folder (`sundae export`", "an export folder (config.json + model.safetensors)",
                     "a run folder of `sundae train` (its generator.pt)",
                     "a quickstart output folder (its generator/generator.pt)",
                     "a checkpoint file (generator.pt, or a run's checkpoints/step_NNNNNNN.pt)"):
            assert kind in text, (verb, kind)
        for kind in ("--tokenizer TOKENIZER the tokenizer the generator was trained with", "an export folder",
                     "a run folder of `sundae train-vqgan` (its tokenizer.pt)",
                     "a quickstart output folder (its tokenizer/tokenizer.pt)", "a checkpoint file (.pt)"):
            assert kind in text, (verb, kind)


def test_every_kind_of_generator_the_help_names_loads(pipeline, tmp_path):
    from sundae import SundaePipeline
    from sundae.checkpoint import export

    gen, tok = pipeline / "gen", pipeline / "tok"
    run("export", gen, tmp_path / "bundle")
    export(gen / "generator.pt", tmp_path / "export")  # the generator alone: it names its tokenizer
    export(tok / "tokenizer.pt", tmp_path / "tok_export")
    quick = tmp_path / "quick"  # a quickstart's layout: generator/ and tokenizer/ run folders side by side
    shutil.copytree(gen, quick / "generator")
    shutil.copytree(tok, quick / "tokenizer")
    numbered = sorted((gen / "checkpoints").glob("step_*.pt"))[-1]  # the last step: generator.pt's weights
    reference = SundaePipeline.from_pretrained(gen / "generator.pt")
    for path in (tmp_path / "bundle", tmp_path / "export", gen, quick, gen / "generator.pt", numbered):
        pipe = SundaePipeline.from_pretrained(path)
        for a, b in ((pipe.generator, reference.generator), (pipe.tokenizer, reference.tokenizer)):
            state = b.state_dict()
            assert all(torch.equal(v, state[k]) for k, v in a.state_dict().items()), path
    for path in (tmp_path / "tok_export", tok, quick, tok / "tokenizer.pt"):  # --tokenizer's kinds
        pipe = SundaePipeline.from_pretrained(gen, tokenizer=path)
        state = reference.tokenizer.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in pipe.tokenizer.state_dict().items()), path


def test_samples_jsonl_describes_every_image(pipeline, tmp_path):
    run("sample", "--generator", pipeline / "gen", "--out", tmp_path / "s", "--num", 3, "--seed", 7,
        "--class", "squares,0", "--guidance-scale", "2,1", "--steps", 3, "--no-early-stop", "--device", "cpu")
    records = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    # Classes cycle over "squares,0"; the scale is the --guidance-scale pair; without early stop every image
    # takes all 3 steps.
    assert records == [
        {"file": f"samples/{i:05d}.png", "seed": 7 + i, "steps": 3, "guidance_scale": [2.0, 1.0],
         "class": label, "class_name": ["circles", "squares"][label]}
        for i, label in enumerate([1, 0, 1])]
    assert sorted(p.name for p in (tmp_path / "s" / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_samples_jsonl_of_a_run_stopped_midway_holds_its_finished_batches(pipeline, tmp_path, monkeypatch, capsys):
    import sundae.cli.sampling as sampling

    saved = []

    def save_or_fail(image, path):
        if len(saved) == 3:  # the second image of the second batch of 2
            raise OSError(28, "No space left on device", str(path))
        saved.append(path)
        save_image(image, path)

    save_image = sampling.save_image
    monkeypatch.setattr(sampling, "save_image", save_or_fail)
    fails(capsys, "sample", "--generator", pipeline / "gen", "--out", tmp_path / "s", "--num", 5,
          "--batch-size", 2, "--steps", 2, "--device", "cpu")
    out = tmp_path / "s"
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["samples/00000.png", "samples/00001.png"]  # whole lines, batch 1 only
    assert [r["seed"] for r in records] == [0, 1]
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


def test_sample_in_fp16_on_cpu(pipeline, tmp_path):
    from sundae import SundaePipeline
    from sundae.pipeline import class_logits_fn

    # The library: the network runs under fp16 autocast (its logits differ from fp32's by fp16 rounding),
    # and the logits handed to the sampler are float32.
    pipe = SundaePipeline.from_pretrained(pipeline / "gen")
    z = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    rows, labels = torch.arange(2), torch.tensor([0, 1])
    with torch.inference_mode():
        full = class_logits_fn(pipe.generator, labels, "fp32")(z, rows, 0)
        half = class_logits_fn(pipe.generator, labels, "fp16")(z, rows, 0)
    assert half.dtype == torch.float32 and half.isfinite().all()
    assert not torch.equal(half, full)  # autocast did run in fp16 (a disabled autocast would give fp32's bits)
    torch.testing.assert_close(half, full, rtol=0.02, atol=0.02)
    # The command line: --precision fp16 on the CPU samples and records like fp32.
    run("sample", "--generator", pipeline / "gen", "--out", tmp_path / "h", "--num", 2, "--steps", 3,
        "--precision", "fp16", "--device", "cpu")
    assert len((tmp_path / "h" / "samples.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "h" / "samples").iterdir()) == ["00000.png", "00001.png"]
