"""The output-folder policy of the verbs: refuse to overwrite earlier outputs unless --overwrite, check that
--out can be written before any work, and leave no empty folder behind when a command fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from sundae.cli.args import UsageError, rank


def claim_outputs(out: str | Path, patterns: Sequence[str], overwrite: bool) -> list[Path]:
    """Refuse to write into `out` when it holds earlier outputs (files matching `patterns`), unless
    `overwrite`. Deletes nothing: returns the earlier outputs, which the command hands to `clear_outputs`
    once its inputs are validated, so a failing command leaves the earlier run as it was."""
    old = [p for pattern in patterns for p in Path(out).glob(pattern)] if Path(out).is_dir() else []
    if old and not overwrite:
        raise UsageError(f"{out} already holds the outputs of an earlier run ({old[0].name}, ...): pass "
                         f"--overwrite to replace them, or choose another --out")
    return old


def clear_outputs(old: Sequence[Path]) -> None:
    """Delete the earlier outputs `claim_outputs` found, so no stale file of that run stays mixed in."""
    for path in old if rank() == 0 else []:  # under torchrun every rank checks, rank 0 deletes
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_out_folder(out: Path, flag: str) -> None:
    """Fail before any work if the output folder `out` cannot be written: it is a file, or a folder cannot
    be created in it or where its missing part would go (read-only or virtual file systems, no permission).
    The check creates and removes a uniquely named folder in the nearest existing parent, so it leaves
    nothing behind and cannot collide with the same check in the other processes of a torchrun job.
    Raises UsageError naming the folder and the reason."""
    missing = missing_folders(out)
    parent = missing[-1].parent if missing else out  # the nearest existing folder (or file)
    what = "cannot create the folder" if missing else "cannot write into the folder"
    if not parent.is_dir():
        if not missing:
            raise UsageError(f"{flag} {out} is a file: expected a folder (it is created if missing)")
        raise UsageError(f"{flag} {out}: cannot create the folder, {parent} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sundae-check-", dir=parent))
    except OSError as err:
        raise UsageError(f"{flag} {out}: {what} ({err.strerror or err})") from err


def missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not out.exists() and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (innermost first) that exists and is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()  # fails on a folder with anything in it, which is kept
        except FileNotFoundError:
            continue
        except OSError:
            return
