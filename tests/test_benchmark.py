"""The benchmark harness, tested on the CPU so it works the first time a GPU runs it."""

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from bigkern import benchmark
from bigkern.benchmark import harness, report
from conftest import backend_skip_reason


class FakeTimer:
    """Returns fixed medians per provider function, so speedups are exact."""

    name = "fake"

    def __init__(self, medians):
        self.medians = medians

    def __call__(self, fn):
        median = self.medians[fn()]
        return harness.Stats(median, median * 0.9, median * 1.1, 10)


CEILINGS = harness.Ceilings(matmul_tflops=100.0, copy_gbps=1000.0, matmul_size=1, copy_bytes=1)


def make_case():
    def unavailable():
        raise harness.Unavailable("no such GPU")

    def broken():
        raise RuntimeError("kernel exploded")

    providers = {"bigkern-triton": lambda: (lambda: "triton"), "bigkern-cuda": unavailable,
                 "bigkern-torch": broken, "torch-eager": lambda: (lambda: "eager"),
                 "torch-compile": lambda: (lambda: "compile")}
    return harness.Case("demo", "case 1", {"n": 1}, torch.float16, "forward", flops=2e9, bytes=4e9,
                        providers=providers, baselines=("torch-eager", "torch-compile"))


def test_stats_from_samples():
    stats = harness.stats_from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_ms, stats.p20_ms, stats.p80_ms, stats.repeats) == (3.0, 1.8, 4.2, 5)
    assert stats.spread == pytest.approx((4.2 - 1.8) / 3.0)


def test_cpu_timer_measures_wall_time():
    stats = harness.CpuTimer(warmup=1, repeats=5)(lambda: time.sleep(0.002))
    assert 2.0 <= stats.median_ms < 50 and stats.repeats == 5


def test_run_case_rates_speedups_and_keeps_failures():
    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    by = {r["provider"]: r for r in rows}
    assert by["bigkern-cuda"]["status"] == "unavailable" and "no such GPU" in by["bigkern-cuda"]["reason"]
    assert by["bigkern-torch"]["status"] == "error" and "exploded" in by["bigkern-torch"]["reason"]
    triton = by["bigkern-triton"]
    assert triton["median_ms"] == 2.0
    assert triton["speedup"] == {"torch-eager": 2.5, "torch-compile": 1.5}
    assert triton["gbps"] == pytest.approx(4e9 / 2e-3 / 1e9)
    assert triton["fraction_of_ceiling"] == pytest.approx(triton["gbps"] / 1000.0)
    assert triton["tflops"] == pytest.approx(2e9 / 2e-3 / 1e12)


def test_results_report_plot_and_readme(tmp_path):
    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    env = dict(timestamp="2026-11-23T12:00:00+00:00", device="NVIDIA Test GPU", git="abc", torch="x", triton="y",
               cuda="z")
    path = harness.write_results(tmp_path, env, CEILINGS, rows, "fake", quick=True)
    assert path.parent.name == "nvidia-test-gpu"
    document = json.loads(path.read_text())
    assert document["ceilings"]["copy_gbps"] == 1000.0 and len(document["rows"]) == 5
    csv = path.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("family,case") and len(csv) == 6

    text = report.markdown(document)
    assert "| case 1 | float16 | forward | triton | 2 | 5 | 3 | 2.50x | 1.50x |" in text
    assert "bigkern-torch on case 1: RuntimeError: kernel exploded" in text
    pngs = report.plot(document, tmp_path)
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)

    verification = tmp_path / "verification"
    verification.mkdir()
    (verification / "cpu.json").write_text(json.dumps(dict(
        environment=dict(device="CPU interpreter", timestamp="2026-11-23T00:00:00"),
        rows=[dict(op="demo", backend="triton", dtype="float16", passed="3/3", status="ok", detail=""),
              dict(op="demo", backend="cuda", dtype="-", passed="-", status="skipped", detail="no GPU")])))
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- results:start -->\nstale\n<!-- results:end -->\n"
                      "<!-- verification:start -->\n<!-- verification:end -->\nbottom\n")
    report.update_readme(readme, tmp_path)
    updated = readme.read_text()
    assert "stale" not in updated and "NVIDIA Test GPU" in updated and updated.endswith("bottom\n")
    assert "| demo | triton | float16 | ✓ CPU interpreter (2026-11-23, 3/3) | NVIDIA Test GPU |" in updated
    # a skipped op x backend claims nothing, but its gap is shown
    assert "| demo | cuda | - | not yet: skipped on CPU interpreter (no GPU) |" in updated


def test_bench_without_gpu_verifies_instead(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from bigkern import cli, ops

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert benchmark.main([]) == 0
    out = capsys.readouterr().out
    assert "no GPU here, so no timings" in out and "Verifying the kernels" in out
    assert calls == [["verify", "--op", *ops.FAMILIES]]
    # the families and dtypes asked for are the ones verified; timing options are said to be unused
    assert benchmark.main(["--family", "lstm", "models", "--dtype", "float16", "--quick"]) == 0
    assert calls[-1] == ["verify", "--op", "lstm", "--dtype", "float16"]
    assert "not used here: --quick" in capsys.readouterr().out


@pytest.mark.parametrize("median", [0.0, float("nan"), float("inf")])
def test_a_timing_that_is_not_one_is_an_error_never_the_best(median):
    """A timer that returns 0 (it divided by zero), NaN or inf measured nothing: an error row, and
    never bigkern's best or a speedup."""
    rows = harness.run_case(make_case(), FakeTimer({"triton": median, "eager": 5.0, "compile": 3.0}), CEILINGS)
    by = {r["provider"]: r for r in rows}
    assert by["bigkern-triton"]["status"] == "error" and "median" in by["bigkern-triton"]["reason"]
    assert report.best_bigkern(by) == (None, None)


def test_results_are_standard_json_and_csv(tmp_path):
    """Multi-line reasons stay one CSV field; no NaN in the JSON; the files are replaced whole."""
    import csv

    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    failed = next(i for i, row in enumerate(rows) if row["status"] == "error")
    rows[failed]["reason"] = 'RuntimeError: first line\nsecond, "quoted" line'
    rows[1]["gbps"] = float("nan")
    env = dict(timestamp="2026-11-23T12:00:00+00:00", device="GPU", git="abc")
    path = harness.write_results(tmp_path, env, CEILINGS, rows, "fake", quick=True)
    document = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert document["rows"][1]["gbps"] is None
    table = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert len(table) == len(rows) and table[failed]["reason"] == rows[failed]["reason"]
    # each row says where and when it was measured (a CSV read on its own)
    assert {(r["device"], r["git"], r["timestamp"], r["torch"]) for r in table} == {("GPU", "abc", env["timestamp"], "")}
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".csv").name])
    assert "first line second" in report.markdown(document)  # one line in the README too


def test_report_says_which_file_or_path_is_wrong(tmp_path, capsys):
    """A truncated or foreign file, a missing directory or README: an error naming it (exit 2),
    never a traceback or a README whose tables quietly went blank."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n")
    device = tmp_path / "results" / "gpu"
    device.mkdir(parents=True)
    cases = {"truncated.json": '{"environment": {"device": "GPU"}, "rows": [',
             "list.json": "[]",
             "no-ceilings.json": json.dumps(dict(environment=dict(device="GPU"), rows=[])),
             "no-median.json": json.dumps(dict(environment=dict(device="GPU"), ceilings=dict(matmul_tflops=1, copy_gbps=1),
                                               rows=[dict(family="f", case="c", dtype="d", mode="m", provider="p",
                                                          status="ok")]))}
    for name, text in cases.items():
        for old in device.iterdir():
            old.unlink()
        (device / name).write_text(text)
        assert benchmark.main(["report", "--results", str(tmp_path / "results"), "--readme", str(readme)]) == 2
        assert name in capsys.readouterr().err
    assert "kept" in readme.read_text()
    assert benchmark.main(["report", "--results", str(tmp_path / "nowhere"), "--readme", str(readme)]) == 2
    assert "nowhere: no such results directory" in capsys.readouterr().err
    assert benchmark.main(["report", "--results", str(tmp_path / "results"), "--readme", str(tmp_path / "R.md")]) == 2
    assert "R.md: no such README" in capsys.readouterr().err


def test_verify_save_keeps_what_this_run_did_not_repeat(tmp_path, monkeypatch, capsys):
    """`bigkern verify --op lstm --save DIR` replaces lstm's rows and keeps every other op's (it
    overwrote the device's whole file), each row with its own date."""
    from bigkern import cli

    def fake_rows(families, backends, dtypes, device, on_row=None):
        return [dict(op=op, backend=b, dtype=str(d).removeprefix("torch."), passed="1/1", status="ok", detail="")
                for op in families for b in backends for d in dtypes], []

    monkeypatch.setattr(cli, "verify_rows", fake_rows)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["verify", "--backend", "torch", "--dtype", "float32", "--save", str(tmp_path)]) == 0
    first = json.loads(next((tmp_path / "verification").glob("*.json")).read_text())
    assert {r["op"] for r in first["rows"]} == {"epilogue", "attention", "lstm", "conv"}
    assert cli.main(["verify", "--op", "lstm", "--backend", "torch", "--dtype", "float32", "float16",
                     "--save", str(tmp_path)]) == 0
    second = json.loads(next((tmp_path / "verification").glob("*.json")).read_text())
    ops_dtypes = sorted((r["op"], r["dtype"]) for r in second["rows"])
    assert ops_dtypes == sorted([("epilogue", "float32"), ("attention", "float32"), ("conv", "float32"),
                                 ("lstm", "float32"), ("lstm", "float16")])
    assert all("timestamp" in r for r in second["rows"])
    assert "kept 3 rows" in capsys.readouterr().out


def test_epilogue_suite_runs_end_to_end_on_cpu(tmp_path, capsys):
    shapes = {"epilogue": {"cases": [{"shape": [4, 6, 3, 3], "dim": 1, "layout": "channels_last",
                                      "activation": "relu", "quick": True}]}}
    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps(shapes))
    rc = benchmark.main(["--cpu", "--quick", "--family", "epilogue", "--shapes", str(shapes_path), "--results",
                         str(tmp_path / "results"), "--provider", "bigkern-triton", "bigkern-cuda", "torch-eager"])
    assert rc == 0
    [path] = (tmp_path / "results").glob("*/*.json")
    rows = json.loads(path.read_text())["rows"]
    statuses = {(r["mode"], r["provider"]): r["status"] for r in rows}
    # timed on the CPU (--cpu), where Triton runs only in the interpreter
    assert statuses[("forward", "bigkern-triton")] == ("ok" if backend_skip_reason("triton", "cpu") is None
                                                       else "unavailable")
    assert statuses[("forward+backward", "torch-eager")] == "ok"
    assert statuses[("forward", "bigkern-cuda")] == "unavailable"
    # not a terminal: a line per case (rich's bar drew nothing on a pipe until the end, so a log showed no progress)
    assert "[1/2] epilogue relu 4x6x3x3 channels_last forward\n" in capsys.readouterr().out


def test_bench_cpu_times_on_the_cpu_with_a_gpu_there(tmp_path, monkeypatch):
    """--cpu was ignored where a GPU is visible: the run went to the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this machine has none to use
    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps({"epilogue": {"cases": [{"shape": [4, 6], "dim": 1, "layout": "contiguous",
                                                               "activation": "relu"}]}}))
    assert benchmark.main(["--cpu", "--family", "epilogue", "--shapes", str(shapes_path), "--results",
                           str(tmp_path / "results"), "--provider", "torch-eager"]) == 0
    [path] = (tmp_path / "results").glob("*/*.json")
    document = json.loads(path.read_text())
    assert path.parent.name.startswith("cpu") and document["environment"]["device"].startswith("cpu")
    assert {r["dtype"] for r in document["rows"]} == {"float32"} and {r["status"] for r in document["rows"]} == {"ok"}


TINY_SHAPES = {
    "epilogue": {"cases": [{"shape": [2, 4, 3, 3], "dim": 1, "layout": "contiguous", "activation": "relu"}]},
    "conv": {"batches": [2], "other": [], "resnet50": [dict(name="l", in_channels=3, out_channels=4, kernel=3, stride=1,
                                                             padding=1, in_hw=5, residual=True)]},
    "attention": {"sweep": [dict(batch=1, heads=2, seq=17, head_dim=16, causal=False)]},
}


@pytest.mark.parametrize("family", ["epilogue", "conv", "attention"])
def test_a_forced_backend_serves_the_backward_of_a_training_step_too(family):
    """bigkern-triton's forward+backward timed the forward on Triton and the backward on whatever
    auto chose (torch, on these CPU tensors): the forced backend must cover the whole step."""
    import importlib

    import bigkern

    suite = importlib.import_module(benchmark.SUITES[family])
    [case] = [c for c in suite.cases(TINY_SHAPES, "cpu", [torch.float32]) if c.mode == "forward+backward"]
    step = case.providers["bigkern-triton"]()
    with bigkern.record() as calls:
        step()
    assert any("backward" in op or "grad" in op for op, _ in calls), calls
    assert {backend for _, backend in calls} == {"triton"}, calls


def test_a_kernel_switch_covers_the_backward_of_a_training_step_too(monkeypatch):
    """bigkern-triton-tma / -nosplit set their switch for the forward only; the backward ran
    with the default kernels, so the row measured a mix."""
    from bigkern.benchmark import attention as suite

    monkeypatch.delenv("BIGKERN_DEMO_SWITCH", raising=False)
    monkeypatch.setattr(suite, "_triton_variants", lambda *args: {"bigkern-triton-demo": {"BIGKERN_DEMO_SWITCH": "1"}})
    seen = []

    def call(q, k, v, is_causal, gqa):
        y = q * 2
        y.register_hook(lambda grad: seen.append(os.environ.get("BIGKERN_DEMO_SWITCH")))
        return y
    monkeypatch.setattr(suite, "_bigkern_call", call)
    [case] = [c for c in suite.cases(TINY_SHAPES, "cpu", [torch.float32]) if c.mode == "forward+backward"]
    case.providers["bigkern-triton-demo"]()()
    assert seen == ["1"] and "BIGKERN_DEMO_SWITCH" not in os.environ


def test_every_case_of_a_compiled_baseline_is_compiled(monkeypatch):
    """dynamo compiles a code object at most recompile_limit (8) times, across torch.compile
    wrappers, then runs it eagerly: from the ninth case on, "torch-compile" timed eager torch."""
    from bigkern.benchmark import epilogue as suite

    graphs = []
    compile_for_real = torch.compile

    def counting_compile(fn, mode=None, dynamic=None):  # dynamo as it is, without Inductor's minutes
        return compile_for_real(fn, backend=lambda graph, inputs: graphs.append(graph) or graph.forward,
                                dynamic=dynamic)
    monkeypatch.setattr(torch, "compile", counting_compile)
    shapes = {"epilogue": {"cases": [{"shape": [2, n], "dim": 1, "layout": "contiguous", "activation": "relu"}
                                     for n in range(3, 13)]}}
    cases = [c for c in suite.cases(shapes, "cpu", [torch.float32]) if c.mode == "forward"]
    try:
        for case in cases:
            case.providers["torch-compile"]()()
    finally:
        torch._dynamo.reset()
    assert len(cases) == 10 and len(graphs) == 10


def test_per_family_samples_every_family_and_quick_compiles_no_whole_model(tmp_path, monkeypatch):
    """make gpu-check's benchmark: the first N cases of each family, and no minutes-long compile of
    a whole model in a --quick run."""
    ran = []
    monkeypatch.setattr(harness, "run_case", lambda case, *args: ran.append(case) or [])
    assert benchmark.main(["--cpu", "--quick", "--per-family", "2", "--family", "epilogue", "models", "--results",
                           str(tmp_path)]) == 0
    assert [(c.family, c.mode) for c in ran] == [("epilogue", "forward"), ("epilogue", "forward+backward"),
                                                 ("models", "training-step"), ("models", "inference")]
    assert sorted(ran[-1].providers) == ["bigkern-patched", "torch-eager"]
    from bigkern.benchmark import models

    assert "torch-compile" in next(models.cases({}, "cpu", [torch.float32], quick=False)).providers


def test_verify_shows_each_row_as_it_finishes(monkeypatch, capsys):
    """On a GPU `bigkern verify` runs for minutes and printed only its table at the end: a log
    (or a cut at a time limit) showed nothing of it."""
    import types

    from bigkern import cli, ops

    printed_before_the_second_row = []

    def verification_cases(device, dtype):
        def run():
            if dtype == torch.float16:
                printed_before_the_second_row.append(capsys.readouterr().out)
            return []
        return [("one", run)]
    monkeypatch.setattr(ops, "FAMILIES", {"demo": types.SimpleNamespace(verification_cases=verification_cases)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["verify", "--backend", "torch", "--dtype", "float32", "float16"]) == 0
    assert "demo torch float32: ok 1/1" in printed_before_the_second_row[0]


def test_kernel_switch_variants_are_reported_against_their_default_never_as_best(monkeypatch):
    """bigkern-triton-tma (a switch timed beside bigkern-triton) gets its own ratio to the default
    and does not become the headline "best" even when faster: users do not get it by default."""
    from bigkern.benchmark.providers import with_environment

    monkeypatch.delenv("BIGKERN_DEMO_SWITCH", raising=False)
    seen = []
    switched = with_environment(lambda: seen.append(os.environ.get("BIGKERN_DEMO_SWITCH")) or "tma",
                                BIGKERN_DEMO_SWITCH="1")
    case = make_case()
    case.providers["bigkern-triton-tma"] = lambda: switched
    rows = harness.run_case(case, FakeTimer({"triton": 2.0, "tma": 1.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    assert seen and set(seen) == {"1"} and "BIGKERN_DEMO_SWITCH" not in os.environ
    env = dict(timestamp="2026-11-23T12:00:00+00:00", device="NVIDIA Test GPU", git="abc", torch="x", triton="y",
               cuda="z")
    text = report.markdown(dict(environment=env, ceilings=CEILINGS.__dict__, rows=rows, timer="fake", quick=True))
    assert "| case 1 | float16 | forward | triton | 2 | 5 | 3 | 2.50x | 1.50x |" in text
    assert "| case 1 | float16 | forward | triton-tma | 1 | 2.00x |" in text


def test_a_run_cut_short_keeps_its_timings_marked_partial(tmp_path):
    """Results are written after every case to the same files: a run killed at a time limit leaves
    what it measured, and the report says it is partial; the finished run's file says nothing."""
    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    env = dict(timestamp="2026-11-23T12:00:00+00:00", device="NVIDIA Test GPU", git="abc", torch="x", triton="y",
               cuda="z")
    first = harness.write_results(tmp_path, env, CEILINGS, rows[:2], "fake", quick=True, progress=(1, 3))
    document = json.loads(first.read_text())
    assert document["partial"] == {"cases_done": 1, "cases": 3} and len(document["rows"]) == 2
    assert "**Partial run**: 1 of 3 cases" in report.markdown(document)
    last = harness.write_results(tmp_path, env, CEILINGS, rows, "fake", quick=True, progress=(3, 3))
    assert last == first and len(list(first.parent.glob("*.json"))) == 1
    document = json.loads(last.read_text())
    assert "partial" not in document and len(document["rows"]) == 5
    assert "Partial" not in report.markdown(document)


def test_gpu_check_keeps_its_deadline_and_always_packages_what_it_has(tmp_path):
    """scripts/gpu_check.py (what a lent GPU runs, without make): every step's limit is cut to
    the deadline, steps with no time left are skipped and said so, and the tarball for $OUT is
    written whatever happened (a lent machine's command is killed at its limit, taking anything
    not yet packaged with it)."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    command = [sys.executable, str(root / "scripts" / "gpu_check.py"), "--skip-build", "--deadline", "60",
               "--tests", "tests/test_testing.py -k compare", "--results", str(tmp_path / "results"),
               "--readme", str(tmp_path / "README.md"), "--logs", str(tmp_path / "logs")]
    (tmp_path / "README.md").write_text("readme\n")
    result = subprocess.run(command, cwd=root, env=dict(os.environ, OUT=str(out)), capture_output=True, text=True,
                            timeout=120)
    summary = result.stdout.split("=== gpu-check summary")[-1]
    steps = {line.split()[0]: line.split()[1] for line in summary.strip().splitlines()}
    assert steps["info"] == steps["tests"] == "rc=0", result.stdout[-2000:] + result.stderr[-2000:]
    # 60 s cannot hold them all (25 kept for packaging, bench keeps 30 for report): skipped, and said.
    # (With 40, a loaded 2-core machine's slow `info` left the tests under the 10 s minimum.)
    assert "rc=skip" in summary and result.returncode == 1
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "README.md" in names and any(name.startswith("gpu-check-logs/") for name in names)


def test_the_bigkern_program_runs_triton_on_a_machine_without_a_gpu():
    """`make bench` on a CPU machine: the program must choose Triton's interpreter before Triton is
    imported (torch imports it with bigkern), else every Triton kernel fails to launch ("Cannot call
    @triton.jit'd outside of the scope of a kernel") and the verification table says fail."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bigkern", "verify", "--op", "epilogue", "--backend", "triton",
                             "--dtype", "float32"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("epilogue"))
    assert row.split()[:3] == ["epilogue", "triton", "float32"] and "ok" in row, row


# ---------------------------------------------------------------------------------------------
# What the numbers mean: work counted, the ceiling each timing is rated against, the report.

H100_LIKE = harness.Ceilings(matmul_tflops=700.0, copy_gbps=3000.0, matmul_size=1, copy_bytes=1)


def test_bytes_are_the_least_each_case_moves():
    """Epilogue forward+backward reads x and dy and writes y and dx (5 per element; it counted 6);
    a conv writes its output once (it counted it twice, three times with a residual)."""
    from bigkern.benchmark import conv, epilogue

    [_, both] = epilogue.cases(TINY_SHAPES, "cpu", [torch.bfloat16])
    assert both.bytes == 5 * 2 * 4 * 3 * 3 * 2
    forward, training = conv.cases(TINY_SHAPES, "cpu", [torch.float32])
    x, w, bias, y = 2 * 3 * 5 * 5, 4 * 3 * 3 * 3, 4, 2 * 4 * 5 * 5
    assert forward.bytes == 4 * (x + w + bias + 2 * y)  # x, w, bias, residual read; y written
    assert training.bytes == forward.bytes + 4 * (2 * x + 2 * w + bias + 3 * y)  # + dy, y, x, w; dx, dw, db, dr


def test_causal_work_is_the_fraction_of_scores_the_mask_keeps():
    from bigkern.benchmark import attention

    assert attention.causal_fraction(4, 4) == 10 / 16
    assert attention.causal_fraction(2, 5) == 3 / 10  # rows see 1 and 2 keys
    assert attention.causal_fraction(5, 2) == 9 / 10  # rows see 1, 2, 2, 2, 2 keys
    shapes = {"attention": {"sweep": [dict(batch=1, heads=2, seq=8, head_dim=16, causal=True)]}}
    forward = next(attention.cases(shapes, "cpu", [torch.float16]))
    assert forward.flops == 4 * 2 * 8 * 8 * 16 * (36 / 64)


def test_each_timing_is_rated_against_its_roofline():
    """A decoding step reads the cache: rated against the matmul ceiling, a kernel at full
    bandwidth showed ~2% "of ceiling". The bound is whichever ceiling limits the case."""
    from bigkern.benchmark import attention

    shapes = {"attention": {"sweep": [dict(batch=4, heads=16, seq=4096, head_dim=128, causal=False)],
                            "decoding": [dict(batch=1, q_heads=32, kv_heads=8, q_len=1, kv_len=4096, head_dim=128)]}}
    long, _, decode = attention.cases(shapes, "cpu", [torch.bfloat16])
    at_bandwidth = decode.bytes / 3000e9
    assert harness.roofline(decode, at_bandwidth, H100_LIKE) == pytest.approx(
        dict(fraction_of_ceiling=1.0, bound="memory"))
    at_peak = long.flops / 700e12
    assert harness.roofline(long, 2 * at_peak, H100_LIKE) == pytest.approx(
        dict(fraction_of_ceiling=0.5, bound="compute"))
    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    triton = next(r for r in rows if r["provider"] == "bigkern-triton")
    assert triton["bound"] == "memory" and triton["fraction_of_ceiling"] == pytest.approx(triton["gbps"] / 1000.0)


def test_plot_draws_each_baseline_at_its_own_cases(tmp_path, monkeypatch):
    """torch-math skips the large cases: its speedups were drawn at the first cases' positions,
    under other cases' labels."""
    import matplotlib.axes

    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.__setitem__(kw["label"], (list(x), list(y))))
    rows = []
    for case, math_status in (("small", "ok"), ("large", "unavailable")):
        for provider, ms in (("bigkern-triton", 1.0), ("torch-flash", 2.0), ("torch-math", 4.0)):
            row = dict(family="attention", case=case, dtype="bfloat16", mode="forward", provider=provider,
                       status=math_status if provider == "torch-math" else "ok", median_ms=ms)
            rows.append(row)
    report.plot(dict(rows=rows, environment=dict(device="GPU")), tmp_path)
    assert drawn["vs torch-flash"] == ([0, 1], [2.0, 2.0])
    x, y = drawn["vs torch-math"]
    assert x == [0, 1] and y[0] == 4.0 and y[1] != y[1]  # a gap (NaN) at the case it did not run


def test_only_backend_switches_are_variants():
    """bigkern-patched-compile is a whole model compiled, not a kernel switch of a backend: it
    competes for bigkern's best (the models table compared uncompiled bigkern with torch.compile)."""
    assert report.is_variant("bigkern-triton-tma") and report.is_variant("bigkern-cuda-sm90")
    assert not report.is_variant("bigkern-patched-compile") and not report.is_variant("bigkern-triton")
    providers = {"bigkern-patched": dict(status="ok", median_ms=3.0),
                 "bigkern-patched-compile": dict(status="ok", median_ms=2.0)}
    assert report.best_bigkern(providers)[0] == "bigkern-patched-compile"


def test_a_provider_does_not_change_the_next_ones_settings():
    """bigkern.patch turns on dynamo's allow_rnn while a patched LSTM lives; the torch-compile
    baseline timed next then traced torch's LSTM instead of running cuDNN's."""
    import torch._dynamo

    seen = []

    def patching():
        torch._dynamo.config.allow_rnn = True
        return lambda: "patched"

    def compiling():
        seen.append(torch._dynamo.config.allow_rnn)
        return lambda: "compiled"
    before = torch._dynamo.config.allow_rnn
    case = harness.Case("models", "m", {}, torch.float32, "inference", flops=0.0, bytes=0.0,
                        providers={"bigkern-patched": patching, "torch-compile": compiling})
    try:
        harness.run_case(case, FakeTimer({"patched": 1.0, "compiled": 1.0}), CEILINGS)
        assert seen == [before] and torch._dynamo.config.allow_rnn == before
    finally:
        torch._dynamo.config.allow_rnn = before


def test_the_report_keeps_every_case_at_its_newest_measurement(tmp_path):
    """A later quick or one-family run replaced a complete run in the README: every case it did
    not repeat disappeared."""
    full = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    other = make_case()
    other.name = "case 2"
    full += harness.run_case(other, FakeTimer({"triton": 1.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    old_env = dict(timestamp="2026-11-20T12:00:00+00:00", device="NVIDIA Test GPU", git="old", torch="x",
                   triton="y", cuda="z")
    harness.write_results(tmp_path, old_env, CEILINGS, full, "fake", quick=False)
    newer = harness.run_case(make_case(), FakeTimer({"triton": 4.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    harness.write_results(tmp_path, dict(old_env, timestamp="2026-11-25T12:00:00+00:00", git="new"), CEILINGS,
                          newer, "fake", quick=True)
    [document] = report.newest_results(tmp_path).values()
    assert [s["environment"]["git"] for s in document["sources"]] == ["new", "old"]
    text = report.markdown(document)
    assert "| case 1 | float16 | forward | triton | 4 | 5 | 3 | 1.25x | 0.75x | 100% (memory) | 1 |" in text
    assert "| case 2 | float16 | forward | triton | 1 | 5 | 3 | 5.00x | 3.00x | 400% (memory) | 2 |" in text
    assert "git new" in text and "git old" in text and "quick run" in text


def test_models_report_throughput():
    case = harness.Case("models", "cnn", {"batch": 8}, torch.float32, "inference", flops=0.0, bytes=0.0,
                        providers={"bigkern-patched": lambda: (lambda: "p"), "torch-eager": lambda: (lambda: "e")},
                        baselines=("torch-eager",), samples=8)
    rows = harness.run_case(case, FakeTimer({"p": 2.0, "e": 4.0}), CEILINGS)
    assert rows[0]["samples_per_s"] == pytest.approx(4000.0)
    env = dict(timestamp="t", device="GPU", git="g", torch="x", triton="y", cuda="z")
    text = report.markdown(dict(environment=env, ceilings=CEILINGS.__dict__, rows=rows, timer="fake"))
    assert "samples/s |" in text and "| cnn | float32 | inference | patched | 2 | 4 | 2.00x | 4000 |" in text


def test_slow_cases_get_enough_timing_samples(monkeypatch):
    """do_bench repeats rep / (its estimate) times: a 25 ms training step in a 40 ms budget was one
    sample, its median and spread meaningless."""
    import triton.testing

    budgets = []

    def do_bench(fn, warmup, rep, return_mode):
        """As Triton's: repeats rep / its own estimate times, the estimate taken with an L2 flush
        before each call (so a little longer than the harness's)."""
        budgets.append(rep)
        assert return_mode == "all"
        return [25.0] * max(1, int(rep / (25.0 + 0.3)))
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(harness.CudaTimer, "estimate_ms", staticmethod(lambda fn: 25.0))
    stats = harness.CudaTimer(warmup_ms=10, rep_ms=40)(lambda: None)
    assert budgets[0] == 250.0 and stats.repeats >= 10 and stats.median_ms == 25.0
    monkeypatch.setattr(harness.CudaTimer, "estimate_ms", staticmethod(lambda fn: 0.01))
    stats = harness.CudaTimer(warmup_ms=10, rep_ms=40)(lambda: None)
    assert budgets[-1] == 40 and stats.repeats >= 10  # the samples do_bench took, counted


def test_results_record_the_settings_every_provider_ran_under(monkeypatch):
    """cuDNN's algorithm choice and TF32 decide baselines' speed: one policy for the run, recorded;
    and a revision where the source has no .git (a lent GPU machine)."""
    from bigkern import amp

    matmul = torch.backends.cuda.matmul
    for chosen in ("none", "tf32"):  # a program that chose TF32 through the newer setting too
        matmul.fp32_precision = chosen
        try:
            with harness.baseline_settings() as settings:
                assert torch.backends.cudnn.benchmark and not amp.tf32_allowed("conv")
                assert not amp.tf32_allowed("matmul")
                assert settings["cudnn_benchmark"] is True and settings["tf32"] is False
            assert matmul.fp32_precision == chosen
        finally:
            matmul.fp32_precision = "none"
    monkeypatch.setenv("BIGKERN_GIT_REVISION", "0123abcd")
    env = harness.environment("cpu")
    assert env["git"] == "0123abcd" and env["bigkern_environment"]["BIGKERN_GIT_REVISION"] == "0123abcd"
    assert "cudnn" in env


def test_each_dtype_is_rated_against_its_own_matmul_ceiling():
    """A float32 case (IEEE: the run turns TF32 off) against the bf16 ceiling looked ~10x worse
    than it is: the run measures the matmul ceiling in every dtype it times."""
    ceilings = harness.measure_ceilings(harness.CpuTimer(1, 1), "cpu", quick=True,
                                        dtypes=[torch.float32, torch.float64])
    assert set(ceilings.matmul_tflops_by_dtype) == {"float64"} and ceilings.matmul_tflops > 0
    rated = dataclasses.replace(H100_LIKE, matmul_tflops_by_dtype={"float32": 50.0})
    case = harness.Case("demo", "c", {}, torch.float32, "forward", flops=50e12, bytes=1.0, providers={})
    assert harness.roofline(case, 2.0, rated) == pytest.approx(dict(fraction_of_ceiling=0.5, bound="compute"))
    case.dtype = torch.bfloat16
    assert harness.roofline(case, 1 / 14, rated)["fraction_of_ceiling"] == pytest.approx(1.0)


def test_the_report_describes_the_runs_its_rows_come_from(tmp_path):
    """A newest run that timed nothing (a --provider that matched no provider, cut short at once)
    lent its header -- quick, partial, its git revision -- to a table of an older run's rows."""
    rows = harness.run_case(make_case(), FakeTimer({"triton": 2.0, "eager": 5.0, "compile": 3.0}), CEILINGS)
    env = dict(timestamp="2026-11-20T12:00:00+00:00", device="NVIDIA Test GPU", git="old", torch="x", triton="y",
               cuda="z")
    harness.write_results(tmp_path, env, CEILINGS, rows, "fake", quick=False)
    harness.write_results(tmp_path, dict(env, timestamp="2026-11-25T12:00:00+00:00", git="new"), CEILINGS, [],
                          "fake", quick=True, progress=(1, 5))
    [document] = report.newest_results(tmp_path).values()
    header = report.markdown(document).split("###")[0]
    assert "git old" in header and "git new" not in header
    assert "quick" not in header and "Partial" not in header


# ---------------------------------------------------------------------------------------------
# The check before timing: a wrong result is never a figure.

def checked_case(bigkern_result, references=("torch-eager",), tolerance=None):
    """Providers that build their inputs from the global generator (as every suite does) and return
    what they computed; bigkern-triton returns bigkern_result(inputs)."""
    def provider(compute, label):
        def make():
            x = torch.randn(5, 7)
            return lambda: _Labelled(compute(x), label)
        return make
    providers = {"bigkern-triton": provider(bigkern_result, "triton"), "torch-eager": provider(torch.relu, "eager"),
                 "torch-compile": provider(torch.relu, "compile")}
    return harness.Case("demo", "checked", {}, torch.float32, "forward", flops=1e9, bytes=1e9, providers=providers,
                        baselines=("torch-eager", "torch-compile"), references=references, tolerance=tolerance)


class _Labelled(tuple):
    """A provider's result (a tensor) that also names the provider for FakeTimer."""

    def __new__(cls, tensor, label):
        result = super().__new__(cls, (tensor,))
        result.label = label
        return result

    def __hash__(self):
        return hash(self.label)

    def __eq__(self, other):
        return self.label == other


class LabelTimer(FakeTimer):
    def __call__(self, fn):
        median = self.medians[fn().label]
        return harness.Stats(median, median * 0.9, median * 1.1, 10)


TIMES = LabelTimer({"triton": 1.0, "eager": 5.0, "compile": 3.0})


def test_every_provider_gets_the_same_inputs_and_bigkern_is_checked_before_it_is_timed():
    [triton, eager, compiled] = harness.run_case(checked_case(torch.relu), TIMES, CEILINGS)
    assert triton["status"] == "ok" and triton["check"] == dict(against="torch-eager", error=0.0, tolerance=1e-3)
    assert triton["speedup"] == {"torch-eager": 5.0, "torch-compile": 3.0}
    assert "check" not in eager and "check" not in compiled


@pytest.mark.parametrize("wrong", ["garbage", "unwritten", "nan", "shape", "slightly"])
def test_a_wrong_result_is_reported_wrong_never_timed_nor_the_best(tmp_path, wrong):
    """Nothing compared a provider's result with anything: a kernel that wrote nothing was timed,
    reported "ok" with a speedup, and could be the table's best bigkern."""
    compute = {"garbage": lambda x: torch.randn_like(x), "unwritten": torch.empty_like,
               "nan": lambda x: torch.relu(x).index_fill(0, torch.tensor([2]), float("nan")),
               "shape": lambda x: torch.relu(x)[1:], "slightly": lambda x: torch.relu(x) * 1.01}[wrong]
    timed = []

    class Recording(LabelTimer):
        def __call__(self, fn):
            timed.append(fn().label)
            return super().__call__(fn)
    rows = harness.run_case(checked_case(compute), Recording(TIMES.medians), CEILINGS)
    triton = rows[0]
    assert triton["status"] == "wrong" and "differs from torch-eager" in triton["reason"], triton
    assert "median_ms" not in triton and "speedup" not in triton and "triton" not in timed
    assert report.best_bigkern({r["provider"]: r for r in rows}) == (None, None)
    env = dict(timestamp="2026-11-20T12:00:00+00:00", device="NVIDIA Test GPU", git="abc", torch="x", triton="y",
               cuda="z")
    path = harness.write_results(tmp_path, env, CEILINGS, rows, "fake", quick=False)
    text = report.markdown(json.loads(path.read_text()))
    assert "Wrong results, not timed" in text and "bigkern-triton on checked" in text


def test_the_check_accepts_roundings_apart_and_uses_the_first_reference_that_runs():
    def unavailable():
        raise harness.Unavailable("no flash here")
    case = checked_case(lambda x: torch.relu(x) * (1 + 5e-4))  # within float32's 1e-3
    case.providers = {"torch-flash": unavailable, **case.providers}
    rows = {r["provider"]: r for r in harness.run_case(dataclasses.replace(
        case, references=("torch-flash", "torch-compile")), TIMES, CEILINGS)}
    assert rows["bigkern-triton"]["status"] == "ok" and rows["bigkern-triton"]["check"]["against"] == "torch-compile"
    assert rows["torch-flash"]["status"] == "unavailable"


def test_a_reference_left_out_by_provider_still_checks_and_is_not_reported():
    rows = harness.run_case(checked_case(torch.empty_like), TIMES, CEILINGS, only={"bigkern-triton"})
    assert [r["provider"] for r in rows] == ["bigkern-triton"] and rows[0]["status"] == "wrong"


def test_without_a_reference_a_timing_is_reported_unchecked(tmp_path):
    case = checked_case(torch.relu, references=("torch-nothing",))
    rows = harness.run_case(case, TIMES, CEILINGS)
    assert rows[0]["status"] == "ok" and rows[0]["check"] == dict(against=None)
    env = dict(timestamp="2026-11-20T12:00:00+00:00", device="NVIDIA Test GPU", git="abc", torch="x", triton="y",
               cuda="z")
    text = report.markdown(json.loads(harness.write_results(tmp_path, env, CEILINGS, rows, "fake", False).read_text()))
    assert "Timed without a check" in text


@pytest.mark.parametrize("family", ["epilogue", "conv", "attention", "lstm"])
def test_each_suite_checks_its_bigkern_results_forward_and_backward(family, monkeypatch):
    """Every suite returns what each provider computed (training steps: the gradients too) from the
    same inputs, so a bigkern result is checked against torch's; a wrong gradient is caught."""
    import importlib

    suite = importlib.import_module(benchmark.SUITES[family])
    shapes = dict(TINY_SHAPES, lstm={"inference": [dict(hidden=8, batch=2, steps=3, input=5)],
                                     "training": [dict(hidden=8, batch=2, steps=3, input=5)]})
    for case in suite.cases(shapes, "cpu", [torch.float32]):
        rows = {r["provider"]: r for r in harness.run_case(case, harness.CpuTimer(0, 1), CEILINGS,
                                                           only={"bigkern-triton"})}
        row = rows["bigkern-triton"]
        assert row["status"] == "ok" and row["check"]["error"] < 1e-4, (case.name, case.mode, row)
        assert row["check"]["against"] == ("torch-flash" if family == "attention" else "torch-eager")
        if case.mode != "forward" and case.mode != "inference":
            # the gradients are part of the result: a training step that got one wrong is "wrong"
            make = case.providers["bigkern-triton"]

            def off_by_a_bit(make=make):
                step = make()

                def wrong_gradient():
                    result = step()
                    result[1].mul_(1.5) if isinstance(result[1], torch.Tensor) else result[1][0].mul_(1.5)
                    return result
                return wrong_gradient
            wrong = dataclasses.replace(case, providers=dict(case.providers, **{"bigkern-triton": off_by_a_bit}))
            [row] = harness.run_case(wrong, harness.CpuTimer(0, 1), CEILINGS, only={"bigkern-triton"})
            assert row["status"] == "wrong", (case.name, row)


def test_lstm_inference_baseline_runs_torch_in_eval_mode(monkeypatch):
    """torch's LSTM in training mode runs cuDNN's training forward (a reserve for backward) even
    under no_grad: the inference baseline was slower than what a user's model.eval() runs."""
    from bigkern.benchmark import lstm as suite

    modes = []
    original = torch.nn.LSTM.forward
    monkeypatch.setattr(torch.nn.LSTM, "forward", lambda self, *a, **k: modes.append(
        (type(self).__name__, self.training)) or original(self, *a, **k))
    shapes = {"inference": [dict(hidden=8, batch=2, steps=3)], "training": [dict(hidden=8, batch=2, steps=3)]}
    for case in suite.cases({"lstm": shapes}, "cpu", [torch.float32]):
        modes.clear()
        case.providers["torch-eager"]()()
        case.providers["bigkern-triton"]()()
        assert modes and all(training == (case.mode == "training") for _, training in modes), (case.mode, modes)


def test_timing_refuses_poisoned_outputs_and_names_other_settings(tmp_path, monkeypatch, capsys):
    from bigkern import memory

    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps({"epilogue": {"cases": [{"shape": [4, 6], "dim": 1, "layout": "contiguous",
                                                               "activation": "relu"}]}}))
    argv = ["--cpu", "--family", "epilogue", "--shapes", str(shapes_path), "--results", str(tmp_path / "results"),
            "--provider", "torch-eager"]
    with memory.poisoned_outputs(), monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)  # refused before anything touches it
        assert benchmark.main(argv[1:]) == 2
    assert "BIGKERN_POISON_OUTPUTS is on" in capsys.readouterr().err
    for name in [name for name in os.environ if name.startswith("BIGKERN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("BIGKERN_GIT_REVISION", "abc")
    with memory.poisoned_outputs(False):
        assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "not the defaults" in out and "BIGKERN_TRITON_AUTOTUNE=0" in out
    assert "Settings not the defaults**: `BIGKERN_TRITON_AUTOTUNE=0`." in out  # the report's header too


def test_the_cases_run_under_pytest_benchmark(tmp_path):
    """`pytest bench/ --benchmark-enable`: each (case, provider) a pytest-benchmark benchmark, each
    bigkern result checked first (here on the CPU, tiny shapes, in the interpreter)."""
    import subprocess
    import sys

    root = Path(benchmark.__file__).resolve().parents[2]
    saved = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench/conftest.py sets it
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "bench"),
                           "-k", "epilogue", "--benchmark-enable", "--benchmark-min-rounds=1",
                           "--benchmark-max-time=0.01", "--benchmark-warmup=off", f"--benchmark-json={saved}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(saved.read_text())["benchmarks"]
    names = {run["name"] for run in runs}
    assert any("bigkern-triton" in name for name in names) and any("torch-eager" in name for name in names), names
    checked = [run["extra_info"]["check"] for run in runs if "bigkern-triton" in run["name"]]
    assert checked and all(c["against"] == "torch-eager" and c["error"] < 1e-5 for c in checked), checked
