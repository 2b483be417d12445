"""What Triton's compiler makes of every family's kernels for Hopper and Ampere (bigkern/codegen.py):
each representative launch compiles at its default tile, without spilling registers, with its
matrix products on the tensor cores. The interpreter that runs the other tests never compiles."""

import json
import os
import subprocess
import sys

import pytest

from conftest import DEVICE

COMPILE_DEFAULT_TILES = """
import json, sys
from bigkern import codegen

arch = int(sys.argv[1])
for family in codegen.FAMILIES:
    for launch in codegen.launches(family, arch):
        usage = codegen.resource_usage(launch.compile(arch))
        print(json.dumps(dict(name=launch.name, tile=launch.tiles[0][0], expects_wgmma=launch.expects_wgmma(arch),
                              **usage)), flush=True)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles the kernels for real")
@pytest.mark.parametrize("arch", [90, 80])
def test_default_tiles_compile_without_spills_on_tensor_cores(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_DEFAULT_TILES, str(arch)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    launches = [json.loads(line) for line in result.stdout.splitlines()]
    assert {launch["name"].split()[0] for launch in launches} == {"attention", "conv", "lstm"}
    for launch in launches:
        assert launch.get("stack_bytes") == 0, launch
        limit = 227 if arch == 90 else 163
        assert launch["shared_bytes"] <= limit * 1024, launch
        if "direct" in launch["name"]:
            continue  # depthwise: one channel per group, FMA by design
        # Hopper's wgmma where the tile's matmuls have the rows for it, mma.sync otherwise (and on
        # Ampere): a tile that slips from wgmma to mma.sync still computes right, at half the speed
        if launch["expects_wgmma"]:
            assert launch["wgmma"] > 0 and launch["mma"] == 0, launch
        else:
            assert launch["mma"] > 0 and launch["wgmma"] == 0, launch
        if launch["name"].startswith("lstm"):
            # every operand through the async copies: the step kernels are latency-bound
            assert launch["ld.b16"] == 0, launch


COMPILE_EVERY_TILE = """
import json, sys
from bigkern import codegen

arch = int(sys.argv[1])
for family in codegen.FAMILIES:
    for launch in codegen.launches(family, arch):
        for tile in range(len(launch.tiles)):
            usage = codegen.resource_usage(launch.compile(arch, tile))
            print(json.dumps(dict(name=launch.name, tile=launch.tiles[tile], **usage)), flush=True)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles the kernels for real")
def test_no_hopper_tile_the_autotuners_may_pick_spills_more_than_8_bytes():
    """Autotuning times every listed tile on the GPU; one that spills is dropped from the lists
    (DEVELOPING.md) -- found so far only by regenerating bench/kernel_resources.md by hand."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_EVERY_TILE, "90"], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    tiles = [json.loads(line) for line in result.stdout.splitlines()]
    spilling = [(t["name"], t["tile"], t["stack_bytes"]) for t in tiles if t.get("stack_bytes", 0) > 8]
    assert len(tiles) > 100 and not spilling, spilling
