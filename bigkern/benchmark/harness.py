"""The benchmark harness every family's suite shares: timing, ceilings, results and reports.

Rules it enforces (see bench/NOTES.md for the numbers it produced):
  * every provider of a case -- each bigkern backend and each baseline -- runs in the same process,
    on the same inputs, one after another;
  * GPU timing uses CUDA events through triton.testing.do_bench (warm-up, then repeats for a fixed
    time, L2 flushed before each repeat), reporting the median and the 20th/80th percentiles;
  * inputs are random normal, never zeros, and the same for every provider (one seed);
  * each bigkern provider's first result (its output; a training step's gradients too) is checked
    against a baseline's before it is timed: a wrong one is reported "wrong", never a figure;
  * each run first measures the machine's own ceilings (bf16 matmul TFLOP/s, device copy GB/s),
    and each result is reported as a fraction of them and as a speedup over each baseline.
A CPU timer stands in where there is no GPU, so the harness itself is tested on CPU.
"""

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch


# ---------------------------------------------------------------------------------------------
# Timing

@dataclasses.dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    @property
    def spread(self):
        """(p80 - p20) / median: how noisy the measurement was."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms else 0.0


def _quantile(sorted_values, q):
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def stats_from_samples(samples_ms):
    values = sorted(samples_ms)
    return Stats(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), len(values))


class CpuTimer:
    """Wall-clock timing with perf_counter: for testing the harness, and for CPU providers."""

    name = "cpu-perf_counter"

    def __init__(self, warmup=2, repeats=10):
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn: Callable) -> Stats:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return stats_from_samples(samples)


class CudaTimer:
    """CUDA-event timing via triton.testing.do_bench: `warmup_ms` of warm-up, then repeats for
    `rep_ms` -- or for `min_repeats` calls where that takes longer -- with the L2 cache flushed
    before each repeat; median and 20/80th percentiles."""

    name = "cuda-events(do_bench)"

    def __init__(self, warmup_ms=25, rep_ms=100, min_repeats=10):
        self.warmup_ms, self.rep_ms, self.min_repeats = warmup_ms, rep_ms, min_repeats

    @staticmethod
    def estimate_ms(fn: Callable, calls=3) -> float:
        """A first estimate of one call's time (CUDA events around a few calls)."""
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls

    def __call__(self, fn: Callable) -> Stats:
        import triton.testing

        # do_bench repeats max(1, rep / its own estimate) times: a 25 ms training step in a 40 ms
        # budget would be one sample, its "median" and spread meaningless. Stretch the budget to
        # min_repeats calls of this estimate, and take more where do_bench's own estimate (with the
        # L2 flush) came out longer and left fewer.
        estimate = max(self.estimate_ms(fn), 1e-3)
        rep = max(self.rep_ms, self.min_repeats * estimate)
        times = []
        while len(times) < self.min_repeats:  # do_bench times at least one call each round
            times += triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=rep, return_mode="all")
        return stats_from_samples(times)


def default_timer(quick=False):
    if torch.cuda.is_available():
        return CudaTimer(warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    return CpuTimer(warmup=1 if quick else 2, repeats=3 if quick else 10)


# ---------------------------------------------------------------------------------------------
# Ceilings: what this machine can do at best, measured, not taken from a datasheet.

@dataclasses.dataclass
class Ceilings:
    matmul_tflops: float  # bf16 (fp32 on CPU) square matmul
    copy_gbps: float  # device-to-device copy, bytes read + written
    matmul_size: int
    copy_bytes: int
    # the matmul ceiling in each other dtype the run times (float32: IEEE, the run's TF32 policy):
    # a float32 case rated against the bf16 ceiling would look several times worse than it is
    matmul_tflops_by_dtype: dict = dataclasses.field(default_factory=dict)

    def matmul_tflops_for(self, dtype) -> float:
        return self.matmul_tflops_by_dtype.get(str(dtype).removeprefix("torch."), self.matmul_tflops)


def measure_ceilings(timer, device, quick=False, dtypes=()) -> Ceilings:
    """The machine's matmul ceiling (bf16 on a GPU, and in each other dtype of `dtypes`) and its
    device-copy bandwidth, each timed like any case."""
    if device == "cuda":
        n, base, copy_bytes = 8192, torch.bfloat16, (2**28 if quick else 2**30)  # smaller n under-measures
    else:
        n, base, copy_bytes = 512, torch.float32, 2**24

    def matmul_tflops(dtype):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return 2 * n**3 / (timer(lambda: torch.mm(a, b)).median_ms * 1e-3) / 1e12

    by_dtype = {str(d).removeprefix("torch."): matmul_tflops(d) for d in dict.fromkeys(dtypes) if d != base}
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src))
    return Ceilings(matmul_tflops=matmul_tflops(base), copy_gbps=2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9,
                    matmul_size=n, copy_bytes=copy_bytes, matmul_tflops_by_dtype=by_dtype)


# ---------------------------------------------------------------------------------------------
# Cases and providers

@dataclasses.dataclass
class Case:
    """One shape of one family, with every provider that can run it.

    `providers` maps a provider name ("bigkern-triton", "torch-eager", ...) to a thunk that builds
    the inputs and returns the function to time (or raises Unavailable with a reason).
    `flops` and `bytes` are the work of one call: the minimum bytes it must move and the floating
    point operations it must do, from which TFLOP/s and GB/s follow.
    """

    family: str
    name: str
    params: dict
    dtype: torch.dtype
    mode: str  # "forward", "forward+backward", ...
    flops: float
    bytes: float
    providers: dict
    baselines: tuple = ()  # provider names the speedups are reported against
    samples: int = 0  # samples one call processes (a model's batch): throughput = samples / time
    # providers whose first call's result (the output; a training step's output and gradients) each
    # bigkern provider must agree with before it is timed: the first of them that runs
    references: tuple = ()
    tolerance: Optional[float] = None  # of that check (default: CHECK_TOLERANCE of the dtype)


class Unavailable(Exception):
    """A provider cannot run this case on this machine (the message says why)."""


def roofline(case: Case, seconds: float, ceilings: Ceilings) -> dict:
    """The fraction of this machine's roofline a timing reached: the least time the case could take
    (its FLOPs at the matmul ceiling of its dtype or its bytes at the copy ceiling, whichever is
    longer) over the time it took, and which of the two bounds it ("compute" or "memory"). A decoding step or a
    depthwise conv is bound by bytes whatever its family: rating it against the matmul ceiling
    would show a kernel running at full bandwidth as a few percent "of ceiling"."""
    compute_s = case.flops / (ceilings.matmul_tflops_for(case.dtype) * 1e12) if case.flops else 0.0
    memory_s = case.bytes / (ceilings.copy_gbps * 1e9) if case.bytes else 0.0
    if not (compute_s or memory_s):
        return {}
    return dict(fraction_of_ceiling=max(compute_s, memory_s) / seconds,
                bound="compute" if compute_s >= memory_s else "memory")


@contextlib.contextmanager
def baseline_settings():
    """The library settings every provider of a run shares, yielded for the results: cuDNN picks
    its fastest algorithm per shape (cudnn.benchmark), as bigkern's kernels autotune and
    max-autotune tunes, and float32 means IEEE float32 for everyone -- TF32 off for matmuls,
    convolutions and cuDNN's RNNs alike (torch's defaults differ per kind: cuDNN's LSTM would
    take TF32 while a compiled hand-written LSTM would not)."""
    matmul = torch.backends.cuda.matmul
    # through torch's newer fp32_precision where it has one: a legacy read raises once a program
    # chose TF32 that way, and a legacy write would leave "ieee" where "none" (follow the global
    # setting) was
    setting = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, setting)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
        setattr(matmul, setting, "ieee" if setting == "fp32_precision" else False)
        try:
            yield dict(cudnn_benchmark=True, tf32=False, cudnn_version=torch.backends.cudnn.version())
        finally:
            setattr(matmul, setting, saved)


@contextlib.contextmanager
def _provider_scope():
    """Process-wide switches a provider may turn (bigkern.patch turns on dynamo's allow_rnn for as
    long as a patched LSTM lives) put back after it, so the next provider -- torch.compile of the
    unpatched model -- compiles as it would on its own."""
    import torch._dynamo

    allow_rnn = torch._dynamo.config.allow_rnn
    try:
        yield
    finally:
        torch._dynamo.config.allow_rnn = allow_rnn


# ---------------------------------------------------------------------------------------------
# The check before timing: a timing counts only for a result that is right.

# the largest max|bigkern - reference| / max|reference| a check accepts: far above two roundings of
# the dtype apart (the tests hold each kernel to FlashAttention's rule against float64), far below
# what a wrong kernel gives (an unwritten tile, a misaligned mask, a wrong head: errors of order 1)
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}
INPUT_SEED = 1234  # set before each provider builds its inputs: every provider gets the same ones


def result_tensors(result):
    """The tensors a provider's call returned (a training step returns its output and gradients),
    in order; None for no tensor (a gradient that is not there)."""
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in result_tensors(r)]
    return [result if isinstance(result, torch.Tensor) else None]


def disagreement(result, reference) -> float:
    """max over the results' tensors of max|a - r| / max|r| (inf where they do not match: a missing
    tensor, another shape, a NaN or inf where the reference is finite)."""
    actual, expected = result_tensors(result), result_tensors(reference)
    if len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, r in zip(actual, expected):
        if a is None or r is None:
            if a is not r:
                return math.inf
            continue
        if a.shape != r.shape:
            return math.inf
        if not r.numel():
            continue
        a, r = a.detach().float(), r.detach().float()
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(a), finite):
            return math.inf
        if not finite.any():
            continue
        scale = r[finite].abs().max().item()
        error = (a[finite] - r[finite]).abs().max().item()
        worst = max(worst, error / scale if scale else (0.0 if error == 0 else math.inf))
    return worst


def _snapshot(result):
    """A copy of a call's result that later calls cannot change (an output buffer reused, a
    gradient replaced)."""
    if isinstance(result, (tuple, list)):
        return [_snapshot(r) for r in result]
    return result.detach().clone() if isinstance(result, torch.Tensor) else result


def first_call(make):
    """Build a provider's inputs (from the one seed every provider shares) and make its first call:
    (the function to time, what that call returned)."""
    torch.manual_seed(INPUT_SEED)
    fn = make()
    result = fn()
    if torch.cuda.is_initialized():  # not with --cpu, though a GPU is there
        torch.cuda.synchronize()
    return fn, result


def reference_result(case: Case):
    """(name, a snapshot of its first result) of the first of case.references that runs, or None:
    for a check outside run_case (which takes its reference from the timed run itself)."""
    for name in case.references:
        try:
            return name, _snapshot(first_call(case.providers[name])[1])
        except Unavailable:
            continue
    return None


def check(case: Case, result, reference):
    """A bigkern provider's first result against the reference's ((name, result), or None where no
    reference ran): (the check for the results, why it is wrong or None)."""
    if reference is None:
        return dict(against=None), None  # timed, reported as unchecked
    tolerance = case.tolerance if case.tolerance is not None else CHECK_TOLERANCE.get(case.dtype, 1e-3)
    error = disagreement(result, reference[1])
    wrong = None if error <= tolerance else (
        f"its result differs from {reference[0]}'s: max error {error:.3g} of the largest value (at most "
        f"{tolerance:g} is accepted)")
    return dict(against=reference[0], error=_finite(error), tolerance=tolerance), wrong


def run_case(case: Case, timer, ceilings: Ceilings, only: Optional[set] = None):
    """Time every provider of `case`; one row per provider (unavailable ones with the reason). Each
    provider builds its inputs from one seed; each bigkern provider's first result is checked
    against the case's reference (the first of case.references that runs, run first) and timed only
    if it agrees ("wrong" otherwise, with the error)."""
    rows, medians, reference = {}, {}, None
    wanted = [name for name in case.providers if not only or name in only]
    if any(name.startswith("bigkern-") for name in wanted):  # a reference runs for the check, if not timed
        wanted += [name for name in case.references if name in case.providers and name not in wanted]
    order = sorted(wanted, key=lambda name: name not in case.references)  # references first, in their order
    for provider in order:
        make = case.providers[provider]
        row = dict(family=case.family, case=case.name, params=case.params, dtype=str(case.dtype).removeprefix("torch."),
                   mode=case.mode, provider=provider, flops=case.flops, bytes=case.bytes)
        rows[provider] = row
        try:
            with _provider_scope():
                fn, result = first_call(make)  # compile / autotune / first-call work: outside the timing
                if provider in case.references and reference is None:
                    reference = (provider, _snapshot(result))
                if only and provider not in only:  # run for the check alone
                    continue
                if case.references and provider.startswith("bigkern-"):
                    row["check"], wrong = check(case, result, reference)
                    if wrong:
                        row.update(status="wrong", reason=wrong)
                        continue
                del result
                stats = timer(fn)
        except Unavailable as reason:
            row.update(status="unavailable", reason=str(reason))
            continue
        except Exception as error:  # a failing provider is a result too; keep the others going
            row.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
            continue
        if not (math.isfinite(stats.median_ms) and stats.median_ms > 0):
            # a timer that saw nothing (or broke) measured nothing: never a result, never the "best"
            row.update(status="error", reason=f"the timer returned a median of {stats.median_ms} ms")
            continue
        seconds = stats.median_ms * 1e-3
        row.update(status="ok", median_ms=stats.median_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms,
                   repeats=stats.repeats, tflops=case.flops / seconds / 1e12 if case.flops else None,
                   gbps=case.bytes / seconds / 1e9 if case.bytes else None)
        row.update(roofline(case, seconds, ceilings))
        if case.samples:
            row["samples_per_s"] = case.samples / seconds
        medians[provider] = stats.median_ms
    rows = [rows[name] for name in case.providers if name in rows and (not only or name in only)]  # in order
    for row in rows:
        if row["status"] == "ok":
            row["speedup"] = {b: medians[b] / row["median_ms"] for b in case.baselines if b in medians}
    return rows


# ---------------------------------------------------------------------------------------------
# Results

def git_revision(cwd=None):
    """The source's git revision (-dirty with uncommitted changes); BIGKERN_GIT_REVISION where the
    source is a copy without .git (a lent GPU machine gets the working tree, not the repository)."""
    if os.environ.get("BIGKERN_GIT_REVISION"):
        return os.environ["BIGKERN_GIT_REVISION"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=cwd or Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd or Path(__file__).resolve().parent, timeout=10)
        rev = out.stdout.strip()
        return (rev + ("-dirty" if dirty.stdout.strip() else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device=None):
    """Where and with what a result was measured (on `device`: by default the GPU when there is one)."""
    import bigkern

    env = dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        cuda=torch.version.cuda, bigkern=bigkern.__version__, git=git_revision(),
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        bigkern_environment={k: v for k, v in sorted(os.environ.items()) if k.startswith("BIGKERN_")},
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return env


def device_slug(device_name: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in device_name.lower())
    return "-".join(filter(None, keep.split("-")))[:60] or "unknown"


def write_results(results_dir: Path, env: dict, ceilings: Ceilings, rows: list, timer_name: str, quick: bool,
                  progress=None):
    """bench/results/<device>/<timestamp>-<git>.json and .csv; returns the JSON path. A run writes
    after every case (progress = (cases done, cases in all)) to the same files, so a run cut short
    -- a time limit on a lent GPU -- still leaves every timing it took, marked partial."""
    directory = Path(results_dir) / device_slug(env["device"])
    directory.mkdir(parents=True, exist_ok=True)
    stamp = env["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = directory / f"{stamp}-{env['git']}"
    document = dict(environment=env, timer=timer_name, quick=quick, ceilings=dataclasses.asdict(ceilings), rows=rows)
    if progress is not None and progress[0] < progress[1]:
        document["partial"] = dict(cases_done=progress[0], cases=progress[1])
    # standard JSON (a stray NaN or inf becomes null), replaced whole: a run killed mid-write (the
    # time limit on a lent GPU) leaves the previous complete file, never a truncated one
    write_atomically(stem.with_suffix(".json"), json.dumps(_finite(document), indent=1, default=str,
                                                           allow_nan=False) + "\n")
    columns = ["family", "case", "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms", "tflops",
               "gbps", "fraction_of_ceiling", "bound", "samples_per_s", "speedup", "reason"]
    # where and with what, on every row: a CSV read on its own (or concatenated with others) says it too
    measured = {key: env.get(key) for key in ("device", "timestamp", "git", "torch", "triton", "cuda")}
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # quotes what needs it: commas, quotes, newlines
    writer.writerow(columns + list(measured))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            if isinstance(value, dict):
                value = ";".join(f"{k}={v:.3f}" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.6g}"
            cells.append(value)
        writer.writerow(cells + ["" if v is None else v for v in measured.values()])
    write_atomically(stem.with_suffix(".csv"), table.getvalue())
    return stem.with_suffix(".json")


def write_atomically(path: Path, text: str):
    """path's new content, all or nothing (a temporary file beside it, then renamed over it)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _finite(value):
    """value with float NaN/inf (not JSON) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
