"""The examples and the end-to-end model workloads run (tiny sizes on the CPU): loss curves with and
without bigkern match from the same seed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigkern import benchmark
from bigkern.benchmark import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["cnn.py", "lstm_classifier.py", "transformer_encoder.py"])
def test_example_trains_with_matching_losses(script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny", "--steps", "4",
                             "--print-every", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 4
    for _, torch_loss, bigkern_loss in rows:
        assert abs(float(torch_loss) - float(bigkern_loss)) <= 1e-3 * max(1.0, abs(float(torch_loss)))
    assert "throughput" in result.stdout


@pytest.mark.parametrize("flag,value,message", [("--steps", "0", "must be at least 1"),
                                                ("--print-every", "0", "must be at least 1"),
                                                ("--dtype", "float33", "not a torch floating-point dtype"),
                                                ("--dtype", "int8", "not a torch floating-point dtype"),
                                                ("--dtype", "float8_e4m3fn", "not a torch floating-point dtype")])
def test_example_refuses_bad_arguments(flag, value, message):
    """argparse's usage error (exit 2), not a traceback from deep inside the run."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "cnn.py"), "--tiny", flag, value],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"argument {flag}: {message}" in result.stderr, result.stderr[-2000:]


def test_workloads_run_forward_and_backward():
    for workload in models.workloads("tiny"):
        inputs, targets = workload.make_batch("cpu", torch.float32)
        loss = workload.loss(workload.model(inputs), targets)
        loss.backward()
        assert torch.isfinite(loss), workload.name


def test_models_suite_runs_on_cpu(tmp_path):
    rc = benchmark.main(["--cpu", "--quick", "--family", "models", "--results", str(tmp_path), "--provider",
                         "torch-eager", "bigkern-patched", "--limit", "2"])
    assert rc == 0
    assert list(tmp_path.glob("*/*.json"))
