"""benchmarks/quality.py end to end in its --smoke mode (tiny sizes; the numbers themselves mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sundae.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_quality_smoke_run_measures_every_method_at_equal_cpu_budget(tmp_path):
    out = tmp_path / "quality.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", "--work",
                             str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SUNDAE best cFID" in result.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    # Smoke plan: T in (4, 12) for two SUNDAE schedules and MaskGIT, one AR row, three ablations at T=4,
    # early stop off at T=12, plus the two reference rows.
    assert len(rows) == 2 + 2 * 2 + 2 + 1 + 3 + 1
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    assert {"SUNDAE unroll 1 (p 0.5)", "SUNDAE unroll 3 (p 0.5)", "SUNDAE 1D shortening (p 0.5)",
            "SUNDAE no early stop (p 0.5)", "autoregressive", "tokenizer reconstructions"} <= set(by_method)
    # Every model got the same CPU budget (and at least one step), with about the same parameter count.
    budget = report["protocol"]["train"]["cpu_seconds_per_model"]
    assert set(report["train"]) == {"sundae", "sundae_u1", "sundae_u3", "sundae_1d", "maskgit", "ar"}
    for stats in report["train"].values():
        assert stats["train_cpu_s"] >= budget and stats["train_steps"] >= 1
        assert abs(stats["params"] / report["train"]["sundae"]["params"] - 1) < 0.1
    # Network calls per image: MaskGIT makes one per step while T <= 64 tokens, AR one per token (8x8 grid),
    # SUNDAE without early stop exactly T.
    assert [r["steps_per_image"] for r in by_method["MaskGIT-style"]] == [4, 12]
    assert by_method["autoregressive"][0]["steps_per_image"] == 64
    assert by_method["SUNDAE no early stop (p 0.5)"][0]["steps_per_image"] == 12
    for r in rows:
        assert r["cfid"] >= 0 and 0 <= r["accuracy"] <= 1
    assert Image.open(out.with_suffix(".png")).size[0] > 400
