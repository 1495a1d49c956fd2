"""The Triton kernels behind :mod:`mlsys_ref.quant.qmatmul` (W4A16 / W8A16), and their tile configs.

See qmatmul.py for the papers, the layout and the design; this file holds only ``@triton.jit`` code.
Three tricks to notice, each spelled out where it happens:
- int -> float by OR-ing the code into the mantissa of 2^23 (the "magic number" conversion of
  FasterTransformer's weight-only kernels, Kim et al. 2022, arXiv:2211.10017): integer-unit ops
  instead of the slow int-to-float conversion.
- a packed int4 byte holds codes for columns 2j and 2j+1; a 16-bit activation pair x[2j], x[2j+1] is
  one int32 word, so x is read as int32 (contiguous, wide loads) and split with shifts -- and a bf16
  is the top half of an fp32, so for bf16 the split *is* the conversion to fp32.
- a BLOCK_K chunk never straddles a quantization group: one scale (and zero) per row per chunk.
"""

from __future__ import annotations

from mlsys_ref.backend import is_interpreter, tl, triton


@triton.jit
def _codes(p, t: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, ZERO_SHIFT: tl.constexpr):
    """Stored bytes -> the code q of sub-column t as exact fp32 (u the unsigned byte/nibble, q = u - ZERO_SHIFT)."""
    if BITS == 4:
        u = (p.to(tl.int32) >> (4 * t)) & 0xF
    elif SIGNED:  # int8 storage read as bytes (uint8): byte = q mod 256, and flipping its top bit gives q + 128
        u = p.to(tl.int32) ^ 0x80
    else:
        u = p.to(tl.int32)
    # 0x4B000000 is 2^23 in fp32: OR-ing u < 2^23 into its mantissa gives the float 2^23 + u exactly;
    # subtracting the constant 2^23 + ZERO_SHIFT then leaves the code q, exactly, in one add
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO_SHIFT)


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
def _load_x(x_ptr, k0, t: tl.constexpr, offs_j, offs_m, M, K, stride_xm, stride_xk, PACK: tl.constexpr,
            OUT: tl.constexpr):
    """xᵀ [KP, M] tile of the activations sub-column t of the chunk multiplies: x[m, k0 + PACK·j + t]."""
    xk = k0 + offs_j * PACK + t
    x = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None] * stride_xk,
                mask=(offs_m[None, :] < M) & (xk[:, None] < K), other=0)
    return x.to(OUT)


@triton.jit
def _load_x_pairs(x_ptr, k0, offs_j, offs_m, M, K, stride_xm, stride_xk, OUT: tl.constexpr, IS_BF16: tl.constexpr):
    """x viewed as int32 [M, K/2]: both halves of an int4 chunk's activations (xᵀ tiles) in one load."""
    jw = k0 // 2 + offs_j
    words = tl.load(x_ptr + offs_m[None, :] * stride_xm + jw[:, None] * stride_xk,
                    mask=(offs_m[None, :] < M) & (jw[:, None] < K // 2), other=0)
    return _split_pairs(words, OUT, IS_BF16)


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, group_size, k_per_split,
                  stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_on,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_KG: tl.constexpr):
    """M = 1: y[n] = Σ_k x[k]·w[n, k] on the FMA units. Each step reads a [BLOCK_N, BLOCK_G, BLOCK_KG]
    strip: BLOCK_G runs of BLOCK_KG codes, each run inside one group (its own scale), so one step can
    read more bytes per row than a group holds -- more bytes in flight per warp, as bandwidth needs."""
    PACK: tl.constexpr = 8 // BITS  # codes per stored byte
    BLOCK_KGP: tl.constexpr = BLOCK_KG // PACK  # stored bytes per row per run
    BLOCK_K: tl.constexpr = BLOCK_G * BLOCK_KG  # codes per row per step
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, BLOCK_G)
    col = offs_g[:, None] * BLOCK_KGP + tl.arange(0, BLOCK_KGP)[None, :]  # [BLOCK_G, BLOCK_KGP] byte within the step
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn  # [BLOCK_N, 1, 1]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_per_split is a multiple of BLOCK_K: tells the compiler 16-byte loads are aligned
        # -- one contiguous strip of packed weights [BLOCK_N, BLOCK_G, BLOCK_KGP]: 16-byte loads per row
        kp = tl.multiple_of(k0 // PACK, BLOCK_K // PACK) + col
        if EVEN_K:
            p = tl.load(w_rows + kp[None, :, :] * stride_wk, mask=n_mask[:, None, None], other=0)
        else:
            p = tl.load(w_rows + kp[None, :, :] * stride_wk,
                        mask=n_mask[:, None, None] & (kp[None, :, :] < K // PACK), other=0)
        # -- each run lies in one group: one scale (and zero) per row and run, [BLOCK_N, BLOCK_G]
        g = (k0 + offs_g * BLOCK_KG) // group_size
        sz_offs = offs_n[:, None] * stride_sn + g[None, :] * stride_sg
        s = tl.load(s_ptr + sz_offs, mask=n_mask[:, None], other=0).to(tl.float32)
        if X_PAIRS:  # x as int32 words: word k0/2 + col holds the two activations of byte col
            words = tl.load(x_ptr + (k0 // 2 + col) * stride_xk, mask=k0 // 2 + col < K // 2, other=0)
            x_even, x_odd = _split_pairs(words, tl.float32, IS_BF16)
        for t in tl.static_range(PACK):
            q = _codes(p, t, BITS, SIGNED, ZERO_SHIFT)  # [BLOCK_N, BLOCK_G, BLOCK_KGP]
            if X_PAIRS:
                if t == 0:
                    xs = x_even
                else:
                    xs = x_odd
            else:
                xk = k0 + col * PACK + t
                xs = tl.load(x_ptr + xk * stride_xk, mask=xk < K, other=0).to(tl.float32)
            if t == 0:  # products of both nibbles summed elementwise (one FMA each), then one reduction
                prod = q * xs[None, :, :]
                x_sum = tl.sum(xs, axis=1)
            else:
                prod += q * xs[None, :, :]
                x_sum += tl.sum(xs, axis=1)
        part = tl.sum(prod, axis=2)  # Σ_j q·x per row and run, [BLOCK_N, BLOCK_G]
        if HAS_ZEROS:  # Σ_j (q - z)·x = Σ_j q·x - z·Σ_j x: the zero point costs one FMA per row and run
            part -= tl.load(z_ptr + sz_offs, mask=n_mask[:, None], other=0).to(tl.float32) * x_sum[None, :]
        acc += tl.sum(part * s, axis=1)  # scale once per row and run, not once per weight
    out_ptrs = out_ptr + pid_k * stride_os + offs_n * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_ptrs, acc, mask=n_mask)  # fp32 partial sums, reduced by _splitk_reduce_kernel


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
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, group_size, k_per_split,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                  EVEN_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M >= 2: yᵀ tile [BLOCK_N, BLOCK_M] = W x^T on the tensor cores, the weight dequantized in registers
    as the left operand (N fills the MMA's M slot, so M = 16 wastes nothing); optional split-K."""
    PACK: tl.constexpr = 8 // BITS
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK
    # axis 0 fastest: the M tiles that share one weight strip run together (it is read from HBM once)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KP)
    m_mask, n_mask = offs_m < M, offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm  # int64 row offset; offs below are local
    local_m = tl.arange(0, BLOCK_M)
    rows_left = M - pid_m * BLOCK_M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_per_split is a multiple of BLOCK_K: tells the compiler 16-byte loads are aligned
        kp = tl.multiple_of(k0 // PACK, BLOCK_KP) + offs_j
        if EVEN_K:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None], other=0)
        else:
            p = tl.load(w_rows + kp[None, :] * stride_wk, mask=n_mask[:, None] & (kp[None, :] < K // PACK), other=0)
        g = k0 // group_size  # the chunk lies in one group
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        if HAS_ZEROS:  # (q - z)·s = q·s - z·s: one FMA per weight
            zs = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32) * s
        if X_PAIRS:
            x_even, x_odd = _load_x_pairs(x_rows, k0, offs_j, local_m, rows_left, K, stride_xm, stride_xk, DOT, IS_BF16)
        for t in tl.static_range(PACK):
            # -- dequantize in registers: W tile [BLOCK_N, BLOCK_KP] = (q - z)·s, in the dot's dtype
            w = _codes(p, t, BITS, SIGNED, ZERO_SHIFT) * s[:, None]
            if HAS_ZEROS:
                w -= zs[:, None]
            w = w.to(DOT)
            if X_PAIRS:
                if t == 0:
                    xs = x_even
                else:
                    xs = x_odd
            else:
                xs = _load_x(x_rows, k0, t, offs_j, local_m, rows_left, K, stride_xm, stride_xk, PACK, DOT)
            acc = tl.dot(w, xs, acc, input_precision=PRECISION)
    out_mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)  # fp32 partial sums, reduced by _splitk_reduce_kernel


# -- configs: ONE per path under the interpreter (big tiles: the interpreter pays per program, not per element)
def gemv_configs() -> list[dict]:
    """M = 1: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps). No software pipeline here: the bytes in flight come
    from resident warps, so wide steps (BLOCK_K spans several groups), split-K and small programs."""
    if is_interpreter():
        return [dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1)]
    table = [(16, 256, 1, 4), (32, 256, 1, 4), (16, 512, 1, 4), (32, 512, 1, 8), (64, 256, 1, 8),
             (16, 256, 2, 4), (16, 512, 2, 4), (32, 256, 2, 4), (16, 256, 4, 4), (8, 512, 2, 2),
             (16, 128, 4, 2), (16, 1024, 1, 4), (32, 128, 1, 4)]
    return [dict(BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=1) for n, k, s, w in table]


def gemm_configs(M: int) -> list[dict]:
    """M >= 2: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); M <= 16 is the skinny, GEMV-like
    regime (one 16-row tile, split-K), larger M the tiled GEMM."""
    if is_interpreter():
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1) if M <= 16 else
                dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=1)]
    if M <= 16:
        table = [(16, 64, 128, 1, 4, 3), (16, 64, 128, 2, 4, 3), (16, 64, 128, 4, 4, 3), (16, 128, 128, 2, 8, 3),
                 (16, 128, 64, 2, 4, 4), (16, 32, 128, 2, 4, 3), (16, 32, 128, 4, 4, 3), (16, 64, 64, 4, 4, 4)]
    else:
        table = [(64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (64, 64, 64, 1, 4, 4), (32, 128, 128, 1, 4, 3),
                 (64, 256, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (128, 64, 128, 1, 4, 3), (64, 128, 128, 1, 8, 3),
                 (32, 128, 64, 2, 4, 4)]
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=st) for m, n, k, s, w, st in table]


if __name__ == "__main__":
    import torch

    from mlsys_ref.backend import default_device
    from mlsys_ref.quant.linear import QuantizedLinear
    from mlsys_ref.quant.qmatmul import quant_matmul, quant_matmul_reference
    from mlsys_ref.testing import max_error

    print("GEMV configs (M = 1):", gemv_configs()[:3], "...")
    for M in (16, 256):
        print(f"tiled configs (M = {M}):", gemm_configs(M)[:2], "...")
    torch.manual_seed(0)
    ql = QuantizedLinear.from_linear(torch.nn.Linear(256, 40), 4, 64, symmetric=False).to(default_device())
    for M in (1, 16, 33):  # GEMV, skinny tiled (split-K), tiled
        x = torch.randn(M, 256, device=default_device(), dtype=torch.float16)
        y = quant_matmul(x, ql.qweight, ql.scales, ql.zeros, bits=4)
        print(f"M={M:2d}: max error vs dequantize-then-matmul "
              f"{max_error(y, quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4)):.2e}")
