"""LSTM recurrence: one fused kernel per timestep, forward and backward.

The input projection of every timestep, X @ W_ih^T, is one large GEMM done before the recurrence
(bigkern/ops/lstm.py); what is left is sequential. For each timestep the forward kernel computes,
for a tile of rows (sequences) and a slice of hidden units j,

    z_q   = gx[q*H + j] + bias[q*H + j] + h_prev @ W_hh[q*H + j, :]^T        q = i, f, g, o
    i, f, o = sigmoid(z_i, z_f, z_o)        g = tanh(z_g)
    c     = f * c_prev + i * g              (fp32, always: c is the recurrence's state)
    h     = o * tanh(c)                     (with proj_size: r = o * tanh(c), then h = r @ W_hr^T)

in one launch instead of a GEMM plus several pointwise kernels; it stores c (fp32) for the next step
and the activated gates (fp32) for backward. The backward kernel is the same shape:

    dh    = grad_out + dZ_next @ W_hh          (the recurrent part; with proj_size, dr = dh @ W_hr)
    dc    = dc_next + dh * o * (1 - tanh(c)^2)
    dZ    = [dc g i(1-i),  dc c_prev f(1-f),  dc i (1-g^2),  dh tanh(c) o(1-o)]
    dc_prev = dc * f

and the weight gradients are large GEMMs over all timesteps afterwards.

Rows. Every sequence batch -- dense (T, B) or packed with decreasing batch sizes, as in a
PackedSequence -- is a (N, .) matrix of rows in processing order: a step owns rows
[row, row + n_rows), sequence b being row + b. Its recurrent input comes from the previous
processed step's rows for b < n_prev and from h0/c0 for the others (a sequence that starts here,
which happens in the reverse direction of a packed batch); rows b >= n_next end here and also
write h_n/c_n. That one rule serves both directions and every batch-size profile.
"""

import functools

import triton
import triton.language as tl

from bigkern.kernels.epilogue import sigmoid, tanh, tanh_parts


@triton.jit
def _rows_times_matrix(a_rows, a_mask, m_ptr, stride_mk, offs_n, mask_n, K,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """acc[b, n] = sum_k A[b, k] * M[k, n] in fp32, where row b of A starts at pointer a_rows[b]
    (rows with a_mask false read as zero) and M[k, n] is at m_ptr + k * stride_mk + n."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=a_mask[:, None] & mask_k[None, :], other=0.0)
        m = tl.load(m_ptr + offs_k[:, None].to(tl.int64) * stride_mk + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a, m, input_precision=PRECISION)
    return acc


@triton.jit
def _previous_cell(cells_ptr, c0_ptr, prev_rows, offs_b, from_prev, offs_j, mask, H):
    """c_prev: the previous step's fp32 cells where the sequence goes on, else c0 (input dtype)."""
    carried = tl.load(cells_ptr + prev_rows[:, None] * H + offs_j[None, :], mask=mask & from_prev[:, None], other=0.0)
    initial = tl.load(c0_ptr + offs_b[:, None] * H + offs_j[None, :], mask=mask & ~from_prev[:, None], other=0.0)
    return tl.where(from_prev[:, None], carried, initial.to(tl.float32))


@triton.jit
def _hidden_grad(grad_out_ptr, grad_hn_ptr, dz_ptr, w_hh_ptr, offs_b, mask_b, offs_n, mask_n,
                 row, next_row, n_next, H, P,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The total gradient reaching h at this step, for rows offs_b and columns offs_n of P:
    grad_out[row + b] plus, where the sequence goes on (b < n_next), dZ_next[b] @ W_hh, else grad_h_n[b]."""
    goes_on = offs_b < n_next
    dz_rows = dz_ptr + (next_row + offs_b).to(tl.int64) * (4 * H)
    recurrent = _rows_times_matrix(dz_rows, mask_b & goes_on, w_hh_ptr, P, offs_n, mask_n, 4 * H,
                                   BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
    mask = mask_b[:, None] & mask_n[None, :]
    grad_out = tl.load(grad_out_ptr + (row + offs_b)[:, None].to(tl.int64) * P + offs_n[None, :],
                       mask=mask, other=0.0).to(tl.float32)
    grad_hn = tl.load(grad_hn_ptr + offs_b[:, None] * P + offs_n[None, :],
                      mask=mask & ~goes_on[:, None], other=0.0).to(tl.float32)
    return grad_out + tl.where(goes_on[:, None], recurrent, grad_hn)


# The row arguments change every step: do_not_specialize keeps one compiled kernel per shape
# (Triton would otherwise specialize ints on == 1 and on divisibility by 16).
@triton.jit(do_not_specialize=["row", "n_rows", "prev_row", "n_prev", "n_next"])
def lstm_forward_step_kernel(
    gx_ptr, stride_gx, w_hh_ptr, bias_ptr, h0_ptr, c0_ptr,
    out_ptr, cells_ptr, gates_ptr, r_ptr, hn_ptr, cn_ptr,
    row, n_rows, prev_row, n_prev, n_next, H, P,
    HAS_BIAS: tl.constexpr, PROJ: tl.constexpr, SAVE_GATES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One timestep for rows [row, row + n_rows) and hidden units [pid(0) * BLOCK_H, ...).

    gx: (N, 4H) rows with stride stride_gx; W_hh: (4H, P); h0: (B, P); c0: (B, H); out: (N, P), the
    previous step's rows are the recurrent input; cells (N, H) and gates (N, 4H) are fp32.
    Without PROJ, h goes to out (and h_n); with PROJ, r = o * tanh(c) goes to the (B, H) scratch r
    and the projection kernel writes out and h_n.
    """
    offs_j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_j = offs_j < H
    mask_b = offs_b < n_rows
    from_prev = offs_b < n_prev  # else the sequence starts here, from h0/c0
    rows = (row + offs_b).to(tl.int64)
    prev_rows = (prev_row + offs_b).to(tl.int64)

    # z_q = h_prev @ W_hh[q*H + j, :]^T for the four gates, sharing each loaded tile of h_prev, which
    # comes from the previous step's rows of out or, for sequences starting here, from h0: two masked
    # loads and a select of the values (a select of the pointers compiles, on Triton 3.8, to scalar
    # loads outside the cp.async pipeline).
    prev_h_rows = out_ptr + prev_rows * P
    first_h_rows = h0_ptr + offs_b * P
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    w_cols = w_hh_ptr + offs_j[None, :].to(tl.int64) * P  # W_hh[j, :] as the columns of a (K, BLOCK_H) tile
    gate_step = H * P
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < P
        h_mask = mask_b[:, None] & mask_k[None, :]
        h_prev = tl.load(prev_h_rows[:, None] + offs_k[None, :], mask=h_mask & from_prev[:, None], other=0.0)
        h_first = tl.load(first_h_rows[:, None] + offs_k[None, :], mask=h_mask & ~from_prev[:, None], other=0.0)
        h = tl.where(from_prev[:, None], h_prev, h_first)
        w_mask = mask_k[:, None] & mask_j[None, :]
        w = w_cols + offs_k[:, None]
        acc_i += tl.dot(h, tl.load(w, mask=w_mask, other=0.0), input_precision=PRECISION)
        acc_f += tl.dot(h, tl.load(w + gate_step, mask=w_mask, other=0.0), input_precision=PRECISION)
        acc_g += tl.dot(h, tl.load(w + 2 * gate_step, mask=w_mask, other=0.0), input_precision=PRECISION)
        acc_o += tl.dot(h, tl.load(w + 3 * gate_step, mask=w_mask, other=0.0), input_precision=PRECISION)

    mask = mask_b[:, None] & mask_j[None, :]
    gx = gx_ptr + rows[:, None] * stride_gx + offs_j[None, :]
    acc_i += tl.load(gx, mask=mask, other=0.0).to(tl.float32)
    acc_f += tl.load(gx + H, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.load(gx + 2 * H, mask=mask, other=0.0).to(tl.float32)
    acc_o += tl.load(gx + 3 * H, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc_i += tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0)[None, :]
        acc_f += tl.load(bias_ptr + H + offs_j, mask=mask_j, other=0.0)[None, :]
        acc_g += tl.load(bias_ptr + 2 * H + offs_j, mask=mask_j, other=0.0)[None, :]
        acc_o += tl.load(bias_ptr + 3 * H + offs_j, mask=mask_j, other=0.0)[None, :]
    i = sigmoid(acc_i)
    f = sigmoid(acc_f)
    g = tanh(acc_g)
    o = sigmoid(acc_o)

    c_prev = _previous_cell(cells_ptr, c0_ptr, prev_rows, offs_b, from_prev, offs_j, mask, H)
    c = f * c_prev + i * g
    h = o * tanh(c)

    tl.store(cells_ptr + rows[:, None] * H + offs_j[None, :], c, mask=mask)
    if SAVE_GATES:
        gates = gates_ptr + rows[:, None] * (4 * H) + offs_j[None, :]
        tl.store(gates, i, mask=mask)
        tl.store(gates + H, f, mask=mask)
        tl.store(gates + 2 * H, g, mask=mask)
        tl.store(gates + 3 * H, o, mask=mask)
    ends = mask & (offs_b >= n_next)[:, None]
    tl.store(cn_ptr + offs_b[:, None] * H + offs_j[None, :], c.to(cn_ptr.dtype.element_ty), mask=ends)
    if PROJ:
        tl.store(r_ptr + offs_b[:, None] * H + offs_j[None, :], h.to(r_ptr.dtype.element_ty), mask=mask)
    else:
        h = h.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * P + offs_j[None, :], h, mask=mask)
        tl.store(hn_ptr + offs_b[:, None] * P + offs_j[None, :], h, mask=ends)


@triton.jit(do_not_specialize=["row", "n_rows", "n_next"])
def lstm_projection_kernel(
    r_ptr, w_hr_ptr, out_ptr, hn_ptr, row, n_rows, n_next, H, P,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """h = r @ W_hr^T for one step (proj_size): r (B, H) scratch, W_hr (P, H); writes out rows and,
    for the sequences that end here, h_n."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_p = offs_p < P
    mask_b = offs_b < n_rows
    # M[k, p] = W_hr[p, k]: step 1 along k, H along p
    acc = _rows_times_matrix(r_ptr + offs_b * H, mask_b, w_hr_ptr, 1, offs_p * H, mask_p, H,
                             BLOCK_B, BLOCK_P, BLOCK_K, PRECISION)
    h = acc.to(out_ptr.dtype.element_ty)
    mask = mask_b[:, None] & mask_p[None, :]
    tl.store(out_ptr + (row + offs_b)[:, None].to(tl.int64) * P + offs_p[None, :], h, mask=mask)
    tl.store(hn_ptr + offs_b[:, None] * P + offs_p[None, :], h, mask=mask & (offs_b >= n_next)[:, None])


@triton.jit(do_not_specialize=["row", "n_rows", "next_row", "n_next"])
def lstm_hidden_grad_kernel(
    grad_out_ptr, grad_hn_ptr, dz_ptr, w_hh_ptr, dh_ptr, row, n_rows, next_row, n_next, H, P,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """With proj_size: the gradient reaching h (P wide) at this step, into dh rows (kept for dW_hr);
    the backward step kernel then takes dr = dh @ W_hr."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_p = offs_p < P
    mask_b = offs_b < n_rows
    dh = _hidden_grad(grad_out_ptr, grad_hn_ptr, dz_ptr, w_hh_ptr, offs_b, mask_b, offs_p, mask_p,
                      row, next_row, n_next, H, P, BLOCK_B, BLOCK_P, BLOCK_K, PRECISION)
    tl.store(dh_ptr + (row + offs_b)[:, None].to(tl.int64) * P + offs_p[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=["row", "n_rows", "prev_row", "n_prev", "next_row", "n_next"])
def lstm_backward_step_kernel(
    dz_ptr, grad_out_ptr, grad_hn_ptr, w_hh_ptr, dh_ptr, w_hr_ptr,
    gates_ptr, cells_ptr, c0_ptr, dc_ptr, grad_cn_ptr,
    row, n_rows, prev_row, n_prev, next_row, n_next, H, P,
    PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gate gradients of one timestep for rows [row, row + n_rows) and hidden units of pid(0).

    dz (N, 4H): written at this step's rows, read at the next processed step's (already done);
    dc (B, H) fp32 carries dc between steps in place: each element is read and written by one
    program, and after the sweep it holds grad c0 (a sequence's last backward step is its first).
    """
    offs_j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_j = offs_j < H
    mask_b = offs_b < n_rows
    mask = mask_b[:, None] & mask_j[None, :]
    rows = (row + offs_b).to(tl.int64)

    if PROJ:  # dr = dh @ W_hr, dh precomputed by lstm_hidden_grad_kernel
        dh = _rows_times_matrix(dh_ptr + rows * P, mask_b, w_hr_ptr, H, offs_j, mask_j, P,
                                BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    else:
        dh = _hidden_grad(grad_out_ptr, grad_hn_ptr, dz_ptr, w_hh_ptr, offs_b, mask_b, offs_j, mask_j,
                          row, next_row, n_next, H, P, BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)

    carry = dc_ptr + offs_b[:, None] * H + offs_j[None, :]
    goes_on = (offs_b < n_next)[:, None]
    dc_next = tl.where(goes_on, tl.load(carry, mask=mask & goes_on, other=0.0),
                       tl.load(grad_cn_ptr + offs_b[:, None] * H + offs_j[None, :], mask=mask & ~goes_on,
                               other=0.0).to(tl.float32))

    gates = gates_ptr + rows[:, None] * (4 * H) + offs_j[None, :]
    i = tl.load(gates, mask=mask, other=0.0)
    f = tl.load(gates + H, mask=mask, other=0.0)
    g = tl.load(gates + 2 * H, mask=mask, other=0.0)
    o = tl.load(gates + 3 * H, mask=mask, other=0.0)
    c = tl.load(cells_ptr + rows[:, None] * H + offs_j[None, :], mask=mask, other=0.0)
    c_prev = _previous_cell(cells_ptr, c0_ptr, (prev_row + offs_b).to(tl.int64), offs_b, offs_b < n_prev,
                            offs_j, mask, H)

    tanh_c, sech2_c = tanh_parts(c)
    dc = dc_next + dh * o * sech2_c
    dz_i = dc * g * i * (1.0 - i)
    dz_f = dc * c_prev * f * (1.0 - f)
    dz_g = dc * i * (1.0 - g * g)
    dz_o = dh * tanh_c * o * (1.0 - o)

    dz = dz_ptr + rows[:, None] * (4 * H) + offs_j[None, :]
    ty = dz_ptr.dtype.element_ty
    tl.store(dz, dz_i.to(ty), mask=mask)
    tl.store(dz + H, dz_f.to(ty), mask=mask)
    tl.store(dz + 2 * H, dz_g.to(ty), mask=mask)
    tl.store(dz + 3 * H, dz_o.to(ty), mask=mask)
    tl.store(carry, dc * f, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers. Tensors arrive validated and laid out by bigkern/ops/lstm.py; `steps` is the schedule
# of (row, n_rows, prev_row, n_prev, next_row, n_next) in processing order.

def _is_interpreted():
    from bigkern.dispatch import triton_interpreter_enabled

    return triton_interpreter_enabled()


# Tile configurations, largest first: (BLOCK_B, BLOCK_H, num_warps). tl.dot needs 16+ in every
# dimension, so a batch below 16 still takes a 16-row tile (rows past the batch are masked).
TILES = [(64, 32, 8), (32, 32, 4), (64, 16, 4), (32, 16, 4), (16, 32, 4), (16, 16, 4)]
INTERPRETER_TILES = (16, 16, 32, 4)  # (BLOCK_B, BLOCK_H, BLOCK_K, num_warps): small and quick


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles(batch, width, tensor):
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for a step over `batch` rows and `width` hidden units.

    Every step is a small GEMM whose weight tiles come from L2, so filling the SMs matters more
    than tile efficiency: take the largest tile that still gives about one program per SM (90%),
    else the one with the most programs. Row tiles never exceed the batch (rounded up to 16)."""
    if _is_interpreted():
        return INTERPRETER_TILES
    block_k = 64 if tensor.dtype.itemsize == 4 else 128
    sms = _multiprocessors(tensor.device.index or 0)
    rows = max(16, triton.next_power_of_2(batch))
    fitting = [t for t in TILES if t[0] <= rows] or [TILES[-1]]
    programs = [triton.cdiv(batch, bb) * triton.cdiv(width, bh) for bb, bh, _ in fitting]
    for (bb, bh, warps), count in zip(fitting, programs):
        if count * 10 >= sms * 9:
            return bb, bh, block_k, warps
    bb, bh, warps = fitting[programs.index(max(programs))]
    return bb, bh, block_k, warps


def _precision(dtype, allow_tf32):
    import torch

    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def forward(gx, w_hh, bias, w_hr, h0, c0, steps, out, cells, gates, r, hn, cn, *, allow_tf32=False):
    """Run the recurrence over `steps`; every output is allocated by the caller. allow_tf32: fp32
    products may round their operands to TF32 (torch's matmul setting, read by the caller)."""
    H, P, B = c0.shape[1], h0.shape[1], h0.shape[0]
    block_b, block_h, block_k, warps = _tiles(B, H, gx)
    precision = _precision(gx.dtype, allow_tf32)
    proj = w_hr is not None
    save = gates.numel() > 0
    grid_h = triton.cdiv(H, block_h)
    for row, n_rows, prev_row, n_prev, _next_row, n_next in steps:
        grid = (grid_h, triton.cdiv(n_rows, block_b))
        lstm_forward_step_kernel[grid](
            gx, gx.stride(0), w_hh, bias if bias is not None else cells, h0, c0,
            out, cells, gates if save else cells, r if proj else cells, hn, cn,
            row, n_rows, prev_row, n_prev, n_next, H, P,
            HAS_BIAS=bias is not None, PROJ=proj, SAVE_GATES=save,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, PRECISION=precision, num_warps=warps,
        )
        if proj:
            lstm_projection_kernel[(triton.cdiv(P, block_h), triton.cdiv(n_rows, block_b))](
                r, w_hr, out, hn, row, n_rows, n_next, H, P,
                BLOCK_B=block_b, BLOCK_P=block_h, BLOCK_K=block_k, PRECISION=precision, num_warps=warps,
            )


def backward(grad_out, grad_hn, grad_cn, w_hh, w_hr, gates, cells, c0, steps, dz, dh, dc, *, allow_tf32=False):
    """The backward sweep over `steps` (given in forward processing order; run in reverse).
    Writes dz (N, 4H), dh (N, P, with proj_size) and leaves grad c0 in dc (B, H) fp32."""
    H, P, B = cells.shape[1], grad_hn.shape[1], grad_hn.shape[0]
    block_b, block_h, block_k, warps = _tiles(B, H, dz)
    precision = _precision(dz.dtype, allow_tf32)
    proj = w_hr is not None
    grid_h = triton.cdiv(H, block_h)
    for row, n_rows, prev_row, n_prev, next_row, n_next in reversed(steps):
        grid_b = triton.cdiv(n_rows, block_b)
        if proj:
            lstm_hidden_grad_kernel[(triton.cdiv(P, block_h), grid_b)](
                grad_out, grad_hn, dz, w_hh, dh, row, n_rows, next_row, n_next, H, P,
                BLOCK_B=block_b, BLOCK_P=block_h, BLOCK_K=block_k, PRECISION=precision, num_warps=warps,
            )
        lstm_backward_step_kernel[(grid_h, grid_b)](
            dz, grad_out, grad_hn, w_hh, dh if proj else dz, w_hr if proj else w_hh,
            gates, cells, c0, dc, grad_cn,
            row, n_rows, prev_row, n_prev, next_row, n_next, H, P,
            PROJ=proj, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, PRECISION=precision, num_warps=warps,
        )
