"""benchmarks/quality.py end to end in its --smoke mode (tiny sizes; the numbers themselves mean nothing): the
structure of the report, the validation/test separation, and that --resume reproduces what it redoes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sundae.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sundae", "sundae_u1", "sundae_u3", "maskgit", "ar", "sundae_share", "sundae_cosine", "sundae_s1",
           "sundae_muon"]
SEEDED = {"sundae", "maskgit"}  # quality.SEEDED: the pair the verdict compares
TIMING = {"s_per_image", "cpu_s_per_image", "train_cpu_s", "train_wall_s"}  # differ between runs


def _run(*args):
    # Fixed threads: the same seed then gives the same numbers in both runs.
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", *args],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _untimed(row):
    return {k: v for k, v in row.items() if k not in TIMING}


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_quality_smoke_run_has_every_curve_and_resumes_to_the_same_numbers(tmp_path):
    out, work = tmp_path / "quality.json", tmp_path / "work"
    stdout = _run("--work", str(work), "--out", str(out))
    assert "estimate for the whole run" in stdout and "tokenizer floor cFID" in stdout
    report = json.loads(out.read_text())
    protocol = report["protocol"]
    seeds, checkpoints = protocol["settings"]["seeds"], protocol["checkpoints"]
    assert seeds == 2 and checkpoints == [1, 2, 4, 8]  # smoke: budget 8, checkpoints at 1/8, 1/4, 1/2, 1
    assert protocol["seeds"] == {m: seeds if m in SEEDED else 1 for m in METHODS}

    # Every method x checkpoint x {ema, raw}, once per seed, scored against the test split.
    splits = protocol["splits"]
    rows = report["rows"]
    for m in METHODS:
        for step in checkpoints:
            for weights in ("ema", "raw"):
                got = sorted(r["seed"] for r in rows if (r["method"], r["step"], r["weights"]) == (m, step, weights))
                assert got == list(range(protocol["seeds"][m])), (m, step, weights)
                summary = report["summary"][m][str(step)][weights]["cfid"]
                assert summary["n"] == len(got) and len(summary["values"]) == len(got)
    assert len(rows) == sum(protocol["seeds"].values()) * 4 * 2
    assert all(r["split"] == "test" and r["reference_images"] == splits["test"] == 200 for r in rows)
    # Training time accumulates along a run's checkpoints.
    for m in METHODS:
        cpu = [r["train_cpu_s"] for r in rows if (r["method"], r["seed"], r["weights"]) == (m, 0, "ema")]
        assert cpu == sorted(cpu) and cpu[0] > 0

    # Validation is carved out of the training images and only it chooses the sampler.
    assert splits["train"] + splits["validation"] == 1000 and splits["validation"] == 200
    val = report["validation_indices"]
    assert len(set(val)) == len(val) == 200 and all(0 <= i < 1000 for i in val)
    kinds = {"maskgit": "maskgit", "ar": "ar"}
    for m in METHODS:
        tuning = report["tuning"][m]
        assert tuning["selected_on"] == "validation" and tuning["reference_images"] == 200
        assert [g["setting"] for g in tuning["grid"]] == protocol["sampler_grids"][kinds.get(m, "sundae")]
        assert tuning["chosen"] in [g["setting"] for g in tuning["grid"]]
        assert tuning["val_cfid"] == min(g["cfid"] for g in tuning["grid"])
        assert all(r["setting"] == tuning["chosen"] for r in rows if r["method"] == m)
        assert all(r["setting"] == tuning["chosen"] for r in report["sweep"] if r["method"] == m)

    # Network calls per image: MaskGIT exactly T, AR one per token of the 8x8 grid, SUNDAE at most T.
    assert all(g["calls_per_image"] == report["tuning"]["maskgit"]["T"] == 2 for g in report["tuning"]["maskgit"]["grid"])
    for r in rows + report["sweep"]:
        if r["method"] == "maskgit":
            assert r["calls_per_image"] == r["T"]
        elif r["method"] == "ar":
            assert r["calls_per_image"] == 64 and r["T"] == 64
        elif r["method"] != "maskgit":
            assert 1 <= r["calls_per_image"] <= r["T"]
    assert sorted(r["T"] for r in report["sweep"] if r["method"] == "maskgit") == [1, 2]
    assert [r["method"] for r in report["reference"]] == ["real validation images", "tokenizer reconstructions"]
    assert {v["b"] for v in report["verdicts"]} == set(METHODS) - {"sundae"}
    assert all(v["verdict"] in ("tie", "sundae better", f"{v['b']} better") for v in report["verdicts"])
    assert Image.open(out.with_suffix(".png")).size[0] > 400

    # Interrupt the last method before its final checkpoint: its last rows, its tuning and sweep (made at the
    # final checkpoint) and its final training state are gone; --resume retrains from step 4 and redoes them.
    last = METHODS[-1]
    cut = dict(report)
    cut["rows"] = rows[:-3]
    cut["tuning"] = {m: t for m, t in report["tuning"].items() if m != last}
    cut["sweep"] = [r for r in report["sweep"] if r["method"] != last]
    del cut["summary"], cut["verdicts"]
    out.write_text(json.dumps(cut))
    (work / "runs" / f"{last}_seed0" / "step000008.pt").unlink()
    stdout = _run("--work", str(work), "--out", str(out), "--resume")
    assert "resumed at step 4" in stdout
    again = json.loads(out.read_text())
    assert [_untimed(r) for r in again["rows"]] == [_untimed(r) for r in rows]
    assert [_untimed(r) for r in again["sweep"]] == [_untimed(r) for r in report["sweep"]]
    assert [_untimed(g) for g in again["tuning"][last]["grid"]] == [_untimed(g) for g in report["tuning"][last]["grid"]]
    assert again["reference"] == report["reference"]
