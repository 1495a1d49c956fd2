"""The Triton kernels behind :mod:`mlsys_ref.quant.qmatmul` (W4A16 / W8A16), and the inline PTX they use.

See qmatmul.py for the papers, the layout and the design; this file holds the ``@triton.jit`` code (the
tile configs live in :mod:`mlsys_ref.quant.qmatmul_tune`, the inline PTX in :mod:`mlsys_ref.quant.qmatmul_ptx`).
Tricks to notice, each spelled out where it happens:
- int -> float without a conversion instruction: OR the code into the mantissa of a power of two (the
  "magic number" conversion of FasterTransformer's weight-only kernels, Kim et al. 2022,
  arXiv:2211.10017). The GEMV ORs it into 256.0 or 16.0 (f = 2^p + u) and folds the "2^p +" into a
  per-group sum of x; the GEMM does the same on two bf16/f16 values per register with inline PTX.
- a packed int4 byte holds codes for columns 2j and 2j+1; a 16-bit activation pair x[2j], x[2j+1] is
  one int32 word, so x is read as int32 (contiguous, wide loads) and split with shifts -- and a bf16
  is the top half of an fp32, so for bf16 the split *is* the conversion to fp32.
- a BLOCK_K chunk never straddles a quantization group: one scale (and zero) per row per chunk.
"""

from __future__ import annotations

from mlsys_ref.backend import tl, triton


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
    if IS_BF16 and OUT == tl.float32:
        even = (words << 16).to(tl.float32, bitcast=True)  # a bf16 moved to the top half is that fp32
        odd = (words & -65536).to(tl.float32, bitcast=True)
    else:  # the 16-bit halves as they are (no float conversion when OUT is x's own dtype)
        even = (words & 0xFFFF).to(tl.int16).to(tl.bfloat16 if IS_BF16 else tl.float16, bitcast=True)
        odd = (words >> 16).to(tl.int16).to(tl.bfloat16 if IS_BF16 else tl.float16, bitcast=True)
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
def _byte_at_15(w, BYTE: tl.constexpr):
    """Byte BYTE of each int32 word moved to bits [15, 23), the top 8 mantissa bits of an fp32."""
    SHIFT: tl.constexpr = 15 - 8 * BYTE
    if SHIFT >= 0:
        return w << SHIFT
    return w >> (-SHIFT)  # arithmetic shift: the sign copies land above bit 22 and are masked off


@triton.jit
def _or_power(a, MASK: tl.constexpr, POWER: tl.constexpr, LOP3: tl.constexpr):
    """(a & MASK) | POWER (the bits of a power of two): one three-input LOP3 on the GPU, where LOP3 is its
    inline PTX (lop3_ptx); left to LLVM, the expression is canonicalized to (a | P) & (MASK | P), two."""
    if LOP3 != "":
        return tl.inline_asm_elementwise(LOP3, "=r,r", [a], dtype=tl.int32, is_pure=True, pack=1)
    return (a & MASK) | POWER


@triton.jit
def _pair_codes(w, j: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr, LOP3_LO: tl.constexpr,
                LOP3_HI: tl.constexpr):
    """int32 words -> (f_lo, f_hi) for code pair j of each word (int4: the nibbles of byte j; int8: bytes 2j,
    2j+1): f = 256 + u, except the int4 high nibble, f = 16 + u -- the code sits in the top mantissa bits
    of 256.0 (or 16.0), whose unit in that place is exactly 1. Bits only: a shift per byte and one LOP3 per
    code (the int8 masks are both LOP3_LO's)."""
    if BITS == 4:
        wb = _byte_at_15(w, j)
        f_lo = _or_power(wb, 0x00078000, 0x43800000, LOP3_LO)  # low nibble at bits [15, 19) of 256.0
        f_hi = _or_power(wb, 0x00780000, 0x41800000, LOP3_HI)  # high nibble at bits [19, 23) of 16.0
    else:
        f_lo = _or_power(_byte_at_15(w, 2 * j), 0x007F8000, 0x43800000, LOP3_LO)  # the byte at bits [15, 23)
        f_hi = _or_power(_byte_at_15(w, 2 * j + 1), 0x007F8000, 0x43800000, LOP3_LO)
    f_lo, f_hi = f_lo.to(tl.float32, bitcast=True), f_hi.to(tl.float32, bitcast=True)
    if EXACT:  # fp32 x: f - 2^p = u exactly (one FADD more), so x·(f - 2^p) rounds like x·u itself
        return f_lo - 256.0, f_hi - (16.0 if BITS == 4 else 256.0)
    return f_lo, f_hi


@triton.jit
def _x_pair(x_ptr, xi, K, stride_xk, X_PAIRS: tl.constexpr, EVEN_K: tl.constexpr, IS_BF16: tl.constexpr):
    """The activation pair (x[2·xi], x[2·xi + 1]) as fp32 (16-bit x: one int32 word per pair)."""
    if X_PAIRS and EVEN_K:
        return _split_pairs(tl.load(x_ptr + xi * stride_xk), tl.float32, IS_BF16)
    if X_PAIRS:
        return _split_pairs(tl.load(x_ptr + xi * stride_xk, mask=xi < K // 2, other=0), tl.float32, IS_BF16)
    x_lo = tl.load(x_ptr + 2 * xi * stride_xk, mask=2 * xi < K, other=0).to(tl.float32)
    return x_lo, tl.load(x_ptr + (2 * xi + 1) * stride_xk, mask=2 * xi + 1 < K, other=0).to(tl.float32)


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, group_size, k_per_split,
                  stride_xk, stride_wn, stride_sn, stride_sg,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                  EVEN_K: tl.constexpr, STAGES: tl.constexpr, LOP3_LO: tl.constexpr, LOP3_HI: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_KG: tl.constexpr):
    """M = 1: y[n] = Σ_g s[n,g]·(Σ_{k∈g} x_k·u[n,k] - (ZERO_SHIFT + z[n,g])·Σ_{k∈g} x_k) on the FMA units.
    The weight is read as int32 words (8 int4 or 4 int8 codes) and each code becomes f = 2^p + u by
    bit operations alone (_pair_codes), so Σ x·f = 2^p·Σ x + Σ x·u: per weight only shift/LOP3 + one FMA
    remain; 2^p·Σ x, Σ x, scales and zeros are applied once per group run.
    A step reads [BLOCK_N, BLOCK_G, BLOCK_WG] words (BLOCK_G runs of BLOCK_KG codes, each inside one group);
    STAGES = 1 loads the next step's words and scales during this step (register double buffer), STAGES > 1
    leaves it to Triton's cp.async pipeline. Split-K: each program stores its fp32 partials, and the last of
    the SPLIT_K programs of a tile (an atomic counter) sums them in a fixed order: one launch, deterministic."""
    CPW: tl.constexpr = 32 // BITS  # codes per int32 word
    PAIRS: tl.constexpr = CPW // 2  # x pairs (one int32 word of a 16-bit x) per weight word
    # what the "2^p +" of f adds per x (none when exact): 256, and 16 for the int4 high nibble
    ONE_LO: tl.constexpr = 0.0 if not X_PAIRS else 256.0
    ONE_HI: tl.constexpr = 0.0 if not X_PAIRS else (16.0 if BITS == 4 else 256.0)
    BLOCK_WG: tl.constexpr = BLOCK_KG // CPW  # words per row per run
    BLOCK_K: tl.constexpr = BLOCK_G * BLOCK_KG  # codes per row per step
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, BLOCK_G)
    col = offs_g[:, None] * BLOCK_WG + tl.arange(0, BLOCK_WG)[None, :]  # [BLOCK_G, BLOCK_WG] word within the step
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn  # [BLOCK_N, 1, 1]
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)  # k_per_split is a multiple of BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, K)
    kw_end = k_end // CPW
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)  # per run position: reduced over runs once, at the end
    if STAGES == 1:  # the first step's words now, each next step's during this one
        kw = k_start // CPW + col
        if EVEN_K:  # a mask constant along K keeps 16-byte loads (tl.where: `bool & scalar` trips the interpreter)
            p_next = tl.load(w_rows + kw[None, :, :], mask=tl.where(k_start < k_end, n_mask, False)[:, None, None], other=0)
        else:
            p_next = tl.load(w_rows + kw[None, :, :], mask=n_mask[:, None, None] & (kw[None, :, :] < kw_end), other=0)
        run_k = k_start + offs_g * BLOCK_KG  # the scales too: a first touch of them is a DRAM round trip
        s_next = tl.load(s_ptr + offs_n[:, None] * stride_sn + (run_k // group_size)[None, :] * stride_sg,
                         mask=n_mask[:, None] & (run_k < k_end)[None, :], other=0)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):  # STAGES > 1: Triton's cp.async pipeline
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_per_split is a multiple of BLOCK_K: aligned 16-byte loads
        if STAGES == 1:
            p = p_next
            kw = (k0 + BLOCK_K) // CPW + col
            if EVEN_K:
                p_next = tl.load(w_rows + kw[None, :, :], mask=tl.where(k0 + BLOCK_K < k_end, n_mask, False)[:, None, None],
                                 other=0)
            else:
                p_next = tl.load(w_rows + kw[None, :, :], mask=n_mask[:, None, None] & (kw[None, :, :] < kw_end), other=0)
        else:
            kw = k0 // CPW + col
            if EVEN_K:
                p = tl.load(w_rows + kw[None, :, :], mask=n_mask[:, None, None], other=0)
            else:
                p = tl.load(w_rows + kw[None, :, :], mask=n_mask[:, None, None] & (kw[None, :, :] < kw_end), other=0)
        run_k = k0 + offs_g * BLOCK_KG
        g = run_k // group_size  # each run lies in one group
        sz_offs = offs_n[:, None] * stride_sn + g[None, :] * stride_sg  # [BLOCK_N, BLOCK_G]
        sz_mask = n_mask[:, None] & (run_k < k_end)[None, :]  # runs past K (a ragged last step) have no group
        if STAGES == 1:
            s, g = s_next.to(tl.float32), (run_k + BLOCK_K) // group_size
            s_next = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                             mask=n_mask[:, None] & (run_k + BLOCK_K < k_end)[None, :], other=0)
        else:
            s = tl.load(s_ptr + sz_offs, mask=sz_mask, other=0).to(tl.float32)
        if SIGNED:  # int8 byte b = q mod 256: flipping each byte's top bit gives u = q + 128 (0x80808080)
            p = p ^ -0x7F7F7F80
        for j in tl.static_range(PAIRS):
            xi = k0 // 2 + col * PAIRS + j  # x pair (x[2·xi], x[2·xi + 1]) of code pair j, [BLOCK_G, BLOCK_WG]
            x_lo, x_hi = _x_pair(x_ptr, xi, K, stride_xk, X_PAIRS, EVEN_K, IS_BF16)
            f_lo, f_hi = _pair_codes(p, j, BITS, not X_PAIRS, LOP3_LO, LOP3_HI)
            # Σ x·f = Σ x·u + Σ 2^p·x (p = 8, or 4 for the int4 high nibble); c = Σ (2^p + ZERO_SHIFT)·x
            if j == 0:
                dot = f_lo * x_lo[None, :, :]
                c = x_lo * (ONE_LO + ZERO_SHIFT)
            else:
                dot += f_lo * x_lo[None, :, :]
                c += x_lo * (ONE_LO + ZERO_SHIFT)
            dot += f_hi * x_hi[None, :, :]
            c += x_hi * (ONE_HI + ZERO_SHIFT)
            if HAS_ZEROS:
                if j == 0:
                    x_sum = x_lo + x_hi
                else:
                    x_sum += x_lo + x_hi
        # -- per row and run: Σ x·q = Σ x·f - Σ (2^p + ZERO_SHIFT)·x  (q = u - ZERO_SHIFT), minus z·Σ x
        part = tl.sum(dot, axis=2) - tl.sum(c, axis=1)[None, :]  # [BLOCK_N, BLOCK_G]
        if HAS_ZEROS:
            part -= tl.load(z_ptr + sz_offs, mask=sz_mask, other=0).to(tl.float32) * tl.sum(x_sum, axis=1)[None, :]
        acc += part * s  # scale once per row and run, not once per weight
    acc = tl.sum(acc, axis=1)  # [BLOCK_N]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:  # fp32 partials [SPLIT_K, N]
        _sum_splits_at_last_arrival(acc, ws_ptr, out_ptr, offs_n, n_mask, N, pid_k, cnt_ptr + pid_n, b_ptr + offs_n,
                                    n_mask, SPLIT_K, HAS_BIAS)


@triton.jit
def _sum_splits_at_last_arrival(acc, ws_ptr, out_ptr, offsets, mask, split_size, pid_k, counter, bias_ptrs, bias_mask,
                                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Split-K in one launch: store this program's fp32 partial at ws[pid_k] (``split_size`` apart), and let the
    last of the SPLIT_K programs that share ``counter`` to arrive sum all partials in split order
    (deterministic), add the bias and write ``out``; it then zeroes the counter for the next launch."""
    tl.store(ws_ptr + pid_k * split_size + offsets, acc, mask=mask)
    tl.debug_barrier()  # every thread's partials are written before the release below
    if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
        total = tl.zeros_like(acc)
        for split in tl.static_range(SPLIT_K):
            total += tl.load(ws_ptr + split * split_size + offsets, mask=mask, other=0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(bias_ptrs, mask=bias_mask, other=0).to(tl.float32)
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter, 0)


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
def _fold_codes(p, t: tl.constexpr, DOT: tl.constexpr, FOLD_SHIFT: tl.constexpr, FOLD_ONE: tl.constexpr):
    """int4 nibble t of each stored byte -> f = 1 + u/16 *in the dot's dtype*, by bit operations only (exact):
    the nibble becomes the top 4 mantissa bits (FOLD_SHIFT = mantissa bits - 4) under the exponent of 1.0."""
    u = p.to(tl.int32)
    SH: tl.constexpr = FOLD_SHIFT - 4 * t
    if SH >= 0:
        v = u << SH
    else:
        v = u >> (-SH)
    v = (v & (0xF << FOLD_SHIFT)) | FOLD_ONE
    if FOLD_SHIFT == 19:  # fp32
        return v.to(tl.float32, bitcast=True)
    return v.to(tl.int16).to(DOT, bitcast=True)  # bf16 / fp16: the low 16 bits are the value


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, group_size, k_per_split,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
                  BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, X_PAIRS: tl.constexpr, IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                  EVEN_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr,
                  FOLD_SHIFT: tl.constexpr, FOLD_ONE: tl.constexpr, ASM: tl.constexpr, ASM_ARGS: tl.constexpr,
                  INTERLEAVE: tl.constexpr, X_DESC: tl.constexpr, ASM_PACK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    if X_DESC:  # x_ptr is a TMA descriptor of x [M, K]: a tile is one bulk copy, no per-thread addresses
        x_rows = x_ptr
    else:
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
        if HAS_ZEROS:  # (q - z)·s = q·s - z·s: one FMA per weight (or per output, folded)
            zs = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32) * s
        USE_ASM: tl.constexpr = ASM != ""
        if X_PAIRS and not INTERLEAVE:
            x_even, x_odd = _load_x_pairs(x_rows, k0, offs_j, local_m, rows_left, K, stride_xm, stride_xk, DOT, IS_BF16)
        # inline PTX (nibble_ptx, ASM_PACK bytes per call; 4 takes a loaded 32-bit register whole, so the compiler
        # packs no bytes around the call): FOLD, the exact codes q of both nibbles, else q·s (symmetric)
        if USE_ASM and FOLD:
            q_even, q_odd = tl.inline_asm_elementwise(ASM, ASM_ARGS, [p], dtype=(tl.int16, tl.int16), is_pure=True,
                                                      pack=ASM_PACK)
        if USE_ASM and not FOLD:
            s_b = tl.broadcast_to(s.to(DOT)[:, None], [BLOCK_N, BLOCK_KP])
            q_even, q_odd = tl.inline_asm_elementwise(ASM, ASM_ARGS, [p, s_b], dtype=(tl.int16, tl.int16), is_pure=True,
                                                      pack=ASM_PACK)
        if INTERLEAVE:  # codes back in k order, (even, odd) adjacent: one dot against x as stored, [BLOCK_K, BLOCK_M]
            w = tl.join(q_even, q_odd).reshape(BLOCK_N, BLOCK_K).to(DOT, bitcast=True)
            if X_DESC:  # [BLOCK_K, BLOCK_M]; rows past M (and columns past K) arrive as zeros
                xs = tl.trans(x_ptr.load([pid_m * BLOCK_M, k0]))
            else:
                xs = _load_x(x_rows, k0, 0, tl.arange(0, BLOCK_K), local_m, rows_left, K, stride_xm, stride_xk, 1, DOT)
            if FOLD:
                part = tl.dot(w, xs, input_precision=PRECISION)
                if HAS_ZEROS:
                    x_sum = tl.sum(xs.to(tl.float32), axis=0)
            else:
                acc = tl.dot(w, xs, acc, input_precision=PRECISION)
        for t in tl.static_range(PACK if not INTERLEAVE else 0):
            if X_PAIRS:
                if t == 0:
                    xs = x_even
                else:
                    xs = x_odd
            else:
                xs = _load_x(x_rows, k0, t, offs_j, local_m, rows_left, K, stride_xm, stride_xk, PACK, DOT)
            if USE_ASM:  # the inline-PTX codes (or weights), bf16/fp16 bit patterns
                if t == 0:
                    w = q_even.to(DOT, bitcast=True)
                else:
                    w = q_odd.to(DOT, bitcast=True)
            elif FOLD and BITS == 4:
                w = _fold_codes(p, t, DOT, FOLD_SHIFT, FOLD_ONE)  # 1 + u/16
            elif FOLD:
                w = _codes(p, t, BITS, SIGNED, ZERO_SHIFT).to(DOT)  # q, |q| <= 255: exact in bf16
            else:
                # -- dequantize in registers: W tile [BLOCK_N, BLOCK_KP] = (q - z)·s, in the dot's dtype
                w = _codes(p, t, BITS, SIGNED, ZERO_SHIFT) * s[:, None]
                if HAS_ZEROS:
                    w -= zs[:, None]
                w = w.to(DOT)
            if FOLD:  # scale and zero go on the chunk's product
                if t == 0:
                    part = tl.dot(w, xs, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M], this chunk only
                else:
                    part = tl.dot(w, xs, part, input_precision=PRECISION)
                if HAS_ZEROS or (BITS == 4 and ASM == ""):
                    if t == 0:
                        x_sum = tl.sum(xs.to(tl.float32), axis=0)  # Σ_k x[m, k] over the chunk, [BLOCK_M]
                    else:
                        x_sum += tl.sum(xs.to(tl.float32), axis=0)
            else:
                acc = tl.dot(w, xs, acc, input_precision=PRECISION)
        if FOLD:
            if BITS == 4 and ASM == "":  # w = 1 + u/16: Σ x·q = 16·part - (16 + ZERO_SHIFT)·Σ x
                c = s * (16 + ZERO_SHIFT)
                s_part = s * 16.0
            else:  # w = q
                c = s * 0.0
                s_part = s
            if HAS_ZEROS:
                c += zs
            if HAS_ZEROS or (BITS == 4 and ASM == ""):
                acc += s_part[:, None] * part - c[:, None] * x_sum[None, :]
            else:
                acc += s_part[:, None] * part
    out_mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None] * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)  # fp32 partial sums, reduced by _splitk_reduce_kernel
