"""2-D convolution as implicit GEMM, with the shared epilogue fused into the forward pass.

Shapes: input x (N, C, H, W), weight w (K, C/G, R, S), output y (N, K, P, Q), G groups; Cg = C/G
and Kg = K/G channels per group. Every tensor is addressed through its four strides, so NCHW,
channels_last and any other strided view are read in place.

Forward, per group g, is the GEMM  y[m, k] = sum_{(r, s, c)} A[m, (r, s, c)] * B[(r, s, c), k]:
    m = (n, p, q)  over N*P*Q output pixels            (the GEMM's M)
    k              over Kg output channels              (N)
    (r, s, c)      over R*S*Cg filter taps x channels   (the reduction)
    A = x[n, g*Cg + c, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w]  (0 in the padding)
    B = w[g*Kg + k, c, r, s]
A is never materialised: each tile is gathered with computed indices, padding by masks. The
reduction runs as one flat loop over (tap, channel block) so Triton pipelines it across taps.
The epilogue, on the fp32 accumulator tile: z = acc + residual + bias[k] (saved for backward when
asked: the activation's own argument), then y = act(z) with `apply_activation` from the shared
epilogue. With one input channel
per group (depthwise) the reduction is only R*S long: a direct kernel does the same with FMAs. With
too few output tiles to fill the GPU (batch 1) the reduction is split into fp32 partial sums that a
second kernel adds up before the same epilogue.

Input gradient (dgrad), a transposed convolution:
    grad_x[n, c, h, w] = sum_{k, r, s} grad_z[n, k, p, q] * w[k, c, r, s]
    where h = p*stride_h - pad_h + r*dil_h, i.e. p = (h + pad_h - r*dil_h) / stride_h must be whole.
With stride > 1 most (h, r) pairs have no whole p. The input pixels are split into stride_h x
stride_w residue classes (h mod stride_h, w mod stride_w); within one class the taps r that give a
whole p are the same for every pixel and form an arithmetic progression, which the launcher
tabulates. Each program takes one class, so it loops only over taps that contribute: no work is
spent on the (stride^2 - 1)/stride^2 of (pixel, tap) pairs that would be masked to zero.

Weight gradient (wgrad), a GEMM reduced over every output pixel:
    grad_w[k, c, r, s] = sum_{(n, p, q)} grad_z[n, k, p, q] * x[n, c, p*stride_h - pad_h + r*dil_h, ...]
The N*P*Q reduction is long and the output small, so it is split (split-K) into fp32 partial sums,
one slice per split, that the caller adds up: deterministic, no atomics. The grad_bias partial sums
(sum of grad_z over n, p, q) ride along in the programs of the first (channel block, tap).
"""

import triton
import triton.language as tl

from bigkern.kernels.autotune import autotune
from bigkern.kernels.epilogue import apply_activation


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Autotuning: a few tile shapes for Hopper / Ampere (bf16/fp16: 64-wide reductions, fp32/TF32: 32).
# The interpreter gets one tile, as few programs as the tests' small shapes allow: there every
# Triton op costs a fraction of a millisecond of Python, whatever the tile's size.
def _configs(shapes, interpreter_tile):
    if _interpreting():
        m, n, k = interpreter_tile
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for m, n, k, w, s in shapes]
    return configs


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
FORWARD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 32, 32, 4, 4),  # small channel counts: little reuse, many programs
]
INTERPRETER_TILE = (64, 16, 16)
WGRAD_TILES = [
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
]
WGRAD_INTERPRETER_TILE = (16, 16, 64)

def _direct_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in [(64, 64, 4, 3), (128, 32, 4, 3), (32, 128, 4, 3), (128, 64, 8, 3), (16, 64, 2, 3)]]
    return configs


_GEOMETRY_KEY = ["N", "C_g", "H", "W", "K_g", "P", "Q", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w"]


@triton.jit
def _grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) for program pid, walking GROUP_M tile rows at a time so that the programs
    running together share A and B tiles in L2 (the Triton matmul tutorial's ordering)."""
    in_group = GROUP_M * n_tiles_n
    first_m = (pid // in_group) * GROUP_M
    rows = tl.minimum(n_tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % rows, (pid % in_group) // rows


# The reduction over (tap, channel) pairs, channel fastest (the order NHWC activations and
# (K, R, S, C) weights are stored in), is walked in blocks one of two ways:
#   per tap (FLAT=False): a block is a run of one tap's channels, so r and s are scalars and the
#       window test is one per row -- the fast path for every layer with >= 16 channels per group;
#   flat (FLAT=True): a block runs across taps, r and s vary along it -- for few channels per group
#       (an RGB stem has 3, a depthwise conv 1), where a block per tap would be mostly padding.

@triton.jit
def _tap_run(block, C_g, S, BLOCK: tl.constexpr):
    """Per-tap walk: (r, s) scalars, and the channels c (vector) and their validity of `block`."""
    c_blocks = tl.cdiv(C_g, BLOCK)
    tap = block // c_blocks
    c = (block % c_blocks) * BLOCK + tl.arange(0, BLOCK)
    return tap // S, tap % S, c, c < C_g


@triton.jit
def _flat_pairs(block, C_g, R, S, BLOCK: tl.constexpr):
    """Flat walk: the `block`-th BLOCK (tap, channel) pairs as vectors (r, s, c, valid)."""
    pair = block * BLOCK + tl.arange(0, BLOCK)
    tap = pair // C_g
    return tap // S, tap % S, pair % C_g, tap < R * S


@triton.jit
def _tap_blocks(C_g, R, S, BLOCK: tl.constexpr, FLAT: tl.constexpr):
    """How many blocks the (R*S, C_g) range takes."""
    if FLAT:
        return tl.cdiv(C_g * R * S, BLOCK)
    else:
        return R * S * tl.cdiv(C_g, BLOCK)


@autotune(configs=_configs(FORWARD_TILES, INTERPRETER_TILE),
                 key=_GEOMETRY_KEY + ["splits", "HAS_RESIDUAL", "FLAT", "DOT_PRECISION"])
@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, y_ptr, z_ptr, partial_ptr,
    N, C_g, H, W, K_g, P, Q, R, S, splits,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    sz_n, sz_c, sz_h, sz_w,
    negative_slope,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_Z: tl.constexpr,
    FLAT: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """One output tile of one group. SPLIT: this program reduces only its slice (program_id(2) of
    `splits`) of the (tap, channel) blocks and writes fp32 partial sums to partial[split, m, channel];
    conv2d_split_epilogue_kernel adds them up and applies the epilogue (small outputs, long
    reductions: batch-1 layers would otherwise run a handful of programs on a GPU of a hundred SMs)."""
    group = tl.program_id(1)
    n_pixels = N * P * Q
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(n_pixels, BLOCK_M), tl.cdiv(K_g, BLOCK_N), GROUP_M)

    # rows: output pixels (n, p, q) and the corner (top, left) of their receptive field
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < n_pixels
    n = m // (P * Q)
    p = (m // Q) % P
    q = m % Q
    top = p * stride_h - pad_h
    left = q * stride_w - pad_w
    x_corner = x_ptr + n.to(tl.int64) * sx_n + (group * C_g).to(tl.int64) * sx_c + top * sx_h + left * sx_w

    # columns: output channels of this group
    k = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K_g
    w_cols = w_ptr + (group * K_g + k).to(tl.int64) * sw_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks = _tap_blocks(C_g, R, S, BLOCK_K, FLAT)
    first, last = 0, blocks
    if SPLIT:
        per_split = tl.cdiv(blocks, splits)
        first = tl.program_id(2) * per_split
        last = tl.minimum(first + per_split, blocks)
    for block in range(first, last):
        if FLAT:
            r, s, c, valid = _flat_pairs(block, C_g, R, S, BLOCK_K)
            dh = (r * dil_h)[None, :]
            dw = (s * dil_w)[None, :]
            in_image = (m_ok[:, None] & valid[None, :] & (top[:, None] >= -dh) & (top[:, None] < H - dh)
                        & (left[:, None] >= -dw) & (left[:, None] < W - dw))
        else:
            r, s, c, valid = _tap_run(block, C_g, S, BLOCK_K)
            dh = r * dil_h
            dw = s * dil_w
            in_image = (m_ok & (top >= -dh) & (top < H - dh) & (left >= -dw) & (left < W - dw))[:, None] \
                & valid[None, :]
        a = tl.load(x_corner[:, None] + (dh * sx_h + dw * sx_w + (c * sx_c)[None, :]), mask=in_image, other=0.0)
        b = tl.load(w_cols[None, :] + (r * sw_r + s * sw_s + c * sw_c)[:, None],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    channel = group * K_g + k
    if SPLIT:
        K = K_g * tl.num_programs(1)
        rows = tl.program_id(2).to(tl.int64) * n_pixels + m
        tl.store(partial_ptr + rows[:, None] * K + channel[None, :], acc, mask=m_ok[:, None] & k_ok[None, :])
    else:
        _forward_epilogue(acc, n, p, q, m_ok, channel, k_ok, bias_ptr, residual_ptr, y_ptr, z_ptr,
                          sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w, negative_slope,
                          ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_Z)


@triton.jit
def conv2d_split_epilogue_kernel(
    partial_ptr, bias_ptr, residual_ptr, y_ptr, z_ptr,
    N, K, P, Q, splits,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    sz_n, sz_c, sz_h, sz_w,
    negative_slope,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = act(sum of the split partial sums + residual + bias), in a fixed order (deterministic)."""
    n_pixels = N * P * Q
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < n_pixels
    channel = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    channel_ok = channel < K
    mask = m_ok[:, None] & channel_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, splits):
        rows = split * n_pixels + m.to(tl.int64)
        acc += tl.load(partial_ptr + rows[:, None] * K + channel[None, :], mask=mask, other=0.0)
    _forward_epilogue(acc, m // (P * Q), (m // Q) % P, m % Q, m_ok, channel, channel_ok, bias_ptr, residual_ptr,
                      y_ptr, z_ptr, sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w,
                      negative_slope, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_Z)


@triton.jit
def _forward_epilogue(acc, n, p, q, m_ok, channel, channel_ok, bias_ptr, residual_ptr, y_ptr, z_ptr,
                      sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w, negative_slope,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      SAVE_Z: tl.constexpr):
    """On the fp32 tile of output pixels (n, p, q) x channels: z = acc + residual + bias (stored
    when backward will need it), y = act(z), with the shared epilogue's apply_activation. z is
    stored with the bias in it: backward takes the activation's derivative at the rounded z, on
    the same side of relu's kink as y."""
    mask = m_ok[:, None] & channel_ok[None, :]
    n64 = n.to(tl.int64)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + (n64 * sr_n + p * sr_h + q * sr_w)[:, None] + channel[None, :] * sr_c,
                      mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_Z:
        tl.store(z_ptr + (n64 * sz_n + p * sz_h + q * sz_w)[:, None] + channel[None, :] * sz_c,
                 acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = apply_activation(acc, ACTIVATION, negative_slope)
    tl.store(y_ptr + (n64 * sy_n + p * sy_h + q * sy_w)[:, None] + channel[None, :] * sy_c,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_direct_configs(), key=_GEOMETRY_KEY + ["HAS_RESIDUAL"])
@triton.jit
def conv2d_direct_forward_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, y_ptr, z_ptr,
    N, C_g, H, W, K_g, P, Q, R, S, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    sz_n, sz_c, sz_h, sz_w,
    negative_slope,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward for one input channel per group (depthwise, or a 1-channel image), where a GEMM's
    reduction is only R*S long and tensor-core tiles would be mostly padding: direct FMAs,
        y[m, k] = sum_{r, s} x[n, k // Kg, top + r*dil_h, left + s*dil_w] * w[k, 0, r, s]
    over a tile of output pixels x output channels of every group at once (channels_last reads
    neighbouring channels from neighbouring addresses)."""
    n_pixels = N * P * Q
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < n_pixels
    n = m // (P * Q)
    p = (m // Q) % P
    q = m % Q
    top = p * stride_h - pad_h
    left = q * stride_w - pad_w
    x_corner = x_ptr + n.to(tl.int64) * sx_n + top * sx_h + left * sx_w

    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K
    x_channel = (k // K_g).to(tl.int64) * sx_c
    w_cols = w_ptr + k.to(tl.int64) * sw_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, R * S):
        dh = (tap // S) * dil_h
        dw = (tap % S) * dil_w
        in_image = m_ok & (top >= -dh) & (top < H - dh) & (left >= -dw) & (left < W - dw)
        xv = tl.load(x_corner[:, None] + (dh * sx_h + dw * sx_w) + x_channel[None, :],
                     mask=in_image[:, None] & k_ok[None, :], other=0.0)
        wv = tl.load(w_cols + (tap // S) * sw_r + (tap % S) * sw_s, mask=k_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    _forward_epilogue(acc, n, p, q, m_ok, k, k_ok, bias_ptr, residual_ptr, y_ptr, z_ptr,
                      sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w, negative_slope,
                      ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_Z)


@triton.jit
def _contributing_taps(residue, pad, dil, R, gcd, inverse, step):
    """(first tap, number of taps) r in [0, R) with (residue + pad - r*dil) a multiple of the stride.

    r*dil = residue + pad (mod stride) is solvable iff gcd(dil, stride) divides residue + pad; then
    r = ((residue + pad)/gcd) * inverse (mod step), with step = stride/gcd and inverse that of
    dil/gcd modulo step. Everything here is non-negative, so % and // mean the same in every backend.
    """
    target = residue + pad
    first = ((target // gcd) * inverse) % step
    solvable = (target % gcd == 0) & (first < R)
    count = tl.where(solvable, (R - 1 - first) // step + 1, 0)
    return first, count


@autotune(configs=_configs(FORWARD_TILES, INTERPRETER_TILE), key=_GEOMETRY_KEY + ["FLAT", "DOT_PRECISION"])
@triton.jit
def conv2d_input_grad_kernel(
    g_ptr, w_ptr, dx_ptr,
    N, C_g, H, W, K_g, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    gcd_h, inverse_h, step_h, gcd_w, inverse_w, step_w,
    sg_n, sg_c, sg_h, sg_w,
    sw_k, sw_c, sw_r, sw_s,
    sd_n, sd_c, sd_h, sd_w,
    FLAT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """grad_x for one residue class (h % stride_h, w % stride_w) of one group: rows are the input
    pixels h = hh*stride_h + rh of the class, columns input channels, and the reduction runs over
    the contributing taps x Kg. For a contributing r, p = hh + (rh + pad_h - r*dil_h)/stride_h."""
    classes = stride_h * stride_w
    group = tl.program_id(1) // classes
    residue = tl.program_id(1) % classes
    rh = residue // stride_w
    rw = residue % stride_w
    class_h = tl.cdiv(H - rh, stride_h)  # rows of this class (0 when rh >= H)
    class_w = tl.cdiv(W - rw, stride_w)
    first_r, count_r = _contributing_taps(rh, pad_h, dil_h, R, gcd_h, inverse_h, step_h)
    first_s, count_s = _contributing_taps(rw, pad_w, dil_w, S, gcd_w, inverse_w, step_w)

    n_pixels = N * class_h * class_w
    max_pixels = N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w)  # the grid is sized for the largest class
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(max_pixels, BLOCK_M), tl.cdiv(C_g, BLOCK_N),
                                   GROUP_M)
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < n_pixels
    n = m // tl.maximum(class_h * class_w, 1)
    hh = (m // tl.maximum(class_w, 1)) % tl.maximum(class_h, 1)
    ww = m % tl.maximum(class_w, 1)
    g_rows = (g_ptr + n.to(tl.int64) * sg_n + (group * K_g).to(tl.int64) * sg_c)[:, None]

    c = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C_g
    w_cols = w_ptr + (group * K_g).to(tl.int64) * sw_k + c.to(tl.int64) * sw_c

    # the reduction: (contributing tap, output channel) pairs; the i-th contributing r is
    # first_r + i*step_h. An output pixel p = hh + (rh + pad_h - r*dil_h)/stride_h (exact division).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(0, _tap_blocks(K_g, count_r, count_s, BLOCK_K, FLAT)):
        if FLAT:
            i_r, i_s, kk, valid = _flat_pairs(block, K_g, count_r, count_s, BLOCK_K)
            r = first_r + i_r * step_h
            s = first_s + i_s * step_w
            p = hh[:, None] + ((rh + pad_h - r * dil_h) // stride_h)[None, :]
            q = ww[:, None] + ((rw + pad_w - s * dil_w) // stride_w)[None, :]
            in_output = m_ok[:, None] & valid[None, :] & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
            g_offsets = p * sg_h + q * sg_w + (kk * sg_c)[None, :]
        else:
            i_r, i_s, kk, valid = _tap_run(block, K_g, count_s, BLOCK_K)
            r = first_r + i_r * step_h
            s = first_s + i_s * step_w
            p = hh + (rh + pad_h - r * dil_h) // stride_h
            q = ww + (rw + pad_w - s * dil_w) // stride_w
            in_output = (m_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q))[:, None] & valid[None, :]
            g_offsets = (p * sg_h + q * sg_w)[:, None] + (kk * sg_c)[None, :]
        a = tl.load(g_rows + g_offsets, mask=in_output, other=0.0)
        b = tl.load(w_cols[None, :] + (r * sw_r + s * sw_s + kk.to(tl.int64) * sw_k)[:, None],
                    mask=valid[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    h = hh * stride_h + rh
    w = ww * stride_w + rw
    channel = group * C_g + c
    tl.store(dx_ptr + (n.to(tl.int64) * sd_n + h * sd_h + w * sd_w)[:, None] + channel[None, :] * sd_c,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@autotune(configs=_configs(WGRAD_TILES, WGRAD_INTERPRETER_TILE),
                 key=_GEOMETRY_KEY + ["splits", "BIAS_GRAD", "FLAT", "DOT_PRECISION"])
@triton.jit
def conv2d_weight_grad_kernel(
    g_ptr, x_ptr, partial_ptr, bias_partial_ptr,
    N, C_g, H, W, K_g, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    splits, pixels_per_split,
    sg_n, sg_c, sg_h, sg_w,
    sx_n, sx_c, sx_h, sx_w,
    BIAS_GRAD: tl.constexpr, FLAT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of (output channel k) x (tap, input channel c) of one group, over one split of the
    N*P*Q pixels, BLOCK_K pixels per step (the reduction).

    partial: fp32 (splits, K, C_g, R, S), dense; bias_partial: fp32 (splits, K)."""
    k_tiles = tl.cdiv(K_g, BLOCK_M)
    tile_k = tl.program_id(0) % k_tiles
    tile_col = tl.program_id(0) // k_tiles
    split = tl.program_id(1)
    group = tl.program_id(2)

    k = tile_k * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = k < K_g
    g_rows = g_ptr + (group * K_g + k).to(tl.int64) * sg_c
    if FLAT:
        r, s, c, valid = _flat_pairs(tile_col, C_g, R, S, BLOCK_N)
        dh = (r * dil_h)[None, :]
        dw = (s * dil_w)[None, :]
    else:
        r, s, c, valid = _tap_run(tile_col, C_g, S, BLOCK_N)
        dh = r * dil_h
        dw = s * dil_w
    x_cols = (x_ptr + (group * C_g + c).to(tl.int64) * sx_c)[None, :] + dh * sx_h + dw * sx_w

    n_pixels = N * P * Q
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, n_pixels)
    bias_program = tile_col == 0  # one program per (k tile, split) also sums grad_bias
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < end
        n = (j // (P * Q)).to(tl.int64)
        p = (j // Q) % P
        q = j % Q
        top = p * stride_h - pad_h
        left = q * stride_w - pad_w
        if FLAT:
            in_image = (j_ok[:, None] & valid[None, :] & (top[:, None] >= -dh) & (top[:, None] < H - dh)
                        & (left[:, None] >= -dw) & (left[:, None] < W - dw))
        else:
            in_image = (j_ok & (top >= -dh) & (top < H - dh) & (left >= -dw) & (left < W - dw))[:, None] \
                & valid[None, :]
        a = tl.load(g_rows[:, None] + (n * sg_n + p * sg_h + q * sg_w)[None, :],
                    mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        b = tl.load(x_cols + (n * sx_n + top * sx_h + left * sx_w)[:, None], mask=in_image, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            if bias_program:
                bias_acc += tl.sum(a.to(tl.float32), axis=1)

    channel = (group * K_g + k).to(tl.int64)
    K = K_g * tl.num_programs(2)
    offsets = ((split * K + channel) * C_g * R * S)[:, None] + (c * (R * S) + r * S + s)[None, :]
    tl.store(partial_ptr + offsets, acc, mask=k_ok[:, None] & valid[None, :])
    if BIAS_GRAD:
        tl.store(bias_partial_ptr + split * K + channel, bias_acc, mask=k_ok & bias_program)


# ---------------------------------------------------------------------------------------------
# Launchers: tensors validated and allocated by bigkern.ops.conv; geometry as plain ints.

def flat_taps(channels_per_group):
    """Walk (tap, channel) pairs as one range when a group has fewer channels than the smallest
    reduction tile (16): an RGB stem, a depthwise or a 1-channel conv."""
    return channels_per_group < 16


def conv2d_forward(x, w, bias, residual, y, z, stride, padding, dilation, groups, activation, negative_slope,
                   dot_precision, splits=1, alloc=None):
    """y = act(conv + residual + bias), z = conv + residual + bias when z is given. One input
    channel per group (depthwise) takes the direct kernel; everything else the implicit GEMM, its reduction
    split `splits` ways when > 1 (fp32 scratch from `alloc(shape)`)."""
    N, C, H, W = x.shape
    K, C_g, R, S = w.shape
    P, Q = y.shape[2:]
    K_g = K // groups
    residual_arg = residual if residual is not None else y
    z_arg = z if z is not None else y
    if C_g == 1:
        def direct_grid(meta):
            return (triton.cdiv(N * P * Q, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]))

        conv2d_direct_forward_kernel[direct_grid](
            x, w, bias if bias is not None else w, residual_arg, y, z_arg,
            N, C_g, H, W, K_g, P, Q, R, S, K,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *w.stride(), *residual_arg.stride(), *y.stride(), *z_arg.stride(),
            negative_slope,
            ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            SAVE_Z=z is not None,
        )
        return

    partial = alloc((splits, N * P * Q, K)) if splits > 1 else y

    def grid(meta):
        return (triton.cdiv(N * P * Q, meta["BLOCK_M"]) * triton.cdiv(K_g, meta["BLOCK_N"]), groups, splits)

    epilogue = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                    SAVE_Z=z is not None)
    conv2d_forward_kernel[grid](
        x, w, bias if bias is not None else w, residual_arg, y, z_arg, partial,
        N, C_g, H, W, K_g, P, Q, R, S, splits,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *w.stride(), *residual_arg.stride(), *y.stride(), *z_arg.stride(),
        negative_slope,
        FLAT=flat_taps(C_g), SPLIT=splits > 1, DOT_PRECISION=dot_precision, **epilogue,
    )
    if splits > 1:
        block_m, block_n = (64, 16) if _interpreting() else (64, 64)
        conv2d_split_epilogue_kernel[(triton.cdiv(N * P * Q, block_m), triton.cdiv(K, block_n))](
            partial, bias if bias is not None else w, residual_arg, y, z_arg,
            N, K, P, Q, splits,
            *residual_arg.stride(), *y.stride(), *z_arg.stride(),
            negative_slope, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **epilogue,
        )


def _tap_progression(stride, dilation):
    """(gcd, inverse, step) for _contributing_taps along one dimension."""
    import math

    gcd = math.gcd(stride, dilation)
    step = stride // gcd
    return gcd, pow(dilation // gcd, -1, step) if step > 1 else 0, step


def conv2d_input_grad(grad, w, dx, stride, padding, dilation, groups, dot_precision):
    N, C, H, W = dx.shape
    K, C_g, R, S = w.shape
    P, Q = grad.shape[2:]
    K_g = K // groups
    max_pixels = N * triton.cdiv(H, stride[0]) * triton.cdiv(W, stride[1])

    def grid(meta):
        return (triton.cdiv(max_pixels, meta["BLOCK_M"]) * triton.cdiv(C_g, meta["BLOCK_N"]),
                groups * stride[0] * stride[1])

    conv2d_input_grad_kernel[grid](
        grad, w, dx,
        N, C_g, H, W, K_g, P, Q, R, S,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *_tap_progression(stride[0], dilation[0]), *_tap_progression(stride[1], dilation[1]),
        *grad.stride(), *w.stride(), *dx.stride(),
        FLAT=flat_taps(K_g), DOT_PRECISION=dot_precision,
    )


def conv2d_weight_grad_partials(grad, x, weight_shape, stride, padding, dilation, groups, splits, bias_grad,
                                dot_precision, alloc):
    """fp32 partial sums (splits, K, C_g, R, S) of grad_w, and (splits, K) of grad_bias when asked
    (else None). `alloc(shape)` allocates fp32 scratch."""
    N, C, H, W = x.shape
    K, C_g, R, S = weight_shape
    P, Q = grad.shape[2:]
    K_g = K // groups
    n_pixels = N * P * Q
    pixels_per_split = triton.cdiv(n_pixels, splits)
    partial = alloc((splits, K, C_g, R, S))
    bias_partial = alloc((splits, K)) if bias_grad else None

    flat = flat_taps(C_g)

    def grid(meta):
        columns = triton.cdiv(C_g * R * S, meta["BLOCK_N"]) if flat else R * S * triton.cdiv(C_g, meta["BLOCK_N"])
        return (triton.cdiv(K_g, meta["BLOCK_M"]) * columns, splits, groups)

    conv2d_weight_grad_kernel[grid](
        grad, x, partial, bias_partial if bias_grad else partial,
        N, C_g, H, W, K_g, P, Q, R, S,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        splits, pixels_per_split,
        *grad.stride(), *x.stride(),
        BIAS_GRAD=bias_grad, FLAT=flat, DOT_PRECISION=dot_precision,
    )
    return partial, bias_partial
