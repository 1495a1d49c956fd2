"""W4A16 at large M on Hopper's wgmma: warpgroups taking turns on the tensor cores (Gluon, GPU only).

Paper: Marlin (Frantar, Castro, Chen, Hoefler, Alistarh 2024, arXiv:2408.11743), §3 (the weight in fragment
order, dequantized in registers straight into the MMA operand), on Hopper's asynchronous warpgroup MMA as
CUTLASS's mixed-input "ping-pong" GEMMs feed it: the weight is the *register* operand (its rows fill the MMA's
M slot, 64 per warpgroup) and x the shared-memory operand, a tile of BLOCK_M tokens brought by TMA.

The one idea to notice: a warpgroup cannot overlap its own bit work with its own MMAs here. A wgmma reads its
register operand asynchronously, and ptxas gives the next unit's operand the same registers (measured: with
the MMAs left in flight across iterations the results were wrong), so each warpgroup must wait for its MMAs
before it dequantizes the next unit. Warpgroups that do *not* wait for each other hide it instead: while one
does bit work the others' MMAs run. So the kernel is warp-specialized: a one-warp producer streams x's tiles
by TMA into a ring of shared-memory stages, and CONSUMERS warpgroups (64 weight rows each) take every stage,
each at its own pace, releasing it through an mbarrier that counts them all. No CTA-wide barrier in the loop:
that lockstep is what the plain-Triton GEMM (``qmatmul_kernels._qgemm_kernel``) had.

Two costs set the tile (H100, quant_notes.md). Every tile of 64·CONSUMERS weight rows streams all of x from
the L2, so x crosses it N / (64·CONSUMERS) times, and that traffic, not the MMAs, capped two consumers of
256 tokens at ~3.7 TB/s; three consumers of 128 tokens read x a third less often, at the price of
dequantizing each weight tile once per 128 tokens (11008 x 4096: 0.82x -> 0.98-1.02x cuBLAS). And a unit's
MMAs can take less than a load's latency, so each warpgroup keeps the weight words of DEPTH units in flight.

Layout: the fragment order of :mod:`mlsys_ref.quant.qmatmul_mma` (``pack_int4_mma``): a lane's 16-byte load
per row and unit is exactly its wgmma register fragment, and the rows are loaded in (h, slab, g) order so the
load's blocked layout *is* the operand layout (the ``convert_layout`` renames registers). One PTX string per
word (``mma_unit_ptx(..., scaled=True)``) gives (u - 8)·s as bf16x2/f16x2: four weights per
shift-LOP3-SUB-MUL, rounded once as dequantize-then-matmul rounds them.

Covers int4, symmetric codes (no zero points), 16-bit x with 16-byte aligned rows, groups of whole 128-code
units (or one per row), bias, split-K (fp32 partials summed by ``qmatmul_launch._reduce_splits``). Gluon does not run
under the interpreter: this is a GPU-only candidate of the fragment-layout path (``quant_matmul`` with an
int32 qweight), whose Triton kernel (:mod:`qmatmul_mma`) computes the same product on every backend.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import HAS_GLUON, gl, gluon, is_interpreter, triton
from mlsys_ref.quant.qmatmul_mma import _unit_weights
from mlsys_ref.quant.qmatmul_ptx import mma_unit_ptx

__all__ = ["wgmma_applies", "wgmma_configs", "wgmma_splits", "wgmma_launch"]

# the dequantization PTX of each x dtype, as module constants: a warp-specialized partition takes no strings
_ASM_BF16 = gl.constexpr(mma_unit_ptx(torch.bfloat16, 8, scaled=True))
_ASM_F16 = gl.constexpr(mma_unit_ptx(torch.float16, 8, scaled=True))

if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

def wgmma_applies(K: int, group_size: int, x: torch.Tensor, zeros: torch.Tensor | None) -> bool:
    """Whether the kernel covers this product (fragment-order int4 weight; the caller validated the formats)."""
    return (HAS_GLUON and not is_interpreter() and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and zeros is None and x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1
            and (group_size >= K or group_size % 128 == 0) and (x.stride(0) * 2) % 16 == 0 and x.data_ptr() % 16 == 0)


def wgmma_configs() -> list[dict]:
    """(BLOCK_M tokens, STAGES of x in shared memory, SPLIT_K, CONSUMERS warpgroups of 64 weight rows, DEPTH:
    units of weight words in flight ahead). H100 sweep at M = 256 (triton 3.6, quant_notes.md): 3 x 64 rows by
    128 tokens, no split, 2 ahead at 11008 x 4096 (42.1 us, 1.02x cuBLAS); the same with split-K 3 and 1 ahead at
    4096 x 4096 (20.5 us, 0.96x); 2 x 64 rows by 256 tokens, split-K 4 at 4096 x 11008 (40.9 us, 1.36x)."""
    table = [(128, 4, 1, 3, 2), (128, 4, 3, 3, 1), (128, 4, 2, 3, 1), (128, 4, 2, 2, 2), (256, 3, 4, 2, 1),
             (256, 3, 1, 2, 2)]
    return [dict(BLOCK_M=m, STAGES=s, SPLIT_K=k, CONSUMERS=c, DEPTH=d) for m, s, k, c, d in table]


@gluon.jit
def _unit_operand(p, s_raw, word, ASM: gl.constexpr, DTYPE: gl.constexpr):
    """Words [64, 16] of one unit (rows in (h, slab, g) order) and the rows' scales -> (u - 8)·s as the [64, 128]
    register operand, by qmatmul_mma's bit work with the scaled PTX (every value stays in its thread)."""
    bits = s_raw.to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    scale_pairs = (bits | (bits << 16))[:, None] + 0 * word[None, :]  # the scale in both halves, beside each word
    return _unit_weights(p, ASM, 8, DTYPE, 4, scale_pairs)


@gluon.jit
def _unit_loads(w_ptrs, s_ptrs, u, live, row_live, stride_sg, GROUP_UNITS: gl.constexpr):
    """Unit u's words [64, 16] and its group's scales [64] (``live``: the unit exists; ``row_live``: the rows)."""
    g = 0 if GROUP_UNITS == 0 else u // GROUP_UNITS
    return (gl.load(w_ptrs + u * 16, mask=row_live[:, None] & live, other=0),
            gl.load(s_ptrs + g * stride_sg, mask=row_live & live, other=0))


@gluon.jit
def _consumer(x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n, stride_wn,
              stride_sn, stride_sg, stride_om, stride_os, pid_k, PART: gl.constexpr, IS_BF16: gl.constexpr,
              GROUP_UNITS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr, CONSUMERS: gl.constexpr, DEPTH: gl.constexpr):
    """One warpgroup, weight rows [64·PART, 64·PART + 64) of the tile. Per unit: dequantize into registers, eight
    wgmmas, wait for them (the operand registers are reused next), release the x stage to the producer."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # lane 4g + t holds words 4t .. 4t + 3 of rows g and g + 8 of its warp's slab: its wgmma A fragment
    words: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[8, 4], warps_per_cta=[4, 1],
                                           order=[1, 0])
    rho = gl.arange(0, 64, layout=gl.SliceLayout(1, words))  # loaded row rho = (h, slab, g)
    rows = pid_n * (64 * CONSUMERS) + PART * 64 + 16 * ((rho // 8) % 4) + 8 * (rho // 32) + rho % 8
    row_live = rows < N
    word = gl.arange(0, 16, layout=gl.SliceLayout(0, words))
    w_ptrs = w_ptr + rows.to(gl.int64)[:, None] * stride_wn + word[None, :]
    s_ptrs = s_ptr + rows * stride_sn
    acc = gl.zeros([64, BLOCK_M], gl.float32, layout=mma)
    p, s_raw = _unit_loads(w_ptrs, s_ptrs, first, count > 0, row_live, stride_sg, GROUP_UNITS)
    if DEPTH == 2:
        p_ahead, s_ahead = _unit_loads(w_ptrs, s_ptrs, first + 1, count > 1, row_live, stride_sg, GROUP_UNITS)
    for i in range(count):
        u = first + i
        # the words and scales of the unit DEPTH ahead, in flight while this one's bit work and MMAs run (one unit
        # ahead arrives late when a unit takes less than a load's latency: 11008 x 4096 at 64 x 128 per warpgroup)
        p_next, s_next = _unit_loads(w_ptrs, s_ptrs, u + DEPTH, i + DEPTH < count, row_live, stride_sg, GROUP_UNITS)
        if IS_BF16:  # (a string or dtype cannot be a partition's argument in triton 3.6: chosen here)
            a = gl.convert_layout(_unit_operand(p, s_raw, word, _ASM_BF16, gl.bfloat16), a_layout)
        else:
            a = gl.convert_layout(_unit_operand(p, s_raw, word, _ASM_F16, gl.float16), a_layout)
        stage = i % STAGES
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, use_acc=i > 0, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(empty.index(stage), count=1)
        if DEPTH == 2:
            p, s_raw = p_ahead, s_ahead
            p_ahead, s_ahead = p_next, s_next
        else:
            p, s_raw = p_next, s_next
    offs_n = pid_n * (64 * CONSUMERS) + PART * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tile = offs_m.to(gl.int64)[None, :] * stride_om + offs_n[:, None]  # out [M, N]: yᵀ
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += gl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(gl.float32)[:, None]
        gl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 partials [SPLIT_K, M, N], summed by the caller's second kernel
        gl.store(out_ptr + pid_k * stride_os + tile, acc, mask=mask)


@gluon.jit
def _producer(x_desc, x_smem, ready, empty, first, count, pid_m, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: x's [BLOCK_M, 128] tiles by TMA, each stage refilled once every consumer has released it."""
    for i in range(count):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1, pred=i >= STAGES)
        mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, (first + i) * 128], ready.index(stage),
                                        x_smem.index(stage))


@gluon.jit
def _wgmma_kernel(x_desc, w_ptr, s_ptr, b_ptr, out_ptr, M, N, units, units_per_split, stride_wn, stride_sn,
                  stride_sg, stride_om, stride_os, IS_BF16: gl.constexpr, GROUP_UNITS: gl.constexpr,
                  HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, DEPTH: gl.constexpr):
    """yᵀ tile [64·CONSUMERS, BLOCK_M] = Σ_units Ŵ_unit x_unitᵀ over this program's share of the units (>= 1, see
    wgmma_splits); the default partition and CONSUMERS - 1 workers are the consumers, a last worker the producer."""
    pid_m, pid_n, pid_k = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    first = pid_k * units_per_split
    count = gl.minimum(units_per_split, units - first)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, 128], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)  # every consumer releases each stage
    # one call per CONSUMERS: triton 3.6 takes the partitions as literal tuples (a tuple built in a variable, or
    # by concatenation, loses its constexprs)
    if CONSUMERS == 2:  # up to 64 x 256 fp32 accumulators: 232 registers a consumer thread
        gl.warp_specialize([
            (_consumer, (x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n,
                         stride_wn, stride_sn, stride_sg, stride_om, stride_os, pid_k, 0, IS_BF16, GROUP_UNITS,
                         HAS_BIAS, SPLIT_K, BLOCK_M, STAGES, CONSUMERS, DEPTH)),
            (_consumer, (x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n,
                         stride_wn, stride_sn, stride_sg, stride_om, stride_os, pid_k, 1, IS_BF16, GROUP_UNITS,
                         HAS_BIAS, SPLIT_K, BLOCK_M, STAGES, CONSUMERS, DEPTH)),
            (_producer, (x_desc, x_smem, ready, empty, first, count, pid_m, BLOCK_M, STAGES))], [4, 1], [232, 40])
    else:
        gl.warp_specialize([
            (_consumer, (x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n,
                         stride_wn, stride_sn, stride_sg, stride_om, stride_os, pid_k, 0, IS_BF16, GROUP_UNITS,
                         HAS_BIAS, SPLIT_K, BLOCK_M, STAGES, CONSUMERS, DEPTH)),
            (_consumer, (x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n,
                         stride_wn, stride_sn, stride_sg, stride_om, stride_os, pid_k, 1, IS_BF16, GROUP_UNITS,
                         HAS_BIAS, SPLIT_K, BLOCK_M, STAGES, CONSUMERS, DEPTH)),
            (_consumer, (x_smem, ready, empty, w_ptr, s_ptr, b_ptr, out_ptr, N, M, first, count, pid_m, pid_n,
                         stride_wn, stride_sn, stride_sg, stride_om, stride_os, pid_k, 2, IS_BF16, GROUP_UNITS,
                         HAS_BIAS, SPLIT_K, BLOCK_M, STAGES, CONSUMERS, DEPTH)),
            (_producer, (x_desc, x_smem, ready, empty, first, count, pid_m, BLOCK_M, STAGES))],
            [4, 4, 1], [152, 152, 40])


def wgmma_splits(K: int, config: dict) -> tuple[int, int]:
    """(units per split, splits): config's SPLIT_K, reduced so that every split owns at least one unit."""
    units = triton.cdiv(K, 128)
    per_split = triton.cdiv(units, config["SPLIT_K"])
    return per_split, triton.cdiv(units, per_split)


def wgmma_launch(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int, config: dict, target: torch.Tensor) -> None:
    """One config on x2 [M, K] (16-bit, rows 16-byte aligned) and the fragment-order codes ``packed``; the output
    goes to ``target``: out [M, N] when ``wgmma_splits`` gives one split (bias added), else fp32 partials
    [splits, M, N] (bias not added). The caller validated the formats and checked :func:`wgmma_applies`."""
    M, K = x2.shape
    N = packed.shape[0]
    consumers, depth = config.get("CONSUMERS", 2), config.get("DEPTH", 1)
    if consumers not in (2, 3) or depth not in (1, 2) or config["BLOCK_M"] not in (128, 256):
        raise ValueError(f"wgmma config {config}: CONSUMERS must be 2 or 3, DEPTH 1 or 2, BLOCK_M 128 or 256")
    per_split, split = wgmma_splits(K, config)
    dtype = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    block = [config["BLOCK_M"], 128]
    desc = TensorDescriptor.from_tensor(x2, block, gl.NVMMASharedLayout.get_default_for(block, dtype))
    _wgmma_kernel[(triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, 64 * consumers), split)](
        desc, packed, scales, bias if bias is not None else target, target, M, N, triton.cdiv(K, 128), per_split,
        packed.stride(0), scales.stride(0), scales.stride(1), target.stride(-2), target.stride(0) if split > 1 else 0,
        IS_BF16=x2.dtype == torch.bfloat16, GROUP_UNITS=0 if group_size >= K else group_size // 128,
        HAS_BIAS=bias is not None and split == 1, SPLIT_K=split, BLOCK_M=config["BLOCK_M"], STAGES=config["STAGES"],
        CONSUMERS=consumers, DEPTH=depth, num_warps=4)
