"""The Triton kernels behind :mod:`mlsys_ref.quant.qmatmul` (W4A16 / W8A16), and their tile configs.

See qmatmul.py for the papers, the layout and the design; this file holds only ``@triton.jit`` code.
Three tricks to notice, each spelled out where it happens:
- int -> float by OR-ing the code into the mantissa of 2^23 (Kim et al. 2022, arXiv:2211.10017, §3.2):
  integer-unit ops instead of the slow int-to-float conversion.
- a packed int4 byte holds codes for columns 2j and 2j+1; a 16-bit activation pair x[2j], x[2j+1] is
  one int32 word, so x is read as int32 (contiguous, wide loads) and split with shifts -- and a bf16
  is the top half of an fp32, so for bf16 the split *is* the conversion to fp32.
- a BLOCK_K chunk never straddles a quantization group: one scale (and zero) per row per chunk.
"""

from __future__ import annotations

from mlsys_ref.backend import is_interpreter, tl, triton


@triton.jit
def _unsigned_codes(p, t: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """Stored bytes -> unsigned codes u of sub-column t, as exact fp32 (u - ZERO_SHIFT = code)."""
    if BITS == 4:
        u = (p.to(tl.int32) >> (4 * t)) & 0xF
    elif SIGNED:
        u = p.to(tl.int32) + 128  # int8 codes shifted to [0, 255]
    else:
        u = p.to(tl.int32)
    # 0x4B000000 is 2^23 in fp32: OR-ing u < 2^23 into its mantissa gives the float 2^23 + u exactly
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _split_pairs(words, OUT: tl.constexpr, IS_BF16: tl.constexpr):
    """int32 words holding x[2j] (low 16 bits) and x[2j+1] (high 16 bits) -> (x_even, x_odd) in OUT."""
    if IS_BF16:
        even = (words << 16).to(tl.float32, bitcast=True)  # a bf16 moved to the top half is that fp32
        odd = (words & -65536).to(tl.float32, bitcast=True)
    else:
        even = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        odd = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return even.to(OUT), odd.to(OUT)


@triton.jit
def _load_x(x_ptr, k0, t: tl.constexpr, offs_j, offs_m, M, K, stride_xm, stride_xk,
            PACK: tl.constexpr, OUT: tl.constexpr, ONE_ROW: tl.constexpr):
    """The activations that sub-column t of the chunk multiplies: x[m, k0 + PACK·j + t] -> [KP] or xᵀ [KP, M]."""
    xk = k0 + offs_j * PACK + t
    if ONE_ROW:
        return tl.load(x_ptr + xk * stride_xk, mask=xk < K, other=0).to(OUT)
    return tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None] * stride_xk,
                   mask=(offs_m[None, :] < M) & (xk[:, None] < K), other=0).to(OUT)


@triton.jit
def _load_x_pairs(x_ptr, k0, offs_j, offs_m, M, K, stride_xm, stride_xk,
                  OUT: tl.constexpr, IS_BF16: tl.constexpr, ONE_ROW: tl.constexpr):
    """x viewed as int32 [M, K/2]: both halves of an int4 chunk's activations in one contiguous load."""
    jw = k0 // 2 + offs_j
    if ONE_ROW:
        words = tl.load(x_ptr + jw * stride_xk, mask=jw < K // 2, other=0)
    else:
        words = tl.load(x_ptr + offs_m[None, :] * stride_xm + jw[:, None] * stride_xk,
                        mask=(offs_m[None, :] < M) & (jw[:, None] < K // 2), other=0)
    return _split_pairs(words, OUT, IS_BF16)


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, group_size, k_per_split,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg,
                  stride_os, stride_om, stride_on,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                  EVEN_K: tl.constexpr, DOT: tl.constexpr, XT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 8 // BITS  # codes per stored byte
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK  # stored bytes per row per chunk
    ONE_ROW: tl.constexpr = BLOCK_M == 1  # M = 1: FMA units (x in XT = fp32); else tl.dot, weight on the left
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_KP)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # yᵀ tile
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # -- one contiguous strip of packed weights: [BLOCK_N, BLOCK_KP] bytes, 16-byte loads per row
        kp = k0 // PACK + offs_j
        if EVEN_K:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None], other=0)
        else:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None] & (kp[None, :] < K // PACK), other=0)
        # -- the chunk lies in one group: one scale (and zero) per row
        g = k0 // group_size
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        z = tl.zeros([BLOCK_N], dtype=tl.float32) + ZERO_SHIFT
        if HAS_ZEROS:
            z += tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        if X_PAIRS:
            x_even, x_odd = _load_x_pairs(x_ptr, k0, offs_j, offs_m, M, K, stride_xm, stride_xk, XT, IS_BF16, ONE_ROW)
        part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in tl.static_range(PACK):
            w = _unsigned_codes(p, t, BITS, SIGNED) - z[:, None]  # integer-valued (q - z), [BLOCK_N, BLOCK_KP]
            if X_PAIRS:
                if t == 0:
                    xs = x_even
                else:
                    xs = x_odd
            else:
                xs = _load_x(x_ptr, k0, t, offs_j, offs_m, M, K, stride_xm, stride_xk, PACK, XT, ONE_ROW)
            if ONE_ROW:
                part += tl.sum(w * xs[None, :], axis=1)[:, None]
            else:
                part += tl.dot(w.to(DOT), xs, input_precision=PRECISION)
        acc += part * s[:, None]  # scale once per chunk, not once per weight
    out_mask = n_mask[:, None] & (offs_m[None, :] < M)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)  # fp32 partial sums, reduced by _splitk_reduce_kernel


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[m, n] = Σ_s workspace[s, m, n] (+ bias[n]), all contiguous; a fixed order: deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + split * MN + offs, mask=mask, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, group_size,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, EVEN_K: tl.constexpr,
                  DOT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 8 // BITS
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)  # axis 0 fastest: M tiles of one weight strip together
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KP)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm  # int64 row offset; offs below are local
    local_m = tl.arange(0, BLOCK_M)
    rows_left = M - pid_m * BLOCK_M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # yᵀ tile: the weight is dot's left operand
    for k0 in range(0, K, BLOCK_K):
        kp = k0 // PACK + offs_j
        if EVEN_K:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None], other=0)
        else:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None] & (kp[None, :] < K // PACK), other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        z = tl.zeros([BLOCK_N], dtype=tl.float32) + ZERO_SHIFT
        if HAS_ZEROS:
            z += tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        if X_PAIRS:
            x_even, x_odd = _load_x_pairs(x_rows, k0, offs_j, local_m, rows_left, K, stride_xm, stride_xk,
                                          DOT, IS_BF16, False)
        for t in tl.static_range(PACK):
            # -- dequantize in registers: W tile [BLOCK_N, BLOCK_KP] = (u - z)·s, in the dot's dtype
            w = ((_unsigned_codes(p, t, BITS, SIGNED) - z[:, None]) * s[:, None]).to(DOT)
            if X_PAIRS:
                if t == 0:
                    xs = x_even
                else:
                    xs = x_odd
            else:
                xs = _load_x(x_rows, k0, t, offs_j, local_m, rows_left, K, stride_xm, stride_xk, PACK, DOT, False)
            acc = tl.dot(w, xs, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# -- configs: ONE under the interpreter (big tiles: the interpreter pays per program, not per element)
def gemv_configs(M: int) -> list[dict]:
    if is_interpreter():
        return [dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1)]
    table = [(16, 128, 1, 4), (32, 128, 1, 4), (64, 128, 1, 4), (32, 256, 1, 4), (16, 512, 1, 4),
             (32, 128, 2, 4), (16, 256, 2, 4), (32, 128, 4, 4), (64, 64, 2, 4), (128, 128, 1, 8)]
    if M > 1:  # tl.dot needs BLOCK_N >= 16 and favours wider N tiles
        table = [(n, k, s, w) for n, k, s, w in table if n >= 32] + [(128, 64, 2, 4), (64, 128, 4, 4)]
    return [dict(BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=3) for n, k, s, w in table]


def gemm_configs() -> list[dict]:
    if is_interpreter():
        return [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)]
    table = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (32, 128, 128, 4, 3),
             (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 128, 4, 3), (64, 128, 128, 8, 3)]
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in table]
