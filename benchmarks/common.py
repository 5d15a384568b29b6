"""Shared measuring tools for the benchmark scripts: peak FLOP/s, timing, peak memory, tables, JSON.

Peak memory on CUDA is `torch.cuda.max_memory_allocated`; on the CPU it is the process's resident-set
high-water mark (VmHWM in /proc/self/status, Linux), reset before each measurement by writing 5 to
/proc/self/clear_refs. Both are reported as the growth over what was resident before the measured call,
so the weights and the Python runtime are not counted. On the CPU, glibc's malloc is told to hand every
block over 64 KiB straight back to the OS when freed (a fixed mmap threshold), so the resident set follows
live memory instead of keeping the heap an earlier, bigger call grew.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from sundae.io import write_json as _write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _return_freed_memory_to_the_os() -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so no dynamic growth
    except (OSError, AttributeError):  # not glibc: CPU peaks may undercount memory the allocator keeps
        pass


_return_freed_memory_to_the_os()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_name(device: torch.device) -> str:
    """A human-readable name of the machine the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 0) -> float:
    """This machine's achievable peak in FLOP/s: a large square matmul in `dtype`, measured now.

    The MFU ratios of the scripts divide by this number (measured in the same run, so a busy or
    throttled machine lowers both sides). size: matrix side; default 8192 on CUDA, 4096 on the CPU.
    """
    n = size or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=5 if device.type == "cpu" else 20, warmup=2)
    return 2 * n**3 / seconds


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run `fn()` once; return (its result, peak memory growth in bytes during the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    if not Path("/proc/self/clear_refs").exists():
        return fn(), -1  # no way to read the CPU high-water mark off Linux
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    out = fn()
    return out, (_rss_kib("VmHWM") - before) * 1024


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print `rows` as an aligned text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], spec) for k, _, spec in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically, and say where."""
    _write_json(path, payload)
    print(f"wrote {path}")


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
