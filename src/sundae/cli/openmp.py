"""The command line's OpenMP setting, made before anything in the process loads torch.

PyTorch's CPU kernels run on OpenMP threads. With OMP_WAIT_POLICY unset, GNU libgomp (the runtime of the
Linux wheels) lets a thread that has finished its share of a parallel region spin for GOMP_SPINCOUNT =
300,000 iterations (a few milliseconds) before it sleeps. A training step of the quickstart's generator is
about 600 parallel regions, one every third of a millisecond on idle cores, so the waiting threads spin
nearly all the time. On a machine that other processes keep busy they spend the process's CPU share
spinning while the thread they wait for waits for a core: the quickstart's training ran many times slower
than its CPU share alone explains (benchmarks/busy_cpu.py, benchmarks/RESULTS.md). PASSIVE makes a waiting
thread sleep at once (GOMP_SPINCOUNT 0).

The runtime reads the variable once, when torch loads it, so `sundae.cli` calls `prefer_passive_waiting`
before its first import of torch (the package `sundae` imports nothing heavy until its names are used).
A value the user set wins: `OMP_WAIT_POLICY=ACTIVE sundae ...` spins as before, and an explicit
GOMP_SPINCOUNT (libgomp) or KMP_BLOCKTIME (LLVM and Intel runtimes) overrides the policy's spin time.
"""

from __future__ import annotations

import os
from typing import MutableMapping


def prefer_passive_waiting(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` unless it is set already. Takes effect only if the OpenMP
    runtime is not loaded yet (no `import torch` so far in this process) and in the processes started later."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
