"""Training under torchrun (2 gloo processes on CPU), exact resume, and surviving signals and crashes.

The torchrun runs are subprocesses of the real CLI; each is bounded by a timeout so a hang fails the test.
"""

import dataclasses
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

from cli_helpers import write_random_tokens
from sundae.checkpoint import load_checkpoint, load_tokenizer
from sundae.hourglass import PRESETS as HG
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, train_generator

SRC = str(Path(__file__).resolve().parents[1] / "src")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], batch_size=4, log_every=10, save_every=10,
                           sample_every=10_000)
SETS = ["--set", "batch_size=4", "--set", "log_every=10", "--set", "save_every=10", "--set", "sample_every=10000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "sundae", *args, "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    # The workers' tracebacks and one-line CLI errors, which torchrun's own report would push out of view.
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("[rank") or ": error: " in line]
    assert proc.returncode == 0, "\n".join(ranks[-40:]) + "\n" + proc.stderr[-2000:]
    return proc


def _ckpt(run: Path, step: int | None = None) -> dict:
    path = run / "generator.pt" if step is None else run / "checkpoints" / f"step_{step:07d}.pt"
    return torch.load(path, weights_only=True)


# Adam's step is lr * m / (sqrt(v) + eps): where a weight's gradient nearly cancels (|g| ~ eps = 1e-8) it
# magnifies float rounding of g (~1e-9, summed in another order over processes) by up to lr / eps = 1e5, so
# weights of runs that differ only in rounding may differ by ~1e-4 (seen: 1.7e-5 after one step, at an element
# whose gradient was 7e-9 against a typical 2e-3). Real differences in the update (another sample's noise,
# labels or condition dropout) move weights by ~lr = 1e-3 per step and the moments, which hold the gradients
# themselves, stay checked at `atol`.
ROUNDING_WEIGHTS_ATOL = 1e-4


def _assert_same(a: dict, b: dict, atol: float, weights_atol: float | None = None) -> None:
    """Adam moments of two generator checkpoints agree within `atol` (0 = bitwise), weights and EMA within
    `weights_atol` (default `atol`)."""
    for part in ("model", "ema"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=atol if weights_atol is None
                                       else weights_atol, msg=f"{part}.{key}")
    for i, state in a["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[moment], b["optimizer"]["state"][i][moment], rtol=0, atol=atol)
    assert a["step"] == b["step"] and a["data"] == b["data"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """21 token grids: an odd count, so 2 ranks cannot split the dataset evenly."""
    return write_random_tokens(tmp_path_factory.mktemp("tokens"), 21, 10)


@pytest.fixture(scope="module")
def runs(tokens, tmp_path_factory) -> dict[str, Path]:
    """One process: 100 steps, and 50 + resume 50. Two processes: 100 steps, and 50 + resume 50."""
    root = tmp_path_factory.mktemp("runs")
    ds, meta = TokenDataset(tokens), {"grid": [4, 4]}
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=100), ds, root / "one", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=50), ds, root / "one_resumed", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=100), ds, root / "one_resumed", meta, resume=True,
                    progress=False)
    common = ["train", "--tokens", str(tokens), "--preset", "tiny", *SETS]
    _torchrun(*common, "--out", str(root / "two"), "--set", "steps=100")
    _torchrun(*common, "--out", str(root / "two_resumed"), "--set", "steps=50")
    _torchrun(*common, "--out", str(root / "two_resumed"), "--set", "steps=100", "--resume")
    return {p.name: p for p in root.iterdir()}


def test_two_processes_match_one_process(runs):
    # Same global batch of 4 (2 per rank), 21 items (uneven over ranks): same losses and weights.
    one = [json.loads(line) for line in (runs["one"] / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (runs["two"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == list(range(10, 101, 10))  # rank 0 alone writes the log
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    _assert_same(_ckpt(runs["one"], 10), _ckpt(runs["two"], 10), atol=1e-5, weights_atol=ROUNDING_WEIGHTS_ATOL)
    assert abs(one[0]["loss"] - np.log(64)) < 0.5  # sanity: near ln(v) early on, not a constant


def test_resume_equals_uninterrupted_run(runs):
    # 50 steps, stop, resume, 50 more == 100 straight: bitwise in one process and in two.
    _assert_same(_ckpt(runs["one"]), _ckpt(runs["one_resumed"]), atol=0)
    _assert_same(_ckpt(runs["two"]), _ckpt(runs["two_resumed"]), atol=0)
    a, b = _ckpt(runs["one"]), _ckpt(runs["one_resumed"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # The log holds every step once, resumed or not.
    steps = [json.loads(line)["step"] for line in (runs["two_resumed"] / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 101, 10))


def test_checkpoints_move_between_one_and_two_processes(runs, tokens, tmp_path):
    # A 2-process checkpoint (step 50) resumed in one process reaches the 2-process step 100 weights...
    (tmp_path / "a").mkdir()
    shutil.copy(runs["two"] / "checkpoints" / "step_0000050.pt", tmp_path / "a" / "generator.pt")
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=100), TokenDataset(tokens), tmp_path / "a",
                    {"grid": [4, 4]}, resume=True, progress=False)
    _assert_same(_ckpt(runs["two"]), _ckpt(tmp_path / "a"), atol=1e-5, weights_atol=ROUNDING_WEIGHTS_ATOL)
    # ... and a 1-process checkpoint (step 80) resumed by 2 processes sharded with FSDP2 for 10 steps, then
    # back in one process for the last 10, reaches the 1-process step 100 weights.
    (tmp_path / "b").mkdir()
    shutil.copy(runs["one"] / "checkpoints" / "step_0000080.pt", tmp_path / "b" / "generator.pt")
    _torchrun("train", "--tokens", str(tokens), "--out", str(tmp_path / "b"), "--resume", "--set", "steps=90",
              "--set", "sharding=fsdp")
    assert _ckpt(tmp_path / "b")["step"] == 90 and _ckpt(tmp_path / "b")["world"] == 2
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=100), TokenDataset(tokens), tmp_path / "b",
                    {"grid": [4, 4]}, resume=True, progress=False)
    _assert_same(_ckpt(runs["one"]), _ckpt(tmp_path / "b"), atol=1e-5, weights_atol=ROUNDING_WEIGHTS_ATOL)


def test_gradient_accumulation_equals_one_large_batch(tokens, tmp_path):
    ds, meta = TokenDataset(tokens), {"grid": [4, 4]}
    cfg = dataclasses.replace(TINY, steps=10, batch_size=8)
    train_generator(HG["tiny"], cfg, ds, tmp_path / "big", meta, progress=False)
    train_generator(HG["tiny"], dataclasses.replace(cfg, grad_accum=4), ds, tmp_path / "acc", meta, progress=False)
    a, b = _ckpt(tmp_path / "big"), _ckpt(tmp_path / "acc")
    _assert_same(a, b, atol=1e-5, weights_atol=ROUNDING_WEIGHTS_ATOL)
    with pytest.raises(ValueError, match="grad_accum"):
        dataclasses.replace(cfg, grad_accum=3)  # 8 micro-batches of 8/3 images do not exist


def test_tokenizer_gan_step_under_ddp(image_folder, tmp_path):
    # Before disc_start the DDP discriminator is never called, after it both updates run; dead codes restart.
    sets = ["--set", "steps=4", "--set", "batch_size=4", "--set", "disc_start=2", "--set", "save_every=2",
            "--set", "restart_dead_codes=2", "--set", "log_every=1"]
    _torchrun("train-vqgan", "--data", str(image_folder), "--out", str(tmp_path), "--preset", "tiny", *sets)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["d_loss"] != 0 for r in log] == [False, False, True, True]
    assert all(0 < r["codebook_usage"] <= 1 for r in log)
    ckpt = load_checkpoint(tmp_path / "tokenizer.pt", "tokenizer")
    assert ckpt["step"] == 4 and ckpt["world"] == 2
    load_tokenizer(tmp_path / "tokenizer.pt")  # the DDP checkpoint loads in one process


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sundae", *args, "--device", "cpu"]


def test_sigterm_saves_at_a_step_boundary_and_resumes_exactly(tokens, tmp_path):
    run = tmp_path / "run"
    cmd = _cli("train", "--tokens", str(tokens), "--preset", "tiny", "--out", str(run), "--set", "steps=100000",
               "--set", "batch_size=4", "--set", "log_every=1", "--set", "save_every=1000000",
               "--set", "sample_every=1000000")
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = _ckpt(run)["step"]
    assert f"stopped by SIGTERM at step {step}" in err and "Traceback" not in err
    # Resuming to step + 3 equals running step + 3 straight.
    ds, meta = TokenDataset(tokens), {"grid": [4, 4]}
    cfg = dataclasses.replace(TINY, steps=step + 3, log_every=1, save_every=1_000_000, sample_every=1_000_000)
    train_generator(HG["tiny"], cfg, ds, tmp_path / "straight", meta, progress=False)
    train_generator(HG["tiny"], cfg, ds, run, meta, resume=True, progress=False)
    straight, resumed = _ckpt(tmp_path / "straight"), _ckpt(run)
    for key in straight["model"]:
        torch.testing.assert_close(straight["model"][key], resumed["model"][key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 4))  # no duplicates from the interrupted run


def test_ctrl_c_under_torchrun_saves_at_a_step_boundary(tokens, tmp_path):
    # Ctrl-C reaches torchrun and both workers (SIGINT to the process group); torchrun then sends SIGTERM.
    run = tmp_path / "run"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "sundae", "train", "--tokens", str(tokens),
           "--out", str(run), "--preset", "tiny", "--set", "steps=1000000", "--set", "batch_size=4",
           "--set", "log_every=1", "--set", "save_every=1000000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 90
    while not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    step = _ckpt(run)["step"]
    assert f"stopped by SIGINT at step {step}" in err
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == step


SLOW_WRITER = """
import sys, time, torch
import sundae.checkpoint as C
real_save, flag = torch.save, sys.argv[2]
def save(obj, f):  # f: the open temporary file (sundae.io.save_torch)
    if obj["step"] >= 20:  # the second save: write half a file, then hang until killed
        f.write(b"PK partial")
        f.flush()
        open(flag, "w").write("writing")
        time.sleep(120)
    real_save(obj, f)
C.torch.save = save
from sundae.cli import main
main(sys.argv[3:])
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tokens, tmp_path):
    run, flag = tmp_path / "run", tmp_path / "flag"
    cmd = [sys.executable, "-c", SLOW_WRITER, "-", str(flag), "train", "--tokens", str(tokens), "--preset", "tiny",
           "--out", str(run), "--set", "steps=30", "--set", "batch_size=4", "--set", "save_every=10",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not flag.is_file():
        assert time.time() < deadline and proc.poll() is None, "never reached the second checkpoint"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    assert load_checkpoint(run / "generator.pt", "generator")["step"] == 10
    assert len(list(run.glob(".generator.pt.*.tmp"))) == 1  # the interrupted write
    # and the run continues from it; log records after step 10, and a line cut short by a crash, are dropped.
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 2')
    train_generator(HG["tiny"], dataclasses.replace(TINY, steps=12, log_every=5), TokenDataset(tokens), run,
                    {"grid": [4, 4]}, resume=True, progress=False)
    assert _ckpt(run)["step"] == 12
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [5, 10, 12]
    assert not list(run.glob(".*.tmp"))


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_resume_works(tokens, tmp_path):
    run, ds, meta = tmp_path / "run", TokenDataset(tokens), {"grid": [4, 4]}
    cfg = dataclasses.replace(TINY, steps=5, save_every=5, log_every=1)
    train_generator(HG["tiny"], cfg, ds, run, meta, progress=False)
    good = (run / "generator.pt").read_bytes()
    # `--resume --set lr=1e30` (the new lr must win over the saved optimizer's): one update makes every weight
    # non-finite, so the loss of the next step, 6, is NaN.
    proc = subprocess.run(_cli("train", "--tokens", str(tokens), "--out", str(run), "--set", "steps=20",
                               "--set", "lr=1e30", "--resume"), env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "at step 6" in proc.stderr and "last good checkpoint" in proc.stderr
    assert (run / "generator.pt").read_bytes() == good
    train_generator(HG["tiny"], dataclasses.replace(cfg, steps=8), ds, run, meta, resume=True, progress=False)
    ckpt = _ckpt(run)
    assert ckpt["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 9))
    # Saving weights that already went non-finite is refused too.
    inf = dataclasses.replace(cfg, steps=1, save_every=1)
    object.__setattr__(inf, "lr", float("inf"))  # the config refuses it; set behind its back
    with pytest.raises(FloatingPointError, match="non-finite at step 1"):
        train_generator(HG["tiny"], inf, ds, tmp_path / "inf", meta, progress=False)


def test_tokenize_under_torchrun_writes_the_single_process_folder(image_folder, tmp_path):
    from sundae.cli import main
    from sundae.tokens import split_rows
    main(["train-vqgan", "--data", str(image_folder), "--out", str(tmp_path / "tok"), "--preset", "tiny",
          "--set", "steps=1", "--set", "batch_size=4", "--device", "cpu"])
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok" / "tokenizer.pt"), "--data", str(image_folder),
            "--flip", "--eval-fraction", "0.25", "--split-seed", "3", "--batch-size", "5"]
    main([*args, "--out", str(tmp_path / "one"), "--device", "cpu"])
    _torchrun(*args, "--out", str(tmp_path / "two"))
    for sub in ("", "eval"):
        for name in ("tokens.npy", "labels.npy", "sources.npy"):
            one, two = np.load(tmp_path / "one" / sub / name), np.load(tmp_path / "two" / sub / name)
            assert np.array_equal(one, two), (sub, name)
    # 24 images: 6 held out, 18 kept twice (original and flipped); the two sides share no source image.
    train, held = np.load(tmp_path / "one" / "sources.npy"), np.load(tmp_path / "one" / "eval" / "sources.npy")
    assert train.shape == (36, 2) and held.shape == (6, 2) and not held[:, 1].any()
    assert not set(train[:, 0]) & set(held[:, 0]) and sorted(set(train[:, 0]) | set(held[:, 0])) == list(range(24))
    assert (np.bincount(train[:, 0], minlength=24)[train[:, 0]] == 2).all()
    assert np.array_equal(split_rows(24, 0.25, 3, True)[1], held)  # deterministic: same seed, same split
    assert not np.array_equal(split_rows(24, 0.25, 4, True)[1], held)
    # Row 1 is the flipped copy of row 0's image: its tokens are those of the mirrored image.
    from sundae.data import ImageFolder
    tokens, tokenizer = np.load(tmp_path / "one" / "tokens.npy"), load_tokenizer(tmp_path / "tok" / "tokenizer.pt")
    image = ImageFolder(image_folder, 32, 3)[int(train[1, 0])][0]
    assert train[1, 1] == 1 and np.array_equal(tokenizer.encode(image.flip(-1)[None])[0].numpy(), tokens[1])
    assert not np.array_equal(tokens[0], tokens[1])
    # Training on those tokens under FSDP draws the same EMA sample grids as one process.
    sets = ["--preset", "tiny", "--set", "steps=2", "--set", "batch_size=4", "--set", "sample_every=2"]
    main(["train", "--tokens", str(tmp_path / "one"), "--out", str(tmp_path / "g1"), *sets, "--device", "cpu"])
    _torchrun("train", "--tokens", str(tmp_path / "two"), "--out", str(tmp_path / "g2"), *sets,
              "--set", "sharding=fsdp")
    grid = Path("samples") / "step_0000002.png"
    assert (tmp_path / "g1" / grid).read_bytes() == (tmp_path / "g2" / grid).read_bytes()
