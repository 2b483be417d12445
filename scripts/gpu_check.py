#!/usr/bin/env python3
"""What to run on a GPU machine that has torch, triton and nvcc but no package index (the lent
H100/H200): `make gpu-check`, or `python3 scripts/gpu_check.py` where make is missing.

Builds bigkern against the machine's own torch with every core, then runs, each under its own time
limit and all within one deadline (--deadline seconds, 560 by default: a lent machine's command
is killed at 600): `bigkern info`, the test suite on the GPU, `bigkern verify` (stored for the
README's status table), the quick benchmark (it stores its results after every case, so a cut
leaves what it measured), and the report. Logs and results go into $OUT when it is set (one
tarball plus the logs: 8 files at most) whatever happened, and a summary is printed last.

    --skip-build   the extension is already built      --full   the full benchmark, not --quick
    --tests ARGS   pytest arguments (default: tests)    --bench ARGS   extra `bigkern bench` arguments
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "gpu-check-logs"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


DEADLINE = [float("inf")]  # time.time() by which every step must have ended
RESERVE_S = 25  # kept back from the deadline for packaging the results


def step(name, command, limit_s, env=None, keep_s=0):
    """Run one step with a time limit (cut to what the deadline leaves, less keep_s for the steps
    after it), teeing its output to gpu-check-logs/<name>.log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    limit_s = int(min(limit_s, DEADLINE[0] - RESERVE_S - keep_s - time.time()))
    if limit_s < 10:
        print(f"\n=== {name}: skipped, the deadline is near", flush=True)
        return dict(step=name, rc="skip", seconds=0, log="", tail=["skipped: no time left before the deadline"])
    log = LOGS / f"{name}.log"
    print(f"\n=== {name}: {' '.join(map(shlex.quote, command))} (limit {limit_s}s)", flush=True)
    start = time.time()
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            for line in process.stdout:
                f.write(line)
                sys.stdout.write(line)
                if time.time() - start > limit_s:
                    process.kill()
                    f.write(f"\n*** killed after {limit_s}s\n")
                    break
            rc = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rc = -9
    elapsed = time.time() - start
    return dict(step=name, rc=rc, seconds=round(elapsed), log=str(log),
                tail=log.read_text().strip().splitlines()[-1:] if log.exists() else [])


def main():
    global LOGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tests", default="tests")
    parser.add_argument("--bench", default="")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--bench-limit", type=int, default=210)
    parser.add_argument("--deadline", type=int, default=560, help="seconds for everything, packaging included")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose tables the report regenerates")
    parser.add_argument("--logs", type=Path, default=LOGS)
    args = parser.parse_args()
    DEADLINE[0] = time.time() + args.deadline
    LOGS = args.logs

    python = sys.executable
    results = []
    if not args.skip_build:
        env = {"MAX_JOBS": str(os.cpu_count() or 4), "BIGKERN_BUILD_CUDA": os.environ.get("BIGKERN_BUILD_CUDA", "1")}
        results.append(step("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                            300, env))
    results.append(step("info", [python, "-m", "bigkern", "info"], 60))
    results.append(step("tests", [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--durations=15",
                                  *shlex.split(args.tests)],
                        args.test_limit))
    results.append(step("verify", [python, "-m", "bigkern", "verify", "--save", str(args.results)], 120))
    bench = [python, "-m", "bigkern", "bench", "--results", str(args.results)] + \
        ([] if args.full else ["--quick"]) + shlex.split(args.bench)
    results.append(step("bench", bench, args.bench_limit, keep_s=30))
    results.append(step("report", [python, "-m", "bigkern", "bench", "report", "--results", str(args.results),
                                   "--readme", str(args.readme)], 60))

    out = os.environ.get("OUT")
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
            for path, name in ((args.results, "bench/results"), (args.readme, "README.md"), (LOGS, "gpu-check-logs")):
                if path.exists():
                    tar.add(path, arcname=name)
        for name in ("tests", "bench", "build"):
            if (LOGS / f"{name}.log").exists():
                shutil.copy(LOGS / f"{name}.log", out / f"{name}.log")

    print("\n=== gpu-check summary")
    for r in results:
        print(f"{r['step']:<8} rc={r['rc']:<4} {r['seconds']:>4}s  {' '.join(r['tail'])[:150]}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
