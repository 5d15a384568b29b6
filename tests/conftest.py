from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (modules opt in with `pytestmark`). Tiny models gain nothing from
    threads, and on a shared 2-core machine spinning OpenMP threads make them far slower; one thread also
    matches torchrun subprocesses (OMP_NUM_THREADS=1) bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """24 real PNG files, 32x32 RGB, in two class sub-folders (circles and squares of varying colour)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        (root / label).mkdir()
        for i in range(12):
            img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(img)
            x0, y0 = (int(v) for v in rng.integers(2, 14, 2))
            box = (x0, y0, x0 + 16, y0 + 16)
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            (draw.ellipse if label == "circles" else draw.rectangle)(box, fill=colour)
            img.save(root / label / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def pipeline(image_folder, tmp_path_factory):
    """train-vqgan -> tokenize -> train on the image folder (tiny presets, class-conditional with 2 classes);
    returns the folder holding the runs tok/, tokens/ and gen/. Shared by the CLI and evaluate tests."""
    from cli_helpers import SET_TINY_VQ, run

    out = tmp_path_factory.mktemp("run")
    run("train-vqgan", "--data", image_folder, "--out", out / "tok", *SET_TINY_VQ, "--device", "cpu")
    run("tokenize", "--tokenizer", out / "tok" / "tokenizer.pt", "--data", image_folder, "--out", out / "tokens",
        "--device", "cpu")
    run("train", "--tokens", out / "tokens", "--out", out / "gen", "--preset", "tiny", "--set", "steps=6",
        "--set", "batch_size=4", "--set", "sample_every=3", "--device", "cpu")
    return out
