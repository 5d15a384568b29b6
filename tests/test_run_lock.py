"""One training run per run folder (`sundae.runs.RunLock`): a second run on a folder in use is refused with a
message naming the holder, a lock left by a killed run is taken over, and under torchrun all ranks stop."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import fails, run, write_random_tokens
from sundae.distributed import Dist
from sundae.hourglass import PRESETS as HG
from sundae.runs import RunInUse, RunLock
from sundae.tokens import TokenDataset
from sundae.train import GENERATOR_TRAIN_PRESETS, train_generator

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--preset", "tiny", "--set", "batch_size=4", "--set", "sample_every=100000", "--device", "cpu"]
HOLD = """import sys, time
from pathlib import Path
from sundae.distributed import Dist
from sundae.runs import RunLock
with RunLock(Path(sys.argv[1]), Dist()):
    print("locked", flush=True)
    time.sleep(300)
"""

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _in_use(out: Path, pid: int) -> str:
    """The refusal, as a regular expression."""
    return (rf"{re.escape(str(out))} is in use by another training run \(pid {pid} on "
            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it or "
            rf"choose another --out")


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_random_tokens(tmp_path_factory.mktemp("tokens"), 8, 2)


def test_the_lock_refuses_a_second_holder_until_released(tmp_path):
    with RunLock(tmp_path, Dist()):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunInUse, match=f"^{_in_use(tmp_path, os.getpid())}$"):
            with RunLock(tmp_path, Dist()):
                pass
    assert not (tmp_path / ".lock").exists()  # removed on release
    with RunLock(tmp_path, Dist()):  # free again
        pass


def test_a_second_train_on_a_folder_in_use_is_refused_and_touches_nothing(tokens, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "run"
    common = ["train", "--tokens", tokens, "--out", out, *TINY, "--set", "log_every=1"]
    with open(tmp_path / "first.err", "w") as err_file:
        first = subprocess.Popen([sys.executable, "-m", "sundae", *map(str, common), "--set", "steps=100000",
                                  "--set", "save_every=5"], env=_env(), stderr=err_file)
    try:
        deadline = time.time() + 180
        while not (out / "generator.pt").is_file():  # the first run is under way
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.1)
        # --overwrite would delete the first run's checkpoints and log under its feet
        err = fails(capsys, *common, "--overwrite", "--set", "steps=2")
        assert re.fullmatch(f"sundae train: error: {_in_use(out, first.pid)}", err), err
    finally:
        first.send_signal(signal.SIGTERM)  # it saves at the next step boundary and stops
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, (tmp_path / "first.err").read_text()
    stopped = torch.load(out / "generator.pt", weights_only=True)["step"]
    assert stopped >= 5 and _steps(out) == list(range(1, stopped + 1))  # every step once, none of a second run
    assert not (out / ".lock").exists()
    run(*common, "--resume", "--set", f"steps={stopped + 2}")  # the holder is gone: training proceeds
    assert torch.load(out / "generator.pt", weights_only=True)["step"] == stopped + 2
    assert _steps(out) == list(range(1, stopped + 3))


def test_a_lock_file_left_by_a_dead_run_is_taken_over(tokens, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-02 03:04:05 UTC"}
    (out / ".lock").write_text(json.dumps(holder) + "\n")  # no process holds a flock on it
    cfg = dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=2, batch_size=4, sample_every=100_000)
    with caplog.at_level("WARNING", logger="sundae"):
        path = train_generator(HG["tiny"], cfg, TokenDataset(tokens), out, {"grid": [4, 4]}, progress=False)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [r.getMessage() for r in caplog.records if ".lock" in r.getMessage()] == [
        f"{out / '.lock'}: the run that held it (pid {dead.pid} on {socket.gethostname()}, started "
        f"2026-01-02 03:04:05 UTC) ended without releasing it (killed?); taking it over"]
    assert not (out / ".lock").exists()


def test_a_holder_killed_with_sigkill_leaves_the_folder_free(tmp_path, caplog):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=_in_use(tmp_path, child.pid)):
            with RunLock(tmp_path, Dist()):
                pass
    finally:
        child.kill()
        child.wait(timeout=30)
    assert (tmp_path / ".lock").is_file()  # a killed run cannot remove it, but the kernel dropped its flock
    with caplog.at_level("WARNING", logger="sundae"), RunLock(tmp_path, Dist()):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records if f"pid {child.pid} " in r.getMessage()]


def test_under_torchrun_all_ranks_stop_when_the_folder_is_in_use(tokens, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "sundae", "train", "--tokens", str(tokens),
           "--out", str(out), *TINY, "--set", "steps=2"]
    with RunLock(out, Dist()):  # held by this process: rank 0 is refused, rank 1 must not wait for it forever
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    assert all(re.search(f"sundae train: error: {_in_use(out, os.getpid())}$", line) for line in errors), errors
    assert sorted(p.name for p in out.iterdir()) == []
