"""Running the `sundae` command line in-process from tests."""

import re

import pytest

from sundae.cli import main

SET_TINY_VQ = ["--preset", "tiny", "--set", "steps=6", "--set", "batch_size=4", "--set", "disc_start=3"]


def run(*argv):
    """Run `sundae ARGV...` (any argument may be a Path or a number)."""
    main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """Run the CLI expecting a one-line error, no traceback and exit status 2; returns the error line. Output
    of earlier calls (progress bars of a run before) is dropped first, so only this call's stderr is judged;
    this call's own progress bar (redrawn in place with carriage returns) may stand before the error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    errors = list(re.finditer(r"sundae [a-z-]+: error: ", err))
    assert "\n" not in err and "Traceback" not in err and len(errors) == 1, err
    return err[errors[0].start():]
