"""W4A16 with the int4 weight stored in tensor-core fragment order (Marlin's offline reshuffle), in Triton.

Paper: Marlin (Frantar, Castro, Chen, Hoefler, Alistarh 2024, arXiv:2408.11743), §3, the kernel design: the
weights are reshuffled *once, offline*, so that the 16 bytes a thread loads are exactly the codes its tensor-core
fragments need, and one LOP3 per pair of codes turns them into an MMA operand register. Nothing passes through
shared memory on the way to the MMA and no instruction moves data between threads.

The layout (``pack_int4_mma``). Each row of W is cut into units of 128 codes (K padded with zero codes to a
multiple of 128). The MMA's left operand (a 16 x 16 tile of W per instruction, m16n8k16 / wgmma) gives lane
4·g + t the rows g, g + 8 and, in every 16-wide k chunk c, the code pairs (2t, 2t+1) and (2t+8, 2t+9). A unit
holds 8 chunks, so lane column t needs 32 codes = four int32 words of each row: those are stored together as
words 4t .. 4t+3 of the unit, and one 16-byte load per row fetches them. Word b of lane column t holds chunks
2b and 2b+1; its nibble j (bits 4j) and nibble j + 4 (bits 16 + 4j) are the pair (k, k + 1) with
k = 16·(2b + j // 2) + 8·(j % 2) + 2t, so ``(word >> 4j) & 0x000F000F`` puts both codes of a pair in the
mantissas of a bf16x2 (or f16x2) register: one shift, one LOP3 and one packed subtraction per two weights.

The kernel loads a [BLOCK_N, 16]-word tile per unit with its rows in the order (h, slab, g), row
16·slab + 8·h + g: the 16-byte-per-thread blocked layout that Triton picks for that tile then already has the
MMA operand's thread mapping (lanes: t across the words, g down the rows; warps: slabs; registers: h and the
words), so after the bit tricks a reshape and a permute that only rename registers put the codes in k order,
and ``tl.dot`` takes them with no layout conversion (check: ``ttg.convert_layout`` to ``dot_op`` is absent
from the compiled TTGIR; the SASS loop has no STS/LDS for the weight).

Scales and zero points go on each 128-code unit's [BLOCK_N, BLOCK_M] product (the codes stay exact; zero
points subtract z·Σx), so the kernel suits small M, where that product is small. Split-K partials are summed by
the last program of a tile to arrive (LAST: an arrival counter and a fixed order, so deterministic) or by the
row-major GEMM's second kernel.

Measured on an H100 (benchmarks/results/h100-sxm/quant_notes.md): 2.1-2.6x bf16 at M = 16 and 1.5-2.0x at
M = 64, where the row-major kernels reach 1.9-2.4x and 1.1-1.3x. At M = 1 it beat the row-major FMA GEMV on
11008-wide shapes (2.63 against 2.48x) and lost by 2% at 4096x4096, although it issues half the instructions
per weight in its loop: a program owns only a few steps, and its fixed cost (pipeline fill, barriers, the
split-K epilogue) dominates; the tensor-core GEMV of :mod:`mlsys_ref.quant.qmatmul_gemv_tc` (Gluon, row-major
codes in a permuted k order, split-K met in shared memory) beats both (2.7-3.1x). At M = 256 the per-unit
scaling of a wide product costs more than it saves (0.7-1.0x against the row-major GEMM's 0.8-1.05x).
QuantizedLinear therefore runs 2 <= M <= 64 from this layout, M = 1 from the GEMV's slab order where the
tensor-core GEMV applies (else from whichever layout its one-off timing picks), and larger M row-major,
except on Hopper, where the warp-specialized wgmma kernel of :mod:`mlsys_ref.quant.qmatmul_wgmma` runs this layout.

One idea to notice: the speed comes from where the bytes are stored, not from the arithmetic. The row-major
kernels spend 3.3-4.5 instructions per weight; this one 1.4 for the codes (3 with its loop overhead) plus the
MMA, and its weight never visits shared memory on the way to the MMA.

Left out: int8 (W8A16) in this layout, and Marlin's warp-specialised asynchronous pipeline and striped grid
partition (Triton's cp.async pipeline and split-K stand in for them).
"""

from __future__ import annotations

import functools

import torch

from mlsys_ref.backend import is_interpreter, tl, tma_descriptor, triton
from mlsys_ref.quant.primitives import pack_int4, unpack_int4
from mlsys_ref.quant.qmatmul_kernels import _sum_splits_at_last_arrival
from mlsys_ref.quant.qmatmul_ptx import mma_unit_ptx

__all__ = ["pack_int4_mma", "unpack_int4_mma", "mma_words", "UNIT"]

UNIT = 128  # codes per row per unit (one 16-byte load per lane column)


def mma_words(K: int) -> int:
    """int32 words per row of the fragment layout: 16 per 128-code unit, K padded to whole units."""
    return 16 * -(-K // UNIT)


def _slot_shifts(device: torch.device) -> torch.Tensor:
    """[j, h] bit offset of slot (j, h) in its word: nibble j of the low (h = 0) or high (h = 1) half."""
    return 4 * torch.arange(4, device=device)[:, None] + 16 * torch.arange(2, device=device)[None, :]


@functools.lru_cache(maxsize=None)
def _unit_order() -> torch.Tensor:
    """k (within a unit) of each stored slot, slots in memory order (t, b, j, h): word 4t + b, nibble j + 4h."""
    t, b, j, h = torch.meshgrid(*(torch.arange(n) for n in (4, 4, 4, 2)), indexing="ij")
    return (16 * (2 * b + j // 2) + 8 * (j % 2) + 2 * t + h).reshape(-1)


def pack_int4_mma(qweight: torch.Tensor) -> torch.Tensor:
    """Row-major int4 codes, uint8 [N, K/2] (low nibble = even k) -> fragment order, int32 [N, ceil(K/128)·16].
    Done once per weight (QuantizedLinear caches it); K is padded with zero codes to a multiple of 128."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"pack_int4_mma needs the uint8 [N, K/2] int4 storage, got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    units = mma_words(K) // 16
    u = torch.nn.functional.pad(unpack_int4(qweight), (0, units * UNIT - K))
    u = u.view(N, units, UNIT)[..., _unit_order().to(u.device)].view(N, units, 4, 4, 4, 2).to(torch.int64)
    words = (u << _slot_shifts(u.device)).sum((-1, -2))  # [N, units, t, b], each < 2^32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(N, units * 16)


def unpack_int4_mma(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int4_mma`: int32 [N, ceil(K/128)·16] -> uint8 [N, K/2]."""
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != mma_words(K):
        raise ValueError(f"unpack_int4_mma needs int32 [N, {mma_words(K)}] for K = {K}, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    N, units = packed.shape[0], packed.shape[1] // 16
    slots = (packed.view(N, units, 4, 4, 1, 1).to(torch.int64) >> _slot_shifts(packed.device)) & 0xF  # [N, units, t, b, j, h]
    u = torch.empty(N, units, UNIT, dtype=torch.uint8, device=packed.device)
    u[..., _unit_order().to(packed.device)] = slots.reshape(N, units, UNIT).to(torch.uint8)
    return pack_int4(u.view(N, units * UNIT)[:, :K])


@triton.jit
def _halves(r, DOT: tl.constexpr):
    """int32 holding two 16-bit floats -> [..., 2] (low half first); free in SASS (the halves are registers)."""
    lo = r.to(tl.int16).to(DOT, bitcast=True)
    hi = (r >> 16).to(tl.int16).to(DOT, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _code_pair(p, j: tl.constexpr, SUB: tl.constexpr):
    """Plain-Triton twin of one pair of the PTX (interpreter, fp32 x): nibbles j and j + 4 -> [..., 2] codes - SUB."""
    lo = ((p >> (4 * j)) & 0xF).to(tl.float32) - SUB
    hi = ((p >> (4 * j + 16)) & 0xF).to(tl.float32) - SUB
    return tl.join(lo, hi)


@triton.jit
def _unit_weights(p, ASM: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr, SLABS: tl.constexpr,
                  scale_pairs=None):
    """[BLOCK_N, 16] words of one unit, rows loaded in (h, slab, g) order -> the codes q = u - SUB as the
    [BLOCK_N, 128] left MMA operand, rows 16·slab + 8·h + g, in k order. Every step keeps each value in the
    thread that loaded it: reshape, join and permute only rename registers. With ``scale_pairs`` (the row's
    scale in both halves of an int32, beside each word; ASM from ``mma_unit_ptx(..., scaled=True)``) the
    weights q·s instead: the Gluon wgmma kernel (qmatmul_wgmma) calls this too."""
    p = tl.reshape(p, (2, SLABS, 8, 4, 4))  # [h, slab, g, t, b]
    if ASM != "":  # a shift, a LOP3 and a packed subtraction per pair of codes: mma_unit_ptx
        if scale_pairs is None:
            r0, r1, r2, r3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [p], dtype=(tl.int32,) * 4,
                                                       is_pure=True, pack=1)
        else:
            r0, r1, r2, r3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r",
                                                       [p, tl.reshape(scale_pairs, (2, SLABS, 8, 4, 4))],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        e0, e1, e2, e3 = _halves(r0, DOT), _halves(r1, DOT), _halves(r2, DOT), _halves(r3, DOT)
    else:
        e0, e1 = _code_pair(p, 0, SUB).to(DOT), _code_pair(p, 1, SUB).to(DOT)
        e2, e3 = _code_pair(p, 2, SUB).to(DOT), _code_pair(p, 3, SUB).to(DOT)
    codes = tl.join(tl.join(e0, e1), tl.join(e2, e3))  # [h, slab, g, t, b, pair half, j % 2, j // 2]
    codes = tl.permute(codes, (1, 0, 2, 4, 7, 6, 3, 5))  # [slab, h, g | b, j // 2, j % 2, t, pair half]
    return tl.reshape(codes, (SLABS * 16, 128))  # row 16·slab + 8·h + g; k = 32b + 16(j//2) + 8(j%2) + 2t + half


@triton.jit
def _qgemm_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split,
                      stride_xm, stride_wn, stride_sn, stride_sg, stride_om,
                      HAS_ZEROS: tl.constexpr, ZERO_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                      X_DESC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr,
                      GROUP_UNITS: tl.constexpr, LAST_ARRIVAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """yᵀ tile [BLOCK_N, BLOCK_M] = Σ_units s·(Q_unit x_unitᵀ) (- s·z·Σ x), the exact codes Q the register
    operand; each unit's product is scaled (and used) at once. (Chaining the MMAs into one accumulator with
    q·s in the registers was measured too: Triton 3.6 then pipelines the register-operand wgmma and the
    results are wrong for wide tiles; see quant_notes.md.)"""
    SLABS: tl.constexpr = BLOCK_N // 16
    UNITS: tl.constexpr = BLOCK_K // 128
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rho = tl.arange(0, BLOCK_N)  # loaded row rho = (h, slab, g) holds weight row 16·slab + 8·h + g
    rows = pid_n * BLOCK_N + 16 * ((rho // 8) % SLABS) + 8 * (rho // (BLOCK_N // 2)) + rho % 8
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + tl.arange(0, 16)[None, :]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, 128)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)  # k_per_split is a multiple of BLOCK_K: 16-byte aligned word loads
        for unit in tl.static_range(UNITS):
            ku = k0 + 128 * unit
            # a unit at or past K only meets zero activations; masking it whole keeps the loads 16 bytes wide
            # (tl.where: `mask & scalar` trips the interpreter)
            live = tl.where(ku < K, rows < N, False)
            n_live = tl.where(ku < K, n_mask, False)
            p = tl.load(w_rows + tl.multiple_of(ku // 8, 16), mask=live[:, None], other=0)
            w = _unit_weights(p, ASM, ZERO_SHIFT, DOT, SLABS)
            if X_DESC:  # rows past M and columns past K arrive as zeros
                xs = x_ptr.load([pid_m * BLOCK_M, ku])
            else:
                xk = ku + offs_k
                xs = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + xk[None, :],
                             mask=(offs_m[:, None] < M) & (xk[None, :] < K), other=0)
            part = tl.dot(w, tl.trans(xs.to(DOT)), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M], this unit
            # a unit lies in one group of GROUP_UNITS units (0: one group per row); a constant divisor is a
            # shift or a multiply, a run-time one a dozen instructions per unit
            g = 0 if GROUP_UNITS == 0 else (ku // 128) // GROUP_UNITS
            sz = offs_n * stride_sn + g * stride_sg
            s = tl.load(s_ptr + sz, mask=n_live, other=0).to(tl.float32)
            if HAS_ZEROS:  # Σ x·(u - z) = Σ x·u - z·Σ x
                z = tl.load(z_ptr + sz, mask=n_live, other=0).to(tl.float32)
                part -= z[:, None] * tl.sum(xs.to(tl.float32), axis=1)[None, :]
            acc += s[:, None] * part
    out_mask = n_mask[:, None] & (offs_m[None, :] < M)
    tile = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M] offsets in out [M, N]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif LAST_ARRIVAL:  # fp32 partials [SPLIT_K, M, N], summed by the tile's last program to arrive
        _sum_splits_at_last_arrival(acc, ws_ptr, out_ptr, tile, out_mask, M * stride_om, pid_k,
                                    cnt_ptr + pid_m * tl.num_programs(1) + pid_n, b_ptr + offs_n[:, None],
                                    n_mask[:, None], SPLIT_K, HAS_BIAS)
    else:  # fp32 partials [SPLIT_K, M, N], summed by _splitk_reduce_kernel
        tl.store(ws_ptr + pid_k * M * stride_om + tile, acc, mask=out_mask)


def mma_launch(x2: torch.Tensor, packed: torch.Tensor, scales, zeros, bias, group_size: int, config: dict,
               out: torch.Tensor, workspace: torch.Tensor | None, counters: torch.Tensor | None) -> None:
    """Launch one config on x2 [M, K] (16-bit or fp32, already permuted) into ``out``; with split-K the fp32
    partials go to ``workspace`` [SPLIT_K, M, N] and, with ``LAST_ARRIVAL``, are summed in the kernel (the
    zeroed ``counters``, one per output tile), else by the caller. The caller validated the formats."""
    M, K = x2.shape
    N = packed.shape[0]
    fp32_dot = x2.dtype == torch.float32 or is_interpreter()  # bf16 tl.dot is wrong under the interpreter
    block_k = config["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, config["SPLIT_K"]), block_k) * block_k
    desc = tma_descriptor(x2, [config["BLOCK_M"], 128]) if config.get("TMA", 1) else None
    if desc is None and x2.stride(1) != 1:
        x2 = x2.contiguous()
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
    _qgemm_mma_kernel[grid](
        desc if desc is not None else x2, packed, scales, zeros if zeros is not None else scales,
        bias if bias is not None else out, out, workspace if workspace is not None else out,
        counters if counters is not None else out, M, N, K, k_per_split,
        x2.stride(0), packed.stride(0), scales.stride(0), scales.stride(1), out.stride(0),
        HAS_ZEROS=zeros is not None, ZERO_SHIFT=0 if zeros is not None else 8, HAS_BIAS=bias is not None,
        SPLIT_K=config["SPLIT_K"], X_DESC=desc is not None,
        DOT=tl.float32 if fp32_dot else (tl.bfloat16 if x2.dtype == torch.bfloat16 else tl.float16),
        PRECISION="ieee" if fp32_dot else "tf32",
        ASM="" if fp32_dot or not config.get("ASM", 1) else mma_unit_ptx(x2.dtype, 0 if zeros is not None else 8),
        GROUP_UNITS=0 if group_size >= K else group_size // 128, LAST_ARRIVAL=bool(config.get("LAST", 0)),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


if __name__ == "__main__":
    from mlsys_ref.backend import default_device
    from mlsys_ref.quant.qmatmul import quant_matmul, quant_matmul_reference
    from mlsys_ref.testing import max_error

    torch.manual_seed(0)
    device, dtype = default_device(), torch.float16
    N, K = 45, 300  # N odd, K not a multiple of the 128-code unit (padded with zero codes)
    q = pack_int4(torch.randint(0, 16, (N, K), dtype=torch.uint8)).to(device)
    packed = pack_int4_mma(q)
    print(f"row-major uint8 {tuple(q.shape)} -> fragment order int32 {tuple(packed.shape)}; "
          f"round trip exact: {torch.equal(unpack_int4_mma(packed, K), q)}")
    scales = (torch.rand(N, 1, device=device) * 0.1).to(dtype)  # one group per row
    for M in (1, 5):
        x = torch.randn(M, K, device=device, dtype=dtype)
        y = quant_matmul(x, packed, scales, bits=4)
        ref = quant_matmul_reference(x.double(), q, scales, bits=4)
        print(f"M = {M}: max error vs dequantize-then-matmul {max_error(y, ref):.2e}")
