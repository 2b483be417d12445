"""scripts/gpu_check.py, what a lent GPU machine runs under a hard time limit: tested on the CPU,
where a hang or a lost result costs nothing."""

import importlib.util
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture
def gpu_check(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "LOGS", tmp_path / "logs")
    monkeypatch.delenv("OUT", raising=False)
    return module


def _alive(pid):
    """Whether process `pid` runs (a zombie, waiting for a parent in a container to reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_if_alive(pid_files):
    """Clean up after a failure: the test's own processes, by the ids they wrote."""
    for path in pid_files:
        if path.exists() and _alive(int(path.read_text())):
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_silent_step_is_killed_at_its_limit_with_the_processes_it_started(gpu_check, tmp_path, monkeypatch):
    """pip, `pytest -q` and `bigkern verify` can print nothing for minutes: the limit must hold all
    the same (it was checked only when a line came), and kill what the step started (nvcc under
    ninja under pip) too."""
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    child, grandchild = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    script = ("import os, subprocess, sys, time\n"
              f"open({str(child)!r}, 'w').write(str(os.getpid()))\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(120)\n")
    results = []
    runner = threading.Thread(target=lambda: results.append(gpu_check.step("silent", [sys.executable, "-c", script],
                                                                           3)), daemon=True)
    start = time.time()
    try:
        runner.start()
        runner.join(timeout=30)
        assert not runner.is_alive(), "step() did not return: the silent step was never killed"
        assert time.time() - start < 15
        [result] = results
        assert result["rc"] == -signal.SIGKILL and result["tail"] == ["*** killed after 3s"]
        log = (tmp_path / "logs" / "silent.log").read_text()
        assert log.startswith("started\n")  # what it printed before the cut is kept
        for path in (child, grandchild):
            pid = int(path.read_text())
            deadline = time.time() + 5
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.05)
            assert not _alive(pid), f"{path.stem} {pid} survived the step"
    finally:
        _kill_if_alive([child, grandchild])


def test_a_step_ends_with_its_process_not_with_what_it_left_behind(gpu_check, tmp_path):
    """A step that exits leaving a process holding its output open (a compile worker) ends when it
    exits, with its status, the leftover killed."""
    leftover = tmp_path / "leftover.pid"
    script = ("import subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(leftover)!r}, 'w').write(str(p.pid))\n"
              "print('done', flush=True)\n"
              "sys.exit(3)\n")
    try:
        start = time.time()
        result = gpu_check.step("leaves", [sys.executable, "-c", script], 60)
        assert time.time() - start < 20
        assert result["rc"] == 3 and result["tail"] == ["done"]
        deadline = time.time() + 5
        while _alive(int(leftover.read_text())) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(int(leftover.read_text()))
    finally:
        _kill_if_alive([leftover])


class FakeSteps:
    """gpu_check.step recorded instead of run: (name, command, limit, env) per step."""

    def __init__(self, rc=None, seconds=None):
        self.calls, self.rc, self.seconds = [], rc or {}, seconds or {}

    def __call__(self, name, command, limit_s, env=None, keep_s=0):
        self.calls.append(dict(name=name, command=command, limit=limit_s, env=env or {}))
        return dict(step=name, rc=self.rc.get(name, 0), seconds=self.seconds.get(name, 1), log="", tail=[])

    def __getitem__(self, name):
        return next(call for call in self.calls if call["name"] == name)


def _main(gpu_check, tmp_path, *argv):
    return gpu_check.main(["--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md"),
                           "--logs", str(tmp_path / "logs"), *argv])


def test_a_failed_build_is_retried_without_cuda_and_pip_stays_offline(gpu_check, tmp_path, monkeypatch):
    """A CUDA build that fails leaves the Triton paths untested unless bigkern is built again
    without it (seconds); pip must never try the network (there is none on a lent machine)."""
    steps = FakeSteps(rc={"build": 1})
    monkeypatch.setattr(gpu_check, "step", steps)
    monkeypatch.delenv("BIGKERN_BUILD_CUDA", raising=False)
    assert _main(gpu_check, tmp_path) == 1
    names = [call["name"] for call in steps.calls]
    assert names[:3] == ["build", "build-no-cuda", "info"]
    assert steps["build"]["env"]["BIGKERN_BUILD_CUDA"] == "1"
    assert steps["build-no-cuda"]["env"]["BIGKERN_BUILD_CUDA"] == "0"
    for name in ("build", "build-no-cuda"):
        assert "--no-index" in steps[name]["command"]
        assert steps[name]["env"]["PIP_DISABLE_PIP_VERSION_CHECK"] == "1"

    steps = FakeSteps()
    monkeypatch.setattr(gpu_check, "step", steps)
    assert _main(gpu_check, tmp_path) == 0
    assert "build-no-cuda" not in [call["name"] for call in steps.calls]


@pytest.mark.parametrize("has_timeout_plugin", [True, False])
def test_gpu_tests_run_first_then_the_rest(gpu_check, tmp_path, monkeypatch, has_timeout_plugin):
    """The whole suite with -x never reached the GPU tests in its time: they run first, to the end,
    each under pytest-timeout's limit where it is installed; the rest gets the time left; neither
    tests nor verify autotune; the benchmark is the sample sized for the bench step."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        (find_spec("pytest") if has_timeout_plugin else None) if name == "pytest_timeout" else find_spec(name, *args)))
    steps = FakeSteps(rc={"gpu-tests": gpu_check.NO_TESTS_RAN}, seconds={"gpu-tests": 70})
    monkeypatch.setattr(gpu_check, "step", steps)
    assert _main(gpu_check, tmp_path, "--skip-build", "--tests", "tests/test_lstm.py -k cuda") == 0
    assert [call["name"] for call in steps.calls] == ["info", "gpu-tests", "tests", "verify", "bench", "report"]
    gpu, rest = steps["gpu-tests"], steps["tests"]
    assert gpu["command"][-5:] == ["-m", "gpu", "tests/test_lstm.py", "-k", "cuda"]
    assert rest["command"][-5:] == ["-m", "not gpu", "tests/test_lstm.py", "-k", "cuda"]
    assert "-x" not in gpu["command"] and "-x" not in rest["command"]
    assert any(arg.startswith("--timeout=") for arg in gpu["command"]) == has_timeout_plugin
    assert (gpu["limit"], rest["limit"]) == (200, 130)
    for name in ("gpu-tests", "tests", "verify"):
        assert steps[name]["env"]["BIGKERN_TRITON_AUTOTUNE"] == "0"
    bench = steps["bench"]["command"]
    assert bench[bench.index("--quick"):] == ["--quick", "--per-family", "4"]


def test_a_run_killed_midway_leaves_every_finished_step_in_out(tmp_path):
    """$OUT was written only at the end, so the machine's hard kill left it empty: now each finished
    step's log, the summary and the tarball are there as soon as it ends."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    (tmp_path / "README.md").write_text("readme\n")
    command = [sys.executable, str(SCRIPT), "--skip-build", "--deadline", "200", "--tests", "tests/test_testing.py",
               "--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md"), "--logs", str(logs)]
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OUT=str(out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "summary.txt").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "summary.txt").exists(), "nothing in $OUT after the first step"
        time.sleep(1)  # the next step (the GPU tests) has started: it must go too
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (out / "summary.txt").read_text().startswith("info ")
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert {"README.md", "gpu-check-logs/info.log", "gpu-check-logs/summary.txt"} <= set(names)
    assert len(list(out.iterdir())) <= 8
    # the step it was running (the GPU tests, in a session of its own) did not outlive it
    leftovers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _started_by(p, out)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"left running: {leftovers}"


def _started_by(proc, out):
    """Whether the process /proc/<pid> is one gpu_check started with this OUT (and still runs)."""
    try:
        return f"OUT={out}".encode() in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name))
    except OSError:
        return False


@pytest.mark.parametrize("revision", [None, "abc123"])
def test_a_copy_without_git_or_revision_says_its_results_will_name_no_revision(gpu_check, tmp_path, monkeypatch,
                                                                               capsys, revision):
    """A lent machine gets the working tree without .git: its results said git 'unknown' silently."""
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # no .git there
    if revision:
        monkeypatch.setenv("BIGKERN_GIT_REVISION", revision)
    else:
        monkeypatch.delenv("BIGKERN_GIT_REVISION", raising=False)
    monkeypatch.setattr(gpu_check, "step", FakeSteps())
    _main(gpu_check, tmp_path, "--skip-build")
    said = "BIGKERN_GIT_REVISION unset" in capsys.readouterr().out.split("gpu-check summary")[-1]
    assert said == (revision is None)
    assert ("BIGKERN_GIT_REVISION unset" in (gpu_check.LOGS / "summary.txt").read_text()) == (revision is None)
