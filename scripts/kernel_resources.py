#!/usr/bin/env python3
"""Registers, spill stack, shared memory and tensor-core / copy instructions of every Triton
kernel at every tile it may be launched with, for a GPU this machine need not have:

    python scripts/kernel_resources.py [--arch 90 80] [--family attention conv lstm] [--out FILE]

Compiles each family's representative launches (bigkern/codegen.py) for each tile of its
autotuning list with Triton's own ptxas, and prints a markdown table; rows whose tile spills
registers to the stack are marked. No timing: what spills or overflows shared memory is a
compiler fact; what is fast is for a GPU to say.
"""

import argparse
import os
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted


def main():
    import triton

    from bigkern import codegen

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--family", nargs="+", default=list(codegen.FAMILIES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    lines = [f"Triton {triton.__version__}; registers per thread, stack bytes (spills), shared memory, and "
             "instruction counts in the PTX (wgmma / mma.sync tensor-core ops, cp.async, TMA copies).", "",
             "| arch | kernel | tile | warps | stages | registers | stack | shared KB | wgmma | mma | cp.async | tma |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    spilled = 0
    for arch in args.arch:
        for family in args.family:
            for launch in codegen.launches(family, arch):
                for index, (tile, warps, stages) in enumerate(launch.tiles):
                    tile_text = "x".join(str(v) for v in tile.values())
                    try:
                        usage = codegen.resource_usage(launch.compile(arch, index))
                    except Exception as error:  # too much shared memory for this arch, etc.
                        line = (f"| sm_{arch} | {launch.name} | {tile_text} | {warps} | {stages} | "
                                f"{type(error).__name__}: {str(error).splitlines()[0][:80]} |||||||")
                    else:
                        stack = usage.get("stack_bytes", 0)
                        spilled += stack > 0
                        line = (f"| sm_{arch} | {launch.name} | {tile_text} | {warps} | {stages} | "
                                f"{usage.get('registers', '?')} | {stack}{' **spills**' if stack else ''} | "
                                f"{usage['shared_bytes'] / 1024:.0f} | {usage['wgmma']} | {usage['mma']} | "
                                f"{usage['cp.async']} | {usage['tma']} |")
                    lines.append(line)
                    print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print(f"\n{spilled} tile(s) spill registers", flush=True)


if __name__ == "__main__":
    main()
