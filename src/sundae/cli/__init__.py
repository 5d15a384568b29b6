"""`sundae <verb>`: the command line, a thin client of the library (`sundae.pipeline`, `sundae.train`, ...).

Verbs: train-vqgan, convert-taming, reconstruct, tokenize, train (`cli.training`); sample, inpaint, export,
demo (`cli.sampling`); img2img, outpaint (`cli.editing`); evaluate, plot, quickstart (`cli.evaluate`).
Configs come from named presets plus `--set key=value` overrides checked against the dataclass fields
(`cli.args`); the sampler's flags are generated from `SamplerConfig`. Errors are one line (`--debug` shows the traceback); the library's warnings
(skipped files, ...) print as `sundae VERB: warning: ...`.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path
from typing import Sequence

from sundae.cli.openmp import prefer_passive_waiting

prefer_passive_waiting()  # before the imports below load torch, and the OpenMP runtime with it

import torch  # noqa: E402

import sundae  # noqa: E402
from sundae.cli import editing, evaluate, sampling, training  # noqa: E402
from sundae.cli.args import UsageError, rank  # noqa: E402
from sundae.cli.outputs import check_out_folder, missing_folders, remove_if_empty  # noqa: E402
from sundae.distributed import teardown  # noqa: E402
from sundae.io import error_line, log  # noqa: E402
from sundae.train import Interrupted  # noqa: E402

__all__ = ["main", "build_parser", "UsageError"]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other CLI error, `sundae VERB: error: MESSAGE (see
    sundae VERB --help)`, exit status 2; the default prints the whole usage block before the message.
    Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sundae", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error instead of "
                        "one line (also accepted after the verb)")
    parser.add_argument("--version", action=_Version, nargs=0, help="print sundae's version, the folder it is "
                        "imported from, and torch's and Python's versions")
    sub = parser.add_subparsers(dest="verb", required=True)
    training.add_parsers(sub)
    sampling.add_parsers(sub)
    editing.add_parsers(sub)
    evaluate.add_parsers(sub)
    return parser


def version_line() -> str:
    """`sundae 0.1.0 from /path/to/sundae (torch 2.13.0, Python 3.11.2)`, the form of `pip --version`: the
    package's version (`sundae.__version__`: the installed metadata, else a source checkout's pyproject.toml)
    and the folder the code is imported from, so a bug report says which copy ran."""
    return (f"sundae {sundae.__version__} from {Path(sundae.__file__).parent} (torch {torch.__version__}, "
            f"Python {platform.python_version()})")


class _Version(argparse.Action):
    """--version: prints `version_line()` unwrapped (argparse's own "version" action wraps it) and exits 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


class _StderrHandler(logging.StreamHandler):
    """Warnings of the library (logger "sundae") as `sundae VERB: warning: ...` lines on the current stderr."""

    def __init__(self, verb: str):
        super().__init__()
        self.setFormatter(logging.Formatter(f"sundae {verb}: warning: %(message)s"))

    @property
    def stream(self):  # the stderr of the moment, so redirections (and pytest's capture) see the lines
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _stderr_line(text: str) -> None:
    """`text` and its newline in one write: `print` makes two, and the ranks of a torchrun job share stderr,
    so their error lines interleaved mid-line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line. Errors print one line `sundae VERB: error: ...` and exit with status 2 (130 on
    Ctrl-C); `--debug` re-raises them with the traceback."""
    args = build_parser().parse_args(argv)
    handler = _StderrHandler(args.verb)
    log.addHandler(handler)
    out_folder = Path(args.out) if args.verb != "reconstruct" and getattr(args, "out", None) else None
    new_folders = missing_folders(out_folder) if out_folder is not None else []
    try:
        if out_folder is not None:
            check_out_folder(out_folder, "out" if args.verb == "export" else "--out")
        elif args.verb == "reconstruct" and not Path(args.out).is_dir():  # --out is the PNG file to write
            check_out_folder(Path(args.out).parent, f"--out {args.out}: its folder")
        args.func(args)
    except Interrupted as err:  # SIGTERM/SIGINT during training: saved at a step boundary
        if args.debug:
            raise
        if rank() == 0:
            _stderr_line(f"sundae {args.verb}: {err}")
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _stderr_line(f"sundae {args.verb}: interrupted; training runs continue from their last checkpoint with "
                     f"--resume")
        sys.exit(130)
    except Exception as err:
        remove_if_empty(new_folders)  # a run that failed before writing anything leaves no folder behind
        if args.debug:
            raise
        expected = isinstance(err, (UsageError, OSError, ValueError, FloatingPointError, ImportError))
        text = error_line(err)
        hint = "" if expected else f" ({type(err).__name__}; run with --debug for the traceback)"
        _stderr_line(f"sundae {args.verb}: error: {text}{hint}")
        sys.exit(2)
    finally:
        log.removeHandler(handler)
        teardown()
