"""bigkern's benchmark suite: `bigkern bench` (also run by `make bench` and `make gpu-check`).

    bigkern bench [--family F ...] [--quick] [--per-family N] [--dtype D ...] [--results DIR]
    bigkern bench report [--results DIR] [--readme README.md]

Each family's cases live in bigkern/benchmark/<family>.py; shapes come from bench/shapes.json.
Without a GPU, `bigkern bench` verifies the kernels instead (timings need a GPU); `--cpu` times
on the CPU (with a GPU there too), which only tests the harness.
"""

import argparse
import importlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

SUITES = {"epilogue": "bigkern.benchmark.epilogue", "attention": "bigkern.benchmark.attention",
          "conv": "bigkern.benchmark.conv", "lstm": "bigkern.benchmark.lstm", "models": "bigkern.benchmark.models"}
REPO = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    bench = REPO / "bench"
    return bench / "results" if bench.is_dir() else Path.cwd() / "bench-results"


def load_shapes(path=None) -> dict:
    """bench/shapes.json of the source tree, else the copy packaged at build time."""
    candidates = [path, os.environ.get("BIGKERN_SHAPES"), REPO / "bench" / "shapes.json",
                  Path(__file__).with_name("shapes.json")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return json.loads(Path(candidate).read_text())
    raise FileNotFoundError("bench/shapes.json not found (set BIGKERN_SHAPES)")


def run_settings(environment) -> dict:
    """The BIGKERN_* settings in `environment` that change what a run times (BIGKERN_TRITON_AUTOTUNE=0:
    each kernel's first tile; BIGKERN_BACKEND: what the patched models run; kernel switches), not
    the ones that only say where things are."""
    return {k: v for k, v in sorted(environment.items())
            if k.startswith("BIGKERN_") and k not in ("BIGKERN_GIT_REVISION", "BIGKERN_SHAPES")}


def _progress(total):
    """A rich progress bar on a terminal; elsewhere (a log, a pipe) a line per case, as rich draws
    nothing on a pipe until the run ends."""
    if sys.stdout.isatty():
        try:
            from rich.progress import Progress

            progress = Progress(transient=False)
            task = progress.add_task("benchmarking", total=total)
            return progress, lambda description: progress.update(task, advance=1, description=description)
        except ImportError:
            pass

    class Plain:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    done = [0]

    def advance(description):
        done[0] += 1
        print(f"[{done[0]}/{total}] {description}", flush=True)
    return Plain(), advance


def run(args) -> int:
    import torch

    from bigkern.benchmark import harness, report

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu" and not args.cpu:
        from bigkern import cli, ops

        families = [f for f in (args.family or ops.FAMILIES) if f in ops.FAMILIES]  # ("models" has no kernels)
        timing_only = [f"--{name.replace('_', '-')}" for name in ("quick", "provider", "results", "limit", "per_family")
                       if getattr(args, name)]
        print("bigkern bench: no GPU here, so no timings (they need a GPU: run `make gpu-check` on one).\n"
              + (f"Options for timing, not used here: {' '.join(timing_only)}.\n" if timing_only else "")
              + "Verifying the kernels on the CPU instead (Triton in the interpreter):\n", flush=True)
        if not families:
            print("bigkern bench: no op family among " + ", ".join(args.family), flush=True)
            return 1
        return cli.main(["verify", "--op", *families] + (["--dtype", *args.dtype] if args.dtype else []))
    from bigkern import memory

    if memory._poison[-1] and device == "cuda":  # (--cpu timings, harness tests, are never figures)
        print("bigkern bench: BIGKERN_POISON_OUTPUTS is on, a test switch (every bigkern output is filled and "
              "guarded, work the baselines do not do): unset it to time", file=sys.stderr, flush=True)
        return 2
    switches = run_settings(os.environ)
    if switches:
        print("bigkern bench: timing with bigkern settings that are not the defaults (the results and the "
              "report say so): " + " ".join(f"{k}={v}" for k, v in switches.items()), flush=True)
    if args.results is None:  # CPU timings (--cpu) are never figures to keep
        args.results = Path(tempfile.gettempdir()) / "bigkern-bench-cpu" if args.cpu else default_results_dir()
    dtypes = [getattr(torch, d) for d in (args.dtype or (["bfloat16"] if device == "cuda" else ["float32"]))]
    shapes = load_shapes(args.shapes)
    timer = harness.default_timer(args.quick) if device == "cuda" else harness.CpuTimer(1, 3 if args.quick else 5)
    cases = []
    for family in args.family or list(SUITES):
        family_cases = importlib.import_module(SUITES[family]).cases(shapes, device, dtypes, args.quick)
        cases += itertools.islice(family_cases, args.per_family)
    if args.limit:
        cases = cases[: args.limit]
    if not cases:
        print("bigkern bench: no case matches", flush=True)
        return 1
    with harness.baseline_settings() as settings:
        env = harness.environment(device) | dict(settings=settings)
        print(f"bigkern bench on {env['device']}: {len(cases)} cases; measuring ceilings first", flush=True)
        ceilings = harness.measure_ceilings(timer, device, args.quick, dtypes)
        others = "".join(f" ({d} {t:.1f})" for d, t in ceilings.matmul_tflops_by_dtype.items())
        print(f"ceilings: matmul {ceilings.matmul_tflops:.1f} TFLOP/s{others}, copy {ceilings.copy_gbps:.0f} GB/s",
              flush=True)
        rows = []
        only = set(args.provider) if args.provider else None
        progress, advance = _progress(len(cases))
        with progress:
            for done, case in enumerate(cases, 1):
                rows += harness.run_case(case, timer, ceilings, only)
                advance(f"{case.family} {case.name} {case.mode}")
                path = harness.write_results(args.results, env, ceilings, rows, timer.name, args.quick,
                                             progress=(done, len(cases)))
    document = json.loads(path.read_text())
    print(f"\nwrote {path} and {path.with_suffix('.csv')}\n")
    print(report.markdown(document))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from bigkern.cli import _prepare_environment

    _prepare_environment()
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="bigkern bench report")
        parser.add_argument("--results", type=Path, default=default_results_dir())
        parser.add_argument("--readme", type=Path, default=REPO / "README.md")
        args = parser.parse_args(argv[1:])
        from bigkern.benchmark import report

        try:
            return report.main(args.results, args.readme)
        except report.ResultsError as error:
            print(f"bigkern bench report: error: {error}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="bigkern bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(SUITES))
    parser.add_argument("--quick", action="store_true",
                        help="the quick subset, shorter timing, no torch.compile of whole models")
    parser.add_argument("--dtype", nargs="+", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--provider", nargs="+", help="only these providers (e.g. bigkern-triton torch-eager)")
    parser.add_argument("--results", type=Path, help="results directory (default: bench/results; with --cpu, "
                        "a temporary one: CPU timings are never figures to keep)")
    parser.add_argument("--shapes", type=Path, help="shapes file (default: bench/shapes.json)")
    parser.add_argument("--limit", type=int, help="only the first N cases")
    parser.add_argument("--per-family", type=int, metavar="N",
                        help="only the first N cases of each family (a sample of every family: make gpu-check)")
    parser.add_argument("--cpu", action="store_true", help="time on the CPU (tests the harness; no real figures)")
    args = parser.parse_args(argv)
    return run(args)
