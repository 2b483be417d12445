"""Flash attention: softmax(scale * Q K^T + mask) V without ever storing the (L, S) matrix.

Shapes (the op layer normalizes every call to these): q (B, Hq, L, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv), out (B, Hq, L, Dv), lse (B, Hq, L) float32; any strides except a unit stride
in the last dimension. Query head h reads kv head h // (Hq // Hkv) (grouped-query attention).
A variable-length batch is the same walk with B = number of sequences, each sequence's rows
starting at cu_seqlens[b] of a packed (total, H, D) tensor.

Forward (one program per BLOCK_M query rows of one head), the online softmax of FlashAttention-2:
for each key block, in base 2 so that one exp2 serves (log2(e) is folded into the scale),

    s     = (q k^T) * scale * log2(e) + mask * log2(e)      masked entries are -inf
    m_new = max(m, rowmax(s));  alpha = 2^(m - m_new);  p = 2^(s - m_new)
    l     = l * alpha + rowsum(p);  acc = acc * alpha + (p * dropout) v

and at the end out = acc / l, lse = (m + log2 l) * ln 2 (the natural-log logsumexp backward needs).
A row whose every key is masked has l = 0: its output is 0 (what torch gives) and its lse is +inf,
so that backward's exp(s - lse) is exactly 0 there (FlashAttention's convention).

Backward (FlashAttention-2): delta = rowsum(dO * O) first; then one program per key block
accumulates dK and dV over every query block (and, for GQA, over every query head of its group,
so no atomics are needed), and one program per query block accumulates dQ over every key block:

    p  = exp(s - lse)                 (recomputed, never stored; a float mask's rows whose lse is
                                       huge use their max and l instead: _row_stats)
    dV += (p * Z)^T dO                Z = keep / (1 - dropout_p), 1 without dropout
    dP = (dO V^T) * Z
    dS = p * (dP - delta)             = d loss / d (scores + mask): also the float mask's gradient
    dQ += scale * dS K;   dK += scale * dS^T Q

Causal attention is torch's: query i sees keys j <= i (top-left aligned, also when L != S), so a
query block stops at its last row and the key blocks past it are never visited. Explicit masks
are added as 0 / -inf (booleans) or as values (floats), with any broadcast expressed by stride 0;
adding keeps NaN in a masked score (NaN + -inf = NaN), as torch's math does.

Dropout draws its numbers in the kernel: Philox4x32-10 keyed by a 62-bit seed, counter
(key column, query row, batch * Hq + head, 0), kept when the 32-bit word >= dropout_p * 2^32.
Forward and backward regenerate the same bits; `dropout_keep_mask` in bigkern/ops/attention.py
computes them with torch ops, bit for bit.
"""

import functools

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2

MASK_NONE = 0
MASK_BOOL = 1
MASK_FLOAT = 2

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the forward and backward kernels.

@triton.jit
def philox_word(c0, c1, c2, c3, k0, k1):
    """The first 32-bit word of Philox4x32-10 for counters (c0..c3) and key (k0, k1), all uint32."""
    for _ in tl.static_range(10):
        prev0 = c0
        prev2 = c2
        c0 = tl.umulhi(prev2, _PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(prev0, _PHILOX_M0) ^ c3 ^ k1
        c1 = prev2 * _PHILOX_M1
        c3 = prev0 * _PHILOX_M0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0


@triton.jit
def dropout_keep(rows, cols, stream, seed_lo, seed_hi, threshold):
    """Which (row, col) of the score tile dropout keeps; rows and cols are broadcastable 2-D int32
    index tensors, in whichever orientation the caller's tile has. (Scalars join a tensor before
    any cast: an int argument equal to 1 arrives as a constexpr on a GPU.)"""
    zero = rows * 0 + cols * 0
    word = philox_word((cols + zero).to(tl.uint32), (rows + zero).to(tl.uint32), (zero + stream).to(tl.uint32),
                       zero.to(tl.uint32), (zero + seed_lo).to(tl.uint32), (zero + seed_hi).to(tl.uint32))
    return word.to(tl.int64) >= threshold


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, other):
    """Load a 2-D tile, bounds-checked only along the axes the caller says may leave the tensor."""
    if MASK_ROWS:
        if MASK_COLS:
            return tl.load(ptrs, mask=row_ok & col_ok, other=other)
        else:
            return tl.load(ptrs, mask=row_ok, other=other)
    else:
        if MASK_COLS:
            return tl.load(ptrs, mask=col_ok, other=other)
        else:
            return tl.load(ptrs)


@triton.jit
def _mask_scores(s, mask_ptrs, rows, cols, seq_q, seq_k, MASK_KIND: tl.constexpr):
    """Add the explicit mask to a score tile; rows/cols broadcastable index tiles. A bool mask adds
    -inf (scores in either unit); a float mask adds its values to natural-unit scores, rounding as
    torch's s * scale + mask does (see _natural)."""
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=(rows < seq_q) & (cols < seq_k), other=0) != 0
        s = s + tl.where(keep, 0.0, float("-inf"))
    elif MASK_KIND == 2:
        s = s + tl.load(mask_ptrs, mask=(rows < seq_q) & (cols < seq_k), other=0.0).to(tl.float32)
    return s


@triton.jit
def _natural(MASK_KIND: tl.constexpr):
    """Whether scores stay in natural units until the row's max is subtracted: under a float mask.
    Scores are otherwise kept in base 2 (the scale folded with log2 e, one multiply fewer per score),
    but a mask added in base 2 rounds at the step of |mask| * log2 e: twice torch's step for about
    half of all magnitudes, which rows dominated by large mask values (a fully masked row under
    -1e4) show as twice torch's error."""
    return MASK_KIND == 2


@triton.jit
def _score_scale(sm_scale, qk_scale, MASK_KIND: tl.constexpr):
    """What q k^T is multiplied by: sm_scale under a float mask (natural units, _natural), else
    qk_scale = sm_scale * log2 e (base 2)."""
    if _natural(MASK_KIND):
        return sm_scale
    else:
        return qk_scale


@triton.jit
def _sequence(CuSeq, b, fixed_len, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: a packed batch's from cu_seqlens, else (0, fixed_len)."""
    if VARLEN:
        start = tl.load(CuSeq + b)
        return start, tl.load(CuSeq + b + 1) - start
    else:
        return b * 0, fixed_len


@triton.jit
def _causal_shift(seq_q, seq_k, IS_CAUSAL: tl.constexpr):
    """Causal attention lets query row i see keys j <= i + shift: IS_CAUSAL 1 aligns the diagonal
    top-left (torch's is_causal, shift 0), IS_CAUSAL 2 bottom-right (causal_lower_right, varlen_attn:
    the last query row sees the last key, shift seq_k - seq_q; rows below -shift see no key)."""
    if IS_CAUSAL == 2:
        return seq_k - seq_q
    else:
        return seq_q * 0


# ---------------------------------------------------------------------------------------------
# Forward

@triton.jit
def _online_softmax_step(s, m_i, l_i, NATURAL: tl.constexpr):
    """One key block of the online softmax: (p, alpha, l, m) for running max m_i and sum l_i, with s
    and m in base 2, or in natural units (NATURAL: converted after the max is subtracted)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen only masked keys so far keeps m = -inf: subtract 0 instead (no inf - inf)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if NATURAL:
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    else:
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _forward_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kv_head, mask_base, n0, offs_m, offs_n,
                   offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn, stride_mm, stride_mn, score_scale,
                   dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   TMA: tl.constexpr, BOUNDARY: tl.constexpr):
    """One key block of the online softmax. BOUNDARY blocks may hold keys past seq_k or past the
    causal diagonal; the others are read without any bounds check."""
    cols = n0 + offs_n
    col_ok = cols < seq_k
    # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_DV)
    if TMA:
        # the copy engine fills the tile; rows past S and columns past D arrive as zeros
        k_t = tl.trans(k_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D))
        v = v_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        k_t = _load_tile(k_base + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None], (offs_d < HEAD_DIM)[:, None],
                         col_ok[None, :], HEAD_DIM != BLOCK_D, BOUNDARY, 0.0)
        v = _load_tile(v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :], col_ok[:, None],
                       (offs_dv < HEAD_DIM_V)[None, :], BOUNDARY, HEAD_DIM_V != BLOCK_DV, 0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION) * score_scale  # natural units or base 2: _natural
    rows2 = offs_m[:, None]
    cols2 = cols[None, :]
    if MASK_KIND != 0:
        s = _mask_scores(s, mask_base + rows2.to(tl.int64) * stride_mm + cols2.to(tl.int64) * stride_mn,
                         rows2, cols2, seq_q, seq_k, MASK_KIND)
    if BOUNDARY:
        visible = cols2 < seq_k
        if IS_CAUSAL:
            visible = visible & (cols2 <= rows2 + causal_shift)
        s = tl.where(visible, s, float("-inf"))
    p, alpha, l_i, m_new = _online_softmax_step(s, m_i, l_i, _natural(MASK_KIND))
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep(rows2, cols2, stream, seed_lo, seed_hi, dropout_threshold)
        p = tl.where(keep, p * dropout_scale, 0.0)
    acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
    Q, K, V, Mask, Out, Lse, CuSeqQ, CuSeqK,
    KDesc, VDesc,  # TMA only: descriptors of the (B, Hkv, S, D) K and V views, else unused
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_os, stride_ls, keys_per_split,  # SPLIT only: a split's offset in Out and Lse, its keys
    n_heads, group_size, seq_q, seq_k,
    sm_scale, qk_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi,  # qk_scale = sm_scale * log2 e
    q_bucket, k_bucket,  # autotuning keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """TMA (Hopper): K and V tiles come through tensor descriptors, copied by the copy engine
    (never with VARLEN). SPLIT (flash-decoding): program_id(0) is (query block, split); each split walks only its
    `keys_per_split` keys and writes a partial output, normalized by its own l, and its own lse
    (-inf where it saw no key) into fp32 scratch, which attention_split_combine_kernel merges."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = _sequence(CuSeqQ, b, seq_q, VARLEN)
    k_start, seq_k = _sequence(CuSeqK, b, seq_k, VARLEN)
    causal_shift = _causal_shift(seq_q, seq_k, IS_CAUSAL)
    split = 0
    if SPLIT:
        n_splits = tl.cdiv(seq_k, keys_per_split)
        split = tl.program_id(0) % n_splits
        pid_m = tl.program_id(0) // n_splits
    elif IS_CAUSAL:
        # the longest query blocks (the last ones) first: they finish with the rest
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_q:
        return
    kv_head = h // group_size
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh
    stream = b * n_heads + h

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    score_scale = _score_scale(sm_scale, qk_scale, MASK_KIND)

    # Key blocks [0, full_end) are whole and (causal) entirely at or below the diagonal of every
    # row of this block; [full_end, end) need the bounds / diagonal masks.
    if IS_CAUSAL:
        end = tl.maximum(tl.minimum(seq_k, m0 + BLOCK_M + causal_shift), 0)
        full_end = (tl.maximum(tl.minimum(m0 + 1 + causal_shift, seq_k), 0) // BLOCK_N) * BLOCK_N
    else:
        end = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    start = 0
    if SPLIT:  # this split's keys [start, end): whole blocks, since keys_per_split is a multiple of BLOCK_N
        start = split * keys_per_split
        end = tl.minimum(end, start + keys_per_split)
        full_end = tl.maximum(tl.minimum(full_end, end), start)
    for n0 in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_head, mask_base, n0, offs_m, offs_n,
            offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn, stride_mm, stride_mn, score_scale,
            dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, IS_CAUSAL, DROPOUT, PRECISION, TMA,
            False)
    for n0 in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_head, mask_base, n0, offs_m, offs_n,
            offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn, stride_mm, stride_mn, score_scale,
            dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, IS_CAUSAL, DROPOUT, PRECISION, TMA,
            True)

    # l = 0: every key masked -> output 0 (acc * 0 keeps a NaN that reached acc, as torch's does)
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    inv_l = tl.where(empty_row, 0.0, 1.0 / l_safe)
    out = acc * inv_l[:, None]
    if _natural(MASK_KIND):  # m in natural units; the log of l converted alone
        m_natural = m_i
        row_lse = m_i + tl.math.log2(l_safe) * LN2
    else:
        m_natural = m_i * LN2
        row_lse = (m_i + tl.math.log2(l_safe)) * LN2
    if SPLIT:
        # the split's max and log l apart (m at `split`, log l at `split + n_splits`): a max near the
        # float range's end (finfo.min masks) would round log l away in their sum, and the merge
        # must weigh each split by its l. A split that saw no key weighs nothing (max -inf).
        o_base = Out + split.to(tl.int64) * stride_os
        lse_base = Lse + split.to(tl.int64) * stride_ls
        lse = tl.where(empty_row, float("-inf"), m_natural)
        log_l_base = (Lse + (split + n_splits).to(tl.int64) * stride_ls + b64 * stride_lb
                      + h.to(tl.int64) * stride_lh + q_start.to(tl.int64))
        tl.store(log_l_base + offs_m, tl.math.log2(l_safe) * LN2, mask=row_ok)
    else:
        lse = tl.where(empty_row, float("inf"), row_lse)
        o_base = Out
        lse_base = Lse
    o_base += b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    lse_base += b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64)
    tl.store(lse_base + offs_m, lse, mask=row_ok)


@triton.jit
def attention_split_combine_kernel(
    Part, PartLse, Out, Lse,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    n_splits, seq_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the splits of one query block (Part (B, H, splits, L, Dv); PartLse (B, H, 2 splits, L):
    each split's max m_s, then each split's log l_s), with lse_s = m_s + log l_s:

        lse = log sum_s exp(lse_s);   out = sum_s exp(lse_s - lse) * out_s

    (the exponents taken as (m_s - max m) + log l_s). A row no split saw a key for gets out 0 and
    lse +inf, as the unsplit kernel gives it."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_base = PartLse + b * stride_qb + h * stride_qh + rows
    part_base = Part + b * stride_pb + h * stride_ph + rows.to(tl.int64)[:, None] * stride_pm + offs_dv[None, :]
    part_ok = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(lse_base + s * stride_qs, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for s in range(0, n_splits):
        m_s = tl.load(lse_base + s * stride_qs, mask=row_ok, other=float("-inf"))
        log_l_s = tl.load(lse_base + (s + n_splits) * stride_qs, mask=row_ok, other=0.0)
        weight = tl.math.exp2(((m_s - m_safe) + log_l_s) * LOG2E)
        total += weight
        acc += weight[:, None] * tl.load(part_base + s * stride_ps, mask=part_ok, other=0.0)
    empty_row = total == 0.0
    total_safe = tl.where(empty_row, 1.0, total)
    out = acc * tl.where(empty_row, 0.0, 1.0 / total_safe)[:, None]
    lse = tl.where(empty_row, float("inf"), m_safe + tl.log(total_safe))
    tl.store(Out + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_om + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=part_ok)
    tl.store(Lse + b * stride_lb + h * stride_lh + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward

@triton.jit
def attention_backward_delta_kernel(
    Out, GradOut, GradLse, Delta, CuSeqQ,
    stride_ob, stride_oh, stride_om, stride_gb, stride_gh, stride_gm, stride_lb, stride_lh,
    seq_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - d loss / d lse, in fp32 (the gradient through lse enters here:
    d lse / d s = p, so it shifts delta and nothing else)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = _sequence(CuSeqQ, b, seq_q, VARLEN)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seq_q:
        return
    b64 = b.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows < seq_q)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + rows).to(tl.int64)[:, None] * stride_om
                + offs_dv[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GradOut + b64 * stride_gb + h.to(tl.int64) * stride_gh
                + (q_start + rows).to(tl.int64)[:, None] * stride_gm + offs_dv[None, :], mask=ok, other=0.0)
    delta = tl.sum(o * g.to(tl.float32), 1)
    lse_offsets = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) + rows
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + lse_offsets, mask=rows < seq_q, other=0.0)
    tl.store(Delta + lse_offsets, delta, mask=rows < seq_q)


# A float mask can put a row's scores near the float range's end (Hugging Face masks with
# finfo.min): there lse = max + log l, one fp32 number, has rounded log l away (and ln/log2
# conversions move it by whole units of a huge ulp), so exp(s - lse) is no probability. The
# backward then reads each row as (center, offset) in natural units (as a float mask's scores are,
# _natural), p = exp((s - center) - offset): lse itself (offset 0) for ordinary rows; the row's max
# and log l, recomputed, for rows whose
# |lse| is at least ROW_STATS_RECOMPUTE_FROM (its ulp, 2^-13 there, is already coarser than a
# fresh pass gets). Blocks without such rows read lse and leave.
ROW_STATS_RECOMPUTE_FROM = tl.constexpr(1024.0)


@triton.jit
def attention_backward_row_stats_kernel(
    Q, K, Mask, Lse, Stats, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh, stride_stats,
    group_size, seq_q, seq_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(center, offset) of every row under a float mask (planes 0 and 1 of Stats, each laid out as
    lse): the forward's online max and sum, without the values, for the rows that need it."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = _sequence(CuSeqQ, b, seq_q, VARLEN)
    k_start, seq_k = _sequence(CuSeqK, b, seq_k, VARLEN)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seq_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_q
    lse_offsets = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) + rows
    center = tl.load(Lse + lse_offsets, mask=row_ok, other=0.0)
    offset = tl.zeros((BLOCK_M,), tl.float32)
    magnitude = tl.abs(center)
    recompute = (magnitude >= ROW_STATS_RECOMPUTE_FROM) & (magnitude < float("inf")) & row_ok
    if tl.max(recompute.to(tl.int32), 0) > 0:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + (q_start + rows).to(tl.int64)[:, None] * stride_qm
                    + offs_d[None, :], mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = K + b64 * stride_kb + (h // group_size).to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        causal_shift = _causal_shift(seq_q, seq_k, IS_CAUSAL)
        end = seq_k
        if IS_CAUSAL:
            end = tl.maximum(tl.minimum(seq_k, m0 + BLOCK_M + causal_shift), 0)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + offs_n
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                        mask=(cols < seq_k)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            rows2 = rows[:, None]
            cols2 = cols[None, :]
            s = _mask_scores(s, mask_base + rows2.to(tl.int64) * stride_mm + cols2.to(tl.int64) * stride_mn,
                             rows2, cols2, seq_q, seq_k, 2)
            visible = cols2 < seq_k
            if IS_CAUSAL:
                visible = visible & (cols2 <= rows2 + causal_shift)
            s = tl.where(visible, s, float("-inf"))
            _, _, l_i, m_i = _online_softmax_step(s, m_i, l_i, True)
        center = tl.where(recompute, m_i, center)
        offset = tl.where(recompute, tl.math.log2(tl.where(recompute, l_i, 1.0)) * LN2, offset)
    tl.store(Stats + lse_offsets, center, mask=row_ok)
    tl.store(Stats + stride_stats + lse_offsets, offset, mask=row_ok)


@triton.jit
def _row_stats(lse_ptrs, stats_ptrs, stride_stats, row_ok, MASK_KIND: tl.constexpr):
    """(center, offset) of rows: from Stats under a float mask (natural units), else (lse * log2 e, 0)
    in base 2. Rows past seq_q read center +inf: their p is 0."""
    if MASK_KIND == 2:
        center = tl.load(stats_ptrs, mask=row_ok, other=float("inf"))
        offset = tl.load(stats_ptrs + stride_stats, mask=row_ok, other=0.0)
    else:
        center = tl.load(lse_ptrs, mask=row_ok, other=float("inf")) * LOG2E
        offset = tl.zeros_like(center)
    return center, offset


@triton.jit
def _recomputed_probabilities(s, center, offset, MASK_KIND: tl.constexpr):
    """p = 2^((s - center) - offset), or under a float mask, in natural units, e^((s - center) - offset);
    center and offset broadcast against s."""
    if MASK_KIND == 2:
        return tl.math.exp2(((s - center) - offset) * LOG2E)
    else:
        return tl.math.exp2(s - center)


@triton.jit
def _backward_dkdv_block(dk, dv, k, v, q_base, do_base, q_desc, do_desc, b, h, lse_base, stats_base, stride_stats,
                         delta_base, mask_base,
                         m0, cols, offs_m, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_qm, stride_dom, stride_mm,
                         stride_mn, score_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                         TMA: tl.constexpr, DIAGONAL: tl.constexpr):
    """dK, dV contributions of one query block, in transposed tiles (keys along rows). Query rows
    past seq_q read lse = +inf, so their p is 0 for finite keys; DIAGONAL blocks apply causality.
    (Elsewhere a non-finite key is seen by a real row too, and its gradient is NaN, as torch's.)"""
    rows = m0 + offs_m
    row_ok = rows < seq_q
    if TMA:  # rows past L and columns past D arrive as zeros
        q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_DV)
    else:
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        do = tl.load(do_base + rows.to(tl.int64)[:, None] * stride_dom + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    center, offset = _row_stats(lse_base + rows, stats_base + rows, stride_stats, row_ok, MASK_KIND)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * score_scale  # (BLOCK_N, BLOCK_M): _natural
    rows2 = rows[None, :]
    cols2 = cols[:, None]
    if MASK_KIND != 0:
        s_t = _mask_scores(s_t, mask_base + rows2.to(tl.int64) * stride_mm + cols2.to(tl.int64) * stride_mn,
                           rows2, cols2, seq_q, seq_k, MASK_KIND)
    p_t = _recomputed_probabilities(s_t, center[None, :], offset[None, :], MASK_KIND)
    if DIAGONAL:
        if IS_CAUSAL:  # rows past L too: a key beyond every real row sees 0 * k there (NaN if k is)
            p_t = tl.where((cols2 <= rows2 + causal_shift) & row_ok[None, :], p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    if DROPOUT:
        keep = dropout_keep(rows2, cols2, stream, seed_lo, seed_hi, dropout_threshold)
        dv += tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, Mask, GradOut, Lse, Stats, Delta, GradK, GradV, CuSeqQ, CuSeqK,
    QDesc, GradOutDesc,  # TMA only: descriptors of the (B, Hq, L, D) query and output-gradient views
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_stats,  # Stats (float masks only): lse's layout, planes stride_stats apart
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_heads, group_size, seq_q, seq_k,
    sm_scale, qk_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi,
    q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per BLOCK_N keys of one kv head: dK and dV summed over every query row of every
    query head that reads this kv head. TMA: the query and output-gradient tiles come through
    tensor descriptors (never with VARLEN)."""
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    score_scale = _score_scale(sm_scale, qk_scale, MASK_KIND)
    q_start, seq_q = _sequence(CuSeqQ, b, seq_q, VARLEN)
    k_start, seq_k = _sequence(CuSeqK, b, seq_k, VARLEN)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= seq_k:
        return
    b64 = b.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < seq_k
    k_rows = (k_start + cols).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_rows[:, None] * stride_kn
                + offs_d[None, :], mask=col_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    v = tl.load(V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vn
                + offs_dv[None, :], mask=col_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)

    # Causal: rows before n0 - shift see none of these keys; rows from diag_end on see all of them.
    causal_shift = _causal_shift(seq_q, seq_k, IS_CAUSAL)
    if IS_CAUSAL:
        start = (tl.maximum(n0 - causal_shift, 0) // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M, seq_q)
    else:
        start = 0
        diag_end = 0
    for g in range(0, group_size):
        h = kv_head * group_size + g
        stream = b * n_heads + h
        h64 = h.to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = GradOut + b64 * stride_gb + h64 * stride_gh + q_start.to(tl.int64) * stride_gm
        lse_offset = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64)
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
        for m0 in range(start, diag_end, BLOCK_M):
            dk, dv = _backward_dkdv_block(
                dk, dv, k, v, q_base, do_base, QDesc, GradOutDesc, b, h, Lse + lse_offset, Stats + lse_offset, stride_stats,
                Delta + lse_offset,
                mask_base, m0, cols, offs_m, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_qm, stride_gm, stride_mm,
                stride_mn, score_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, IS_CAUSAL, DROPOUT, PRECISION, TMA,
                True)
        for m0 in range(tl.maximum(start, diag_end), seq_q, BLOCK_M):
            dk, dv = _backward_dkdv_block(
                dk, dv, k, v, q_base, do_base, QDesc, GradOutDesc, b, h, Lse + lse_offset, Stats + lse_offset, stride_stats,
                Delta + lse_offset,
                mask_base, m0, cols, offs_m, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_qm, stride_gm, stride_mm,
                stride_mn, score_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, IS_CAUSAL, DROPOUT, PRECISION, TMA,
                False)

    dk = dk * sm_scale
    tl.store(GradK + b64 * stride_dkb + kv_head.to(tl.int64) * stride_dkh + k_rows[:, None] * stride_dkn
             + offs_d[None, :], dk.to(GradK.dtype.element_ty), mask=col_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(GradV + b64 * stride_dvb + kv_head.to(tl.int64) * stride_dvh + k_rows[:, None] * stride_dvn
             + offs_dv[None, :], dv.to(GradV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _backward_dq_block(dq, q, do, center, offset, delta, k_base, v_base, k_desc, v_desc, b, kv_head, mask_base,
                       grad_mask_base, n0, rows, offs_n, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn,
                       stride_mm, stride_mn, stride_gmm, stride_gmn, score_scale, dropout_threshold, dropout_scale,
                       seed_lo, seed_hi, stream,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                       PRECISION: tl.constexpr, TMA: tl.constexpr, BOUNDARY: tl.constexpr):
    """dQ contribution of one key block (and, with MASK_GRAD, that block of the mask's gradient)."""
    cols = n0 + offs_n
    col_ok = cols < seq_k
    if TMA:  # rows past S and columns past D arrive as zeros
        k = k_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        k = _load_tile(k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], col_ok[:, None],
                       (offs_d < HEAD_DIM)[None, :], BOUNDARY, HEAD_DIM != BLOCK_D, 0.0)
        v = _load_tile(v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :], col_ok[:, None],
                       (offs_dv < HEAD_DIM_V)[None, :], BOUNDARY, HEAD_DIM_V != BLOCK_DV, 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale  # natural units or base 2: _natural
    rows2 = rows[:, None]
    cols2 = cols[None, :]
    if MASK_KIND != 0:
        s = _mask_scores(s, mask_base + rows2.to(tl.int64) * stride_mm + cols2.to(tl.int64) * stride_mn,
                         rows2, cols2, seq_q, seq_k, MASK_KIND)
    p = _recomputed_probabilities(s, center[:, None], offset[:, None], MASK_KIND)
    if BOUNDARY:
        # keys past seq_k must not count: with a very negative lse their p would overflow
        visible = cols2 < seq_k
        if IS_CAUSAL:
            visible = visible & (cols2 <= rows2 + causal_shift)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep = dropout_keep(rows2, cols2, stream, seed_lo, seed_hi, dropout_threshold)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:
        tl.store(grad_mask_base + rows2.to(tl.int64) * stride_gmm + cols2.to(tl.int64) * stride_gmn,
                 ds.to(grad_mask_base.dtype.element_ty), mask=(rows2 < seq_q) & (cols2 < seq_k))
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, Mask, GradOut, Lse, Stats, Delta, GradQ, GradMask, CuSeqQ, CuSeqK,
    KDesc, VDesc,  # TMA only: descriptors of the (B, Hkv, S, D) key and value views
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_stats,  # Stats (float masks only): lse's layout, planes stride_stats apart
    stride_dqb, stride_dqh, stride_dqm,
    stride_gmb, stride_gmh, stride_gmm, stride_gmn,
    n_heads, group_size, seq_q, seq_k,
    sm_scale, qk_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi,
    q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per BLOCK_M query rows of one head: dQ over every key block it sees (TMA: the key
    and value tiles through tensor descriptors, never with VARLEN)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    score_scale = _score_scale(sm_scale, qk_scale, MASK_KIND)
    q_start, seq_q = _sequence(CuSeqQ, b, seq_q, VARLEN)
    k_start, seq_k = _sequence(CuSeqK, b, seq_k, VARLEN)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_q:
        return
    kv_head = h // group_size
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seq_q
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    do = tl.load(GradOut + b64 * stride_gb + h64 * stride_gh + q_rows[:, None] * stride_gm + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    lse_offsets = b64 * stride_lb + h64 * stride_lh + q_rows
    center, offset = _row_stats(Lse + lse_offsets, Stats + lse_offsets, stride_stats, row_ok, MASK_KIND)
    delta = tl.load(Delta + lse_offsets, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    grad_mask_base = GradMask + b64 * stride_gmb + h64 * stride_gmh
    stream = b * n_heads + h
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    causal_shift = _causal_shift(seq_q, seq_k, IS_CAUSAL)
    if IS_CAUSAL:
        end = tl.maximum(tl.minimum(seq_k, m0 + BLOCK_M + causal_shift), 0)
        full_end = (tl.maximum(tl.minimum(m0 + 1 + causal_shift, seq_k), 0) // BLOCK_N) * BLOCK_N
    else:
        end = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        dq = _backward_dq_block(
            dq, q, do, center, offset, delta, k_base, v_base, KDesc, VDesc, b, kv_head, mask_base, grad_mask_base, n0, rows,
            offs_n, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn, stride_mm, stride_mn, stride_gmm,
            stride_gmn, score_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, IS_CAUSAL, DROPOUT, MASK_GRAD, PRECISION,
            TMA, False)
    for n0 in range(full_end, end, BLOCK_N):
        dq = _backward_dq_block(
            dq, q, do, center, offset, delta, k_base, v_base, KDesc, VDesc, b, kv_head, mask_base, grad_mask_base, n0, rows,
            offs_n, offs_d, offs_dv, seq_q, seq_k, causal_shift, stride_kn, stride_vn, stride_mm, stride_mn, stride_gmm,
            stride_gmn, score_scale, dropout_threshold, dropout_scale, seed_lo, seed_hi, stream,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, IS_CAUSAL, DROPOUT, MASK_GRAD, PRECISION,
            TMA, True)
    dq = dq * sm_scale
    tl.store(GradQ + b64 * stride_dqb + h64 * stride_dqh + q_rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(GradQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------------------------
# Tile configurations: few, chosen per head dim and architecture, autotuned per (head dims,
# mask, causal, dropout, power-of-two sequence lengths). The interpreter runs one small tile.

def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _capability():
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _head_dim_class(kwargs):
    d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _causal(args):
    return bool(args.get("IS_CAUSAL"))


def _fp32(args):
    """32-bit inputs (a launch's Q, or fp32=True in a representative launch): twice the shared
    memory of a 16-bit tile, so some tiles stop fitting (bench/kernel_resources.md: fp32 rows)."""
    q = args.get("Q")
    return bool(args.get("fp32")) or (q is not None and hasattr(q, "element_size") and q.element_size() == 4)


# Hopper tiles under a float mask, 16-bit inputs: the mask tile's loads hold registers, and the
# tiles below spill where the unmasked ones do not (dK/dV hd64 causal 32x128: 792 bytes with Triton
# 3.6; forward hd64 causal 128x64 of 4 warps: 680 with 3.8). These spill nothing with Triton 3.6 or
# 3.8 (dK/dV hd128 causal in 2 stages: 8 bytes with 3.6). (kernel, head dim class, causal) -> tiles.
_FLOAT_MASK_HOPPER_TILES = {
    ("forward", 64, False): [(128, 64, 8, 3), (128, 64, 8, 4)],
    ("forward", 64, True): [(128, 64, 8, 3), (128, 64, 8, 4)],
    ("forward", 128, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("forward", 128, True): [(128, 32, 8, 3)],
    ("dkdv", 64, False): [(16, 128, 8, 2), (16, 128, 8, 3)],
    ("dkdv", 64, True): [(16, 128, 8, 2)],
    ("dkdv", 128, False): [(16, 128, 8, 2)],
    ("dkdv", 128, True): [(16, 64, 8, 1), (16, 64, 8, 2)],
    ("dq", 64, True): [(128, 32, 8, 3), (64, 32, 4, 3)],
    ("dq", 128, False): [(128, 32, 8, 2), (64, 32, 4, 2)],
    ("dq", 128, True): [(128, 32, 8, 2)],
}


def _float_mask_tiles(name, args, hopper):
    """The tiles of _FLOAT_MASK_HOPPER_TILES that apply to this launch, or None."""
    if not hopper or args.get("MASK_KIND") != MASK_FLOAT:
        return None
    if _fp32(args):  # with the mask's tile the hd128 forward's 128x64 needs 288 KB in fp32
        return [(128, 32, 8, 3), (64, 64, 4, 2)] if name == "forward" and _head_dim_class(args) == 128 else None
    return _FLOAT_MASK_HOPPER_TILES.get((name, _head_dim_class(args), _causal(args)))


def forward_tiles(args, hopper):
    """(BLOCK_M, BLOCK_N, warps, stages) for the forward kernel, best guess first. Hopper: 128-row
    tiles of 8 warps (two warpgroups of wgmma) with 3-4 stage pipelines; Ampere: shallower
    pipelines, and half the key tile at head dim 256 to stay within its 164 KB of shared memory.
    No default tile spills registers on sm_90 or sm_80 with Triton 3.6 or 3.8 (causal ones included:
    their masking holds more registers), and no other tile more than 8 bytes
    (scripts/kernel_resources.py, bench/kernel_resources.md)."""
    d = _head_dim_class(args)
    if args["q_bucket"] <= 16:  # decoding-like: few query rows, long key walks
        if d > 128:
            return [(16, 64, 4, 2), (16, 32, 4, 2)]
        if _fp32(args):  # 16x128 in 3 stages needs 272 KB at hd128
            return [(16, 64, 4, 3), (16, 128, 4, 2)]
        return [(16, 128, 4, 3), (16, 64, 4, 3)] if hopper else [(16, 64, 4, 3), (16, 128, 4, 3)]
    if args["q_bucket"] <= 64:
        if _fp32(args) and d == 128:  # 64x64 in 3 stages needs 176 KB (sm_80 has 163)
            return [(64, 64, 4, 2), (64, 32, 4, 3)]
        if d == 64:
            return [(64, 64, 4, 3), (64, 128, 4, 3)]
        # 8 warps: with 4, 64x64 spills 8 bytes at hd128 on sm_80, 64x128 40-96 bytes, and 64x32
        # 8-32 bytes at hd256 (Triton 3.6)
        return [(64, 64, 8, 3), (64, 128, 8, 2)] if d == 128 else [(64, 32, 8, 2), (64, 64, 8, 2)]
    masked = _float_mask_tiles("forward", args, hopper)
    if masked:
        return masked
    if d == 64:
        if not hopper:  # causal masking holds registers: 128x64 spills 8 bytes on sm_80
            return [(128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3)] if _causal(args) else \
                   [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)]
        return [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4)]
    if d == 128:
        if not hopper:
            return [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2)] if _causal(args) else \
                   [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)]
        # causal: 128x128 spills 32 bytes (Triton 3.8)
        return [(128, 64, 8, 3), (64, 64, 4, 3)] if _causal(args) else \
               [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    if _fp32(args):  # 128x64 needs 288 KB on sm_90, 64x64 208 KB on sm_80
        return [(64, 64, 4, 2), (128, 32, 8, 2)] if hopper else [(64, 32, 8, 2)]
    # 64x64 of 4 warps spills 40 bytes at hd256 (Triton 3.6 and 3.8): 8 warps
    return [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)] if hopper else [(64, 32, 8, 2), (64, 64, 8, 2)]


def dkdv_tiles(args, hopper):
    """dK/dV: a tall key tile (it accumulates two (BLOCK_N, D) fp32 tiles) walking short query tiles."""
    d = _head_dim_class(args)
    masked = _float_mask_tiles("dkdv", args, hopper)
    if masked:
        return masked
    # causal masking holds registers: the query tile halves where the full one spills (32x128:
    # 48 bytes on sm_80 at hd64 and 32-80 bytes on sm_90 at hd128; 32x64: 184 bytes on sm_80 at
    # hd128; 64x128 up to 360 bytes on sm_90 at hd64; Triton 3.6 and 3.8)
    if d == 64:
        if not hopper:
            return [(16, 128, 8, 2), (16, 128, 8, 1)] if _causal(args) else [(32, 128, 8, 2), (32, 64, 4, 2)]
        return [(32, 128, 8, 3), (32, 64, 4, 3)] if _causal(args) else \
               [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)]
    if d == 128:
        if not hopper:
            return [(64, 64, 8, 1), (16, 128, 8, 2)] if _causal(args) else [(32, 64, 4, 2), (64, 64, 8, 1)]
        return [(16, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 2)] if _causal(args) else \
               [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2)]
    if _fp32(args) and not hopper:  # 16x64 needs 164 KB on sm_80 (163 KB there)
        return [(32, 32, 4, 1)]
    if hopper and _causal(args):  # 16x64 spills 72-104 bytes, 16x32 of 4 warps 120
        return [(16, 32, 8, 2), (32, 32, 8, 1)]
    return [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)] if hopper else [(16, 64, 8, 1), (32, 32, 4, 1)]


def dq_tiles(args, hopper):
    """dQ: a tall query tile walking short key tiles."""
    d = _head_dim_class(args)
    masked = _float_mask_tiles("dq", args, hopper)
    if masked:
        return masked
    if d == 64:
        if not hopper:  # causal: 128x32 spills 8 bytes on sm_80
            return [(64, 32, 4, 2), (128, 32, 4, 2)] if _causal(args) else [(128, 32, 4, 2), (64, 32, 4, 2)]
        return [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
    if d == 128:
        return [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)] if hopper else [(64, 32, 4, 2), (128, 32, 8, 1)]
    return [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2)] if hopper else [(64, 16, 8, 1), (32, 32, 4, 1)]


# Under TMA the descriptors were built for one tile along the walked rows (the launcher took the
# first tile's): autotuning chooses among the configs that use it. (kernel -> tile list, which
# tile dimension the descriptors fix, the descriptor argument)
_TMA_TILE = {"forward": (forward_tiles, 1, "KDesc"), "dkdv": (dkdv_tiles, 0, "QDesc"), "dq": (dq_tiles, 1, "KDesc")}


def _pruner(name):
    tiles, fixed, descriptor = _TMA_TILE[name]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        chosen = tiles(args, _capability()[0] >= 9)
        if args["TMA"]:
            chosen = [c for c in chosen if c[fixed] == args[descriptor].block_shape[2]]
        return [_config(*c) for c in chosen]
    return prune


_forward_prune, _dkdv_prune, _dq_prune = _pruner("forward"), _pruner("dkdv"), _pruner("dq")


_TUNING_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "IS_CAUSAL", "DROPOUT", "SPLIT", "TMA", "q_bucket", "k_bucket"]
# Replaced per shape by the prune functions above. Two, because Triton consults a pruner only when
# it holds more than one config: with one, every launch would run that one.
_PLACEHOLDER = [_config(64, 64, 4, 2), _config(64, 32, 4, 2)]
# Unequal tiles on purpose: the tests then see query and key blocks that do not line up.
_INTERPRETER_TILES = {"forward": {"BLOCK_M": 32, "BLOCK_N": 16}, "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
                      "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}}


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _tuned(name):
    """The autotuned kernel (bigkern's autotune: results cached on disk across processes)."""
    from bigkern.kernels.autotune import autotune

    kernel, prune = {
        "forward": (attention_forward_kernel, _forward_prune),
        "dkdv": (attention_backward_dkdv_kernel, _dkdv_prune),
        "dq": (attention_backward_dq_kernel, _dq_prune),
    }[name]
    return autotune(_PLACEHOLDER, key=_TUNING_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


def _launch(name, raw_kernel, grid, args, meta):
    """Run a kernel: autotuned on a GPU, with the one small interpreter tile on the CPU."""
    if _interpreting():
        meta = {**meta, **_INTERPRETER_TILES[name]}
        raw_kernel[grid(meta)](*args, **meta)
    else:
        _tuned(name)[grid](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Launchers. Tensors arrive as 4-D views (B, H, rows, dim) with unit last stride and outputs
# allocated by the caller. A packed variable-length batch passes (1, H, total, dim) views plus
# cu_seqlens (int32, batch + 1): the batch strides are then unused and the batch is len(cu) - 1.

def _strides(t, n):
    return tuple(t.stride())[:n] if t is not None else (0,) * n


def _bucket(n):
    return triton.next_power_of_2(max(int(n), 1))


def _block_dim(d):
    return max(16, triton.next_power_of_2(max(int(d), 1)))


def _precision(dtype, allow_tf32):
    import torch

    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def _geometry(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    # packed: the longest sequence, never more than the tokens there are (a generous max_seqlen
    # would launch that many programs with nothing to do)
    seq_q = q.shape[2] if cu_seqlens_q is None else min(max_seqlen_q, q.shape[2])
    seq_k = k.shape[2] if cu_seqlens_q is None else min(max_seqlen_k, k.shape[2])
    return batch, q.shape[1], k.shape[1], seq_q, seq_k


def _batch_strides(t, n, varlen):
    strides = _strides(t, n)
    return (0,) + strides[1:] if varlen else strides


def _constexprs(q, k, v, mask, is_causal, dropout, allow_tf32, varlen):
    return dict(HEAD_DIM=q.shape[3], HEAD_DIM_V=v.shape[3], BLOCK_D=_block_dim(q.shape[3]),
                BLOCK_DV=_block_dim(v.shape[3]),
                MASK_KIND=MASK_NONE if mask is None else MASK_FLOAT if mask.dtype.is_floating_point else MASK_BOOL,
                IS_CAUSAL=int(is_causal), VARLEN=varlen, DROPOUT=dropout is not None,
                PRECISION=_precision(q.dtype, allow_tf32))


def _dropout_args(dropout):
    """(threshold, scale, seed_lo, seed_hi): `dropout` is (p, seed_lo, seed_hi) or None."""
    if dropout is None:
        return 0, 1.0, 0, 0
    p, seed_lo, seed_hi = dropout
    threshold = min(int(round(p * 2.0**32)), 2**32)
    return threshold, (0.0 if p >= 1.0 else 1.0 / (1.0 - p)), seed_lo, seed_hi


def attention_forward(q, k, v, mask, out, lse, *, scale, is_causal, dropout=None, allow_tf32=False,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """out, lse <- attention(q, k, v). mask: None or a (B, Hq, L, S) view (bool or float, strides
    0 where broadcast). dropout: None or (p, seed_lo, seed_hi)."""
    varlen = cu_seqlens_q is not None
    batch, heads, kv_heads, seq_q, seq_k = _geometry(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if batch == 0 or heads == 0 or seq_q == 0:
        return
    meta = _constexprs(q, k, v, mask, is_causal, dropout, allow_tf32, varlen)
    threshold, dropout_scale, seed_lo, seed_hi = _dropout_args(dropout)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    inputs = (*_batch_strides(q, 3, varlen), *_batch_strides(k, 3, varlen), *_batch_strides(v, 3, varlen),
              *_strides(mask, 4))
    scalars = (heads, heads // kv_heads, seq_q, seq_k, scale, scale * 1.4426950408889634, threshold, dropout_scale,
               seed_lo, seed_hi, _bucket(seq_q), _bucket(seq_k))
    mask_arg = mask if mask is not None else q
    descriptors = tma_descriptors("forward", k, v, seq_q, meta, varlen)
    meta["TMA"] = descriptors is not None
    pointers = (q, k, v, mask_arg) + (descriptors or (q, q))  # placeholders without TMA: never read
    keys_per_split = split_keys(batch, heads, seq_q, seq_k, is_causal, varlen, q.device)
    if keys_per_split is None:
        _launch("forward", attention_forward_kernel, lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), heads, batch),
                (*pointers[:4], out, lse, cu_q, cu_k, *pointers[4:], *inputs, *_batch_strides(out, 3, varlen),
                 *_batch_strides(lse, 2, varlen), 0, 0, 0, *scalars), {**meta, "SPLIT": False})
        return

    # each split writes (B, H, split, L, Dv) fp32 partial outputs and its (B, H, L) max and log l
    # into (B, H, 2 splits, L); then merge
    import torch

    splits = triton.cdiv(seq_k, keys_per_split)
    part = torch.empty((batch, heads, splits, seq_q, v.shape[3]), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, 2 * splits, seq_q), dtype=torch.float32, device=q.device)
    _launch("forward", attention_forward_kernel,
            lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]) * splits, heads, batch),
            (*pointers[:4], part, part_lse, cu_q, cu_k, *pointers[4:], *inputs,
             part.stride(0), part.stride(1), part.stride(3), part_lse.stride(0), part_lse.stride(1),
             part.stride(2), part_lse.stride(2), keys_per_split, *scalars), {**meta, "SPLIT": True})
    block_m = 16
    attention_split_combine_kernel[(triton.cdiv(seq_q, block_m), heads, batch)](
        part, part_lse, out, lse, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        *_strides(part_lse, 3), *_strides(out, 3), *_strides(lse, 2), splits, seq_q,
        HEAD_DIM_V=meta["HEAD_DIM_V"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=block_m)


# TMA (Hopper's copy engine) for the tiles each kernel walks -- forward and dQ: key and value
# blocks; dK/dV: query and output-gradient blocks: one instruction per tile instead of every
# thread computing addresses, and out-of-bounds rows and columns come back as zeros with no masks.
# A host-side descriptor fixes its tile shape, so the launcher picks the walked tile and
# autotuning chooses among the configs that use it (_pruner). Off unless BIGKERN_ATTENTION_TMA=1
# until a GPU run has verified and measured it (bench/NOTES.md, v3).
TMA_ENV = "BIGKERN_ATTENTION_TMA"


def tma_enabled(device):
    import os

    if os.environ.get(TMA_ENV, "0") in ("", "0"):
        return False
    return _interpreting() or (device.type == "cuda" and _capability()[0] >= 9)


def _tma_rows(name, seq_q, meta):
    """The rows of each descriptor tile under TMA: the first tile's, as _pruner keeps it."""
    tiles, fixed, _ = _TMA_TILE[name]
    if _interpreting():
        return _INTERPRETER_TILES[name]["BLOCK_N" if fixed else "BLOCK_M"]
    return tiles(dict(meta, q_bucket=_bucket(seq_q)), _capability()[0] >= 9)[0][fixed]


def _describable(t):
    """Can a TMA descriptor address t: 16-byte aligned base and strides, unit last stride."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st > 0 and st * size % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))


def tma_descriptors(name, first, second, seq_q, meta, varlen):
    """TensorDescriptors over two (B, H, rows, dim) views for kernel `name`'s TMA path -- forward
    and dQ: K and V; dK/dV: Q and dO -- or None where TMA cannot serve: not enabled, a packed
    variable-length batch, 32-bit inputs, unaligned strides or an empty tensor (a descriptor's sizes
    must be positive)."""
    import torch

    if varlen or first.dtype not in (torch.float16, torch.bfloat16) or not tma_enabled(first.device):
        return None
    if first.numel() == 0 or second.numel() == 0:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if not (_describable(first) and _describable(second)):
        return None
    rows = _tma_rows(name, seq_q, meta)

    def describe(t, block_d):
        # a size-1 dimension's stride is never used; give it one the copy engine accepts
        strides = [st if n > 1 else 16 // t.element_size() for st, n in zip(t.stride(), t.shape)]
        strides[-1] = 1
        return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, block_d])
    return describe(first, meta["BLOCK_D"]), describe(second, meta["BLOCK_DV"])


# Flash-decoding: with few query rows (decoding) the unsplit grid has batch * heads programs, too
# few to fill the GPU, each walking every key. Splitting the key walk over several programs and
# merging their partial results (one small extra kernel) puts every SM to work.
SPLIT_MAX_QUERY_ROWS = 16  # the decoding tiles' BLOCK_M: one query block per (batch, head)
SPLIT_KEY_GRANULE = 128  # keys per split are a multiple of every decoding tile's BLOCK_N
SPLIT_MIN_GRANULES = 2  # each split walks at least this many granules (the merge is not free)
SPLIT_ENV = "BIGKERN_ATTENTION_SPLIT_KV"  # 0 turns splitting off (for before/after benchmarks)


def split_keys(batch, heads, seq_q, seq_k, is_causal, varlen, device):
    """Keys each split of the forward walks, or None to run unsplit."""
    import os

    if varlen or is_causal == 1 or seq_q > SPLIT_MAX_QUERY_ROWS or os.environ.get(SPLIT_ENV, "1") == "0":
        # top-left causal rows see at most seq_q keys here (bottom-right ones nearly all: a KV cache's
        # decoding, what splitting is for); varlen sequences vary
        return None
    granule = _INTERPRETER_TILES["forward"]["BLOCK_N"] if _interpreting() else SPLIT_KEY_GRANULE
    programs = batch * heads
    target = 2 * _multiprocessors(device)
    granules = triton.cdiv(seq_k, granule)
    splits = min(triton.cdiv(target, programs), granules // SPLIT_MIN_GRANULES)
    if splits < 2:
        return None
    return triton.cdiv(granules, splits) * granule


@functools.lru_cache(maxsize=None)
def _multiprocessors(device):
    import torch

    if device.type != "cuda":
        return 4  # the interpreter: small test shapes still split
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention_backward(grad_out, q, k, v, mask, out, lse, grad_lse, delta, grad_q, grad_k, grad_v, grad_mask, *,
                       scale, is_causal, dropout=None, allow_tf32=False,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """grad_q, grad_k, grad_v (and grad_mask, a (B, Hq, L, S) tensor, when not None) <- the
    gradients of attention(q, k, v); delta is fp32 scratch shaped like lse."""
    varlen = cu_seqlens_q is not None
    batch, heads, kv_heads, seq_q, seq_k = _geometry(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if batch == 0 or heads == 0:
        return
    meta = _constexprs(q, k, v, mask, is_causal, dropout, allow_tf32, varlen)
    threshold, dropout_scale, seed_lo, seed_hi = _dropout_args(dropout)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    if seq_q > 0:
        block_m = 16 if _interpreting() else 32
        attention_backward_delta_kernel[(triton.cdiv(seq_q, block_m), heads, batch)](
            out, grad_out, grad_lse if grad_lse is not None else lse, delta, cu_q,
            *_batch_strides(out, 3, varlen), *_batch_strides(grad_out, 3, varlen), *_batch_strides(lse, 2, varlen),
            seq_q, HEAD_DIM_V=meta["HEAD_DIM_V"], BLOCK_DV=meta["BLOCK_DV"], VARLEN=varlen,
            HAS_GRAD_LSE=grad_lse is not None, BLOCK_M=block_m)
    mask_arg = mask if mask is not None else q
    stats, stride_stats = lse, 0  # read only under a float mask
    if meta["MASK_KIND"] == MASK_FLOAT and seq_q > 0 and seq_k > 0:
        import torch

        stats = torch.empty((2, *lse.shape), dtype=torch.float32, device=lse.device)
        stride_stats = stats.stride(0)
        block_m, block_n = (32, 16) if _interpreting() else (64, 64)
        attention_backward_row_stats_kernel[(triton.cdiv(seq_q, block_m), heads, batch)](
            q, k, mask_arg, lse, stats, cu_q, cu_k, *_batch_strides(q, 3, varlen), *_batch_strides(k, 3, varlen),
            *_strides(mask, 4), *_batch_strides(lse, 2, varlen), stride_stats, heads // kv_heads, seq_q, seq_k,
            scale, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"],
            IS_CAUSAL=meta["IS_CAUSAL"], VARLEN=varlen, PRECISION=meta["PRECISION"], BLOCK_M=block_m,
            BLOCK_N=block_n)
    common = (*_batch_strides(q, 3, varlen), *_batch_strides(k, 3, varlen), *_batch_strides(v, 3, varlen),
              *_strides(mask, 4), *_batch_strides(grad_out, 3, varlen), *_batch_strides(lse, 2, varlen),
              stride_stats)
    scalars = (heads, heads // kv_heads, seq_q, seq_k, scale, scale * 1.4426950408889634,
               threshold, dropout_scale, seed_lo, seed_hi, _bucket(seq_q), _bucket(seq_k))
    if seq_k > 0:
        descriptors = tma_descriptors("dkdv", q, grad_out, seq_q, meta, varlen)
        _launch("dkdv", attention_backward_dkdv_kernel,
                lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), kv_heads, batch),
                (q, k, v, mask_arg, grad_out, lse, stats, delta, grad_k, grad_v, cu_q, cu_k, *(descriptors or (q, q)),
                 *common, *_batch_strides(grad_k, 3, varlen), *_batch_strides(grad_v, 3, varlen), *scalars),
                {**meta, "TMA": descriptors is not None})
    if seq_q > 0:
        descriptors = tma_descriptors("dq", k, v, seq_q, meta, varlen)
        _launch("dq", attention_backward_dq_kernel,
                lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), heads, batch),
                (q, k, v, mask_arg, grad_out, lse, stats, delta, grad_q, grad_mask if grad_mask is not None else q,
                 cu_q, cu_k, *(descriptors or (q, q)), *common, *_batch_strides(grad_q, 3, varlen),
                 *_strides(grad_mask, 4), *scalars),
                {**meta, "MASK_GRAD": grad_mask is not None, "TMA": descriptors is not None})
