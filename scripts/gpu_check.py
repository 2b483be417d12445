#!/usr/bin/env python3
"""What to run on a GPU machine that has torch, triton and nvcc but no package index (the lent
H100/H200): `make gpu-check`, or `python3 scripts/gpu_check.py` where make is missing.

Builds bigkern against the machine's own torch with every core, then runs, each under its own time
limit so the whole fits in 10 minutes: `bigkern info`, the test suite on the GPU, `bigkern verify`
(stored for the README's status table), the quick benchmark, and the report. Logs and results go
into $OUT when it is set (as one tarball plus the logs: 8 files at most), and a summary is printed last.

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


def step(name, command, limit_s, env=None):
    """Run one step with a time limit, teeing its output to gpu-check-logs/<name>.log."""
    LOGS.mkdir(exist_ok=True)
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
    return dict(step=name, rc=rc, seconds=round(elapsed), log=str(log.relative_to(ROOT)),
                tail=log.read_text().strip().splitlines()[-1:] if log.exists() else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tests", default="tests")
    parser.add_argument("--bench", default="")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--bench-limit", type=int, default=210)
    args = parser.parse_args()

    python = sys.executable
    results = []
    if not args.skip_build:
        env = {"MAX_JOBS": str(os.cpu_count() or 4), "BIGKERN_BUILD_CUDA": os.environ.get("BIGKERN_BUILD_CUDA", "1")}
        results.append(step("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                            300, env))
    results.append(step("info", [python, "-m", "bigkern", "info"], 60))
    results.append(step("tests", [python, "-m", "pytest", "-q", "-x", "--durations=15", *shlex.split(args.tests)],
                        args.test_limit))
    results.append(step("verify", [python, "-m", "bigkern", "verify", "--save", "bench/results"], 120))
    bench = [python, "-m", "bigkern", "bench"] + ([] if args.full else ["--quick"]) + shlex.split(args.bench)
    results.append(step("bench", bench, args.bench_limit))
    results.append(step("report", [python, "-m", "bigkern", "bench", "report"], 60))

    out = os.environ.get("OUT")
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
            tar.add(ROOT / "bench" / "results", arcname="bench/results")
            tar.add(ROOT / "README.md", arcname="README.md")
            tar.add(LOGS, arcname="gpu-check-logs")
        for name in ("tests", "bench", "build"):
            if (LOGS / f"{name}.log").exists():
                shutil.copy(LOGS / f"{name}.log", out / f"{name}.log")

    print("\n=== gpu-check summary")
    for r in results:
        print(f"{r['step']:<8} rc={r['rc']:<4} {r['seconds']:>4}s  {' '.join(r['tail'])[:150]}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
