"""Training steps on a busy CPU: does the slowdown follow the CPU share the process still gets?

    python benchmarks/busy_cpu.py                      # a few minutes on 2 idle cores, most in the loaded runs
    python benchmarks/busy_cpu.py --policies unset,PASSIVE,GOMP_SPINCOUNT=10000 --threads 0

Each configuration runs in a fresh Python process, so that its OpenMP settings are in the environment before
torch (and with it the OpenMP runtime) is loaded. The process trains the quickstart's generator: the `fashion`
hourglass with the quickstart's codebook and classes, its `GeneratorTrainConfig` (batch 64, unroll, condition
dropout, AdamW, warm-up, gradient clipping, EMA), on random 8x8 tokens; a step is the loop of
`sundae.train.train_generator` without the data loader and the files. After `--warmup` steps it times
`--steps` steps and reports steps/s, its CPU seconds per step (all threads, user + system) and its CPU share
(CPU seconds / wall seconds, in cores).

Configurations: the OpenMP setting (`--policies`; default: OMP_WAIT_POLICY unset, the runtime's default, and
PASSIVE) x the thread count (`--threads`; default: torch's default and 1) x the load (idle; loaded: one busy Python loop per core this process may use, started before and
stopped after the configuration's runs). "share-only" is the loaded steps/s the loaded CPU share alone
predicts, idle steps/s x loaded share / idle share: a loaded figure far below it means the process burns its
CPU share without getting work done (threads spinning while they wait for a thread that has no core).
The runs go round-robin over the repeats; the table shows each configuration's median. Prints a table and
writes benchmarks/results/busy_cpu.json. On a machine that other jobs already load, both columns measure
that load too: say so beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# A busy Python loop that also ends when its parent dies, so that no competitor outlives the benchmark.
COMPETITOR = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(1_000_000): pass\n"


def child(steps: int, warmup: int) -> dict[str, Any]:
    """Time `steps` quickstart generator steps in this process; returns what `main` tabulates."""
    import torch  # first: the OpenMP runtime reads the environment the parent gave this process when it loads

    import copy
    import dataclasses
    from sundae.apps.quickstart import QUICKSTART_PRESETS
    from sundae.data import FASHION_MNIST_CLASSES
    from sundae.hourglass import Hourglass
    from sundae.sundae import condition_dropout, unrolled_loss
    from sundae.train import ema_update

    qs = QUICKSTART_PRESETS["fashion"]
    cfg = qs.generator_train
    num_classes = len(FASHION_MNIST_CLASSES)
    model_cfg = dataclasses.replace(qs.hourglass, codebook_size=qs.vqgan.codebook_size, num_classes=num_classes)
    side, b, v = qs.image_size // qs.vqgan.f, cfg.batch_size, model_cfg.codebook_size
    torch.manual_seed(0)
    model = Hourglass(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    def step(i: int) -> None:
        tokens = torch.randint(0, v, (b, side, side))
        labels = torch.randint(0, num_classes, (b,))
        gens = [torch.Generator().manual_seed(i * b + k) for k in range(b)]  # one per sample, as in training
        drop = condition_dropout(b, cfg.cond_dropout, "cpu", gens)

        def logits(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            if rows is None:
                return model(z, labels, drop=drop)
            return model(z, labels[rows], drop=drop[rows])

        opt.zero_grad(set_to_none=True)
        loss, _ = unrolled_loss(logits, tokens, v, cfg.unroll_steps, gens, unroll_share=cfg.unroll_share,
                                corruption=cfg.corruption)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        sched.step()
        ema_update(ema, model, cfg.ema_decay, i)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {i}")

    for i in range(warmup):
        step(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    info = torch.__config__.parallel_info()
    return {"steps": steps, "wall_s": wall, "cpu_s": cpu, "steps_per_s": steps / wall, "cpu_s_per_step": cpu / steps,
            "cpu_share": cpu / wall, "threads": torch.get_num_threads(),
            "openmp": "libgomp" if _loaded("libgomp") else "llvm libomp" if _loaded("libomp") else
                      "intel libiomp" if _loaded("libiomp") else "unknown",
            "parallel_backend": next((line.split(":")[1].strip() for line in info.splitlines()
                                      if line.startswith("ATen parallel backend")), "unknown")}


def _loaded(library: str) -> bool:
    """Whether a shared library whose file name starts with `library` is mapped into this process (Linux)."""
    try:
        return any(Path(line.split()[-1]).name.startswith(library)
                   for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line)
    except OSError:
        return False


@contextmanager
def competitors(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` busy Python processes for the duration of the block; stopped on every way out of it."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", COMPETITOR]))
        time.sleep(0.5)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def policy_env(policy: str) -> dict[str, str]:
    """The variables of a --policies item: "unset" (none), a wait policy ("PASSIVE"), or NAME=VALUE."""
    if policy == "unset":
        return {}
    name, _, value = policy.rpartition("=")
    return {name or "OMP_WAIT_POLICY": value}


def run_child(policy: str, threads: int, steps: int, warmup: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(policy_env(policy))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--warmup", str(warmup)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (median reported)")
    parser.add_argument("--policies", default="unset,PASSIVE",
                        help="comma-separated: unset (the OpenMP runtime's default), an OMP_WAIT_POLICY value, "
                             "or NAME=VALUE such as GOMP_SPINCOUNT=10000")
    parser.add_argument("--threads", default="0,1", help="comma-separated thread counts, 0 = torch's default")
    parser.add_argument("--competitors", type=int, default=len(os.sched_getaffinity(0)),
                        help="busy processes in the loaded runs (default: one per core this process may use)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "busy_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.warmup)))
        return

    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the competitors too (the finally blocks)
    import torch
    from common import environment, print_table, write_json

    configs = [(policy, int(threads)) for policy in args.policies.split(",") for threads in args.threads.split(",")]
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    t0, load_before = time.time(), os.getloadavg()
    for r in range(args.repeats):
        for load in ("idle", "loaded"):
            with competitors(args.competitors if load == "loaded" else 0):
                for policy, threads in configs:
                    res = run_child(policy, threads, args.steps, args.warmup)
                    runs.setdefault((policy, threads, load), []).append(res)
                    print(f"repeat {r + 1}/{args.repeats} {load:6s} {policy:7s} "
                          f"threads={res['threads']}: {res['steps_per_s']:.2f} steps/s, "
                          f"CPU share {res['cpu_share']:.2f}", flush=True)

    rows = []
    for policy, threads in configs:
        med = {load: {k: statistics.median(run[k] for run in runs[(policy, threads, load)])
                      for k in ("steps_per_s", "cpu_s_per_step", "cpu_share")} for load in ("idle", "loaded")}
        idle, loaded = med["idle"], med["loaded"]
        share_only = idle["steps_per_s"] * loaded["cpu_share"] / idle["cpu_share"]
        rows.append({"policy": policy, "threads": runs[(policy, threads, "idle")][0]["threads"],
                     "idle_steps_per_s": idle["steps_per_s"], "loaded_steps_per_s": loaded["steps_per_s"],
                     "slowdown": idle["steps_per_s"] / loaded["steps_per_s"],
                     "idle_cpu_share": idle["cpu_share"], "loaded_cpu_share": loaded["cpu_share"],
                     "share_drop": idle["cpu_share"] / loaded["cpu_share"],
                     "idle_cpu_s_per_step": idle["cpu_s_per_step"], "loaded_cpu_s_per_step": loaded["cpu_s_per_step"],
                     "share_only_steps_per_s": share_only,
                     "loaded_vs_share_only": loaded["steps_per_s"] / share_only})
    print(f"\nquickstart generator training, {args.steps} steps x {args.repeats} repeats per configuration, "
          f"loaded = {args.competitors} busy processes, medians ({time.time() - t0:.0f} s; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}, on {len(os.sched_getaffinity(0))} cores)")
    print_table(rows, [("policy", "OpenMP setting", "s"), ("threads", "threads", "d"),
                       ("idle_steps_per_s", "idle steps/s", ".2f"), ("loaded_steps_per_s", "loaded steps/s", ".2f"),
                       ("slowdown", "slowdown x", ".1f"), ("idle_cpu_share", "idle share", ".2f"),
                       ("loaded_cpu_share", "loaded share", ".2f"), ("share_drop", "share drop x", ".1f"),
                       ("idle_cpu_s_per_step", "idle CPU s/step", ".3f"),
                       ("loaded_cpu_s_per_step", "loaded CPU s/step", ".3f"),
                       ("share_only_steps_per_s", "share-only steps/s", ".2f"),
                       ("loaded_vs_share_only", "loaded / share-only", ".2f")])
    first = next(iter(runs.values()))[0]
    write_json(args.out, {"environment": {**environment(torch.device("cpu")), "openmp": first["openmp"],
                                          "parallel_backend": first["parallel_backend"],
                                          "cores_available": len(os.sched_getaffinity(0)),
                                          "load_average_before": load_before,
                                          "load_average_after": os.getloadavg()},
                          "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                   if k not in ("child", "out")},
                          "rows": rows,
                          "runs": [{"policy": p, "threads_requested": t, "load": load, **res}
                                   for (p, t, load), results in runs.items() for res in results]})


if __name__ == "__main__":
    main()
