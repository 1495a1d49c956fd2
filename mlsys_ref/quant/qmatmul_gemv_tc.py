"""W4A16 at M = 1 on the tensor cores, from the int4 codes in row-major or slab order (Gluon, GPU only).

Paper: Marlin (Frantar, Castro, Chen, Hoefler, Alistarh 2024, arXiv:2408.11743), §3: at batch 1 the product is a
stream of the weights, and the work per weight has to be small enough that the SMs keep up with HBM. Here each
weight costs about one instruction of bit work plus a share of an ``mma.sync.m16n8k16`` (x is the MMA's right
operand, an [128, 8] tile whose column 0 is live), against ~4.5 for the FMA GEMV of :mod:`qmatmul`.

The one idea to notice: Σ_k W[n, k]·x[k] does not care in which order its terms are added, so inside each
128-code unit the kernel *chooses* which k an MMA slot stands for, as long as W and x agree. It picks the order
that makes every lane's operands contiguous in memory: lane column t of the fragment takes the codes
32t .. 32t + 31 of each of its rows (four row-major int32 words: one 16-byte load) and x[32t .. 32t + 31] (four
16-byte loads), and the register of slot pair (b, j) holds codes 8b + j and 8b + j + 4 -- nibbles j and j + 4
of word b, which one shift and one LOP3 (``mma_unit_ptx``) put in a bf16x2. So no reshuffled copy of the
weight is needed (``qmatmul_mma``'s fragment order fixes the natural k order instead, and pays for it with a
second copy of the codes). x's matching pairs (x[8b + j], x[8b + j + 4]) are two half-word selects per register.

The grid: one program per 16·SPW rows over all of K. Its W warps split K between them -- a batched MMA with
warps along the batch -- and their partial sums meet once, in shared memory, at the end: split-K without a
second kernel, without fp32 partials in global memory and without an arrival counter. Nothing in the loop
touches shared memory or waits on a barrier; a warp's loads run DEPTH units ahead of their use.

What the bandwidth took (H100, quant_notes.md, twelfth and thirteenth sessions), beyond the arithmetic:
- **Slab order** (``pack_gemv_slabs``): the same words, stored so that each 16-row x 128-code unit is one 1 KB
  piece, [N/16, units, 16, 16]. From row-major codes a warp's unit is 16 pieces of 64 bytes, 2·K/8 bytes apart.
  Alone: 12.1 and 12.5 µs at 11008 x 4096 and 4096 x 11008 (64% and 61% of copy), from 12.9 and 13.4 µs.
- **Registers**: a program's register count sets how many programs an SM holds, so how many waves the grid
  takes. Written as below, 8 warps x 32 rows take 80 registers a thread (three programs an SM); an earlier
  version of the same loop took 102 (two) and ran 14.9 instead of 12.2 µs at 11008 x 4096.
- **Programmatic dependent launch** for GEMVs that follow one another (``qmatmul_chain.chained_gemvs``): the
  kernel issues its first weight loads, then waits for the kernel before it (``griddepcontrol.wait``; only x
  can depend on it) and at once lets the next one start, so back-to-back GEMVs overlap one's ramp with the
  other's tail (a call's fixed cost, launch and HBM ramp, is ~2.4 µs in a CUDA graph even for a plain read).
  Chained: 10.4 and 11.0 µs (74% and 70% of copy). Not for a GEMV after PyTorch's kernels, which do not
  trigger their dependents: there the launch as a dependent cost ~0.3 µs (a decode 2% slower).

Why Gluon: plain Triton chooses the register layouts itself, and for one-warp MMAs its choice sends the operands
through shared memory (measured 10-13 µs at 4096², quant_notes.md). Gluon states the layouts: the loads' blocked
layouts are, register for register, the MMA operand fragments, so each ``convert_layout`` below is a renaming
(no SHFL, STS or LDS in the compiled loop). Gluon does not run under the Triton interpreter, so this kernel is a
GPU-only *candidate*: the M = 1 tuner of :mod:`qmatmul` times it against the FMA GEMV, which computes the same
thing on every backend. ``tc_gemv_torch`` is this kernel's algorithm in PyTorch -- the slot order
(``slot_order``), the bit work on the words (``unit_slots_from_words``), the warps' split of K -- which the CPU
tests check against the reference; the GPU tests check the kernel.

Covers int4 with 16-bit x, scales per group of whole 128-code units (or per row), zero points, bias;
K % 32 == 0 (a lane's 32-code block is wholly inside K or past it). Left out: int8 (bf16 cannot hold
128 + a byte exactly), M > 1 (``qmatmul_mma``). Tried and lost: the first units copied into shared memory
(cp.async) before the wait, each warp's k-loop rotated per program, the scales and x loaded a unit
ahead, a persistent grid of one or two programs an SM, a register cap (quant_notes.md, thirteenth session).
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import HAS_GLUON, gl, gluon, is_interpreter, triton
from mlsys_ref.quant.qmatmul_chain import chain_launch
from mlsys_ref.quant.qmatmul_mma import _halves, _slot_shifts
from mlsys_ref.quant.qmatmul_ptx import mma_unit_ptx

__all__ = ["tc_gemv", "tc_gemv_applies", "tc_gemv_configs", "tc_gemv_torch", "slot_order", "unit_slots_from_words",
           "pack_gemv_slabs", "unpack_gemv_slabs", "gemv_slabs_shape"]

if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# -- the algorithm in PyTorch (CPU-checkable): the slot order, the bit work, the warps' split of K -----------------
def slot_order() -> torch.Tensor:
    """k (inside a 128-code unit) that MMA slot s stands for: slot 16(2b + j//2) + 8(j%2) + 2t + e (the m16n8k16
    fragment's chunk c = 2b + j//2, half j%2, lane column t, element e) holds code 32t + 8b + j + 4e."""
    b, j_hi, j_lo, t, e = torch.meshgrid(*(torch.arange(n) for n in (4, 2, 2, 4, 2)), indexing="ij")
    return (32 * t + 8 * b + 2 * j_hi + j_lo + 4 * e).reshape(-1)


def unit_slots_from_words(words: torch.Tensor) -> torch.Tensor:
    """The row-major int32 words of one unit, [N, 16] -> its 128 codes in slot order, [N, 128], by the kernel's bit
    work: lane column t owns words 4t .. 4t + 3, and pair j of word b is nibbles j and j + 4 (``mma_unit_ptx``)."""
    w = words.to(torch.int64).reshape(-1, 4, 4, 1, 1) & 0xFFFFFFFF  # [N, t, b, 1, 1]
    pairs = (w >> _slot_shifts(w.device)) & 0xF  # [N, t, b, j, e]: nibble j + 4e, the fragment layout's slot shifts
    pairs = pairs.reshape(-1, 4, 4, 2, 2, 2)  # [N, t, b, j // 2, j % 2, e]
    return pairs.permute(0, 2, 3, 4, 1, 5).reshape(-1, 128)  # [N, b, j // 2, j % 2, t, e]: slot order


def tc_gemv_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  group_size: int, warps: int = 4) -> torch.Tensor:
    """The kernel's algorithm for one row x [K], loops and all, in fp32: per unit, the left operand is the unit's
    codes in slot order and the right one x in the same order (any order sums to the same); the units are split
    among ``warps``, whose partial sums are added at the end. K % 32 == 0; the last unit is padded with zeros."""
    N, K = qweight.shape[0], x.shape[-1]
    units = -(-K // 128)
    pad = 128 * units - K
    words = torch.nn.functional.pad(qweight, (0, pad // 2)).view(torch.int32)  # [N, units·16] row-major words
    xs = torch.nn.functional.pad(x.float(), (0, pad))
    order = slot_order()
    zero_shift = 8 if zeros is None else 0  # symmetric codes are stored + 8
    per_warp = -(-units // warps)
    partial = torch.zeros(warps, N)
    for warp in range(warps):
        for unit in range(warp * per_warp, min(units, (warp + 1) * per_warp)):
            q = unit_slots_from_words(words[:, 16 * unit:16 * unit + 16]).float() - zero_shift  # A, [N, 128]
            x_unit = xs[128 * unit + order]  # column 0 of B, same slots
            part = q @ x_unit
            g = 0 if group_size >= K else 128 * unit // group_size
            if zeros is not None:
                part -= zeros[:, g].float() * x_unit.sum()
            partial[warp] += scales[:, g].float() * part
    return partial.sum(0)  # the kernel: in shared memory


def tc_gemv_applies(bits: int, K: int, group_size: int, x_dtype: torch.dtype) -> bool:
    """Whether the kernel covers this product (the caller has checked that qweight is int32-word aligned)."""
    return (HAS_GLUON and not is_interpreter() and bits == 4 and x_dtype in (torch.float16, torch.bfloat16)
            and K % 32 == 0 and (group_size >= K or group_size % 128 == 0))


def tc_gemv_configs() -> list[dict]:
    """(W warps, SPW 16-row slabs, DEPTH units of weight words in flight per warp). H100 sweep (triton 3.6, slab
    order; quant_notes.md, thirteenth session): alone, 8 warps x 32 rows at 11008 x 4096 (12.2 µs), 16 x 16 rows
    at 4096 x 11008 and 4096² (12.6, 6.2 µs); chained, the same at 10.4, 11.0 (DEPTH 2) and 4.9 µs, 8 x 16 rows
    at 8192 x 2048 (4.7 µs), 32 x 16 rows at 2048 x 8192 (5.2 µs)."""
    table = [(8, 2, 1), (16, 1, 2), (16, 1, 1), (16, 2, 1), (8, 1, 2), (8, 1, 1), (32, 1, 1)]
    return [dict(W=w, SPW=spw, DEPTH=depth) for w, spw, depth in table]


# -- the GEMV's own order of the codes: 16-row slabs, each unit's 16 x 64 bytes contiguous -------------------------
def pack_gemv_slabs(qweight: torch.Tensor) -> torch.Tensor:
    """Row-major int4 codes, uint8 [N, K/2] -> int32 [ceil(N/16), ceil(K/128), 16, 16]: slab s, unit u holds rows
    16s .. 16s + 15, each row's 16 words of the unit as row-major stores them (so the kernel's bit work is the
    same). N and K are padded with zero codes. Done once per weight (QuantizedLinear caches it)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"pack_gemv_slabs needs the uint8 [N, K/2] int4 storage, got {qweight.dtype} {tuple(qweight.shape)}")
    N, half_k = qweight.shape
    slabs, units, _, _ = gemv_slabs_shape(N, 2 * half_k)
    padded = torch.nn.functional.pad(qweight, (0, 64 * units - half_k, 0, 16 * slabs - N))
    return padded.view(torch.int32).view(slabs, 16, units, 16).permute(0, 2, 1, 3).contiguous()


def unpack_gemv_slabs(slabs: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_gemv_slabs`: int32 [ceil(N/16), ceil(K/128), 16, 16] -> uint8 [N, K/2]."""
    if slabs.dtype != torch.int32 or tuple(slabs.shape) != gemv_slabs_shape(N, K):
        raise ValueError(f"unpack_gemv_slabs needs int32 {gemv_slabs_shape(N, K)} for N = {N}, K = {K}, got "
                         f"{slabs.dtype} {tuple(slabs.shape)}")
    words = slabs.permute(0, 2, 1, 3).reshape(slabs.shape[0] * 16, -1)
    return words.contiguous().view(torch.uint8)[:N, :K // 2]


def gemv_slabs_shape(N: int, K: int) -> tuple[int, int, int, int]:
    return (-(-N // 16), -(-K // 128), 16, 16)


@gluon.jit
def _weight_operand(p, ASM: gl.constexpr, DTYPE: gl.constexpr, W: gl.constexpr, SPW: gl.constexpr):
    """Words [W, 16·SPW, 16] (rows in (h, slab, g) order, row 16·slab + 8h + g) -> A [W, 16·SPW, 128]: slot
    16(2b + j//2) + 8(j%2) + 2t + e holds code 32t + 8b + j + 4e of the unit, as q = u - ZERO_SHIFT."""
    p = gl.reshape(p, (W, 2, SPW, 8, 4, 4))  # [w, h, slab, g, t, b]
    r0, r1, r2, r3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [p], dtype=(gl.int32,) * 4, is_pure=True, pack=1)
    codes = gl.join(gl.join(_halves(r0, DTYPE), _halves(r1, DTYPE)), gl.join(_halves(r2, DTYPE), _halves(r3, DTYPE)))
    codes = gl.permute(codes, (0, 2, 1, 3, 5, 8, 7, 4, 6))  # [w, slab, h, g | b, j // 2, j % 2, t, e]
    return gl.reshape(codes, (W, SPW * 16, 128))


@gluon.jit
def _x_operand(x_ptr, ku, unit_live, K, DTYPE: gl.constexpr, x_words: gl.constexpr, W: gl.constexpr):
    """B [W, 128, 8] for warp w's unit at code ku[w]: column 0 holds x at the same slots as _weight_operand's codes,
    the other columns 0. Lane t loads x words 16t .. 16t + 15 of the unit (x[32t .. 32t + 31])."""
    m = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_words)))  # word 16t + 4b + i of the unit
    n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_words)))
    kx = gl.convert_layout(ku, gl.SliceLayout(1, gl.SliceLayout(2, x_words)))
    live = gl.convert_layout(unit_live, gl.SliceLayout(1, gl.SliceLayout(2, x_words)))
    offs = gl.multiple_of(kx // 2, 64)[:, None, None] + m[None, :, None] + 0 * n[None, None, :]
    mask = (live[:, None, None] & (kx[:, None, None] + 32 * (m // 16)[None, :, None] < K)) & (n == 0)[None, None, :]
    words = gl.load(x_ptr + offs, mask=mask, other=0)
    words = gl.permute(gl.reshape(words, (W, 4, 4, 2, 2, 8)), (0, 1, 2, 4, 5, 3))  # [w, t, b, i % 2, n, i // 2]
    lo, hi = gl.split(words)  # word i holds (x[8b + 2i], x[8b + 2i + 1]); lo: i < 2, hi: i >= 2
    pair_even = (lo & 0xFFFF) | (hi << 16)  # j = 2(i % 2): (x[8b + j], x[8b + j + 4])
    pair_odd = ((lo >> 16) & 0xFFFF) | (hi & -65536)  # j = 2(i % 2) + 1
    x = _halves(gl.join(pair_even, pair_odd), DTYPE)  # [w, t, b, j // 2, n, j % 2, e]
    return gl.reshape(gl.permute(x, (0, 2, 3, 5, 1, 6, 4)), (W, 128, 8))


@gluon.jit
def _griddepcontrol(t, ASM: gl.constexpr):
    gl.inline_asm_elementwise(ASM, "=r,r,~{memory}", [t], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _unit_of(warp, u, units_per_warp, K):
    """(ku, live) of a warp's u-th unit: its first code, and whether the unit is in the warp's share and in K.
    Past the share the index wraps to the share's start, so that the (masked) addresses stay inside the weight."""
    ku = 128 * (warp * units_per_warp + u % units_per_warp)
    return ku, (u < units_per_warp) & (ku < K)


@gluon.jit
def _unit_words(w_ptrs, warp, u, units_per_warp, K, row_live, word, SLABS: gl.constexpr):
    """The weight words of a warp's u-th unit, [W, 16·SPW, 16] (zero past K, past N and past the warp's share)."""
    ku, live = _unit_of(warp, u, units_per_warp, K)
    step = gl.multiple_of(2 * ku, 256) if SLABS else gl.multiple_of(ku // 8, 16)  # a unit: 256 or 16 words on
    mask = row_live & (live[:, None, None] & (ku[:, None, None] + 32 * (word // 4)[None, None, :] < K))
    return gl.load(w_ptrs + step[:, None, None], mask=mask, other=0)


@gluon.jit
def _unit_product(acc, p, x_ptr, s_ptr, z_ptr, warp, warp_r, u, units_per_warp, K, offs_n, n_mask, stride_sn, stride_sg,
                  ASM: gl.constexpr, DTYPE: gl.constexpr, GROUP_UNITS: gl.constexpr, HAS_ZEROS: gl.constexpr,
                  W: gl.constexpr, SPW: gl.constexpr, mma: gl.constexpr, x_words: gl.constexpr):
    """acc + s·(the unit's codes · x) (- z·Σx): one MMA of the warp's u-th unit, scaled per row."""
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    ku, live = _unit_of(warp, u, units_per_warp, K)
    a = gl.convert_layout(_weight_operand(p, ASM, DTYPE, W, SPW), a_layout)
    xs = gl.convert_layout(_x_operand(x_ptr, ku, live, K, DTYPE, x_words, W), b_layout)
    part = mma_v2(a, xs, gl.zeros_like(acc))
    ku_r, live_r = _unit_of(warp_r, u, units_per_warp, K)
    unit = ku_r // 128
    g = 0 * unit if GROUP_UNITS == 0 else unit // GROUP_UNITS
    sz = offs_n[None, :] * stride_sn + g[:, None] * stride_sg
    sz_mask = live_r[:, None] & n_mask[None, :]
    s = gl.load(s_ptr + sz, mask=sz_mask, other=0).to(gl.float32)
    if HAS_ZEROS:  # Σ x·(u - z) = Σ x·u - z·Σ x; column 0 of Σ_k B is Σ x, the others 0
        x_sum = gl.convert_layout(gl.sum(xs.to(gl.float32), axis=1), gl.SliceLayout(1, mma))
        z = gl.load(z_ptr + sz, mask=sz_mask, other=0).to(gl.float32)
        part -= z[:, :, None] * x_sum[:, None, :]
    return acc + s[:, :, None] * part


@gluon.jit
def _tc_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, units_per_warp, stride_wn, stride_sn, stride_sg,
                    ASM: gl.constexpr, DTYPE: gl.constexpr, GROUP_UNITS: gl.constexpr, HAS_ZEROS: gl.constexpr,
                    HAS_BIAS: gl.constexpr, W: gl.constexpr, SPW: gl.constexpr, DEPTH: gl.constexpr,
                    SLABS: gl.constexpr, PDL: gl.constexpr):
    """y[n] = Σ_units s[n, g]·(Σ_k q[n, k]·x[k] - z[n, g]·Σ_k x[k]) (+ bias): warp w sums the units
    [w·upw, (w + 1)·upw), the W partial sums are added in shared memory at the end."""
    ROWS: gl.constexpr = 16 * SPW
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    # a lane holds 4 words (16 bytes) of rows g and g + 8 per slab: the A fragment of lane 4g + t
    words: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[1, 8, 4], warps_per_cta=[W, 1, 1],
                                           order=[2, 1, 0])
    # lane 4g + t holds x words 16t .. 16t + 15 for column g: the B fragment (column g > 0 masked to 0)
    x_words: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16, 1], threads_per_warp=[1, 4, 8],
                                             warps_per_cta=[W, 1, 1], order=[1, 2, 0])
    pid = gl.program_id(0)
    warp = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, words)))
    rho = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, words)))
    rows = pid * ROWS + 16 * ((rho // 8) % SPW) + 8 * (rho // (ROWS // 2)) + rho % 8
    word = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, words)))
    if SLABS:  # [N/16, units, 16, 16]: a unit of a slab is 1 KB in one piece; stride_wn is a slab's words
        w_ptrs = w_ptr + ((rows // 16).to(gl.int64) * stride_wn + (rows % 16) * 16)[None, :, None] + word[None, None, :]
    else:
        w_ptrs = w_ptr + rows.to(gl.int64)[None, :, None] * stride_wn + word[None, None, :]
    row_live = (rows < N)[None, :, None]
    per_row: gl.constexpr = gl.SliceLayout(2, mma)  # [W, ROWS]
    warp_r = gl.arange(0, W, layout=gl.SliceLayout(1, per_row))
    offs_n = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, per_row))
    n_mask = offs_n < N
    acc = gl.zeros([W, ROWS, 8], gl.float32, layout=mma)
    # the words of the next DEPTH units are in flight while a unit's bit work and MMA run
    p = _unit_words(w_ptrs, warp, 0, units_per_warp, K, row_live, word, SLABS)
    if DEPTH == 2:
        p_ahead = _unit_words(w_ptrs, warp, 1, units_per_warp, K, row_live, word, SLABS)
    if PDL:  # programmatic dependent launch: the kernel before may still run until the wait, and only x (and the
        # output) can depend on it -- the weight is constant -- so the first weight words are already on their way;
        # the next kernel may start as soon as every program got here, and stream its own weight meanwhile
        _griddepcontrol(warp, "griddepcontrol.wait; mov.b32 $0, 0;")
        _griddepcontrol(warp, "griddepcontrol.launch_dependents; mov.b32 $0, 0;")
    for u in range(units_per_warp):
        p_next = _unit_words(w_ptrs, warp, u + DEPTH, units_per_warp, K, row_live, word, SLABS)
        acc = _unit_product(acc, p, x_ptr, s_ptr, z_ptr, warp, warp_r, u, units_per_warp, K, offs_n, n_mask, stride_sn,
                            stride_sg, ASM, DTYPE, GROUP_UNITS, HAS_ZEROS, W, SPW, mma, x_words)
        if DEPTH == 2:
            p = p_ahead
            p_ahead = p_next
        else:
            p = p_next
    y = gl.sum(gl.sum(acc, axis=2), axis=0)  # the warps' partial sums meet in shared memory
    if HAS_BIAS:
        y += gl.load(b_ptr + offs_n, mask=n_mask, other=0).to(gl.float32)
    gl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def tc_gemv(x_words: torch.Tensor, w_words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, out: torch.Tensor, K: int, group_size: int, config: dict) -> torch.Tensor:
    """out [N] = W x for one row x, given as int32 words [K/2] of its 16-bit values; w_words: the int4 codes as
    int32 words, row-major [N, K/8] or in slab order (:func:`pack_gemv_slabs`, 4-D); symmetric codes stored +8,
    as QuantizedLinear does. The caller validated the formats and checked :func:`tc_gemv_applies`. Inside
    ``qmatmul_chain.chained_gemvs()`` on Hopper the kernel is launched as a programmatic dependent."""
    N, slabs = out.shape[0], w_words.dim() == 4
    W, SPW = config["W"], config["SPW"]
    pdl, dependent = chain_launch(torch.cuda.get_device_capability(out.device)[0] >= 9)
    _tc_gemv_kernel[(triton.cdiv(N, 16 * SPW),)](
        x_words, w_words, scales, zeros if zeros is not None else scales, bias if bias is not None else out, out,
        N, K, triton.cdiv(triton.cdiv(K, 128), W), w_words.stride(0), scales.stride(0), scales.stride(1),
        ASM=mma_unit_ptx(out.dtype, 0 if zeros is not None else 8),
        DTYPE=gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16,
        GROUP_UNITS=0 if group_size >= K else group_size // 128, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, W=W, SPW=SPW, DEPTH=config["DEPTH"], SLABS=slabs, PDL=pdl, num_warps=W,
        launch_pdl=dependent)
    return out
