"""The `sundae` command makes its OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE) unless the
user says otherwise, and sets it before torch loads the OpenMP runtime, which reads it only then."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sundae.cli.openmp import prefer_passive_waiting

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Runs `python -m sundae --help` in this interpreter, noting OMP_WAIT_POLICY at the moment `torch` is first
# imported, and prints it with the thread count torch then uses.
PROBE = """
import json, os, runpy, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
        return None
sys.meta_path.insert(0, Spy())
sys.argv = ["sundae", "--help"]
try:
    runpy.run_module("sundae", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
import torch
print(json.dumps({**seen, "threads": torch.get_num_threads()}))
"""


def _probe(**env: str) -> tuple[dict, dict[str, str]]:
    """(what PROBE printed, the OpenMP runtime's own report of its settings: OMP_DISPLAY_ENV=VERBOSE)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**base, "PYTHONPATH": SRC, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    report = dict(re.findall(r"^\s*(\w+)\s*=\s*'([^']*)'", out.stdout + out.stderr, re.MULTILINE))
    return json.loads(out.stdout.strip().splitlines()[-1]), report


def test_the_command_sets_passive_waiting_before_torch_loads():
    seen, report = _probe()
    assert seen["policy"] == "PASSIVE"
    if "GOMP_SPINCOUNT" in report:  # GNU libgomp, the runtime of the Linux wheels: no spinning at all
        assert report["GOMP_SPINCOUNT"] == "0"


def test_the_users_own_openmp_settings_win():
    seen, report = _probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert seen == {"policy": "ACTIVE", "threads": 1}
    if "GOMP_SPINCOUNT" in report:
        assert report["OMP_WAIT_POLICY"] == "ACTIVE" and report["OMP_NUM_THREADS"] == "1"
        assert int(report["GOMP_SPINCOUNT"]) > 300_000  # libgomp's active policy spins far longer than its default


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                             ({"OMP_WAIT_POLICY": ""}, "")])
def test_prefer_passive_waiting_only_fills_a_missing_value(given, expected):
    env = dict(given)
    prefer_passive_waiting(env)
    assert env == {"OMP_WAIT_POLICY": expected}
