"""`bigkern` command line (also `python -m bigkern`).

    bigkern info                  versions, GPU, which backends are built and usable here, and why not
    bigkern verify [--op NAME]    every registered op against its float64 reference; a table
    bigkern bench [...]           the benchmark suite (see `bigkern bench --help`)
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def _prepare_environment():
    """Without a GPU, Triton kernels can only run in the interpreter, which Triton decides when it
    is imported (its own library functions are made for one mode or the other). Returns True when
    the switch came too late for this process: torch had imported Triton already."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
            return "triton" in sys.modules
    return False


def command():
    """The `bigkern` program (console script and `python -m bigkern`). `import bigkern` imports
    torch's compiler stack, which imports Triton, so on a machine without a GPU the program starts
    itself again with the interpreter chosen from the first line."""
    if _prepare_environment():
        os.execv(sys.executable, [sys.executable, "-m", "bigkern", *sys.argv[1:]])
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# info

def info_lines():
    import torch

    import bigkern
    from bigkern import _ext, dispatch

    lines = [f"bigkern {bigkern.__version__}  (python {platform.python_version()}, {platform.machine()})"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            props = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {props.name}, compute capability {major}.{minor}, "
                         f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU: none visible to torch (kernels can be verified on CPU; timings need a GPU)")

    build = _ext.build_info()
    if build is None:
        lines.append("build: not built (a source tree; run `pip install --no-build-isolation -e .`)")
    elif build.cuda_built:
        lines.append(f"build: bigkern._C for CUDA {build.cuda_version}, archs {build.cuda_archs}, against torch "
                     f"{build.torch_version}, git {build.git_revision}")
    else:
        lines.append(f"build: no CUDA extension ({build.skipped_reason}), git {build.git_revision}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, device=device)
    reasons = {
        "triton": dispatch.triton_unsupported(probe),
        "cuda": dispatch.cuda_unsupported(probe),
        "torch": None,
    }
    try:
        requested = dispatch.requested_backend()
    except ValueError as error:  # a bad BIGKERN_BACKEND: info is where to find that out
        requested = f"invalid: {error}"
    lines.append(f"backends on {device} tensors (requested: {requested}, "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}):")
    for backend, reason in reasons.items():
        lines.append(f"  {backend:<7}{'usable' if reason is None else 'unusable: ' + reason}")
    if _ext.extension() is not None and not torch.cuda.is_available():
        lines.append("  (bigkern._C is built and loaded; its kernels need a GPU to run)")
    from bigkern import ops

    lines.append("ops: " + ", ".join(sorted(dispatch.REGISTRY)))
    lines.append("op families (bigkern verify --op): " + ", ".join(ops.FAMILIES))
    if dispatch.triton_unavailable() is None:
        from bigkern.kernels import autotune

        entries = autotune.cache_entries()
        kernels = sorted({p.name.removesuffix(".autotune.json") for p in entries})
        lines.append(f"autotune cache: {autotune.cache_dir()} ({len(entries)} stored results"
                     + (f": {', '.join(kernels)})" if kernels else ")"))
    return lines


def cmd_info(args):
    print("\n".join(info_lines()))
    return 0


# ---------------------------------------------------------------------------------------------
# verify

def verify_rows(families, backends, dtypes, device, on_row=None):
    """Run every verification case; (rows, failure messages). on_row(row) is called as each row is
    done, so a long run (minutes on a GPU) shows its progress before the table."""
    import torch

    from bigkern import dispatch, memory, testing

    probe = torch.empty(1, device=device)
    usable = {"triton": dispatch.triton_unsupported(probe), "cuda": dispatch.cuda_unsupported(probe), "torch": None}
    rows, failures = [], []

    def add(row):
        rows.append(row)
        if on_row:
            on_row(row)
    for family, module in families.items():
        for backend in backends:
            if usable[backend]:
                add(dict(op=family, backend=backend, dtype="-", passed="-", status="skipped", detail=usable[backend]))
                continue
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                cases = list(module.verification_cases(device, dtype))
                if not cases:
                    why = ("bf16 is verified on a GPU (Triton's interpreter computes bf16 dots wrongly)"
                           if device == "cpu" and dtype == torch.bfloat16 else f"no cases for this dtype on {device}")
                    add(dict(op=family, backend=backend, dtype=name, passed="-", status="skipped", detail=why))
                    continue
                passed, crashed, worst = 0, 0, 0.0
                for description, run in cases:
                    testing.seed_everything()
                    with dispatch.use_backend(backend), memory.poisoned_outputs(True):
                        try:
                            comparisons = run()
                            memory.check_guards()
                        except Exception as error:  # a crash is a failure to report, not to hide
                            comparisons = [testing.Comparison("run", float("inf"), 0, 0, False, repr(error))]
                            crashed += 1
                    bad = [c for c in comparisons if not c.ok]
                    worst = max([worst] + [c.error / c.bound for c in comparisons if c.bound > 0])
                    if bad:
                        failures.append(f"{family} {backend} {name} {description}: " + "; ".join(map(str, bad)))
                    else:
                        passed += 1
                add(dict(op=family, backend=backend, dtype=name, passed=f"{passed}/{len(cases)}",
                         status="ok" if passed == len(cases) else "fail",
                         detail=(f"{crashed} crashed; " if crashed else "") + f"worst error/bound {worst:.2f}"))
    return rows, failures


def cmd_verify(args):
    import torch

    from bigkern import dispatch, ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unknown = [name for name in args.op or () if name not in ops.FAMILIES]
    if unknown:
        print(f"no op family named {', '.join(unknown)}; families: {', '.join(ops.FAMILIES)}", file=sys.stderr)
        return 2
    families = {name: module for name, module in ops.FAMILIES.items() if not args.op or name in args.op}
    backends = [b for b in dispatch.BACKENDS if args.backend in ("all", b)]
    def done(row):  # as each row finishes: the table comes only at the end
        print(f"  {row['op']} {row['backend']} {row['dtype']}: {row['status']} {row['passed']}", flush=True)
    rows, failures = verify_rows(families, backends, [getattr(torch, d) for d in args.dtype], device, on_row=done)

    print(f"bigkern verify on {device}" + (" (Triton in the interpreter)" if device == "cpu" else ""))
    header = ("op", "backend", "dtype", "passed", "result")
    table = [(r["op"], r["backend"], r["dtype"], r["passed"], f"{r['status']}: {r['detail']}") for r in rows]
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
    for row in [header] + table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for failure in failures:
        print("FAIL", failure)
    if args.save:
        from bigkern.benchmark import harness

        env = harness.environment()
        if device == "cpu":
            env["device"] = f"CPU, Triton {env.get('triton')} interpreter"
        directory = args.save / "verification"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{harness.device_slug(env['device'])}.json"
        rows = [row | dict(timestamp=env["timestamp"], git=env["git"]) for row in rows]
        kept = _rows_not_rerun(path, families, backends, args.dtype)
        harness.write_atomically(path, json.dumps(dict(environment=env, rows=kept + rows), indent=1) + "\n")
        print(f"wrote {path}" + (f" (kept {len(kept)} rows of earlier runs this one did not repeat)" if kept else ""))
    return 1 if failures else 0


def _rows_not_rerun(path, families, backends, dtypes):
    """The stored rows of `path` that a run of these families x backends x dtypes did not repeat
    (a run of one op must not erase the others' verification); each keeps its own timestamp."""
    from bigkern.benchmark import report

    if not path.exists():
        return []
    try:
        stored = report.load_document(path, report.VERIFICATION_FIELDS)
    except report.ResultsError:
        return []  # not a verification file: this run's rows replace it
    rows, when = stored["rows"], stored["environment"]

    def rerun(row):
        return (row.get("op") in families and row.get("backend") in backends
                and (row.get("dtype") in dtypes or row.get("dtype") == "-"))
    return [{"timestamp": when.get("timestamp"), "git": when.get("git")} | row for row in rows if not rerun(row)]


# ---------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="bigkern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, usable backends").set_defaults(func=cmd_info)
    verify = sub.add_parser("verify", help="every op against its float64 reference")
    verify.add_argument("--op", nargs="+", help="op families (default: all)")
    verify.add_argument("--backend", default="all", choices=("all",) + ("triton", "cuda", "torch"))
    verify.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    verify.add_argument("--save", type=Path, metavar="RESULTS_DIR",
                        help="store the table under RESULTS_DIR/verification/ (for the README's status table)")
    verify.set_defaults(func=cmd_verify)
    sub.add_parser("bench", help="the benchmark suite (bigkern bench --help)", add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_environment()
    if argv[:1] == ["bench"]:  # the suite parses its own options
        from bigkern import benchmark

        return benchmark.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    command()
