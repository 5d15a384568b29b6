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
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`.

    Raises OSError "cannot write PATH: REASON" (errno set, ENOSPC for a full disk) when the write fails for an
    I/O reason, also when the serializer reports it in its own exception type (safetensors' SafetensorError,
    torch's RuntimeError with the OSError as its context); `path` then keeps its previous contents and no
    temporary file is left. Other exceptions of `write` pass through unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)
        code = _errno_of(err)
        if code is None and not isinstance(err, OSError):
            raise  # not an I/O failure: the serializer's own error (an unpicklable object, ...)
        raise write_error(path, err, code, existed) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_error(path: str | Path, err: BaseException, code: int | None, existed: bool = False) -> OSError:
    """The one-line OSError "cannot write PATH: REASON" for a failed write of `path`, with errno `code`
    (None when the cause reported none); `existed`: the file there is unchanged, which the message says."""
    reason = os.strerror(code) if code else error_line(err)
    error = OSError(f"cannot write {path}: {reason}" + (" (the file there is unchanged)" if existed else ""))
    error.errno = code  # set after construction: OSError(errno, text) would print as "[Errno 28] text"
    return error


def _errno_of(err: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, one in the chain of exceptions that led to `err`
    (torch reports a failed write of its file object as a RuntimeError), or one quoted in the message the
    way Rust prints an I/O error ("... (os error 28)": safetensors)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        quoted = re.search(r"\(os error (\d+)\)", str(err))
        if quoted:
            return int(quoted.group(1))
        err = err.__cause__ or err.__context__
    return None


class _Recorded:
    """A binary file object that remembers the OSError of a failed write. torch.save and numpy.save write a
    file object through its `write` (given a path or a real file, they write in C and a full disk becomes a
    RuntimeError "unexpected pos ..." or an OSError without errno, which name neither the file nor the cause)."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _dump(tmp: str, dump) -> None:
    """dump(file) into the file `tmp`; a failed write raises its own OSError (errno and all)."""
    with open(tmp, "wb") as raw:
        fh = _Recorded(raw)
        try:
            dump(fh)
        except Exception as err:
            if fh.error is not None and fh.error is not err:
                raise fh.error from err
            raise


def save_torch(path: str | Path, obj) -> None:
    """torch.save `obj` to `path`, atomically. Raises OSError naming `path` (errno ENOSPC for a full disk) when
    the file cannot be written; `path` then keeps its previous contents."""
    import torch

    atomic_write(path, lambda tmp: _dump(tmp, lambda fh: torch.save(obj, fh)))


def save_npy(path: str | Path, array) -> None:
    """numpy.save `array` to `path` (a .npy file that numpy.load can memory-map), atomically. Raises OSError
    naming `path` (errno ENOSPC for a full disk) when the file cannot be written."""
    import numpy as np

    atomic_write(path, lambda tmp: _dump(tmp, lambda fh: np.save(fh, array)))


def append_line(path: str | Path, line: str) -> None:
    """Append `line` (one line of text, without its newline) and a newline to `path`, creating it. A failed
    append (a full disk) leaves the file as it was, never with a half-written line that would break the next
    reader or swallow the next line. Raises OSError "cannot write PATH: REASON" (errno ENOSPC for a full disk).
    """
    data = (line + "\n").encode()
    try:
        with open(path, "ab", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                written = 0
                while written < len(data):  # a raw write may be short (a nearly full disk): write the rest
                    written += fh.write(data[written:])
            except OSError:
                os.ftruncate(fh.fileno(), size)
                raise
    except OSError as err:
        raise write_error(path, err, err.errno) from err


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
