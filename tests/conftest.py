import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

# Threads that wait sleep instead of spinning (libgomp's default), as the `sundae` command sets it
# (sundae.cli.openmp): on a busy CI machine spinning threads make the suite many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
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


class _Cramped(io.FileIO):
    """A file on a disk with `room` bytes left (shared by all such files): a write past it is short, the next
    raises ENOSPC, as on a real full disk."""

    room = 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) and _Cramped.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(data[:_Cramped.room])
        _Cramped.room -= written
        return written


@pytest.fixture
def full_disk(monkeypatch):
    """Files that `sundae.io` opens for writing (checkpoints, .npy files, log.jsonl lines) sit on a disk with
    `room` bytes left. Returns a function setting `room` (None: unlimited, as before)."""
    import sundae.io

    limited = [False]

    def fake_open(file, mode="r", buffering=-1, *args, **kwargs):
        if not limited[0] or not any(c in mode for c in "wax"):
            return open(file, mode, buffering, *args, **kwargs)
        raw = _Cramped(file, mode.replace("b", ""))
        return raw if buffering == 0 else io.BufferedWriter(raw)

    def set_room(room: int | None) -> None:
        limited[0] = room is not None
        _Cramped.room = room or 0

    monkeypatch.setattr(sundae.io, "open", fake_open, raising=False)
    return set_room


class Tmpfs:
    """A mounted tmpfs: `path`, and `fill()` which takes its last free byte (a file `path/filler`)."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self) -> Path:
        filler = self.path / "filler"
        with open(filler, "ab", buffering=0) as fh:
            for size in (1 << 16, 1):  # big blocks, then the bytes left in the last page
                try:
                    while fh.write(b"\0" * size):
                        pass
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
        return filler


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 16 MiB tmpfs mounted on a fresh folder (a `Tmpfs`), for writes that must meet a real full disk.
    Skips the test where this process may not mount one."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield Tmpfs(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def token_dir(tmp_path):
    """A token folder of 20 random 4x4 grids (64 codes, 10 classes) for the training-loop tests."""
    rng = np.random.default_rng(0)
    (tmp_path / "tokens").mkdir()
    np.save(tmp_path / "tokens" / "tokens.npy", rng.integers(0, 64, (20, 4, 4)).astype(np.uint16))
    np.save(tmp_path / "tokens" / "labels.npy", rng.integers(0, 10, 20).astype(np.int64))
    (tmp_path / "tokens" / "meta.json").write_text(json.dumps({"grid": [4, 4], "codebook_size": 64, "num_classes": 10}))
    return tmp_path / "tokens"
