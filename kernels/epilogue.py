"""Fused bias + activation: the epilogue every bigkern kernel family shares.

    z = x + bias[c]            c = the element's coordinate along the channel dimension
    y = act(z)

Forward is one pass over memory: read x, write y. Backward recomputes z from x and bias rather
than keeping it, so it too is one pass: read grad_y and x, write grad_x, and reduce grad_x per
channel into fp32 partial sums that the caller adds up (a tiny second reduction, deterministic,
no atomics).

`apply_activation` and `activation_grad` are @triton.jit functions that other kernels (the conv
epilogue, the LSTM gates) call on tiles they already hold in registers. All arithmetic is fp32.
"""

import triton
import triton.language as tl

# Activation codes. csrc/common/activation.cuh holds the same numbers (a test checks they agree).
NONE = tl.constexpr(0)
RELU = tl.constexpr(1)
GELU = tl.constexpr(2)  # exact, erf form: torch's gelu(approximate="none")
GELU_TANH = tl.constexpr(3)  # torch's gelu(approximate="tanh")
SILU = tl.constexpr(4)
SIGMOID = tl.constexpr(5)
TANH = tl.constexpr(6)
LEAKY_RELU = tl.constexpr(7)

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2/pi)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def sigmoid_parts(z):
    """(sigmoid(z), 1 - sigmoid(z)), each without cancellation: with e = exp(-|z|) <= 1 they are
    1/(1+e) and e/(1+e), in the order the sign of z decides. NaN stays NaN; exp never overflows."""
    e = tl.exp(-tl.abs(z))
    near_one = 1.0 / (1.0 + e)
    near_zero = e * near_one
    positive = z >= 0
    return tl.where(positive, near_one, near_zero), tl.where(positive, near_zero, near_one)


@triton.jit
def sigmoid(z):
    return sigmoid_parts(z)[0]


@triton.jit
def tanh_parts(z):
    """(tanh(z), 1 - tanh(z)^2) in fp32 to about an ulp each (libdevice's tanh is unavailable in
    the interpreter, and 1 - t*t cancels where t is near 1).

    |z| < 0.25: the odd Taylor series to z^9 (next term < 1e-8 relative); 1 - t^2 > 0.9 is safe.
    otherwise, with e = exp(-2|z|) <= 0.61:  tanh|z| = (1 - e)/(1 + e),  1 - tanh^2 = 4e/(1 + e)^2.
    """
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    inv = 1.0 / (1.0 + e)
    z2 = z * z
    # odd in z, so tanh(-0) = -0 as torch gives (a sign taken from |z| afterwards would lose it)
    series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0)))))
    small = a < 0.25
    large = (1.0 - e) * inv
    t = tl.where(small, series, tl.where(z < 0, -large, large))  # NaN: not small, not < 0: NaN passes through
    sech2 = tl.where(small, 1.0 - series * series, 4.0 * e * inv * inv)
    return t, sech2


@triton.jit
def tanh(z):
    return tanh_parts(z)[0]


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr, negative_slope):
    """act(z), elementwise, with NaN propagating as in torch."""
    if ACTIVATION == RELU:
        return tl.where(z < 0, 0.0, z)  # not maximum(z, 0): that would turn NaN into 0
    elif ACTIVATION == GELU:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif ACTIVATION == GELU_TANH:
        # z/2 (1 + tanh u) = z * sigmoid(2u): no cancellation in 1 + tanh u where u < 0
        return z * sigmoid((z + z * z * z * _GELU_CUBIC) * _TWO_SQRT_2_OVER_PI)
    elif ACTIVATION == SILU:
        return z * sigmoid(z)
    elif ACTIVATION == SIGMOID:
        return sigmoid(z)
    elif ACTIVATION == TANH:
        return tanh(z)
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(z > 0, z, z * negative_slope)  # torch's form: -0 and 0 * inf slope as torch gives them
    else:
        return z


@triton.jit
def activation_grad(z, grad_y, ACTIVATION: tl.constexpr, negative_slope):
    """grad_z = grad_y * act'(z), matching torch's backward formulas: relu'(0) = 0, leaky'(0) = slope,
    and at z = NaN relu passes grad_y through (torch: z <= 0 ? 0 : grad) while leaky scales it."""
    if ACTIVATION == RELU:
        return tl.where(z <= 0, 0.0, grad_y)
    elif ACTIVATION == GELU:
        # d/dz z*Phi(z) = Phi(z) + z*phi(z)
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return grad_y * (cdf + z * pdf)
    elif ACTIVATION == GELU_TANH:
        # y = z s, s = sigmoid(2u), u = sqrt(2/pi)(z + c z^3)
        # y' = s + z s (1 - s) 2u',  2u' = 2 sqrt(2/pi)(1 + 3c z^2)
        s, one_minus_s = sigmoid_parts((z + z * z * z * _GELU_CUBIC) * _TWO_SQRT_2_OVER_PI)
        two_du = (1.0 + z * z * _GELU_CUBIC * 3.0) * _TWO_SQRT_2_OVER_PI
        return grad_y * (s + z * s * one_minus_s * two_du)
    elif ACTIVATION == SILU:
        s, one_minus_s = sigmoid_parts(z)
        return grad_y * s * (1.0 + z * one_minus_s)
    elif ACTIVATION == SIGMOID:
        s, one_minus_s = sigmoid_parts(z)
        return grad_y * s * one_minus_s
    elif ACTIVATION == TANH:
        return grad_y * tanh_parts(z)[1]
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(z > 0, grad_y, grad_y * negative_slope)
    else:
        return grad_y


@triton.jit
def bias_act_forward_kernel(
    x_ptr, bias_ptr, y_ptr,
    numel, channel_stride, n_channels, negative_slope,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = act(x + bias) over the flat storage of a dense tensor.

    In a dense tensor of any dimension order, the element at storage offset o has coordinate
    (o // stride) % size along a dimension: so channel = (o // channel_stride) % n_channels.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_BIAS:
        channel = (offsets // channel_stride) % n_channels
        z += tl.load(bias_ptr + channel, mask=mask).to(tl.float32)
    y = apply_activation(z, ACTIVATION, negative_slope)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_act_backward_kernel(
    grad_y_ptr, x_ptr, bias_ptr, grad_x_ptr, partial_ptr,
    numel, n_rows, n_cols, n_channels, rows_per_program, negative_slope,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNEL_IN_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x = grad_y * act'(x + bias), and per-channel partial sums of grad_x for grad_bias.

    The dense tensor is seen as a row-major (n_rows, n_cols) matrix in storage order, whose last
    row may be short (numel need not be a multiple of n_cols when the rows are plain chunks):
      CHANNEL_IN_ROWS:  channel = row % n_channels (the channel has elements after it in storage,
                        as in NCHW); this program owns BLOCK_R whole rows and writes one sum per row.
      otherwise:        channel = column (channels innermost, as in channels_last or (N, C)); this
                        program owns a BLOCK_C column tile of `rows_per_program` rows and writes
                        one sum per column into row pid(0) of the partial matrix.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if CHANNEL_IN_ROWS:
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        bias = tl.zeros((BLOCK_R,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows % n_channels, mask=row_mask).to(tl.float32)
        row_sum = tl.zeros((BLOCK_R,), tl.float32)
        for col_start in range(0, n_cols, BLOCK_C):
            cols = col_start + tl.arange(0, BLOCK_C)
            offsets = rows[:, None] * n_cols + cols[None, :]
            mask = row_mask[:, None] & (cols < n_cols)[None, :] & (offsets < numel)
            z = tl.load(x_ptr + offsets, mask=mask).to(tl.float32) + bias[:, None]
            g = tl.load(grad_y_ptr + offsets, mask=mask).to(tl.float32)
            grad_z = activation_grad(z, g, ACTIVATION, negative_slope)
            tl.store(grad_x_ptr + offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)
            row_sum += tl.sum(tl.where(mask, grad_z, 0.0), axis=1)
        tl.store(partial_ptr + rows, row_sum, mask=row_mask)
    else:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        bias = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_mask).to(tl.float32)
        col_sum = tl.zeros((BLOCK_C,), tl.float32)
        first_row = pid_r.to(tl.int64) * rows_per_program
        for row_start in range(0, rows_per_program, BLOCK_R):
            rows = first_row + row_start + tl.arange(0, BLOCK_R)
            offsets = rows[:, None] * n_cols + cols[None, :]
            mask = (rows < n_rows)[:, None] & col_mask[None, :] & (offsets < numel)
            z = tl.load(x_ptr + offsets, mask=mask).to(tl.float32) + bias[None, :]
            g = tl.load(grad_y_ptr + offsets, mask=mask).to(tl.float32)
            grad_z = activation_grad(z, g, ACTIVATION, negative_slope)
            tl.store(grad_x_ptr + offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)
            col_sum += tl.sum(tl.where(mask, grad_z, 0.0), axis=0)
        tl.store(partial_ptr + pid_r * n_cols + cols, col_sum, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launchers. Tensors arrive dense (any dimension order) with outputs allocated by the caller.

FORWARD_BLOCK = 1024


def bias_act_forward(x, bias, y, channel_stride, n_channels, activation, negative_slope):
    numel = x.numel()
    grid = (triton.cdiv(numel, FORWARD_BLOCK),)
    bias_act_forward_kernel[grid](
        x, bias if bias is not None else x, y,
        numel, channel_stride, n_channels, negative_slope,
        ACTIVATION=activation, HAS_BIAS=bias is not None, BLOCK=FORWARD_BLOCK, num_warps=4,
    )


def bias_act_backward_partials(grad_y, x, bias, grad_x, n_rows, n_cols, n_channels, channel_in_rows,
                               activation, negative_slope, partial_alloc):
    """Launch the backward kernel; returns the fp32 partial sums (a (n_rows,) vector when the
    channel is in the rows, else a (row_programs, n_cols) matrix). `partial_alloc(shape)` allocates."""
    bias_arg = bias if bias is not None else x
    if channel_in_rows:
        block_c = min(1024, triton.next_power_of_2(n_cols))
        block_r = max(1, min(64, 2048 // block_c))
        partial = partial_alloc((n_rows,))
        grid = (triton.cdiv(n_rows, block_r), 1)
        rows_per_program = block_r
    else:
        block_c = min(256, triton.next_power_of_2(n_cols))
        block_r = max(1, min(64, 4096 // block_c))
        # enough row programs to fill a GPU, each with at least a few row blocks of work
        row_programs = max(1, min(triton.cdiv(n_rows, 4 * block_r), 1024))
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_programs), block_r) * block_r
        row_programs = triton.cdiv(n_rows, rows_per_program)
        partial = partial_alloc((row_programs, n_cols))
        grid = (row_programs, triton.cdiv(n_cols, block_c))
    bias_act_backward_kernel[grid](
        grad_y, x, bias_arg, grad_x, partial,
        x.numel(), n_rows, n_cols, n_channels, rows_per_program, negative_slope,
        ACTIVATION=activation, HAS_BIAS=bias is not None, CHANNEL_IN_ROWS=channel_in_rows,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return partial
