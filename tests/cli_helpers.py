"""Running the `sundae` command line in-process from tests."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sundae.cli import main

SET_TINY_VQ = ["--preset", "tiny", "--set", "steps=6", "--set", "batch_size=4", "--set", "disc_start=3"]


def run(*argv):
    """Run `sundae ARGV...` (any argument may be a Path or a number)."""
    main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """Run the CLI expecting a one-line error, no traceback and exit status 2; returns the error line. Output
    of earlier calls (progress bars of a run before) is dropped first, so only this call's stderr is judged;
    this call's own progress bar (redrawn in place with carriage returns, closed with a newline when the run
    stops on the error) may stand on the lines before it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    *bars, err = err.split("\n")
    assert all(re.search(r"\d+/\d+ \[", line) for line in bars), bars  # progress bars only
    errors = list(re.finditer(r"sundae [a-z0-9-]+: error: ", err))
    assert "Traceback" not in err and len(errors) == 1, err
    return err[errors[0].start():]


def write_random_tokens(root: Path, count: int, num_classes: int) -> Path:
    """A token folder at `root` of `count` random 4x4 grids over 64 codes with random labels (seed 0)."""
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 64, (count, 4, 4)).astype(np.uint16))
    np.save(root / "labels.npy", rng.integers(0, num_classes, count).astype(np.int64))
    (root / "meta.json").write_text(json.dumps({"grid": [4, 4], "codebook_size": 64, "num_classes": num_classes}))
    return root
