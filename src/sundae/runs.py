"""Run folders: a training run's checkpoints, log and RNG, and stopping cleanly on a signal.

`restore` and `save` are the only readers and writers of a run's resumable checkpoint (`out/<kind>.pt`, plus
numbered copies in `out/checkpoints/`). They hold the unwrapped module's full weights and optimizer state
keyed by parameter name, so a checkpoint written by one process, by DDP or by FSDP2 ranks resumes in any of
those. `log.jsonl` gets one JSON record per logged step; `trim_log` drops what a resumed run will rewrite.
`RunLock` keeps a second training run out of a folder while one writes it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sundae import distributed
from sundae.checkpoint import (bundle_info, config_from_dict, load_checkpoint, resolve_checkpoint,
                               save_checkpoint)
from sundae.io import append_line, atomic_write, file_digest, log


def log_record(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line to `path` (log.jsonl). Raises OSError "cannot write PATH: ..." (errno
    ENOSPC for a full disk), leaving the log as it was (no half-written line)."""
    append_line(path, json.dumps(record))


def trim_log(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a run resumes from) and any line a crash cut
    short, so a resumed run's log has each step once."""
    if not path.is_file():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except (json.JSONDecodeError, AttributeError):
            return False

    lines = path.read_text().splitlines()
    keep = [line for line in lines if before(line)]
    if len(keep) != len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


class RunInUse(OSError):
    """Another training run holds the run folder (`RunLock`)."""


class RunLock:
    """Context manager: an advisory lock (flock) on `out/.lock` while a training run writes `out`, so that a
    second run on the same folder is refused instead of both overwriting each other's checkpoints and logging
    every step twice. The file holds the holder's pid, host and start time, which the refusal names; it is
    removed on exit. The kernel drops a flock when its process dies, so the file a killed run leaves behind
    holds no lock: the next run takes it over (with a warning naming the dead run). Under torchrun rank 0
    takes the lock and all ranks follow its outcome. Where the file system offers no locks (some network file
    systems) a warning says so and the run goes on unguarded.

    Raises RunInUse (an OSError) naming the folder and the holder when another run holds the lock.
    """

    def __init__(self, out: Path, ctx: distributed.Dist):
        self.path, self.ctx, self.fd = Path(out) / ".lock", ctx, None

    def __enter__(self) -> "RunLock":
        refusal = self._acquire() if self.ctx.main else None
        refusal = distributed.from_main(refusal, self.ctx)
        if refusal:
            raise RunInUse(refusal)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()  # while still locked: a run starting now waits for no file or a new one
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def _acquire(self) -> str | None:
        """Lock, and write this process's line into the file; the refusal message when another run holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                return self._unguarded(err)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _holder(fd) or "it has not recorded its pid yet"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    return self._unguarded(err)
                return (f"{self.path.parent} is in use by another training run ({holder}); wait for it or choose "
                        f"another --out")
            try:  # a run that ended between our open and flock removed the file: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning(f"{self.path}: the run that held it ({stale}) ended without releasing it (killed?); "
                        f"taking it over")
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, a refused run just cannot name us
            pass
        return None

    def _unguarded(self, err: OSError) -> None:
        log.warning(f"cannot lock {self.path} ({err.strerror or err}): nothing keeps a second training run out "
                    f"of {self.path.parent}")


def _holder(fd: int) -> str:
    """The holder a lock file names, as "pid 1234 on host, started ..."; empty when it names none."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return ""


def rng_state() -> dict[str, Any]:
    """The torch (and CUDA) RNG states, for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopOnSignal:
    """While active, SIGTERM/SIGINT only set `signum`; the loop checks it at step boundaries, saves and stops.
    A second Ctrl-C (SIGINT) before that raises KeyboardInterrupt at once (the last checkpoint stays as it
    was). Further SIGTERMs change nothing: torchrun answers Ctrl-C by sending its workers SIGTERM too.

    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __enter__(self) -> "StopOnSignal":
        self.signum, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def restore(out: Path, kind: str, parts: dict[str, Any], ema: nn.Module, resume: bool,
            ctx: distributed.Dist, overwrite: bool = False,
            init_from: str | Path | None = None) -> tuple[int, Any, dict[str, Any]]:
    """Load the run's last checkpoint `out/<kind>.pt` into `parts` (key -> object with load_state_dict) and
    the EMA. Returns (step, RNG state, the checkpoint), or (0, None, {}) when there is no checkpoint yet.
    Every rank reads the file (the run folder must be on storage all nodes see). Rank 0 drops log records
    after the restored step and the temporary files of checkpoint writes that a crash interrupted.

    `overwrite` (without `resume`) starts a new run over an old one: rank 0 deletes the old run's
    checkpoints, log and sample grids first, unless the run's `init_from` source (fine-tuning) is `out` or
    lies inside it: that would delete the weights the new run is to start from.
    Raises FileExistsError when a checkpoint exists and neither `resume` nor `overwrite` is set; ValueError
    (before anything is deleted) for an `init_from` inside `out` with `overwrite`.
    """
    path = out / f"{kind}.pt"
    ckpt: dict[str, Any] = {}
    if overwrite and not resume and init_from is not None:
        source, folder = Path(init_from).resolve(), out.resolve()
        if source == folder or folder in source.parents:
            raise ValueError(f"--init-from {init_from} lies in --out {out}, which --overwrite would clear before "
                             f"reading it: copy the source elsewhere, or choose another --out")
    if overwrite and not resume:
        if ctx.main:
            old = [path, out / "log.jsonl", out / "curves.png", *out.glob("checkpoints/step_*.pt"),
                   *out.glob("samples/step_*.png"),
                   *out.glob("tensorboard/events.out.tfevents.*")]
            for file in old:
                file.unlink(missing_ok=True)
    elif path.is_file():
        if not resume:
            raise FileExistsError(f"{path} exists: pass --resume to continue that run, --overwrite to start over "
                                  f"(deleting it), or choose another --out")
        ckpt = load_checkpoint(path, kind)
        if kind == "generator" and ("optimizer_muon" in ckpt) != ("optimizer_muon" in parts):
            was, now = ("muon", "adamw") if "optimizer_muon" in ckpt else ("adamw", "muon")
            raise ValueError(f"{path} was trained with optimizer {was!r}, this run asks for {now!r}: resume with "
                             f"--set optimizer={was}, or start a new run")
        try:
            for key, obj in parts.items():
                load_state(obj, ckpt[key], parts[_OWNER.get(key, "model")])
            load_state(ema, ckpt["ema"], ema)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{path} was made with a different config ({str(err).splitlines()[0]})") from None
    step = ckpt.get("step", 0)
    if ctx.main:
        trim_log(out / "log.jsonl", step)
        for folder in (out, out / "checkpoints"):  # temporary files of writes a crash cut short
            for tmp in folder.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)
    return step, ckpt.get("rng"), ckpt


def set_hparams(opts: list[torch.optim.Optimizer], sched: Any, cfg: Any, step: int) -> None:
    """Put the training config's lr and betas back into optimizers (and the scheduler) whose state a resume
    loaded: the saved state carries the old run's values, and `--resume --set lr=...` must take effect."""
    factor = sched.lr_lambdas[0](step) if sched is not None else 1.0
    for opt in opts:
        for group in opt.param_groups:
            group["lr"], group["initial_lr"] = cfg.lr * factor, cfg.lr
            if "betas" in group:  # Adam's; Muon has a momentum instead
                group["betas"] = cfg.betas
    if sched is not None:
        sched.base_lrs = [cfg.lr] * len(sched.base_lrs)
        sched._last_lr = [group["lr"] for group in opts[0].param_groups]


_OWNER = {"optimizer_disc": "disc"}  # the module whose parameters an optimizer in `parts` updates


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The names of `opt`'s parameters in its own order (the order of optimizer state dict indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_state(obj: Any, model: nn.Module) -> dict[str, Any]:
    """The whole (unsharded) state dict of a module, of `model`'s optimizer, or of anything else with one.
    Optimizer state is keyed by parameter name, so it loads whether the run is sharded or not. Collective
    under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if isinstance(obj, torch.optim.Optimizer):
        if _is_sharded(model):
            return get_optimizer_state_dict(model, obj, options=options)
        state, names = obj.state_dict(), _param_names(obj, model)
        return {"state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    if isinstance(obj, nn.Module) and _is_sharded(obj):
        return get_model_state_dict(obj, options=options)
    return obj.state_dict()


def load_state(obj: Any, state: dict[str, Any], model: nn.Module) -> None:
    """The inverse of `_full_state`; also takes optimizer state keyed by index (older checkpoints)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    if isinstance(obj, torch.optim.Optimizer):
        if _is_sharded(model):
            set_optimizer_state_dict(model, obj, state, options=options)
            return
        index = {n: i for i, n in enumerate(_param_names(obj, model))}
        state = {"state": {index.get(k, k): v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [index.get(k, k) for k in g["params"]]}
                                  for g in state["param_groups"]]}
    if isinstance(obj, nn.Module) and _is_sharded(obj):
        set_model_state_dict(obj, state, options=options)
    else:
        obj.load_state_dict(state)


def save(out: Path, kind: str, model_cfg: Any, train_cfg: Any, parts: dict[str, Any], ema: nn.Module,
         step: int, ctx: distributed.Dist, **extra: Any) -> Path:
    """Write everything `restore` needs, plus `extra` keys, atomically to the resumable `out/<kind>.pt` and
    to a numbered copy `out/checkpoints/step_NNNNNNN.pt` (rank 0 writes; all ranks must call). The weights are
    the unwrapped module's, so a checkpoint from N processes loads in one and the reverse. Returns the former.
    """
    states = {key: full_state(obj, parts[_OWNER.get(key, "model")]) for key, obj in parts.items()}
    if not all(torch.isfinite(v).all() for v in states["model"].values() if v.is_floating_point()):
        raise FloatingPointError(f"the weights became non-finite at step {step}; nothing was saved, the last good "
                                 f"checkpoint is kept (continue from it with --resume, e.g. with a lower lr)")
    ema_state = full_state(ema, ema)
    last = out / f"{kind}.pt"
    if ctx.main:
        data = {"batches": step, "batch_size": train_cfg.batch_size, "seed": train_cfg.seed}
        for path in (last, out / "checkpoints" / f"step_{step:07d}.pt"):
            save_checkpoint(path, kind, model_cfg, states["model"], ema=ema_state, step=step, rng=rng_state(),
                            data=data, world=ctx.world, train=dataclasses.asdict(train_cfg),
                            **{k: v for k, v in states.items() if k != "model"}, **extra)
    distributed.barrier(ctx)
    return last


# ---- a new run from existing weights (fine-tuning) ----------------------------------------------------

CLASS_ROWS = "class_embedding.embedding.weight"  # the generator's class embedding: rows 0..n-1, then the null class


def init_source(source: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a new run of `kind` starts from, and its contents: `source` is a checkpoint file, a run
    folder, a quickstart output folder, an export folder, or (for a tokenizer) a bundle, whose `tokenizer/`
    is used. Raises FileNotFoundError or ValueError naming the file (not a checkpoint, the other kind)."""
    path = Path(source)
    bundled = bundle_info(path).get("bundle", {}) if kind == "tokenizer" else {}
    if isinstance(bundled, dict) and bundled.get("tokenizer"):
        path = path / bundled["tokenizer"]
    path = resolve_checkpoint(path, kind)
    return path, load_checkpoint(path, kind)


def _weights_digest(path: Path) -> str:
    """sha256 of the file the weights were read from (an export folder's model.safetensors)."""
    return file_digest(path / "model.safetensors" if path.is_dir() else path)


def _grow_classes(state: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """`state` with its class embedding grown to the rows of `fresh` (a freshly initialised model's state):
    the old classes keep their rows, the null class (the last row, used by condition dropout and guidance)
    keeps its row and moves to the new last index, the new classes get the fresh rows."""
    old, new = state.get(CLASS_ROWS), fresh.get(CLASS_ROWS)
    if old is None or new is None or old.shape[0] == new.shape[0]:
        return state
    rows = new.clone()
    rows[:old.shape[0] - 1], rows[-1] = old[:-1], old[-1]
    return {**state, CLASS_ROWS: rows}


def start_from(source: str | Path | None, kind: str, model_cfg: Any, parts: dict[str, Any], ema: nn.Module,
               ckpt: dict[str, Any], out: Path, ctx: distributed.Dist) -> dict[str, Any] | None:
    """Start a new run from the weights of `source` (`init_source`): the model and EMA weights (an export
    holds one set: both start from it), and the discriminator (`parts["disc"]`) when the source holds one of
    the same shape (else it starts fresh, as from a converted taming tokenizer, which holds none). The
    optimizer, step, lr schedule and data order start afresh. A generator may gain classes: `model_cfg`
    with more classes than the source adds rows (`_grow_classes`); every other field must be the source's.

    `ckpt` is what `restore` loaded: when the run already has a checkpoint (`--resume`) it wins, `source` is
    not read, and the record it stored comes back. Otherwise returns the record {"path", "sha256", "step"}
    (written to the checkpoints and as a `log.jsonl` line `{"step": 0, "init_from": ..., "init_sha256": ...}`),
    or None without a source. Raises ValueError naming the field whose value differs from the source's.
    """
    if ckpt or source is None:
        return ckpt.get("init")
    path, src = init_source(source, kind)
    stored = config_from_dict(type(model_cfg), src["config"], str(path))
    for field in dataclasses.fields(stored):
        have, want = getattr(stored, field.name), getattr(model_cfg, field.name)
        grows = field.name == "num_classes" and 0 < have <= want
        if have != want and not grows:
            raise ValueError(f"{path}: {field.name} is {have!r} there, {want!r} here: fine-tuning keeps the "
                             f"architecture" + (" (a token folder may add classes, not remove them)"
                                                if field.name == "num_classes" else ""))
    model = parts["model"]
    fresh = full_state(model, model)
    for module, key in ((model, "model"), (ema, "ema" if src.get("ema") is not None else "model")):
        load_state(module, _grow_classes(src[key], fresh), module)
    disc, disc_state = parts.get("disc"), src.get("disc")
    if disc is not None:
        shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
        if disc_state is not None and shapes == {k: tuple(v.shape) for k, v in disc_state.items()}:
            disc.load_state_dict(disc_state)
        else:
            log.info(f"{path} holds no discriminator of this shape: it starts fresh")
    record = {"path": str(path.resolve()), "sha256": _weights_digest(path), "step": src.get("step")}
    if ctx.main:
        log_record(out / "log.jsonl", {"step": 0, "init_from": record["path"], "init_sha256": record["sha256"]})
    return record


class RunLog:
    """Context manager writing a run's log: one JSON line per record to `out/log.jsonl` (rank 0), and with
    `logger` "tensorboard" also every number as a TensorBoard scalar under `out/tensorboard/` (events after
    `step`, the step a run resumes from, are purged). Raises ImportError naming the package when tensorboard
    is not installed."""

    def __init__(self, out: Path, logger: str, step: int, ctx: distributed.Dist):
        self.path, self.writer = out / "log.jsonl", None
        if logger == "tensorboard" and ctx.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("logger=tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pip install -e \".[tensorboard]\")") from None
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        self.main = ctx.main

    def __enter__(self) -> "RunLog":
        return self

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        log_record(self.path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()
