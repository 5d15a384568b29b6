"""Files written whole or not at all, file digests, the library's logger, and errors as one line.

`log` (logger "sundae") carries the library's warnings (skipped files, ignored options, ...); the CLI prints
them as `sundae VERB: warning: ...` lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger("sundae")


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only folder, ...: name the file that could not be written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_digest(path: str | Path) -> str:
    """sha256 of a file, hex: identifies which tokenizer checkpoint made a token file. For an exported model
    folder, the sha256 of the checkpoint it was exported from."""
    if Path(path).is_dir():
        try:
            return str(json.loads((Path(path) / "config.json").read_text()).get("source_sha256", ""))
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path}/config.json is not an exported model's config: {err}") from None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def error_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: how the
    command line and the demo show an error in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def refused_globals(path: str | Path, err: Exception) -> list[str]:
    """Names of the pickled globals a `torch.load(weights_only=True)` of `path` refused, found without
    unpickling (zip format) or parsed from torch's error `err` (legacy format); empty when the error is
    something else (a truncated file). Callers name these instead of repeating torch's advice to load with
    weights_only=False, which would run the file's code."""
    import torch

    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        names = []
    return names or re.findall(r"GLOBAL (\S+) was not", str(err))
