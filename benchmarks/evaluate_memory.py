"""Peak memory of `sundae evaluate` against 2,000, 10,000 and 60,000 Fashion-MNIST reference images (issue 19).

Each measurement is one `python -m sundae evaluate` in its own process; its peak resident set (ru_maxrss of
that child, from os.wait4) is the figure, so it counts everything the command holds: Python, torch, the
models, the reference and the classifier's training split. Up to 10,000 references are the first images of
the test split, more are the first of the train split. `--src NAME=PATH` runs the `sundae` package found in
PATH (a `src` folder), so one run can measure the code before and after a change (`git archive OLD src`):

    python benchmarks/evaluate_memory.py --generator quickstart/generator --classifier quickstart/classifier.pt
    python benchmarks/evaluate_memory.py --generator quickstart/generator --src before=/tmp/old/src --src after=src

The classifier of classifier-FID is trained once (an unmeasured run on 100 references) when `--classifier`
does not exist yet, so that no measured run includes its training. Each child gets an address-space limit
(`--limit-gib`), so a run that would exhaust a shared machine fails instead; it is reported as failed with
its last line of output. Prints a table and writes benchmarks/results/evaluate_memory.json, with the
metrics each run reported (so runs of two versions can be checked for the same numbers).

The children inherit the environment. glibc's malloc keeps some freed memory (its mmap threshold grows with
the blocks freed), so the peak includes what the allocator holds as well as live tensors;
`MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/evaluate_memory.py ...` makes it hand blocks over 64 KiB back
(as `common.py` does in-process), and the JSON records that setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, environment, print_table, write_json  # noqa: E402  (puts src/ on the path)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = 10000  # Fashion-MNIST's test split; larger reference counts come from the train split


def _evaluate(src: Path, args: argparse.Namespace, count: int, out: Path, log: Path) -> dict[str, Any]:
    """Run one `sundae evaluate` with the package in `src`; returns its peak RSS, seconds and results."""
    spec = "fashion-mnist:test" if count <= TEST_IMAGES else "fashion-mnist:train"
    cmd = [sys.executable, "-m", "sundae", "evaluate", "--generator", args.generator, "--reference", spec,
           "--reference-limit", str(count), "--num", str(args.num), "--steps", args.steps, "--batch-size",
           str(args.batch_size), "--classifier", str(args.classifier), "--out", str(out), "--overwrite",
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1",
           "SUNDAE_INCEPTION": args.inception or str(out / "no-inception-weights.pth")}
    limit = int(args.limit_gib * 2**30)

    def cap_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.time()
    with open(log, "w") as fh:
        child = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=cap_address_space)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {"references": count, "reference": spec, "seconds": time.time() - t0,
                           "peak_rss_mib": usage.ru_maxrss / 1024, "returncode": child.returncode}
    if child.returncode == 0:
        result = json.loads((out / "evaluation.json").read_text())
        row["tokenizer"], row["samples"] = result["tokenizer"], result["samples"]
    else:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        row["error"] = lines[-1] if lines else f"exit status {child.returncode}"
    return row


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Largest relative difference between the metrics of two runs (seconds left out); None if either failed."""
    if "tokenizer" not in a or "tokenizer" not in b:
        return None
    pairs = [(a["tokenizer"][k], b["tokenizer"][k]) for k in a["tokenizer"]]
    for ra, rb in zip(a["samples"], b["samples"]):
        pairs += [(ra[k], rb[k]) for k in ra if k not in ("seconds_per_image",)]
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, help="a generator `sundae evaluate` accepts (a quickstart's "
                        "generator folder, say)")
    parser.add_argument("--classifier", help="classifier file of classifier-FID; trained there first when it does "
                        "not exist (default: in --work)")
    parser.add_argument("--counts", default="2000,10000,60000", help="reference counts, comma-separated")
    parser.add_argument("--src", action="append", default=[], metavar="NAME=PATH", help="a version of the code to "
                        "measure: a name and its src folder (repeatable; default after=<this checkout>/src)")
    parser.add_argument("--num", type=int, default=200, help="samples per run (default 200)")
    parser.add_argument("--steps", default="8", help="sampling steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=250, help="evaluate's --batch-size (its default 250)")
    parser.add_argument("--inception", help="FID Inception weights to include Inception FID (default: none)")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="address-space limit of each run, GiB")
    parser.add_argument("--work", help="folder for the runs' outputs and logs (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS / "evaluate_memory.json"))
    args = parser.parse_args()
    versions = dict(s.split("=", 1) for s in args.src) if args.src else {"after": str(ROOT / "src")}
    versions = {name: Path(path).resolve() for name, path in versions.items()}
    work = Path(args.work or tempfile.mkdtemp(prefix="evaluate_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    args.classifier = Path(args.classifier or work / "classifier.pt").resolve()
    if not args.classifier.is_file():
        print(f"training the classifier once, unmeasured: {args.classifier}", flush=True)
        first = next(iter(versions.values()))
        warm = _evaluate(first, argparse.Namespace(**{**vars(args), "num": 10, "steps": "2"}), 100,
                         work / "classifier_run", work / "classifier_run.log")
        if warm["returncode"]:
            sys.exit(f"training the classifier failed: {warm['error']} (log: {work / 'classifier_run.log'})")

    runs: list[dict[str, Any]] = []
    payload = {"benchmark": "evaluate_memory", "environment": environment(torch.device("cpu")),
               "settings": {"generator": str(Path(args.generator).resolve()), "classifier": str(args.classifier),
                            "num": args.num, "steps": args.steps, "batch_size": args.batch_size,
                            "inception": args.inception, "limit_gib": args.limit_gib,
                            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                            "versions": {k: str(v) for k, v in versions.items()}},
               "runs": runs}
    for count in (int(c) for c in args.counts.split(",")):
        for name, src in versions.items():
            print(f"{name}: {count} references ...", flush=True)
            run = _evaluate(src, args, count, work / f"{name}_{count}", work / f"{name}_{count}.log")
            row = {"version": name, **run}
            runs.append(row)
            print(f"  peak {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.0f} s"
                  + (f", failed: {row['error']}" if row["returncode"] else ""), flush=True)
            write_json(Path(args.out), payload)  # after every run: a long run keeps what it measured

    table = []
    for count in dict.fromkeys(r["references"] for r in runs):
        line: dict[str, Any] = {"references": count}
        by_name = {r["version"]: r for r in runs if r["references"] == count}
        for name, r in by_name.items():
            line[f"{name}_mib"] = r["peak_rss_mib"] if r["returncode"] == 0 else None
            line[f"{name}_s"] = r["seconds"]
        if len(by_name) == 2:
            line["difference"] = _same_numbers(*by_name.values())
        table.append(line)
    columns = [("references", "references", "d")]
    for name in versions:
        columns += [(f"{name}_mib", f"{name} peak MiB", ".0f"), (f"{name}_s", f"{name} s", ".0f")]
    if len(versions) == 2:
        columns.append(("difference", "largest relative metric difference", ".1e"))
    print_table(table, columns)
    for r in runs:
        if r["returncode"]:
            print(f"{r['version']}, {r['references']} references: failed after {r['seconds']:.0f} s "
                  f"(peak {r['peak_rss_mib']:.0f} MiB): {r['error']}")
    payload["table"] = table
    write_json(Path(args.out), payload)


if __name__ == "__main__":
    main()
