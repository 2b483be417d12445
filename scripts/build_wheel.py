#!/usr/bin/env python3
"""Build bigkern's wheel (with the compiled extension when a CUDA toolkit is here), and with
--smoke install it into a fresh virtual environment and check it there.

    python scripts/build_wheel.py [--archs "8.0;9.0a"] [--smoke]

The version carries a local tag naming the torch and CUDA it was built against
(0.1.0+torch2.14.1.cu130): a wheel only loads its extension under that torch.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = r"""
import os, sys, torch
os.environ.setdefault("TRITON_INTERPRET", "1")
import bigkern
from bigkern import _ext
info = _ext.build_info()
assert bigkern.__file__.startswith(sys.prefix), f"imported {bigkern.__file__}, not the installed wheel"
print("bigkern", bigkern.__version__, "from", os.path.dirname(bigkern.__file__))
if info.cuda_built:
    assert _ext.extension() is not None, _ext.unavailable_reason()
    assert "+torch" in bigkern.__version__, bigkern.__version__
    print("extension loaded:", _ext.extension().__file__)
x, b = torch.randn(3, 5), torch.randn(5)
for backend in ("torch", "triton"):
    with bigkern.use_backend(backend):
        y = bigkern.nn.functional.bias_act(x, b, "gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x + b))
from bigkern.cli import main
assert main(["info"]) == 0
print("wheel smoke test passed")
"""


def run(command, **kwargs):
    print("+", " ".join(str(c) if len(str(c)) < 200 else "<smoke test>" for c in command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", help="TORCH_CUDA_ARCH_LIST for the build")
    parser.add_argument("--smoke", action="store_true", help="install into a fresh venv and smoke-test")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    args = parser.parse_args()

    env = {**os.environ, "BIGKERN_LOCAL_VERSION": "1"}
    if args.archs:
        env["TORCH_CUDA_ARCH_LIST"] = args.archs
    for old in args.dist.glob("bigkern-*.whl"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(args.dist), "."],
        cwd=ROOT, env=env)
    [wheel] = args.dist.glob("bigkern-*.whl")
    print(f"built {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB)")
    # the build rewrote bigkern/_build_info.py with the tagged version: restore the untagged one
    run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], cwd=ROOT)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            venv = Path(tmp) / "venv"
            run([sys.executable, "-m", "venv", str(venv)])
            python = venv / "bin" / "python"
            import torch

            run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "numpy"])
            run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
            run([str(python), "-c", SMOKE], cwd=tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
