"""What Triton's compiler makes of a kernel for a GPU this machine does not have.

The interpreter checks what a Triton kernel computes, never how it compiles: a construct only the
compiler rejects, a tile that spills registers to the stack or overflows shared memory, dots that
miss the tensor cores. `compile_for_gpu` compiles a kernel for sm_<arch> (to PTX and cubin, no GPU needed)
with its pointer arguments specialized as a real launch from torch tensors would (16-byte
aligned), and `resource_usage` reads registers, spill stack and shared memory off the cubin, and
counts the instructions that matter in the PTX. The tests use it to compile every family's
kernels; `scripts/kernel_resources.py` runs it over every autotuning config.

Must run with TRITON_INTERPRET unset (under the interpreter the kernels are Python functions).
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable


def _named_like_a_pointer(name):
    return name.endswith("_ptr")


def compile_for_gpu(kernel, constexprs, arch, *, types=None, pointer="*bf16", is_pointer=_named_like_a_pointer,
                    aligned=(), num_warps=4, num_stages=3):
    """Compile `kernel` (a @triton.jit function, or an autotuned one) for sm_<arch>.

    constexprs: the value of every constexpr argument (names the kernel does not take are
    ignored, so one dict can serve several kernels). types: Triton types of the other arguments
    where the default is wrong; by default the arguments `is_pointer` accepts (names ending in
    _ptr) are pointers of type `pointer`, the rest i32. Tensor descriptors are typed
    "tensordesc<bf16[1,1,64,128]>".
    aligned: integer arguments to specialize as multiples of 16, as Triton does at launch when
    they are (row strides of 16-bit tensors with head or channel counts of 8 and more)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "src"):
        kernel = kernel.fn  # unwrap autotuners and heuristics
    types = types or {}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, pointer if is_pointer(name) else "i32")
        if signature[name].startswith("*") or name in aligned:  # torch allocations are 16-byte aligned
            attrs[(index,)] = [["tt.divisibility", 16]]
    taken = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    source = ASTSource(kernel, signature, taken, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


INSTRUCTIONS = {  # PTX mnemonics worth counting: tensor cores, asynchronous copies
    "wgmma": r"wgmma\.mma_async",
    "mma": r"\bmma\.sync",
    "cp.async": r"cp\.async\.c[ag]\.",
    "tma": r"cp\.async\.bulk\.tensor",
    # scalar 16-bit global loads: an operand loaded element by element, outside the async pipeline
    "ld.b16": r"ld\.global(?:\.\w+)*\.b16\b",
}


def resource_usage(compiled):
    """{registers, stack_bytes (spilled registers and local arrays), shared_bytes, <instruction>:
    count} of a compiled kernel."""
    import triton

    usage = dict(shared_bytes=compiled.metadata.shared)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    match = re.search(r"REG:(\d+) STACK:(\d+)", dump.stdout)
    if match:
        usage.update(registers=int(match[1]), stack_bytes=int(match[2]))
    ptx = compiled.asm["ptx"]
    usage.update({name: len(re.findall(pattern, ptx)) for name, pattern in INSTRUCTIONS.items()})
    return usage


# ---------------------------------------------------------------------------------------------
# Representative launches of every family's Triton kernels: the constexprs and argument types a
# real call passes (16-bit inputs, channels_last convolutions, every epilogue feature on), and
# the tiles autotuning or the launcher would try, in the order they are tried.

@dataclass
class Launch:
    name: str
    kernel: object
    constexprs: dict  # everything but the tile
    tiles: list  # [(tile constexprs, num_warps, num_stages)], the first is the default
    types: dict = field(default_factory=dict)
    is_pointer: Callable = _named_like_a_pointer
    aligned: tuple = ()
    rows: str = "BLOCK_M"  # the tile constexpr that is the M of the kernel's matmuls

    def expects_wgmma(self, arch, tile=0):
        """Whether the tile's matmuls should run as Hopper's wgmma: M of 64 rows or more per warpgroup
        of 4 warps (smaller tiles take mma.sync by design, e.g. decoding's 16 query rows)."""
        constexprs, warps, _ = self.tiles[tile]
        return arch >= 90 and constexprs.get(self.rows, 0) >= 64 and warps % 4 == 0

    def compile(self, arch, tile=0):
        constexprs, warps, stages = self.tiles[tile]
        return compile_for_gpu(self.kernel, {**self.constexprs, **constexprs}, arch, types=self.types,
                               is_pointer=self.is_pointer, aligned=self.aligned, num_warps=warps, num_stages=stages)


def _attention_launches(arch):
    from bigkern.kernels import attention as kernels

    hopper = arch >= 90
    types = {"Mask": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "GradLse": "*fp32", "GradMask": "*fp32",
             "CuSeqQ": "*i32", "CuSeqK": "*i32", "qk_scale": "fp32", "dropout_scale": "fp32", "sm_scale": "fp32",
             "dropout_threshold": "i64"}
    def launch(name, kernel, constexprs, tiles, **extra):
        tiles = [(dict(BLOCK_M=m, BLOCK_N=n), w, s) for m, n, w, s in tiles]
        strides = tuple(arg for arg in kernel.arg_names if arg.startswith("stride"))  # head dims of 16+
        rows = "BLOCK_N" if kernel is kernels.attention_backward_dkdv_kernel else "BLOCK_M"  # dK/dV: key rows
        return Launch(f"attention {name}", kernel, constexprs, tiles, extra.pop("types", types),
                      is_pointer=lambda arg: arg[:1].isupper(), aligned=strides, rows=rows)

    launches = []
    for d in (64, 128, 256):
        meta = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, MASK_KIND=0, IS_CAUSAL=False, VARLEN=False,
                    DROPOUT=False, PRECISION="tf32", TMA=False, MASK_GRAD=False)
        long_rows = kernels.forward_tiles(dict(meta, q_bucket=4096), hopper)

        def walks(suffix, constexprs):
            """The forward over 4k rows and both backward kernels, with these constexprs."""
            return [
                launch(f"forward hd{d} seq 4k{suffix}", kernels.attention_forward_kernel,
                       dict(constexprs, SPLIT=False), kernels.forward_tiles(dict(constexprs, q_bucket=4096), hopper)),
                launch(f"backward dK/dV hd{d}{suffix}", kernels.attention_backward_dkdv_kernel, constexprs,
                       kernels.dkdv_tiles(constexprs, hopper)),
                launch(f"backward dQ hd{d}{suffix}", kernels.attention_backward_dq_kernel, constexprs,
                       kernels.dq_tiles(constexprs, hopper))]
        causal = dict(meta, IS_CAUSAL=1)  # the diagonal blocks' masking, the skipped blocks' bounds
        launches += walks("", meta) + walks(" causal", causal)
        launches.append(launch(f"forward hd{d} decoding (split)", kernels.attention_forward_kernel,
                               dict(meta, SPLIT=True), kernels.forward_tiles(dict(meta, q_bucket=1), hopper)))
        for kind in (meta, causal):  # 17-64 query rows: their own tiles
            launches.append(launch(f"forward hd{d} 64 query rows{' causal' if kind is causal else ''}",
                                   kernels.attention_forward_kernel, dict(kind, SPLIT=False),
                                   kernels.forward_tiles(dict(kind, q_bucket=64), hopper)))
        if hopper and d <= 128:  # a float mask (Hopper's own tiles)
            launches += walks(" float mask", dict(meta, MASK_KIND=kernels.MASK_FLOAT))
            launches += walks(" float mask causal", dict(causal, MASK_KIND=kernels.MASK_FLOAT))
        if not hopper:
            continue
        # TMA: the tiles that keep the launcher's walked tile (the first one's), as the pruning does
        for name, kernel, tiles, fixed, descriptors, extra in (
                ("forward", kernels.attention_forward_kernel, long_rows, 1, ("KDesc", "VDesc"), dict(SPLIT=False)),
                ("backward dK/dV", kernels.attention_backward_dkdv_kernel, kernels.dkdv_tiles(meta, hopper), 0,
                 ("QDesc", "GradOutDesc"), {}),
                ("backward dQ", kernels.attention_backward_dq_kernel, kernels.dq_tiles(meta, hopper), 1,
                 ("KDesc", "VDesc"), {})):
            rows = tiles[0][fixed]
            descriptor = f"tensordesc<bf16[1,1,{rows},{d}]>"
            launches.append(launch(f"{name} hd{d} TMA", kernel, dict(meta, TMA=True, **extra),
                                   [t for t in tiles if t[fixed] == rows],
                                   types=dict(types, **{arg: descriptor for arg in descriptors})))
    return launches


def _conv_launches(arch):
    from bigkern.kernels import conv as kernels
    from bigkern.kernels.epilogue import RELU

    # channels_last tensors: the channel stride is 1, which Triton specializes as a constant
    unit = {name: 1 for name in ("sx_c", "sw_c", "sr_c", "sy_c", "sz_c", "sg_c", "sd_c")}
    aligned = ("sx_n", "sx_h", "sx_w", "sw_k", "sw_r", "sw_s", "sr_n", "sr_h", "sr_w", "sy_n", "sy_h", "sy_w",
               "sz_n", "sz_h", "sz_w", "sg_n", "sg_h", "sg_w", "sd_n", "sd_h", "sd_w", "C_g", "K_g")
    types = {"partial_ptr": "*fp32", "bias_partial_ptr": "*fp32", "negative_slope": "fp32"}
    epilogue = dict(ACTIVATION=RELU.value, HAS_BIAS=True, HAS_RESIDUAL=True, SAVE_Z=True)

    def tiles(shapes):
        return [(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), w, s) for m, n, k, w, s in shapes]

    def launch(name, kernel, constexprs, kernel_tiles, **kernel_types):
        return Launch(f"conv {name}", kernel, {**unit, **constexprs}, kernel_tiles, {**types, **kernel_types},
                      aligned=aligned)

    implicit_gemm = dict(FLAT=False, DOT_PRECISION="ieee")
    return [
        launch("forward (implicit GEMM, bias + residual + relu)", kernels.conv2d_forward_kernel,
               dict(epilogue, SPLIT=False, GROUP_M=8, **implicit_gemm), tiles(kernels.FORWARD_TILES)),
        launch("forward, split reduction", kernels.conv2d_forward_kernel,
               dict(epilogue, SPLIT=True, GROUP_M=8, **implicit_gemm), tiles(kernels.FORWARD_TILES)),
        launch("forward, depthwise (direct)", kernels.conv2d_direct_forward_kernel,
               {k: v for k, v in epilogue.items()},
               [(dict(BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"]), c.num_warps, c.num_stages)
                for c in kernels._direct_configs()]),
        launch("backward, input gradient", kernels.conv2d_input_grad_kernel, dict(GROUP_M=8, **implicit_gemm),
               tiles(kernels.FORWARD_TILES)),
        launch("backward, weight gradient", kernels.conv2d_weight_grad_kernel, dict(BIAS_GRAD=True, **implicit_gemm),
               tiles(kernels.WGRAD_TILES)),
    ]


def _lstm_launches(arch):
    from bigkern.kernels import lstm as kernels

    types = {name: "*fp32" for name in ("bias_ptr", "cells_ptr", "gates_ptr", "dc_ptr")}
    tiles = [(dict(BLOCK_B=b, BLOCK_H=h, BLOCK_K=128), w, 3) for b, h, w in kernels.TILES]
    projection_tiles = [(dict(BLOCK_B=b, BLOCK_P=h, BLOCK_K=128), w, 3) for b, h, w in kernels.TILES]
    common = dict(PRECISION="ieee")
    aligned = ("stride_gx", "H", "P")  # hidden and projection sizes of 8 and more 16-bit elements
    return [
        Launch("lstm forward step (projection)", kernels.lstm_forward_step_kernel,
               dict(common, HAS_BIAS=True, PROJ=True, SAVE_GATES=True), tiles, types, aligned=aligned, rows="BLOCK_B"),
        Launch("lstm projection", kernels.lstm_projection_kernel, common, projection_tiles, types, aligned=aligned,
               rows="BLOCK_B"),
        Launch("lstm hidden gradient", kernels.lstm_hidden_grad_kernel, common, projection_tiles, types,
               aligned=aligned, rows="BLOCK_B"),
        Launch("lstm backward step", kernels.lstm_backward_step_kernel, dict(common, PROJ=False), tiles, types,
               aligned=aligned, rows="BLOCK_B"),
    ]


FAMILIES = {"attention": _attention_launches, "conv": _conv_launches, "lstm": _lstm_launches}


def launches(family, arch):
    """The representative launches of one family's Triton kernels for sm_<arch>."""
    return FAMILIES[family](arch)
