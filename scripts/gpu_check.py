#!/usr/bin/env python3
"""What to run on a GPU machine that has torch, triton and nvcc but no package index (the lent
H100/H200): `make gpu-check`, or `python3 scripts/gpu_check.py` where make is missing.

Builds bigkern against the machine's own torch with every core (pip never goes to the network;
if the build fails, it builds again without the CUDA extension, in seconds, so that the Triton
paths are still tested), then runs, each under its own time limit and all within one deadline
(--deadline seconds, 560 by default: a lent machine's command is killed at 600):
  info     `bigkern info`
  tests    the GPU tests first (`pytest -m gpu`, each under a timeout where pytest-timeout is
           installed), then the rest of the suite in what is left of --test-limit
  verify   `bigkern verify` (stored for the README's status table)
  bench    the benchmark (below)
  report   the README's tables from the results
Tests and verify run with BIGKERN_TRITON_AUTOTUNE=0: one tile per kernel, nothing timed.

The benchmark is `bigkern bench --quick --per-family 4`, sized for ~200 s on an H100, most of it
compiling and autotuning: the first four quick cases of each family, 19 cases (epilogue's four;
attention hd64 seq2048, plain and causal; conv ResNet-50 l1.3x3 and l3.1x1b at batch 32, each of
these forward and forward+backward; the three LSTM cases; example-cnn and transformer-encoder-4k,
eager and patched: --quick leaves out torch.compile of whole models, minutes each). It stores its
results after every case, so a cut leaves what it measured. --full runs the whole benchmark.

A step is killed at its limit with every process it started (it runs in a session of its own),
whether it prints or not. Logs and results go into $OUT, when it is set, after every step (one
tarball of the results, README and logs, the main logs and the summary: 8 files at most), so a
kill at any point leaves what was done; the summary is printed last.

    --skip-build   the extension is already built      --full   the full benchmark, not the sample
    --tests ARGS   pytest arguments (default: tests)    --bench ARGS   extra `bigkern bench` arguments
"""

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "gpu-check-logs"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


DEADLINE = [float("inf")]  # time.time() by which every step must have ended
RESERVE_S = 25  # kept back from the deadline for packaging the results
MIN_STEP_S = 10  # a step that would get less is skipped
QUICK_BENCH = ["--quick", "--per-family", "4"]  # ~200 s on an H100 (see above)
TEST_TIMEOUT_S = 60  # per test, with pytest-timeout: a hung kernel costs one test, not the step
NO_TESTS_RAN = 5  # pytest's exit status when --tests selects no test of a kind (-m gpu)
# copied into $OUT beside the tarball (which holds every log)
OUT_FILES = ("build.log", "gpu-tests.log", "tests.log", "verify.log", "bench.log", "summary.txt")


def _tee(stream, log):
    """Copy a step's output, as it comes, to its log and to our stdout."""
    try:
        for line in stream:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
    except (OSError, ValueError):  # our stdout is gone, or step() closed the log after giving up on us
        pass


def _kill_group(process):
    """Kill the step's session: the step and what it started (ninja, nvcc, Inductor's workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def step(name, command, limit_s, env=None, keep_s=0):
    """Run one step with a time limit (cut to what the deadline leaves, less keep_s for the steps
    after it), teeing its output to <logs>/<name>.log. The limit is kept by waiting on the process,
    the output read by a thread: a step silent for minutes (pip, pytest -q, a progress bar on a
    pipe) is killed on time too."""
    LOGS.mkdir(parents=True, exist_ok=True)
    limit_s = int(min(limit_s, DEADLINE[0] - RESERVE_S - keep_s - time.time()))
    if limit_s < MIN_STEP_S:
        print(f"\n=== {name}: skipped, the deadline is near", flush=True)
        return dict(step=name, rc="skip", seconds=0, log="", tail=["skipped: no time left before the deadline"])
    log = LOGS / f"{name}.log"
    print(f"\n=== {name}: {' '.join(map(shlex.quote, command))} (limit {limit_s}s)", flush=True)
    start = time.time()
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            reader = threading.Thread(target=_tee, args=(process.stdout, f), daemon=True)
            reader.start()
            rc = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on success: a leftover worker would hold the output open
            _kill_group(process)
        reader.join(timeout=10)
        if rc is None:
            rc = process.wait()
            f.write(f"\n*** killed after {limit_s}s\n")
    elapsed = time.time() - start
    return dict(step=name, rc=rc, seconds=round(elapsed), log=str(log),
                tail=log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else [])


def summary(results):
    return [f"{r['step']:<10} rc={r['rc']:<4} {r['seconds']:>4}s  {' '.join(r['tail'])[:150]}" for r in results]


def package(out, results_dir, readme):
    """What is done so far into $OUT: the tarball (written beside and renamed over the previous one,
    so a kill while writing leaves that one), then the main logs and the summary."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".results.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for path, name in ((results_dir, "bench/results"), (readme, "README.md"), (LOGS, "gpu-check-logs")):
            if path.exists():
                tar.add(path, arcname=name)
    os.replace(partial, out / "results.tar.gz")
    for name in OUT_FILES:
        if (LOGS / name).exists():
            shutil.copy(LOGS / name, out / name)


def main(argv=None):
    global LOGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tests", default="tests")
    parser.add_argument("--bench", default="")
    parser.add_argument("--test-limit", type=int, default=200, help="seconds for the GPU tests and the rest together")
    parser.add_argument("--bench-limit", type=int, default=210)
    parser.add_argument("--deadline", type=int, default=560, help="seconds for everything, packaging included")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose tables the report regenerates")
    parser.add_argument("--logs", type=Path, default=LOGS)
    args = parser.parse_args(argv)
    DEADLINE[0] = time.time() + args.deadline
    LOGS = args.logs
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    python = sys.executable
    results = []
    notes = []
    if not os.environ.get("BIGKERN_GIT_REVISION") and not (ROOT / ".git").exists():
        notes.append("note: no .git here and BIGKERN_GIT_REVISION unset: the results say git 'unknown' (run it as "
                     "BIGKERN_GIT_REVISION=<git rev-parse --short=12 HEAD, where the source came from> ...)")
        print(notes[-1], flush=True)

    def record(result):
        results.append(result)
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "summary.txt").write_text("\n".join(notes + summary(results)) + "\n")
        if out:
            package(out, args.results, args.readme)
        return result

    if not args.skip_build:
        pip = [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."]
        env = {"MAX_JOBS": str(os.cpu_count() or 4), "BIGKERN_BUILD_CUDA": os.environ.get("BIGKERN_BUILD_CUDA", "1"),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if record(step("build", pip, 300, env))["rc"] != 0 and env["BIGKERN_BUILD_CUDA"] != "0":
            # without the CUDA extension (seconds), so that the Triton paths are still tested
            record(step("build-no-cuda", pip, 120, {**env, "BIGKERN_BUILD_CUDA": "0"}))
    record(step("info", [python, "-m", "bigkern", "info"], 60))

    no_autotune = {"BIGKERN_TRITON_AUTOTUNE": "0"}
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15"]
    if importlib.util.find_spec("pytest_timeout"):  # the GPU image has it; this machine may not
        pytest.append(f"--timeout={TEST_TIMEOUT_S}")

    def run_tests(name, marker, limit_s):
        result = step(name, pytest + ["-m", marker, *shlex.split(args.tests)], limit_s, no_autotune)
        if result["rc"] == NO_TESTS_RAN:  # e.g. --tests naming a file without GPU tests
            result["rc"] = 0
        return record(result)
    # the GPU tests first: the whole suite does not fit, and they came late in it
    gpu_tests = run_tests("gpu-tests", "gpu", args.test_limit)
    run_tests("tests", "not gpu", args.test_limit - gpu_tests["seconds"])
    record(step("verify", [python, "-m", "bigkern", "verify", "--save", str(args.results)], 120, no_autotune))
    bench = [python, "-m", "bigkern", "bench", "--results", str(args.results)] + \
        ([] if args.full else QUICK_BENCH) + shlex.split(args.bench)
    record(step("bench", bench, args.bench_limit, keep_s=30))
    record(step("report", [python, "-m", "bigkern", "bench", "report", "--results", str(args.results),
                           "--readme", str(args.readme)], 60))

    print("\n=== gpu-check summary")
    print("\n".join(notes + summary(results)))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    # steps run in sessions of their own, out of reach of a signal to ours: a SIGTERM goes through
    # step()'s cleanup, which kills the running one
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
