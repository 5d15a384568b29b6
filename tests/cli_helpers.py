"""Running the `sundae` command line in-process from tests."""

import pytest

from sundae.cli import main


def run(*argv):
    """Run `sundae ARGV...` (any argument may be a Path or a number)."""
    main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """Run the CLI expecting a one-line error, no traceback and exit status 2; returns the line."""
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
