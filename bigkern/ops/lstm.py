"""LSTM: one layer, one direction, over a whole sequence -- the recurrence as a registered op.

    gates_x = X @ W_ih^T                         one large GEMM over every timestep (torch)
    out, h_n, c_n = bigkern::lstm_layer(gates_x, W_hh, b_ih, b_hh, W_hr, h0, c0, ...)

`bigkern::lstm_layer` runs the recurrence (kernels/lstm.py: one fused kernel per timestep; or the
persistent CUDA kernel of csrc/lstm/, or a pure-PyTorch loop), saving c (fp32) and the activated
gates (fp32) for `bigkern::lstm_layer_backward`, which sweeps back through time with one fused
kernel per step and then forms every weight gradient as one large GEMM. Gate order is torch's
(i, f, g, o); biases are added in fp32 inside the kernel.

Rows: a batch of sequences is an (N, .) matrix of rows in time order -- dense (T*B rows, B per
step) or packed exactly like PackedSequence.data (batch_sizes[t] rows at step t, decreasing).
`batch_sizes=[]` means dense. The layers above (multi-layer, bidirectional, dropout, batch_first,
unbatched input, PackedSequence) are plain Python here and in bigkern/nn/rnn.py.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from bigkern import amp, dispatch, memory
from bigkern.ops.checks import check_like, check_same_device, check_tensor, type_name

# ---------------------------------------------------------------------------------------------
# The schedule: which rows each processing step owns and where its recurrent state comes from.


@functools.lru_cache(maxsize=256)
def schedule(batch_sizes: tuple, reverse: bool):
    """Steps in processing order, each (row, n_rows, prev_row, n_prev, next_row, n_next): the step
    owns rows [row, row + n_rows) (sequence b is row + b); its sequences b < n_prev continue from
    the previous processed step's rows (the others start from h0/c0), and those b >= n_next end
    here (they write h_n/c_n). Also returns, per sequence, the row of its first processed step."""
    offsets = [0]
    for size in batch_sizes:
        offsets.append(offsets[-1] + size)
    order = list(range(len(batch_sizes)))[::-1] if reverse else list(range(len(batch_sizes)))
    steps = []
    start_rows = [0] * (batch_sizes[0] if batch_sizes else 0)
    for s, t in enumerate(order):
        prev_t = order[s - 1] if s > 0 else None
        next_t = order[s + 1] if s + 1 < len(order) else None
        n_prev = batch_sizes[prev_t] if prev_t is not None else 0
        for b in range(n_prev, batch_sizes[t]):
            start_rows[b] = offsets[t] + b
        steps.append((offsets[t], batch_sizes[t],
                      offsets[prev_t] if prev_t is not None else 0, n_prev,
                      offsets[next_t] if next_t is not None else 0,
                      batch_sizes[next_t] if next_t is not None else 0))
    return tuple(steps), tuple(start_rows)


def _batch_sizes(batch_sizes, n_rows, batch):
    """The per-step batch sizes as a tuple; [] means dense (every step has the whole batch)."""
    if batch_sizes:
        return tuple(int(b) for b in batch_sizes)
    return (batch,) * (n_rows // batch if batch else 0)


def _previous_hidden(out, h0, batch_sizes, reverse):
    """(N, P): row n holds the h its step read (the previous processed step's row, or h0): the
    right operand of grad W_hh = dZ^T @ H_prev."""
    B, N = h0.shape[0], out.shape[0]
    if not batch_sizes:  # dense: a shift by one step
        return torch.cat([h0, out[:N - B]]) if not reverse else torch.cat([out[B:], h0])
    steps, _ = schedule(_batch_sizes(batch_sizes, N, B), reverse)
    index = [0] * N
    for row, n_rows, prev_row, n_prev, _, _ in steps:
        for b in range(n_rows):
            index[row + b] = prev_row + b if b < n_prev else N + b
    return torch.cat([out, h0])[torch.tensor(index, device=out.device)]


# ---------------------------------------------------------------------------------------------
# Outputs and the parts of backward every backend shares.

def state_dtype(dtype):
    """The dtype c and the saved gates are kept in: fp32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _allocate_forward(gx, w_hh, h0, c0, save):
    N, B, H, P = gx.shape[0], h0.shape[0], c0.shape[1], h0.shape[1]
    dev, dt = gx.device, gx.dtype
    out = memory.empty((N, P), dtype=dt, device=dev)
    hn = memory.empty((B, P), dtype=dt, device=dev)
    cn = memory.empty((B, H), dtype=dt, device=dev)
    gates = memory.empty((N, 4 * H) if save else (0,), dtype=state_dtype(dt), device=dev)
    cells = memory.empty((N, H), dtype=state_dtype(dt), device=dev)  # the recurrence's state; kept when saving
    return out, hn, cn, gates, cells


def _saved(cells, save):
    """The op returns c of every row only for backward; without it, an empty tensor."""
    return cells if save else cells.new_empty((0,))


def _weight_grads(dz, dh, dc, out, gates, cells, w_hh, w_hr, h0, batch_sizes, reverse):
    """From the gate gradients dz (N, 4H) of every row: the weight, bias and initial-state
    gradients, each one large GEMM or reduction."""
    B, H = h0.shape[0], cells.shape[1]
    grad_w_hh = dz.t().mm(_previous_hidden(out, h0, batch_sizes, reverse))
    grad_bias = dz.sum(0, dtype=state_dtype(dz.dtype))
    _, start_rows = schedule(_batch_sizes(batch_sizes, dz.shape[0], B), reverse)
    if not batch_sizes:
        first = dz[:B] if not reverse else dz[dz.shape[0] - B:]
    else:
        first = dz[torch.tensor(start_rows, device=dz.device)]
    grad_h0 = first.mm(w_hh)
    grad_c0 = dc.to(dz.dtype)
    if w_hr is None:
        grad_w_hr = dz.new_empty((0,))
    else:  # h = r @ W_hr^T with r = o * tanh(c): grad W_hr = dh^T @ r
        r = (gates[:, 3 * H:] * torch.tanh(cells)).to(dz.dtype)
        grad_w_hr = dh.t().mm(r)
    return grad_w_hh, grad_bias, grad_w_hr, grad_h0, grad_c0


# ---------------------------------------------------------------------------------------------
# The pure-PyTorch reference: the same rows, schedule and saved tensors as the kernels.

def _rows(source, start, count):
    return source[start:start + count]


def _state_rows(seq, h_init, prev_row, n_prev, n_rows, dtype):
    """Rows 0..n_rows-1 of the recurrent state: from the previous step where it goes on, else from
    the initial state."""
    carried = min(n_prev, n_rows)
    return torch.cat([_rows(seq, prev_row, carried).to(dtype), h_init[carried:n_rows].to(dtype)])


def _lstm_layer_torch(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save):
    out, hn, cn, gates, cells = _allocate_forward(gx, w_hh, h0, c0, save)
    B, N = h0.shape[0], gx.shape[0]
    steps, _ = schedule(_batch_sizes(batch_sizes, N, B), reverse)
    acc = state_dtype(gx.dtype)
    w = w_hh.to(acc).t()
    bias = sum(b.to(acc) for b in (b_ih, b_hh) if b is not None)
    for row, n, prev_row, n_prev, _, n_next in steps:
        h_prev = _state_rows(out, h0, prev_row, n_prev, n, acc)
        c_prev = _state_rows(cells, c0, prev_row, n_prev, n, acc)
        z = _rows(gx, row, n).to(acc) + h_prev.mm(w) + bias
        i, f, g, o = z.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c_prev + i * g
        h = (o * torch.tanh(c)).to(gx.dtype)
        if w_hr is not None:  # the kernels round r to the input dtype before projecting too
            h = h.to(acc).mm(w_hr.to(acc).t()).to(gx.dtype)
        cells[row:row + n] = c
        out[row:row + n] = h
        if save:
            gates[row:row + n] = torch.cat([i, f, g, o], 1)
        if n_next < n:
            hn[n_next:n] = h[n_next:]
            cn[n_next:n] = c[n_next:].to(cn.dtype)
    return out, hn, cn, gates, _saved(cells, save)


def _layer_in_torch_ops(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse):
    """The layer as a plain composition of torch's differentiable ops, with no op of bigkern's and
    no in-place write: what forward-mode AD and torch.func differentiate instead of the kernels
    (dispatch.autodiff_transform_reason). h and c are carried for the whole batch; a step updates
    its first n sequences (the others have ended, or, walking backwards, not started yet)."""
    acc = state_dtype(gx.dtype)
    steps, _ = schedule(_batch_sizes(batch_sizes, gx.shape[0], h0.shape[0]), reverse)
    bias = sum(b.to(acc) for b in (b_ih, b_hh) if b is not None)
    h, c = h0, c0.to(acc)
    out_rows = {}
    for row, n, *_ in steps:
        i, f, g, o = (_rows(gx, row, n).to(acc) + h[:n].to(acc).mm(w_hh.to(acc).t()) + bias).chunk(4, 1)
        c_step = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
        h_step = (torch.sigmoid(o) * torch.tanh(c_step)).to(gx.dtype)
        if w_hr is not None:  # rounded to the input dtype before projecting, as the kernels do
            h_step = h_step.to(acc).mm(w_hr.to(acc).t()).to(gx.dtype)
        h, c = torch.cat([h_step, h[n:]]), torch.cat([c_step, c[n:]])
        out_rows[row] = h_step
    out = torch.cat([out_rows[row] for row in sorted(out_rows)]) if out_rows else gx.new_empty((0, h0.shape[1]))
    return out, h, c.to(gx.dtype)


def _lstm_layer_backward_torch(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0,
                               batch_sizes, reverse):
    B, H, P, N = h0.shape[0], c0.shape[1], h0.shape[1], out.shape[0]
    dt = out.dtype
    steps, _ = schedule(_batch_sizes(batch_sizes, N, B), reverse)
    dz = memory.empty((N, 4 * H), dtype=dt, device=out.device)
    dh_all = memory.empty((N, P), dtype=dt, device=out.device) if w_hr is not None else None
    acc = state_dtype(dt)
    dc = memory.empty((B, H), dtype=acc, device=out.device)
    w = w_hh.to(acc)
    for row, n, prev_row, n_prev, next_row, n_next in reversed(steps):
        goes_on = min(n_next, n)
        dh = _rows(grad_out, row, n).to(acc) + torch.cat(
            [_rows(dz, next_row, goes_on).to(acc).mm(w), grad_hn[goes_on:n].to(acc)])
        if w_hr is not None:
            dh_all[row:row + n] = dh.to(dt)
            dh = dh_all[row:row + n].to(acc).mm(w_hr.to(acc))
        dc_next = torch.cat([dc[:goes_on], grad_cn[goes_on:n].to(acc)])
        i, f, g, o = _rows(gates, row, n).chunk(4, 1)
        c = _rows(cells, row, n)
        c_prev = _state_rows(cells, c0, prev_row, n_prev, n, acc)
        tanh_c = torch.tanh(c)
        dcc = dc_next + dh * o * (1 - tanh_c * tanh_c)
        dz[row:row + n] = torch.cat([dcc * g * i * (1 - i), dcc * c_prev * f * (1 - f), dcc * i * (1 - g * g),
                                     dh * tanh_c * o * (1 - o)], 1).to(dt)
        dc[:n] = dcc * f
    return (dz,) + _weight_grads(dz, dh_all, dc, out, gates, cells, w_hh, w_hr, h0, batch_sizes, reverse)


# ---------------------------------------------------------------------------------------------
# Implementations and the reasons each cannot serve a call.

def _dtype_reason(gx):
    if gx.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32, not {gx.dtype}"
    return None


def _triton_unsupported(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, *rest):
    return (dispatch.triton_unsupported(gx, w_hh, h0, c0) or dispatch.triton_dot_unsupported(gx, w_hh)
            or _dtype_reason(gx))


def _backward_triton_unsupported(grad_out, grad_hn, grad_cn, out, gates, *rest):
    return (dispatch.triton_unsupported(grad_out, out, gates) or dispatch.triton_dot_unsupported(grad_out, out)
            or _dtype_reason(out))


def _always(*args):
    return None


def _kernel_layout(gx, w_hh, b_ih, b_hh, w_hr, h0, c0):
    """What the kernels index: gates_x rows of unit column stride; everything else contiguous."""
    if gx.shape[1] and gx.stride(1) != 1:
        gx = gx.contiguous()
    return (gx, w_hh.contiguous(), None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous(), None if w_hr is None else w_hr.contiguous(),
            h0.contiguous(), c0.contiguous())


def _combined_bias(b_ih, b_hh):
    if b_ih is None and b_hh is None:
        return None
    return sum(b.float() for b in (b_ih, b_hh) if b is not None)


LSTM_LAYER = dispatch.Op("lstm_layer")
LSTM_LAYER_BACKWARD = dispatch.Op("lstm_layer_backward")


# The persistent CUDA kernel (csrc/lstm/): W_hh resident on chip for the whole sequence. Registered
# first: `auto` prefers it where it can serve (small batches, W_hh fits) once verified on a GPU.

CUDA_KERNELS = dispatch.CompiledKernels()  # lstm_persistent_plan, lstm_persistent_forward, _backward


def _cuda_unsupported(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save):
    reason = CUDA_KERNELS.unsupported([gx, w_hh, h0, c0]) or _dtype_reason(gx)
    if reason:
        return reason
    if w_hr is not None:
        return "the persistent kernel has no proj_size projection (it would need a second grid barrier a step)"
    if batch_sizes:
        return "the persistent kernel takes dense batches, not variable lengths (PackedSequence)"
    return persistent_plan_reason(w_hh, h0.shape[0], backward=save)


def _backward_cuda_unsupported(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0, batch_sizes,
                               reverse):
    reason = CUDA_KERNELS.unsupported([grad_out, out, gates]) or _dtype_reason(out)
    if reason:
        return reason
    if w_hr is not None:
        return "the persistent kernel has no proj_size projection"
    if batch_sizes:
        return "the persistent kernel takes dense batches, not variable lengths (PackedSequence)"
    return persistent_plan_reason(w_hh, h0.shape[0], backward=True)


def persistent_plan_reason(w_hh, batch, backward=False):
    """Why the persistent kernel cannot hold this W_hh (and batch) on chip, or None. The binding
    asks the device: SM count, opt-in shared memory per block, cooperative launch support."""
    reason = CUDA_KERNELS.lstm_persistent_plan(w_hh, batch, backward)
    return reason or None


@LSTM_LAYER.register("cuda", _cuda_unsupported, auto=False)
def _lstm_layer_cuda(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save):
    gx, w_hh, b_ih, b_hh, w_hr, h0, c0 = _kernel_layout(gx, w_hh, b_ih, b_hh, w_hr, h0, c0)
    N, B, H, dev = gx.shape[0], h0.shape[0], c0.shape[1], gx.device
    out = memory.empty((N, H), dtype=gx.dtype, device=dev)
    hn, cn = memory.empty((B, H), dtype=gx.dtype, device=dev), memory.empty((B, H), dtype=gx.dtype, device=dev)
    # c stays in registers for the whole sequence: every row's c and the gates are stored only for backward
    gates = memory.empty((N, 4 * H) if save else (0,), dtype=torch.float32, device=dev)
    cells = memory.empty((N, H) if save else (0,), dtype=torch.float32, device=dev)
    if N and H:
        CUDA_KERNELS.lstm_persistent_forward(gx, w_hh, _combined_bias(b_ih, b_hh), h0, c0, out,
                                             cells if save else None, gates if save else None, hn, cn, reverse)
    return out, hn, cn, gates, cells


@LSTM_LAYER_BACKWARD.register("cuda", _backward_cuda_unsupported, auto=False)
def _lstm_layer_backward_cuda(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0, batch_sizes,
                              reverse):
    B, H, N = h0.shape[0], c0.shape[1], out.shape[0]
    w_hh, c0 = w_hh.contiguous(), c0.contiguous()
    dz = memory.empty((N, 4 * H), dtype=out.dtype, device=out.device)
    dc = memory.empty((B, H), dtype=torch.float32, device=out.device)
    if N and H:
        CUDA_KERNELS.lstm_persistent_backward(grad_out.contiguous(), grad_hn.contiguous(), grad_cn.contiguous(),
                                              w_hh, gates, cells, c0, dz, dc, reverse)
    else:
        dc.zero_()
    return (dz,) + _weight_grads(dz, None, dc, out, gates, cells, w_hh, None, h0, batch_sizes, reverse)


@LSTM_LAYER.register("triton", _triton_unsupported)
def _lstm_layer_triton(gx, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save):
    from bigkern.kernels import lstm as kernels

    gx, w_hh, b_ih, b_hh, w_hr, h0, c0 = _kernel_layout(gx, w_hh, b_ih, b_hh, w_hr, h0, c0)
    out, hn, cn, gates, cells = _allocate_forward(gx, w_hh, h0, c0, save)
    B, H, N = h0.shape[0], c0.shape[1], gx.shape[0]
    steps, _ = schedule(_batch_sizes(batch_sizes, N, B), reverse)
    r = memory.empty((B, H), dtype=gx.dtype, device=gx.device) if w_hr is not None else None
    if steps and H:
        kernels.forward(gx, w_hh, _combined_bias(b_ih, b_hh), w_hr, h0, c0, steps, out, cells, gates, r, hn, cn,
                        allow_tf32=amp.tf32_allowed("matmul"))
    return out, hn, cn, gates, _saved(cells, save)


@LSTM_LAYER_BACKWARD.register("triton", _backward_triton_unsupported)
def _lstm_layer_backward_triton(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0,
                                batch_sizes, reverse):
    from bigkern.kernels import lstm as kernels

    B, H, P, N = h0.shape[0], c0.shape[1], h0.shape[1], out.shape[0]
    w_hh, h0, c0 = w_hh.contiguous(), h0.contiguous(), c0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    grad_out, grad_hn, grad_cn = grad_out.contiguous(), grad_hn.contiguous(), grad_cn.contiguous()
    steps, _ = schedule(_batch_sizes(batch_sizes, N, B), reverse)
    dz = memory.empty((N, 4 * H), dtype=out.dtype, device=out.device)
    dh = memory.empty((N, P), dtype=out.dtype, device=out.device) if w_hr is not None else None
    dc = memory.empty((B, H), dtype=torch.float32, device=out.device)
    if steps and H:
        kernels.backward(grad_out, grad_hn, grad_cn, w_hh, w_hr, gates, cells, c0, steps, dz, dh, dc,
                         allow_tf32=amp.tf32_allowed("matmul"))
    else:
        dc.zero_()
    return (dz,) + _weight_grads(dz, dh, dc, out, gates, cells, w_hh, w_hr, h0, batch_sizes, reverse)


LSTM_LAYER.register("torch", _always)(_lstm_layer_torch)
LSTM_LAYER_BACKWARD.register("torch", _always)(_lstm_layer_backward_torch)


# ---------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, torch.export and autograd see.

@torch.library.custom_op("bigkern::lstm_layer", mutates_args=())
def lstm_layer_op(gates_x: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                  w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, batch_sizes: list[int], reverse: bool,
                  save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out (N, P), h_n (B, P), c_n (B, H), and in the state dtype (fp32, or float64): gates (N, 4H) when
    `save` else empty, cells (N, H) when `save` else empty)."""
    return LSTM_LAYER(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save)


@lstm_layer_op.register_fake
def _(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save):
    N, B, H, P = gates_x.shape[0], h0.shape[0], c0.shape[1], h0.shape[1]
    acc = state_dtype(gates_x.dtype)
    return (gates_x.new_empty((N, P)), gates_x.new_empty((B, P)), gates_x.new_empty((B, H)),
            gates_x.new_empty((N, 4 * H) if save else (0,), dtype=acc),
            gates_x.new_empty((N, H) if save else (0,), dtype=acc))


@torch.library.custom_op("bigkern::lstm_layer_backward", mutates_args=())
def lstm_layer_backward_op(grad_out: Tensor, grad_hn: Tensor, grad_cn: Tensor, out: Tensor, gates: Tensor,
                           cells: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                           batch_sizes: list[int], reverse: bool
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad gates_x, grad W_hh, grad bias (in the state dtype), grad W_hr (empty without), grad h0, grad c0)."""
    return LSTM_LAYER_BACKWARD(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0, batch_sizes,
                               reverse)


@lstm_layer_backward_op.register_fake
def _(grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0, batch_sizes, reverse):
    N, H = out.shape[0], c0.shape[1]
    return (out.new_empty((N, 4 * H)), w_hh.new_empty(w_hh.shape), out.new_empty((4 * H,), dtype=cells.dtype),
            out.new_empty(w_hr.shape if w_hr is not None else (0,)), h0.new_empty(h0.shape), c0.new_empty(c0.shape))


def _setup_context(ctx, inputs, output):
    gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save = inputs
    out, _, _, gates, cells = output
    # one step (an LSTMCell): its input projection is no bigger than the gates, so it is kept for a
    # backward with create_graph=True, which recomputes the step in torch's ops
    # Called with save=False yet differentiated: a graph traced without grad (torch.export under
    # no_grad) run with grad later. Its input projection is kept to recompute the forward with save.
    ctx.one_step = not batch_sizes and gates_x.shape[0] == h0.shape[0]
    kept = (gates_x, b_ih, b_hh) if ctx.one_step or not save else (None, None, None)
    ctx.save_for_backward(out, gates, cells, w_hh, w_hr, h0, c0, *kept)
    ctx.args = (batch_sizes, reverse, save)
    ctx.bias_dtypes = (None if b_ih is None else b_ih.dtype, None if b_hh is None else b_hh.dtype)


def _backward(ctx, grad_out, grad_hn, grad_cn, _grad_gates, _grad_cells):
    out, gates, cells, w_hh, w_hr, h0, c0, gates_x, b_ih, b_hh = ctx.saved_tensors
    batch_sizes, reverse, save = ctx.args
    if ctx.one_step and dispatch.backward_is_differentiated():
        def forward(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0):
            return _layer_in_torch_ops(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse)

        grads = dispatch.gradients_by_torch("lstm_layer", forward, (gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0),
                                            (grad_out, grad_hn, grad_cn), ctx.needs_input_grad[:7])
        return (*grads, None, None, None)
    if not save:
        out, _, _, gates, cells = lstm_layer_op(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, True)
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_hn = torch.zeros_like(h0) if grad_hn is None else grad_hn
    grad_cn = torch.zeros_like(c0) if grad_cn is None else grad_cn
    dz, grad_w_hh, grad_bias, grad_w_hr, grad_h0, grad_c0 = lstm_layer_backward_op(
        grad_out, grad_hn, grad_cn, out, gates, cells, w_hh, w_hr, h0, c0, batch_sizes, reverse)
    grad_b_ih, grad_b_hh = (None if dtype is None else grad_bias.to(dtype) for dtype in ctx.bias_dtypes)
    return (dz, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr if w_hr is not None else None, grad_h0, grad_c0,
            None, None, None)


lstm_layer_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    # the recurrence would have to be recomputed from the input projection, which is not kept
    raise RuntimeError("bigkern's LSTM has no double backward over a sequence (differentiating gradients taken "
                       "with create_graph=True), like cuDNN's LSTM (LSTMCell has one): differentiate twice through "
                       "torch.nn.LSTM itself (bigkern.unpatch), or through torch.func.grad, which runs torch's ops")


lstm_layer_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Python entry points: validate like torch, naming the argument, then call the registered op.

def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_shape(t, name, expected, fn):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise RuntimeError(f"{fn}(): argument '{name}' must have shape {tuple(expected)}, but got {tuple(t.shape)}")


def _check_weights(input, w_ih, w_hh, b_ih, b_hh, w_hr, fn, suffix=""):
    """Shapes of one layer's parameters against each other and the input; returns (H, P)."""
    for name, t, optional in (("weight_ih", w_ih, False), ("weight_hh", w_hh, False), ("bias_ih", b_ih, True),
                              ("bias_hh", b_hh, True), ("weight_hr", w_hr, True)):
        check_tensor(t, name + suffix, f"{fn}()", optional=optional)
        check_like(t, name + suffix, input, "input", f"{fn}()")
    if w_ih.dim() != 2 or w_ih.shape[0] % 4:
        raise RuntimeError(f"{fn}(): argument 'weight_ih{suffix}' must be (4*hidden_size, input_size), "
                           f"but got {tuple(w_ih.shape)}")
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    if w_ih.shape[1] != input.shape[-1]:
        raise RuntimeError(f"{fn}(): input has inconsistent input_size: got {input.shape[-1]} expected "
                           f"{w_ih.shape[1]} (the width of 'weight_ih{suffix}')")
    _check_shape(w_hh, "weight_hh" + suffix, (4 * H, P), fn)
    _check_shape(b_ih, "bias_ih" + suffix, (4 * H,), fn)
    _check_shape(b_hh, "bias_hh" + suffix, (4 * H,), fn)
    if w_hr is not None:
        _check_shape(w_hr, "weight_hr" + suffix, (P, H), fn)
    return H, P


def _size_read_error(fn, name, t, dim, expected):
    """torch reads t.size(dim) before it checks t's dimensions: its IndexError, naming the argument."""
    return IndexError(f"{fn}(): Dimension out of range (expected to be in range of [-{t.dim()}, {t.dim() - 1}], "
                      f"but got {dim}) (argument '{name}' must be {expected})")


def _check_packed_hx_dims(hx, fn):
    """torch's packed LSTM reads hx[i].size(2) before any other check of hx: its IndexError."""
    if isinstance(hx, (tuple, list)):
        for i, t in enumerate(hx):
            if isinstance(t, Tensor) and t.dim() < 3:
                raise _size_read_error(fn, f"hx[{i}]", t, 2, "3-D")


# torch's CPU LSTM computes in complex dtypes too (its composite ops): such calls are its own
COMPLEX_REASON = "complex inputs: bigkern's LSTM kernels compute in real dtypes (torch's CPU LSTM serves complex)"


def is_complex_call(input) -> bool:
    data = input.data if isinstance(input, torch.nn.utils.rnn.PackedSequence) else input
    return isinstance(data, Tensor) and data.is_complex()


def _check_input(input, fn):
    check_tensor(input, "input", f"{fn}()")
    if not input.is_floating_point():
        raise RuntimeError(f"{fn}(): argument 'input' must be a floating-point tensor, not {input.dtype}")


def packed_batch_sizes(batch_sizes, n_rows, fn):
    """A PackedSequence's batch sizes as a list: a 1-d CPU int64 tensor of positive, non-increasing
    sizes (all pack_padded_sequence makes; the kernels index rows by them) adding up to at most the
    data's rows. torch raises RuntimeError for anything else, mostly from deep inside its loop;
    here before any kernel runs. Rows past the sum are ignored, as torch ignores them."""
    check_tensor(batch_sizes, "batch_sizes", f"{fn}()")
    if batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"{fn}(): argument 'batch_sizes': expected scalar type Long but found {batch_sizes.dtype}")
    if batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu":
        raise RuntimeError(f"{fn}(): argument 'batch_sizes' must be a 1-d CPU tensor, but got shape "
                           f"{tuple(batch_sizes.shape)} on {batch_sizes.device}")
    sizes = batch_sizes.tolist()
    if not sizes:  # torch reads batch_sizes[0] first
        raise IndexError(f"{fn}(): index 0 is out of bounds for dimension 0 with size 0 (argument 'batch_sizes' "
                         f"is empty)")
    if any(size < 1 for size in sizes) or any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        raise RuntimeError(f"{fn}(): argument 'batch_sizes' must be positive and non-increasing (as "
                           f"pack_padded_sequence makes them), but got {sizes}")
    if sum(sizes) > n_rows:
        raise RuntimeError(f"{fn}(): argument 'batch_sizes' adds up to {sum(sizes)} rows, but the packed "
                           f"data has {n_rows}")
    return sizes


def _run_layer(x2d, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, gates_bias=None):
    """One layer, one direction over rows x2d (N, I): the input projection as one GEMM (plus
    `gates_bias`, biases that are not one vector), then the recurrence op. Returns (out (N, P), h_n, c_n)."""
    gates_x = torch.nn.functional.linear(x2d, w_ih)
    if gates_bias is not None:
        gates_x = gates_x + gates_bias
    reason = dispatch.autodiff_transform_reason(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0)
    if reason is not None:
        return dispatch.served_by_torch("lstm_layer", reason, _layer_in_torch_ops, gates_x, w_hh, b_ih, b_hh, w_hr,
                                        h0, c0, batch_sizes, reverse)
    save = _needs_grad(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0)
    out, hn, cn, _, _ = lstm_layer_op(gates_x, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse, save)
    return out, hn, cn


def _cast_floats(value, dtype):
    if isinstance(value, Tensor):
        return value.to(dtype) if amp.is_castable(value) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _autocast_like_torch(cast_devices, composite_on_cpu=False, cpu_paths=False):
    """Autocast as torch applies it to LSTMs: on the devices whose autocast lists the op as lower
    precision, every floating argument but float64 is cast to the autocast dtype -- CUDA for
    lstm_cell and whole LSTMs (cuDNN), and also CPU for whole LSTMs (oneDNN's mkldnn_rnn_layer is
    on CPU autocast's list; lstm_cell is not). Elsewhere dtypes are kept. Either way the math inside
    is not autocast piece by piece -- except that on CPU an LSTM with projections is not oneDNN's:
    torch runs it op by op, so its cell state stays in the dtype it came in (c_n float32 for float32
    or no c0) while the output and h_n come out of the projection's autocast matmul.
    composite_on_cpu (lstm_cell): torch's CPU cell is a composition whose gate matmuls autocast and
    whose cell update promotes, so h_1 and c_1 come out in promote(autocast dtype, c0's dtype);
    computing in that dtype gives those dtypes (and takes a bfloat16 input to float32 weights).
    cpu_paths (torch.lstm): where oneDNN does not take the call (packed input, or an input dtype it
    refuses), torch's CPU LSTM is that same composition, step by step: without projections its
    outputs come out in promote(autocast dtype, c0's dtype) too."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(input, *args, **kwargs):
            if not isinstance(input, Tensor) or not amp.autocast_enabled(input.device.type):
                return fn(input, *args, **kwargs)
            device_type = input.device.type
            with torch.autocast(device_type, enabled=False):
                if device_type == "cpu" and (composite_on_cpu or cpu_paths and _cpu_lstm_is_composite(input, args)):
                    dtype = torch.promote_types(torch.get_autocast_dtype("cpu"),
                                                _cell_state_dtype(input, args, kwargs))
                    if dtype != torch.float64:
                        input, args, kwargs = _cast_floats((input, args, kwargs), dtype)
                    return fn(input, *args, **kwargs)
                if device_type not in cast_devices:
                    return fn(input, *args, **kwargs)
                dtype = torch.get_autocast_dtype(device_type)
                state_dtype_in = _cell_state_dtype(input, args, kwargs)
                input, args, kwargs = _cast_floats((input, args, kwargs), dtype)
                result = fn(input, *args, **kwargs)
            if device_type == "cpu":
                result = _keep_cell_state_dtype_with_projection(result, torch.promote_types(state_dtype_in, dtype))
            return result
        return wrapper
    return decorate


def _cpu_lstm_is_composite(input, args) -> bool:
    """Whether torch.lstm on CPU runs step by step in torch's ops (oneDNN refuses packed input, and
    inputs of a dtype it cannot take here: torch's use_mkldnn) with no projection (with one, the
    projection's matmul sets h's dtype: the general rule and _keep_cell_state_dtype_with_projection)."""
    packed = _packed_overload(args)
    params = args[2] if packed else (args[1] if len(args) > 1 else None)
    if not isinstance(params, (tuple, list)) or len(params) < 2 or not isinstance(params[1], Tensor) \
            or params[1].dim() != 2 or params[1].shape[1] != params[1].shape[0] // 4:
        return False  # projections (w_hh (4H, P), P != H), or arguments the call itself will refuse
    if packed:
        return True
    mkldnn = torch.backends.mkldnn
    takes = {torch.float32: True,
             torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
             torch.float16: not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    return not (mkldnn.is_available() and mkldnn.enabled and takes.get(input.dtype, False) and input.numel() != 0)


def _packed_overload(args) -> bool:
    """Whether the arguments after the input are torch.lstm's packed overload's (batch_sizes, hx, params, ...)."""
    return bool(args) and isinstance(args[0], Tensor)


def _cell_state_dtype(input, args, kwargs):
    """The dtype of the c0 an LSTM call passes (input's when it passes none): hx is the first
    argument after the input, or after batch_sizes in torch.lstm's packed overload."""
    hx = kwargs.get("hx", args[1] if _packed_overload(args) and len(args) > 1 else (args[0] if args else None))
    if isinstance(hx, (tuple, list)) and len(hx) == 2 and isinstance(hx[1], Tensor):
        return hx[1].dtype
    return input.dtype


def _keep_cell_state_dtype_with_projection(result, dtype):
    """(out, h_n, c_n) or (out, (h_n, c_n)): with projections (h narrower than c), c_n in `dtype`."""
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        return result
    h_n, c_n = result[1] if len(result) == 2 else result[1:]
    if h_n.shape[-1] == c_n.shape[-1] or c_n.dtype == dtype:
        return result
    c_n = c_n.to(dtype)
    return (result[0], (h_n, c_n)) if len(result) == 2 else (result[0], h_n, c_n)


@_autocast_like_torch(("cuda", "cpu"))
@dispatch.entry_point
def lstm_layer(input: Tensor, hx: Optional[tuple] = None, weight_ih: Tensor = None, weight_hh: Tensor = None,
               bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
               weight_hr: Optional[Tensor] = None, *, reverse: bool = False,
               batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in one direction over a whole sequence, fused forward and backward.

    input: (T, B, input_size), or PackedSequence data (N, input_size) with its `batch_sizes`.
    hx: (h0 (B, P), c0 (B, hidden_size)) or None for zeros; P = proj_size (weight_hr's rows) or
    hidden_size. Returns (output (T, B, P) or (N, P), (h_n (B, P), c_n (B, hidden_size))); with
    batch_sizes, h_n/c_n are each sequence's state at its own last step.
    """
    fn = "lstm_layer"
    _check_input(input, fn)
    H, P = _check_weights(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, fn)
    if batch_sizes is not None:
        if input.dim() != 2:
            raise RuntimeError(f"{fn}(): packed 'input' must have 2 dimensions, got {input.dim()}")
        sizes = [int(b) for b in batch_sizes]
        B = sizes[0] if sizes else 0
        x2d = input
    else:
        if input.dim() != 3:
            raise RuntimeError(f"{fn}(): 'input' must have 3 dimensions (seq_len, batch, input_size), "
                               f"got {input.dim()}")
        if input.shape[0] == 0:
            raise RuntimeError(f"{fn}(): Expected sequence length to be larger than 0 in RNN (argument 'input')")
        sizes, B = [], input.shape[1]
        x2d = input.reshape(-1, input.shape[-1])
    h0, c0 = _initial_state(hx, input, (B, P), (B, H), fn)
    out, hn, cn = _run_layer(x2d, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, sizes, reverse)
    if batch_sizes is None:
        out = out.view(input.shape[0], B, P)
    return out, (hn, cn)


def _initial_state(hx, input, h_shape, c_shape, fn, names=("hx[0]", "hx[1]"), cell_state_promotes=False):
    """(h0, c0), zeros when hx is None. cell_state_promotes (torch's cell, a composition): c0 may be
    of another floating dtype, which the update c1 = f c0 + i g promotes to."""
    if hx is None:
        zeros = dict(dtype=input.dtype, device=input.device)
        return torch.zeros(h_shape, **zeros), torch.zeros(c_shape, **zeros)
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"{fn}(): argument 'hx' must be tuple of Tensors, not {type_name(hx)}")
    if len(hx) != 2:  # torch's wording and type, then the argument's name
        raise RuntimeError(f"{fn} expects two hidden states (argument 'hx' has {len(hx)})")
    h0, c0 = hx
    for t, name, shape in ((h0, names[0], h_shape), (c0, names[1], c_shape)):
        check_tensor(t, name, f"{fn}()")
        if t is c0 and cell_state_promotes and c0.is_floating_point() and input.is_floating_point():
            check_same_device(t, name, input, "input", f"{fn}()")
        else:
            check_like(t, name, input, "input", f"{fn}()")
        _check_shape(t, name, shape, fn)
    return h0, c0


@_autocast_like_torch(("cuda",), composite_on_cpu=True)
@dispatch.entry_point
def lstm_cell(input: Tensor, hx: Optional[tuple], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch.lstm_cell's signature: input (B, input_size), hx (h (B, H), c (B, H))
    or None for zeros; returns (h_1, c_1)."""
    fn = "lstm_cell"
    if is_complex_call(input):
        return dispatch.served_by_torch(fn, COMPLEX_REASON, torch.lstm_cell, input, hx, w_ih, w_hh, b_ih, b_hh)
    _check_input(input, fn)
    for name, t in (("input", input), ("weight_ih", w_ih)):
        if isinstance(t, Tensor) and t.dim() < 2:  # torch reads their size(1) first: IndexError
            raise _size_read_error(fn, name, t, 1, "2-D")
    if input.dim() != 2:
        raise RuntimeError(f"{fn}(): 'input' must have 2 dimensions (batch, input_size), got {input.dim()}")
    # torch adds the biases by broadcasting, so (1,), (1, 4H) and per-row (B, 4H) biases work too:
    # those join the input projection (where any bias may go: the gates sum them all)
    gates_bias = None
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if (isinstance(b, Tensor) and isinstance(w_ih, Tensor) and w_ih.dim() == 2
                and (b.dim() != 1 or b.shape[0] != w_ih.shape[0])):
            check_like(b, name, input, "input", f"{fn}()")
            try:
                b = b.expand(input.shape[0], w_ih.shape[0])
            except RuntimeError as error:
                raise RuntimeError(f"{fn}(): argument '{name}' of shape {tuple(b.shape)} does not broadcast to the "
                                   f"gates' {(input.shape[0], w_ih.shape[0])}: {error}") from None
            gates_bias = b if gates_bias is None else gates_bias + b
            b_ih, b_hh = (None, b_hh) if name == "bias_ih" else (b_ih, None)
    H, _ = _check_weights(input, w_ih, w_hh, b_ih, b_hh, None, fn)
    B = input.shape[0]
    if hx is not None and isinstance(hx, (tuple, list)) and len(hx) == 2:
        # torch's wording (it calls hx[i] "hidden<i>"), then the argument's name
        for i, t in enumerate(hx):
            if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] != B:
                raise RuntimeError(f"{fn}(): Input batch size {B} doesn't match hidden{i} batch size {t.shape[0]} "
                                   f"(argument 'hx[{i}]')")
            if isinstance(t, Tensor) and t.dim() == 1:  # torch reads hx[i].size(1) next: IndexError
                raise _size_read_error(fn, f"hx[{i}]", t, 1, "(batch, hidden_size)")
            if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[1] != H:
                raise RuntimeError(f"{fn}(): hidden{i} has inconsistent hidden_size: got {t.shape[1]}, expected {H} "
                                   f"(argument 'hx[{i}]')")
    h0, c0 = _initial_state(hx, input, (B, H), (B, H), fn, cell_state_promotes=True)
    if c0.dtype != input.dtype:  # as torch's: h_1 and c_1 in promote(input's dtype, c0's)
        dtype = torch.promote_types(input.dtype, c0.dtype)
        input, w_ih, w_hh, b_ih, b_hh, h0, c0, gates_bias = _cast_floats(
            (input, w_ih, w_hh, b_ih, b_hh, h0, c0, gates_bias), dtype)
    # h_n, not the step's output rows (the same values): those are kept for backward, and torch's
    # cell lets code change the h it returns in place (zoneout)
    _, hn, cn = _run_layer(input, w_ih, w_hh, b_ih, b_hh, None, h0, c0, [], False, gates_bias)
    return hn, cn


@_autocast_like_torch(("cuda", "cpu"), cpu_paths=True)
@dispatch.entry_point
def lstm(input: Tensor, hx, params, has_biases: bool, num_layers: int, dropout: float, train: bool,
         bidirectional: bool, batch_first=False):
    """torch.lstm (what torch.nn.LSTM calls), both overloads:

        lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        lstm(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)

    params: per layer and direction, w_ih, w_hh[, b_ih, b_hh][, w_hr], as nn.LSTM._flat_weights.
    Returns (output, h_n, c_n). Dropout between layers uses torch's dropout (and RNG).
    """
    fn = "lstm"
    if is_complex_call(input):
        return dispatch.served_by_torch(fn, COMPLEX_REASON, torch.lstm, input, hx, params, has_biases, num_layers,
                                        dropout, train, bidirectional, batch_first)
    if isinstance(hx, Tensor):  # the packed overload: (data, batch_sizes, hx, params, ...)
        if not (params is None or isinstance(params, (tuple, list))) or not isinstance(has_biases, (tuple, list)):
            # neither overload fits (e.g. a bare tensor as hx): torch's argument parser's TypeError
            raise TypeError(f"{fn}() received an invalid combination of arguments: expected (input, hx, params, "
                            f"has_biases, ...) with hx and params sequences of Tensors, or (data, batch_sizes, hx, "
                            f"params, ...); got hx of type Tensor")
        data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional = (
            input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        _check_input(data, fn)
        _check_packed_hx_dims(hx, fn)
        sizes = packed_batch_sizes(batch_sizes, data.shape[0] if data.dim() else 0, fn)
        data = data[:sum(sizes)]
        return _lstm_layers(data, sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional, fn)
    _check_input(input, fn)
    if isinstance(hx, (tuple, list)):
        for i, t in enumerate(hx):  # torch reads hx[i].size(2) (and input's) first: IndexError
            if isinstance(t, Tensor) and t.dim() < 3:
                raise _size_read_error(fn, f"hx[{i}]", t, 2, "3-D")
    if input.dim() < 3:
        raise _size_read_error(fn, "input", input, 2, "3-D")
    if input.dim() != 3:
        raise RuntimeError(f"{fn}(): 'input' must have 3 dimensions, got {input.dim()}")
    x = input.transpose(0, 1) if batch_first else input
    T, B = x.shape[0], x.shape[1]
    if T == 0:
        raise RuntimeError(f"{fn}(): Expected sequence length to be larger than 0 in RNN (argument 'input')")
    out, hn, cn = _lstm_layers(x.reshape(T * B, x.shape[2]), [], hx, params, has_biases, num_layers, dropout,
                               train, bidirectional, fn, batch=B)
    out = out.view(T, B, out.shape[-1])
    return (out.transpose(0, 1) if batch_first else out), hn, cn


def _lstm_layers(x2d, sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional, fn, batch=None):
    """Stacked (and bidirectional) layers over rows x2d; sizes=[] means dense with `batch` per step."""
    directions = 2 if bidirectional else 1
    per_layer = len(params) // (num_layers * directions) if num_layers * directions else 0
    has_proj = per_layer == (5 if has_biases else 3)
    if per_layer not in ((4, 5) if has_biases else (2, 3)) or per_layer * num_layers * directions != len(params):
        raise RuntimeError(f"{fn}(): got an incorrect number of LSTM parameters ({len(params)} for "
                           f"num_layers={num_layers}, bidirectional={bidirectional}, has_biases={has_biases})")
    B = sizes[0] if sizes else batch
    H = params[0].shape[0] // 4
    P = params[per_layer - 1].shape[0] if has_proj else H
    shape_h, shape_c = (num_layers * directions, B, P), (num_layers * directions, B, H)
    h0, c0 = _initial_state(hx, x2d, shape_h, shape_c, fn)
    layer_input, h_n, c_n = x2d, [], []
    for layer in range(num_layers):
        if layer and dropout and train:
            layer_input = torch.nn.functional.dropout(layer_input, dropout, True)
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weights = list(params[index * per_layer:(index + 1) * per_layer])
            w_ih, w_hh = weights[0], weights[1]
            b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
            w_hr = weights[-1] if has_proj else None
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            _check_weights(layer_input, w_ih, w_hh, b_ih, b_hh, w_hr, fn, suffix)
            out, hn, cn = _run_layer(layer_input, w_ih, w_hh, b_ih, b_hh, w_hr, h0[index], c0[index], sizes,
                                     bool(direction))
            outputs.append(out)
            h_n.append(hn)
            c_n.append(cn)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


# ---------------------------------------------------------------------------------------------
# Verification against float64, shared by tests/test_lstm.py and `bigkern verify`.

def compare_with_reference(module, x, hx=None, grad_seed=None, backward=True):
    """Run bigkern's LSTM/LSTMCell `module` (any backend requested) forward and backward on `x`
    (Tensor or PackedSequence) and `hx`, and torch's module of the same configuration with the same
    state_dict in float64 (the reference) and in the module's dtype (torch's own error); returns
    the Comparisons of every output and of the gradients of every parameter, the input and hx.
    backward=False: inference only (bigkern's forward runs under no_grad, saving nothing)."""
    from torch.nn.utils.rnn import PackedSequence

    from bigkern import testing

    def leaves(value, dtype=None, device=None):
        """Detached copies requiring grad (the input and hx), cast when asked."""
        if value is None:
            return None
        if isinstance(value, PackedSequence):
            return PackedSequence(leaves(value.data, dtype, device), value.batch_sizes, value.sorted_indices,
                                  value.unsorted_indices)
        if isinstance(value, (tuple, list)):
            return type(value)(leaves(v, dtype, device) for v in value)
        return value.detach().to(dtype=dtype or value.dtype, device=device or value.device).requires_grad_(True)

    def tensors_of(value):
        if value is None:
            return []
        if isinstance(value, PackedSequence):
            return [value.data]
        if isinstance(value, (tuple, list)):
            return [t for v in value for t in tensors_of(v)]
        return [value]

    def run(mod, inputs, state):
        result = mod(inputs, state) if state is not None else mod(inputs)
        outs = tensors_of(result)
        return outs

    torch_class = type(module).__mro__[1]  # the torch class bigkern's drop-in subclasses
    config = _module_config(module)
    reference = torch_class(**config, dtype=torch.float64)
    reference.load_state_dict({k: v.double().cpu() for k, v in module.state_dict().items()})
    same_dtype = torch_class(**config, device=next(module.parameters()).device, dtype=next(module.parameters()).dtype)
    same_dtype.load_state_dict(module.state_dict())
    for mod in (reference, same_dtype):
        mod.train(module.training)

    module.zero_grad(set_to_none=True)
    x_ours, hx_ours = leaves(x), leaves(hx)
    x_64, hx_64 = leaves(x, torch.float64, "cpu"), leaves(hx, torch.float64, "cpu")
    x_t, hx_t = leaves(x), leaves(hx)
    seed = testing.seed_everything(grad_seed)
    with torch.set_grad_enabled(backward):
        ours = run(module, x_ours, hx_ours)
    testing.seed_everything(seed)  # the same dropout masks for every run
    ref = run(reference, x_64, hx_64)
    testing.seed_everything(seed)
    theirs = run(same_dtype, x_t, hx_t)

    names = ["output", "h_n", "c_n"] if len(ours) == 3 else ["h", "c"]
    results = [testing.compare(a, r, t, name=n) for a, r, t, n in zip(ours, ref, theirs, names)]
    if not backward:
        return results
    grads = [testing.make_tensor(o.shape, o.dtype, o.device) for o in ours]
    for outs, mod in ((ours, module), (ref, reference), (theirs, same_dtype)):
        device = outs[0].device
        torch.autograd.backward(outs, [g.to(dtype=outs[0].dtype, device=device) for g in grads])
    named = [("input", tensors_of(x_ours), tensors_of(x_64), tensors_of(x_t)),
             ("hx", tensors_of(hx_ours), tensors_of(hx_64), tensors_of(hx_t))]
    for (name, p), (_, p64), (_, pt) in zip(module.named_parameters(), reference.named_parameters(),
                                             same_dtype.named_parameters()):
        named.append((name, [p], [p64], [pt]))
    scales = {}
    if isinstance(module, torch.nn.LSTMCell):
        scales = _cell_term_scales(reference, x_64, hx_64, grads)
    for name, a_list, r_list, t_list in named:
        for k, (a, r, t) in enumerate(zip(a_list, r_list, t_list)):
            label = f"grad {name}" + (f"[{k}]" if len(a_list) > 1 else "")
            if r.grad is None:
                if a.grad is not None and a.grad.abs().max() > 0:
                    results.append(testing.Comparison(label, float("inf"), 0, 0, False, "expected no gradient"))
                continue
            if a.grad is None:
                results.append(testing.Comparison(label, float("inf"), 0, 0, False, "gradient missing"))
                continue
            results.append(testing.compare(a.grad, r.grad, t.grad, name=label, factor=testing.GRADIENT_FACTOR,
                                           scale=scales.get(label)))
    return results


def _cell_term_scales(cell, x, hx, grads):
    """Each gradient of an LSTM step is a sum of products of the gate gradients dz with x, h or a
    weight, rounded term by term in 16-bit (dz is kept in the input dtype, as torch keeps it). When
    the terms cancel, the error follows their magnitude, not the result's: per gradient, the largest
    sum of |terms| (float64), the scale the rule's floor is measured in. A tiny output (a single
    element, where torch's own error can be zero by luck) depends on it."""
    B = x.numel() // cell.input_size
    H = cell.hidden_size
    x = x.detach().reshape(B, cell.input_size)
    if hx is None:
        h = c = torch.zeros(B, H, dtype=x.dtype)
    else:
        h, c = (t.detach().reshape(B, H) for t in hx)
    w_ih, w_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
    z = x @ w_ih.t() + h @ w_hh.t()
    if cell.bias:
        z = z + cell.bias_ih.detach() + cell.bias_hh.detach()
    z = z.requires_grad_()
    i, f, g, o = z.chunk(4, 1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(c1)
    torch.autograd.backward([h1, c1], [grad.detach().double().cpu().reshape(B, H) for grad in grads])
    dz = z.grad.abs()
    bias = dz.sum(0).max().item()
    return {"grad input": (dz @ w_ih.abs()).max().item(), "grad hx[0]": (dz @ w_hh.abs()).max().item(),
            "grad weight_ih": (dz.t() @ x.abs()).max().item(), "grad weight_hh": (dz.t() @ h.abs()).max().item(),
            "grad bias_ih": bias, "grad bias_hh": bias}


def _module_config(module):
    if isinstance(module, torch.nn.LSTMCell):
        return dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
    return dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                bidirectional=module.bidirectional, proj_size=module.proj_size)


def verification_cases(device, dtype):
    """(description, thunk returning Comparisons) on fresh random inputs: what `bigkern verify` runs."""
    from torch.nn.utils.rnn import pack_sequence

    from bigkern import testing
    from bigkern.nn import rnn

    def lstm_case(config, T, B, packed=False):
        def run():
            module = rnn.LSTM(**config, device=device, dtype=dtype)
            I = config["input_size"]
            if packed:
                lengths = [max(1, T - 2 * k) for k in range(B)][::-1]  # unsorted: shortest first
                x = pack_sequence([testing.make_tensor((n, I), dtype, device) for n in lengths],
                                  enforce_sorted=False)
                return compare_with_reference(module, x)
            shape = (B, T, I) if config.get("batch_first") else (T, B, I)
            return compare_with_reference(module, testing.make_tensor(shape, dtype, device))
        return run

    def cell_case(I, H, B):
        def run():
            module = rnn.LSTMCell(I, H, device=device, dtype=dtype)
            x = testing.make_tensor((B, I), dtype, device)
            hx = (testing.make_tensor((B, H), dtype, device), testing.make_tensor((B, H), dtype, device))
            return compare_with_reference(module, x, hx)
        return run

    if device == "cpu" and dtype == torch.bfloat16:
        return  # the Triton interpreter's tl.dot on bfloat16 is wrong: bfloat16 is verified on a GPU
    big = device != "cpu"
    yield "LSTMCell 7->33 batch 5", cell_case(7, 33, 5)
    yield "LSTM 7->16 T=5 B=3", lstm_case(dict(input_size=7, hidden_size=16), 5, 3)
    yield "LSTM 2 layers bidirectional batch_first", lstm_case(
        dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, batch_first=True), 4, 3)
    yield "LSTM proj_size", lstm_case(dict(input_size=6, hidden_size=9, proj_size=4), 4, 2)
    yield "LSTM packed unsorted bidirectional", lstm_case(
        dict(input_size=5, hidden_size=7, bidirectional=True), 6, 3, packed=True)
    if big:
        yield "LSTM 256->512 T=50 B=4", lstm_case(dict(input_size=256, hidden_size=512), 50, 4)
        yield "LSTM 129->129 2 layers T=20 B=33", lstm_case(dict(input_size=129, hidden_size=129, num_layers=2), 20, 33)
