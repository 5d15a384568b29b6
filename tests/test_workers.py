"""`--workers N`: images decoded in DataLoader worker processes give the same results as without them (tokens,
reconstructions, evaluations, a tokenizer trained and resumed), the same one-line errors naming a bad file,
seeds that differ per worker and per pass, and training that still stops cleanly on Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from cli_helpers import SET_TINY_VQ, fails, run
from sundae.checkpoint import load_tokenizer
from sundae.data import ImageFolder, data_loader
from sundae.distributed import EpochBatchSampler

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Noise(Dataset):
    """Item i: (a draw from torch's RNG of the process reading it, i, the id of the worker reading it)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        info = get_worker_info()
        return torch.rand(()), i, -1 if info is None else info.id


def test_each_worker_and_each_pass_draws_its_own_seeded_numbers():
    loader = data_loader(Noise(), workers=2, batch_size=1, seed=5)
    passes = [[(x.item(), i.item(), w.item()) for x, i, w in loader] for _ in range(2)]
    # torch's rule, computed here: each pass draws a base seed from the loader's generator (seeded 5), worker k
    # seeds torch with base + k, and items go to the workers in turn (item i to worker i % 2).
    gen = torch.Generator().manual_seed(5)
    for items in passes:
        base = torch.empty((), dtype=torch.int64).random_(generator=gen).item()
        streams = [torch.Generator().manual_seed(base + k) for k in range(2)]
        expected = [torch.rand((), generator=streams[i % 2]).item() for i in range(8)]
        assert [x for x, _, _ in items] == expected
        assert [(i, w) for _, i, w in items] == [(i, i % 2) for i in range(8)]
    assert passes[0][0][0] != passes[0][1][0] and passes[0][0][0] != passes[1][0][0]
    # The same seed and worker count repeat a run; the loader leaves this process's RNG alone.
    state = torch.get_rng_state()
    again = [(x.item(), i.item(), w.item()) for x, i, w in data_loader(Noise(), workers=2, batch_size=1, seed=5)]
    assert again == passes[0] and torch.equal(torch.get_rng_state(), state)


def test_the_training_loaders_epochs_differ_and_repeat_with_the_seed():
    def stream():  # 4 items, batches of 2: epochs of 2 batches, in one endless pass
        batches = iter(data_loader(Noise(), 2, batch_sampler=EpochBatchSampler(4, 2, seed=3), seed=11))
        return [next(batches) for _ in range(4)]

    first, second = stream(), stream()
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    draws = [{int(i): float(x) for x, i in zip(batch[0], batch[1])} for batch in first]
    epoch0, epoch1 = {**draws[0], **draws[1]}, {**draws[2], **draws[3]}
    assert sorted(epoch0) == sorted(epoch1) == [0, 1, 2, 3]
    assert all(epoch0[i] != epoch1[i] for i in range(4))  # every item drawn anew in the next epoch


def _tensors(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "disc", "ema") for k, v in ckpt[part].items()}


@pytest.fixture(scope="module")
def tokenizers(image_folder, tmp_path_factory):
    """train-vqgan (tiny, 6 steps) without workers, with 2, and with 2 stopped after 3 steps and resumed."""
    out = tmp_path_factory.mktemp("vq")
    run("train-vqgan", "--data", image_folder, "--out", out / "w0", *SET_TINY_VQ, "--device", "cpu")
    run("train-vqgan", "--data", image_folder, "--out", out / "w2", *SET_TINY_VQ, "--workers", 2, "--device", "cpu")
    run("train-vqgan", "--data", image_folder, "--out", out / "resumed", *SET_TINY_VQ, "--set", "steps=3",
        "--workers", 2, "--device", "cpu")
    run("train-vqgan", "--data", image_folder, "--out", out / "resumed", *SET_TINY_VQ, "--resume", "--workers", 2,
        "--device", "cpu")
    return out


def test_train_vqgan_with_workers_is_the_same_run_and_resumes_exactly(tokenizers):
    # The sampler picks the batches in the main process and the loader draws nothing from its RNG, so workers
    # change nothing, and a run resumed at step 3 reads the batches the uninterrupted run read.
    runs = {name: _tensors(tokenizers / name / "tokenizer.pt") for name in ("w0", "w2", "resumed")}
    assert torch.load(tokenizers / "resumed" / "tokenizer.pt", weights_only=True)["step"] == 6
    for name in ("w2", "resumed"):
        assert runs[name].keys() == runs["w0"].keys()
        assert all(torch.equal(runs[name][k], v) for k, v in runs["w0"].items()), name


def test_tokenize_with_workers_writes_the_same_files(tokenizers, image_folder, tmp_path):
    tok = tokenizers / "w0" / "tokenizer.pt"
    common = ["--tokenizer", tok, "--data", image_folder, "--flip", "--eval-fraction", "0.25", "--batch-size", 5,
              "--device", "cpu"]
    run("tokenize", *common, "--out", tmp_path / "w0")
    run("tokenize", *common, "--out", tmp_path / "w2", "--workers", 2)
    for sub in ("", "eval"):
        for name in ("tokens.npy", "labels.npy", "sources.npy", "meta.json"):
            assert (tmp_path / "w2" / sub / name).read_bytes() == (tmp_path / "w0" / sub / name).read_bytes()
    # Row r holds image sources[r] (flipped where marked), encoded here one at a time.
    tokenizer, images = load_tokenizer(tok), ImageFolder(image_folder, 32, 3)
    tokens, sources = np.load(tmp_path / "w2" / "tokens.npy"), np.load(tmp_path / "w2" / "sources.npy")
    assert len(tokens) == 2 * 18  # 24 images, 6 held out, each kept one also flipped
    with torch.no_grad():
        for row, (src, flipped) in zip(tokens, sources):
            x = images[src][0]
            assert np.array_equal(row, tokenizer.encode((x.flip(-1) if flipped else x)[None])[0].numpy())


def test_reconstruct_with_workers_writes_the_same_grid(tokenizers, image_folder, tmp_path, capsys):
    common = ["--tokenizer", tokenizers / "w0" / "tokenizer.pt", "--data", image_folder, "--num", 20,
              "--device", "cpu"]  # 20 images: 3 chunks of reading, over 2 workers
    printed = []
    for workers in (0, 2):
        capsys.readouterr()
        run("reconstruct", *common, "--out", tmp_path / f"w{workers}.png", "--workers", workers)
        printed.append(capsys.readouterr().out.replace(f"w{workers}.png", "W.png"))
    assert (tmp_path / "w2.png").read_bytes() == (tmp_path / "w0.png").read_bytes()
    assert printed[0] == printed[1] and "on 20 images" in printed[0]


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k and k != "path"}
    return [_without_times(v) for v in value] if isinstance(value, list) else value


def test_evaluate_with_workers_gives_the_same_numbers(pipeline, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SUNDAE_INCEPTION", str(tmp_path / "none.pth"))
    results = []
    for workers in (0, 2):  # --reference-limit: the reference images and the classifier's are read separately
        run("evaluate", "--generator", pipeline / "gen", "--reference", image_folder, "--reference-limit", 20,
            "--steps", 2, "--num", 8, "--batch-size", 4, "--min-steps", 1, "--classifier-epochs", 2,
            "--out", tmp_path / f"w{workers}", "--workers", workers, "--device", "cpu")
        results.append(json.loads((tmp_path / f"w{workers}" / "evaluation.json").read_text()))
    assert results[0]["protocol"]["reference"]["count"] == 20
    assert _without_times(results[1]) == _without_times(results[0])


@pytest.fixture
def broken_folder(image_folder, tmp_path):
    """The image folder with a truncated PNG among the squares (sorted: the 4th of them)."""
    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    data = (root / "squares" / "00.png").read_bytes()
    (root / "squares" / "03b.png").write_bytes(data[: len(data) // 2])
    return root


def test_a_bad_file_read_in_a_worker_is_the_same_one_line_error(tokenizers, broken_folder, tmp_path, capsys,
                                                                  monkeypatch):
    import sundae.data

    bad = broken_folder / "squares" / "03b.png"
    tok = tokenizers / "w0" / "tokenizer.pt"
    # The scan would skip the file; pretend it changed after the scan, so that a worker meets it.
    monkeypatch.setattr(sundae.data._Checks, "__getitem__", lambda self, i: None)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # a failed in-process run's bar is closed late, in the next one's output
    verbs = {"tokenize": lambda w: ["--tokenizer", tok, "--out", tmp_path / f"t{w}"],
             "reconstruct": lambda w: ["--tokenizer", tok, "--num", 24, "--out", tmp_path / f"r{w}.png"],
             "train-vqgan": lambda w: ["--out", tmp_path / f"v{w}", *SET_TINY_VQ, "--set", "batch_size=25"]}
    for verb, args in verbs.items():  # the bad file is item 16 of 25: read after the first 16 (the grid's)
        lines = [fails(capsys, verb, "--data", broken_folder, *args(w), "--workers", w, "--device", "cpu")
                 for w in (0, 2)]
        assert lines[0] == lines[1], verb
        assert lines[0].startswith(f"sundae {verb}: error: cannot read image {bad}: "), lines[0]


def test_the_scan_in_workers_skips_and_stops_like_without(tokenizers, broken_folder, tmp_path, capsys):
    (broken_folder / "circles" / "notes.bin").write_bytes(b"not an image")
    common = ["--tokenizer", tokenizers / "w0" / "tokenizer.pt", "--data", broken_folder, "--device", "cpu"]
    warnings = []
    for workers in (0, 2):
        capsys.readouterr()
        run("tokenize", *common, "--out", tmp_path / f"w{workers}", "--workers", workers)
        warnings.append([line for line in capsys.readouterr().err.splitlines() if ": warning: " in line])
    assert warnings[0] == warnings[1] and len(warnings[0]) == 3  # two files, then the count
    assert "notes.bin" in warnings[0][0] and "03b.png" in warnings[0][1] and "skipped 2 of 26" in warnings[0][2]
    assert np.load(tmp_path / "w2" / "tokens.npy").shape[0] == 24
    errors = [fails(capsys, "tokenize", *common, "--out", tmp_path / "s", "--strict", "--workers", workers)
              for workers in (0, 2)]
    assert errors[0] == errors[1] and "notes.bin" in errors[0] and "--strict" in errors[0]
    assert "--workers" in fails(capsys, "tokenize", *common, "--out", tmp_path / "n", "--workers", "-1")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_to_the_process_group_stop_training_with_workers_at_a_step_boundary(image_folder, tmp_path, signum):
    # Ctrl-C (SIGINT) and batch schedulers (SIGTERM) signal every process of the job, the workers too: they
    # ignore it, and the main process saves at the step boundary and stops them.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sundae", "train-vqgan", "--data", str(image_folder), "--out", str(out),
           *SET_TINY_VQ, "--set", "steps=100000", "--set", "log_every=1", "--set", "save_every=100000",
           "--set", "sample_every=100000", "--workers", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": SRC, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=300)
    step = torch.load(out / "tokenizer.pt", weights_only=True)["step"]
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name} at step {step}" in err
    assert "Traceback" not in err and "worker" not in err
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step
