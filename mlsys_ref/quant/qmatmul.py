"""W4A16 and W8A16 matmul in Triton: integer weights dequantized in registers, fp16/bf16 activations.

Papers: weight-only quantized GEMM as in GPTQ (Frantar et al. 2022, arXiv:2210.17323, §5 "Practical
speedups": the matrix-vector product is memory-bound, so reading 4-bit weights instead of 16-bit ones
is the speed-up) and Marlin (Frantar et al. 2024, arXiv:2408.11743, §3: stream the weights once, with
wide loads and enough work in flight to saturate HBM). The int -> float trick is the "magic number"
conversion used by FasterTransformer's weight-only kernels (Kim et al. 2022, arXiv:2211.10017):
OR the integer into the mantissa of 2^23.

y[m, n] = Σ_k x[m, perm[k]] · (q[n, k] - z[n, g(k)]) · s[n, g(k)],  g(k) = k // group_size,
with the storage format of :mod:`mlsys_ref.quant.linear` (int4: uint8 [N, K/2], low nibble = even k;
zero points may be fractional, as in llama.cpp's Q4_1 grid).

Three kernels:
- ``_qgemv_kernel`` (M = 1, decode, on the FMA units): the packed weight is read as int32 words (8 int4
  or 4 int8 codes), [BLOCK_N, BLOCK_G, BLOCK_WG] words per step. Each code becomes the float
  f = 2^p + u by bit operations alone (a shift per byte, then one LOP3 per code, (a & MASK) | 2^p, by
  inline PTX on the GPU: written in Triton, LLVM would turn it into two instructions), and
  Σ x·f = 2^p·Σ x + Σ x·u: per weight only the bit operations and one FMA remain (no x·2^p); the
  group-wise affine is factored out, y_n = Σ_g s_gn·(Σ_{k∈g} x_k·u_kn - (ZERO_SHIFT + z_gn)·Σ_{k∈g} x_k),
  so scales, zeros and Σ x cost once per group. Loads are prefetched (a register double buffer, or
  Triton's cp.async pipeline). Split-K partials are summed by the *last* program of each tile (an
  arrival counter, fixed order: deterministic) -- one launch, no reduction kernel.
- the tensor-core GEMV of :mod:`mlsys_ref.quant.qmatmul_gemv_tc` (M = 1, int4, GPU only, in Gluon): the same
  row-major words on ``mma.sync``, about one instruction of bit work per weight, in a k order chosen so that
  every lane's operands are contiguous. The M = 1 tuner times it against the FMA GEMV; on the H100 it wins.
- ``_qgemm_kernel`` (M >= 2, and M = 1 when its tuner says so): the weight tile is dequantized in
  registers and fed to ``tl.dot`` as the *left* operand (yᵀ = W xᵀ, so the large N fills the tensor
  core's M slot and M = 16 wastes nothing); for 2 <= M <= 16 it runs as a skinny GEMV-like kernel (one
  16-row tile, split-K into an fp32 workspace reduced in a fixed order), above that as a tiled GEMM with
  programs ordered M-fastest so the tiles sharing one weight strip run together. FOLD = 1 feeds the
  *exact* codes to the tensor cores and applies the scale to each chunk's [BLOCK_N, BLOCK_M] product
  (cheap when BLOCK_M is small); FOLD = 0 dequantizes each weight to (q - z)·s (cheap when BLOCK_M is
  large). On the GPU the int4 codes come from inline PTX (``nibble_ptx``): PRMT spreads two bytes into
  the halves of a register, one LOP3 per nibble pair ORs the nibbles into the mantissas of 128.0 (bf16;
  the high nibble after a shift) or 1024.0 (fp16), and one packed FMA gives q (and a packed multiply
  q·s): 1.5 / 1.25 instructions per weight, not ~6; a call takes a whole loaded 32-bit register
  (4 bytes), so the compiler packs no bytes around it. For large M
  the tile holds all 256 rows of x, read through a TMA descriptor (one bulk copy per tile instead of
  per-thread address arithmetic), so each weight tile is dequantized once.

Choices: a chunk (a run, in the GEMV) never straddles a quantization group, so scales and zeros are
one value per row per chunk, applied once per chunk; the int4 pair (even k, odd k) is handled as two
half-chunks against x[k0 + 2j] and x[k0 + 2j + 1] instead of interleaving nibbles in registers, and
for 16-bit x that pair is one int32 word, so x is read as int32 [M, K/2] with wide contiguous loads
and split with two shifts (fp32 x: two strided loads); act-order permutes x once *before* the
kernel (``x[..., perm]``: M·K elements, negligible next to N·K weights) so the kernel never gathers.
The jit code lives in :mod:`mlsys_ref.quant.qmatmul_kernels`; this file validates and launches.

Marlin's offline weight reshuffle into tensor-core fragment order is :mod:`mlsys_ref.quant.qmatmul_mma`
(``pack_int4_mma``): an int32 qweight is that layout, and its kernel serves every M. QuantizedLinear keeps
the row-major codes (its storage format) and packs a copy on first use: it runs 2 <= M <= 64 from it (on
Hopper larger M too, by the wgmma kernel of :mod:`mlsys_ref.quant.qmatmul_wgmma`), and M = 1 from a slab-order
copy (a 4-D int32 qweight, ``pack_gemv_slabs``) where the tensor-core GEMV applies, else from whichever layout a
one-off timing picks
(:mod:`mlsys_ref.quant.qmatmul_dispatch`, which also holds the ``use_kernels`` switch). In the row-major
kernels here, the packed int4 tile goes through shared memory to reach the MMA's register layout.

Left out: asynchronous global->shared pipelines written by hand, and stream-K (built and measured on the
H100: slower at M = 16 and M = 256; at M = 256 the tiled GEMM itself runs at 0.93x cuBLAS on 4096² and
loses the rest to the split-K reduction, benchmarks/results/h100-sxm/quant_notes.md); int3 and int2 (use
the PyTorch path). The split-K GEMV's counters are one buffer per device: two such GEMVs running
concurrently on two streams are not supported.

The one idea to notice: at M = 1 the kernel is a memory copy of the quantized weight with a little
arithmetic on the side; every design choice (word loads, bit-level conversion, factored scales,
split-K, prefetch) is about keeping HBM busy with few instructions per byte, because 4 bits per weight
is the whole speed-up.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import (check_kernel_device, default_device, is_interpreter, require_triton, tl,
                               tma_descriptor, triton)
from mlsys_ref.quant.primitives import dequantize, unpack_int4
from mlsys_ref.quant.qmatmul_chain import chain_timing, in_chain
from mlsys_ref.quant.qmatmul_gemv_tc import (gemv_slabs_shape, tc_gemv, tc_gemv_applies, tc_gemv_configs,
                                              unpack_gemv_slabs)
from mlsys_ref.quant.qmatmul_kernels import _qgemm_kernel, _qgemv_kernel, _splitk_reduce_kernel
from mlsys_ref.quant.qmatmul_mma import UNIT, mma_launch, mma_words, pack_int4_mma, unpack_int4_mma
from mlsys_ref.quant.qmatmul_ptx import lop3_ptx, nibble_ptx
from mlsys_ref.quant.qmatmul_tune import gemm_configs, gemv_configs, m_bucket, mma_configs, pick_config
from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies, wgmma_configs, wgmma_launch, wgmma_splits

__all__ = ["quant_matmul", "quant_matmul_reference", "quant_matmul_eager", "dequantize_weight", "pack_int4_mma"]


def _fit_block_k(config: dict, group_size: int, K: int, min_block: int) -> dict:
    """Shrink BLOCK_K so that a chunk never straddles a group (BLOCK_K must divide group_size)."""
    block = config["BLOCK_K"]
    if group_size < K:
        block = min(block, group_size & -group_size)  # largest power of two dividing group_size
    return {**config, "BLOCK_K": max(block, min_block)}


def _unique(configs) -> list[dict]:
    """Drop configs that became identical after _fit_block_k (e.g. BLOCK_K 256 and 512 at group 128)."""
    seen, out = set(), []
    for config in configs:
        key = tuple(sorted(config.items()))
        if key not in seen:
            seen.add(key)
            out.append(config)
    return out


def _words_fit(qweight: torch.Tensor, K: int, bits: int) -> bool:
    """The GEMV reads qweight as int32 words: whole words per row, 4-byte aligned rows."""
    return (K % (32 // bits) == 0 and qweight.stride(1) == 1 and qweight.stride(0) % 4 == 0
            and qweight.storage_offset() % 4 == 0)


_COUNTERS: dict = {}  # device -> int32 arrival counters of the split-K GEMV, zero between launches


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Arrival counters for ``tiles`` output tiles; each launch leaves them at zero (the last program of a
    tile resets its counter). One buffer per device: launches on one stream (or one graph) are serialized;
    two split-K GEMVs running *concurrently* on two streams would share counters (not supported)."""
    buffer = _COUNTERS.get(device)
    if buffer is None or buffer.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quant_matmul: run the split-K GEMV once before capturing a CUDA graph "
                               "(its counters are allocated on first use)")
        buffer = _COUNTERS[device] = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
    return buffer


def _reduce_splits(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = Σ_s partials[s] (+ bias, contiguous), fp32 partials [SPLIT_K, M, N], summed in split order."""
    MN = out.numel()
    _splitk_reduce_kernel[(triton.cdiv(MN, 1024),)](partials, bias if bias is not None else out, out, MN,
                                                     out.shape[1], SPLIT_K=partials.shape[0], HAS_BIAS=bias is not None,
                                                     BLOCK=1024)


def _validate(x, qweight, scales, zeros, bits, perm, bias) -> tuple[int, int, int]:
    """Check the storage format; return (N, K, group_size)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for the Triton kernels, got {bits!r} (int3 etc.: PyTorch path)")
    K = x.shape[-1]
    slab_order = bits == 4 and qweight.dtype == torch.int32 and qweight.dim() == 4  # the GEMV's: N from scales
    if not slab_order and qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K/2] (int4) or [N, K] (int8), or 4-D from pack_gemv_slabs, "
                         f"got {tuple(qweight.shape)}")
    N = (scales.shape[0] if scales.dim() == 2 else -1) if slab_order else qweight.shape[0]
    if slab_order and tuple(qweight.shape) != gemv_slabs_shape(N, K):
        raise ValueError(f"int4 qweight in slab order (pack_gemv_slabs) must be int32 {gemv_slabs_shape(N, K)} for "
                         f"N = scales.shape[0] = {N}, K = x.shape[-1] = {K}, got {tuple(qweight.shape)}")
    if slab_order and x.numel() != K:
        raise ValueError(f"int4 qweight in slab order (pack_gemv_slabs) is for one row x (M = 1); got x of "
                         f"shape {tuple(x.shape)}: use the row-major codes or pack_int4_mma for M > 1")
    words = mma_words(K)  # per row of the fragment layout (pack_int4_mma)
    if bits == 4 and qweight.dtype == torch.int32 and qweight.dim() == 2 and qweight.shape[1] != words:
        raise ValueError(f"int4 qweight in fragment order (pack_int4_mma) must be int32 [N, {words}] for "
                         f"K = x.shape[-1] = {K}, got {tuple(qweight.shape)}")
    if bits == 4 and qweight.dtype != torch.int32 and (qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K):
        raise ValueError(f"int4 qweight must be uint8 [N, K/2] = [{N}, {K / 2:g}] (K = x.shape[-1] = {K}) or int32 "
                         f"[N, {words}] from pack_int4_mma, got {qweight.dtype} {tuple(qweight.shape)}")
    if bits == 8 and (qweight.dtype not in (torch.int8, torch.uint8) or qweight.shape[1] != K):
        raise ValueError(f"int8 qweight must be int8/uint8 [N, K] = [{N}, {K}], got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dim() != 2 or scales.shape[0] != N or not scales.is_floating_point() or K % scales.shape[1]:
        raise ValueError(f"scales must be float [N={N}, G] with G dividing K={K}, got {scales.dtype} {tuple(scales.shape)}")
    group_size = K // scales.shape[1]
    if zeros is not None and (zeros.shape != scales.shape or not zeros.is_floating_point()):
        raise ValueError(f"zeros must be None or float with the shape of scales {tuple(scales.shape)}, got "
                         f"{zeros.dtype} {tuple(zeros.shape)}")
    min_block = 32 if bits == 4 else 16  # tl.dot needs 16 codes of each half-chunk
    if group_size < K and group_size % min_block:
        raise ValueError(f"group_size={group_size} must be a multiple of {min_block} for the int{bits} kernels")
    if qweight.dtype == torch.int32 and group_size < K and group_size % UNIT:
        raise ValueError(f"group_size={group_size} must be a multiple of {UNIT} (or all of K) for the fragment "
                         f"layout and the slab order")
    if perm is not None and (perm.dtype != torch.int64 or perm.shape != (K,)):
        raise ValueError(f"perm must be None or int64 [K={K}], got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be None or [N={N}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm), ("bias", bias)):
        if t is not None:
            check_kernel_device(t, name)
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return N, K, group_size


def _launch(x2, qweight, scales, zeros, bits, bias, group_size, config=None) -> torch.Tensor:
    """x2 [M, K] (already permuted) -> y [M, N] in x2's dtype; ``config`` pins the tile choice (tests)."""
    require_triton("quant_matmul")
    M, K = x2.shape
    N, x_dtype = scales.shape[0], x2.dtype  # scales are [N, G] in every order of the codes
    out = torch.empty(M, N, device=x2.device, dtype=x_dtype)
    if M == 0:
        return out
    signed = qweight.dtype == torch.int8
    if signed:
        qweight = qweight.view(torch.uint8)  # same bytes; the kernels flip the sign bit (see _unsigned_codes)
    common = dict(BITS=bits, SIGNED=signed, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                  ZERO_SHIFT=128 if signed else (8 if bits == 4 and zeros is None else 0),
                  IS_BF16=x_dtype == torch.bfloat16)
    if zeros is not None and zeros.stride() != scales.stride():  # the kernels index both with scales' strides
        scales, zeros = scales.contiguous(), zeros.contiguous()
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    b = bias.contiguous() if bias is not None else out
    if qweight.dim() == 4:  # slab order (pack_gemv_slabs): the tensor-core GEMV only
        return _launch_slabs(x2, qweight, scales, zeros, bias, group_size, out, config)
    if qweight.dtype == torch.int32:  # fragment order (qmatmul_mma): its own kernel, for every M
        return _launch_mma(x2, qweight, scales, zeros, bias, group_size, out, config)
    min_block = 32 if bits == 4 else 16
    key = (m_bucket(M), N, K, group_size, bits, signed, zeros is not None, bias is not None, x_dtype)

    def split_k(cfg: dict) -> tuple[int, torch.Tensor]:
        """K per split (a multiple of BLOCK_K, so chunks stay group-aligned) and where partial sums go."""
        split = cfg["SPLIT_K"]
        k_per_split = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        return k_per_split, out if split == 1 else torch.empty(split, M, N, device=out.device, dtype=torch.float32)

    gemv = M == 1 and _words_fit(qweight, K, bits)
    if gemv:
        w32 = qweight.view(torch.int32)  # [N, K/8] (int4) or [N, K/4] (int8): 8 or 4 codes per word
        xv = x2[0] if x_dtype == torch.float32 else _gemv_x_words(x2[0])  # 16-bit x as int32 words, as in the GEMM

    # GPU: each code -> float in one LOP3 by inline PTX (the interpreter runs the same bits in plain Triton)
    lop3_lo = "" if is_interpreter() else lop3_ptx(0x00078000 if bits == 4 else 0x007F8000, 0x43800000)  # 256 + u
    lop3_hi = "" if is_interpreter() else lop3_ptx(0x00780000, 0x41800000)  # int4 high nibble: 16 + u

    def run_gemv(cfg: dict) -> torch.Tensor:
        # runs of BLOCK_KG codes each inside one group; BLOCK_G runs per step
        block_kg = cfg["BLOCK_K"] if group_size == K else min(cfg["BLOCK_K"], group_size & -group_size)
        k_per_split, target = split_k(cfg)
        counters = _counters(x2.device, triton.cdiv(N, cfg["BLOCK_N"])) if cfg["SPLIT_K"] > 1 else out
        _qgemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])](
            xv, w32, scales, z, b, out, target, counters, N, K, group_size, k_per_split,
            xv.stride(0), w32.stride(0), scales.stride(0), scales.stride(1),
            SPLIT_K=cfg["SPLIT_K"], EVEN_K=K % cfg["BLOCK_K"] == 0, STAGES=cfg["num_stages"], BLOCK_N=cfg["BLOCK_N"],
            LOP3_LO=lop3_lo if cfg.get("LOP3", 1) else "", LOP3_HI=lop3_hi if cfg.get("LOP3", 1) else "",
            BLOCK_G=cfg["BLOCK_K"] // block_kg, BLOCK_KG=block_kg, X_PAIRS=x_dtype != torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
        return out

    xg = x2
    if bits == 4 and x_dtype != torch.float32:  # int32 words [M, K/2]: word j = (x[:, 2j], x[:, 2j+1])
        if xg.stride(1) != 1 or xg.stride(0) % 2 or xg.storage_offset() % 2:
            xg = xg.clone(memory_format=torch.contiguous_format)
        xg = xg.view(torch.int32)
    fp32_dot = x_dtype == torch.float32 or is_interpreter()  # bf16 tl.dot is wrong under the interpreter
    # FOLD: 1.0 in the dot's dtype and where its top 4 mantissa bits start (a nibble there makes 1 + u/16)
    fold_shift, fold_one = (19, 0x3F800000) if fp32_dot else ((3, 0x3F80) if x_dtype == torch.bfloat16 else (6, 0x3C00))
    # inline PTX for the int4 codes: GPU, 16-bit x; the scaled variant also needs scales exact in x's dtype
    use_asm = bits == 4 and not fp32_dot
    use_asm_w = use_asm and zeros is None and scales.dtype == x_dtype

    def run_gemm(cfg: dict) -> torch.Tensor:
        cfg = _fit_block_k(cfg, group_size, K, min_block)  # a chunk never straddles a group
        k_per_split, target = split_k(cfg)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        fold, pack = cfg.get("FOLD", 1), cfg.get("PACK", 4)  # PACK: bytes per inline-PTX call (nibble_ptx)
        ptx = bool(cfg.get("ASM", 1)) and (use_asm if fold else use_asm_w)  # FOLD = 0 needs the scaled variant
        asm, asm_args = nibble_ptx(x_dtype, common["ZERO_SHIFT"], not fold, pack) if ptx else ("", "")
        # INTERLEAVE (inline PTX only): codes back in k order, so x is read as stored, one dot per chunk
        interleave = bool(cfg.get("IL", 0)) and ptx
        xk = x2 if interleave else xg
        # TMA (interleaved path): x's tiles by the tensor-memory accelerator -- one instruction per
        # [BLOCK_M, BLOCK_K] tile instead of per-thread address math, what large-M tiles need (see the benchmark)
        desc = tma_descriptor(x2, [cfg["BLOCK_M"], cfg["BLOCK_K"]]) if cfg.get("TMA", 0) and interleave else None
        x_desc = desc is not None
        _qgemm_kernel[grid](
            desc if x_desc else xk,
            qweight, scales, z, b, target, M, N, K, group_size, k_per_split,
            xk.stride(0), xk.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            target.stride(0) if cfg["SPLIT_K"] > 1 else 0, target.stride(-2), target.stride(-1),
            SPLIT_K=cfg["SPLIT_K"], EVEN_K=K % cfg["BLOCK_K"] == 0, X_PAIRS=xk.dtype == torch.int32, INTERLEAVE=interleave,
            X_DESC=x_desc,
            DOT=tl.float32 if fp32_dot else (tl.float16 if x_dtype == torch.float16 else tl.bfloat16),
            PRECISION="ieee" if fp32_dot else "tf32", FOLD=fold, FOLD_SHIFT=fold_shift, FOLD_ONE=fold_one,
            ASM=asm, ASM_ARGS=asm_args, ASM_PACK=pack, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **common)
        if cfg["SPLIT_K"] > 1:  # second pass: sum the fp32 partials in a fixed order, add bias, cast
            _reduce_splits(target, None if bias is None else b, out)
        return out

    # M = 1 on the tensor cores from the same row-major words (Gluon, GPU only): one more candidate family
    tc = gemv and tc_gemv_applies(bits, K, group_size, x_dtype)

    def run(cfg: dict) -> torch.Tensor:  # a config naming BLOCK_M is a tensor-core (GEMM) config, even at M = 1
        if "SPW" in cfg:
            if not tc:
                raise ValueError(f"config {cfg} is the tensor-core GEMV (qmatmul_gemv_tc), which does not cover "
                                 f"this product (int4, 16-bit x, M = 1, K % 32 == 0, groups of whole 128-code units)")
            tc_gemv(xv, w32, scales, zeros, b if bias is not None else None, out[0], K, group_size, cfg)
            return out
        return run_gemm(cfg) if "BLOCK_M" in cfg or not gemv else run_gemv(cfg)

    if config is not None:
        candidates = [config]
    else:  # M = 1: the FMA GEMV, the tensor-core GEMV and the 16-row tensor-core kernel compete
        candidates = _unique(_fit_block_k(c, group_size, K, min_block) for c in gemm_configs(M))
        candidates = (gemv_configs(bits) + (tc_gemv_configs() if tc else []) + candidates[:2]) if gemv else candidates
    return run(pick_config("qmm", key, candidates, run))


def _gemv_x_words(x: torch.Tensor) -> torch.Tensor:
    """One 16-bit row x [K] read as int32 words [K/2] (what the GEMVs load)."""
    return (x if x.stride(0) == 1 and x.storage_offset() % 2 == 0 else x.contiguous()).view(torch.int32)


def _launch_slabs(x2, slabs, scales, zeros, bias, group_size, out, config=None) -> torch.Tensor:
    """The slab order (pack_gemv_slabs): what QuantizedLinear runs at M = 1 where the tensor-core GEMV applies.
    Inside ``chained_gemvs()`` the configs are tuned apart, timed in a chain (``qmatmul_chain.chain_timing``)."""
    K = x2.shape[1]
    if not tc_gemv_applies(4, K, group_size, x2.dtype):
        raise ValueError("int4 qweight in slab order (pack_gemv_slabs) runs only on the tensor-core GEMV "
                         "(qmatmul_gemv_tc: GPU with Gluon, 16-bit x, K % 32 == 0, groups of whole 128-code units)")
    xv = _gemv_x_words(x2[0])  # (_launch already gave zeros the strides of scales)
    b = None if bias is None else bias.contiguous()

    def run(cfg: dict) -> torch.Tensor:
        tc_gemv(xv, slabs, scales, zeros, b, out[0], K, group_size, cfg)
        return out

    if config is None:
        chained = in_chain()
        key = ("slabs", out.shape[1], K, group_size, zeros is not None, bias is not None, x2.dtype, chained)
        if chained:  # timed back to back, each call on the next scratch copy of the weight
            timing, repeat = chain_timing(lambda cfg, w: tc_gemv(xv, *w, b, out[0], K, group_size, cfg),
                                          (slabs, scales, zeros))
        else:
            timing, repeat = run, 1
        config = pick_config("qmm_slabs", key, tc_gemv_configs(), timing, repeat)
    return run(config)


def _launch_mma(x2, packed, scales, zeros, bias, group_size, out, config=None) -> torch.Tensor:
    """The fragment-layout kernels: qmatmul_mma's (every backend) and, on Hopper, qmatmul_wgmma's (a config naming
    STAGES). Split-K partials are summed by the last program of a tile to arrive (config LAST = 1, qmatmul_mma
    only) or by the row-major GEMM's second kernel."""
    M, K = x2.shape
    N = out.shape[1]
    bias = bias.contiguous() if bias is not None else None
    wgmma = wgmma_applies(K, group_size, x2, zeros)

    def run(cfg: dict) -> torch.Tensor:
        if "STAGES" in cfg and not wgmma:
            raise ValueError(f"config {cfg} is the wgmma kernel (qmatmul_wgmma), which does not cover this product "
                             "(Hopper GPU, 16-bit x with 16-byte aligned rows, no zero points, 128-code groups)")
        split = wgmma_splits(K, cfg)[1] if "STAGES" in cfg else cfg["SPLIT_K"]
        last = split > 1 and bool(cfg.get("LAST", 0))
        workspace = None if split == 1 else torch.empty(split, M, N, device=out.device, dtype=torch.float32)
        if "STAGES" in cfg:  # adds the bias itself only without split-K
            wgmma_launch(x2, packed, scales, bias, group_size, cfg, out if split == 1 else workspace)
        else:
            tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
            mma_launch(x2, packed, scales, zeros, bias, group_size, cfg, out, workspace,
                       _counters(out.device, tiles) if last else None)
        if split > 1 and not last:
            _reduce_splits(workspace, bias, out)
        return out

    key = (m_bucket(M), N, K, group_size, zeros is not None, bias is not None, x2.dtype)
    # above M = 64 the warp-specialized wgmma kernel joins the candidates where it applies (H100: 0.94-1.33x
    # cuBLAS at M = 256, against 0.66-0.97x for the Triton fragment kernel; quant_notes.md)
    candidates = mma_configs(M) + (wgmma_configs() if M > 64 and wgmma else [])
    return run(config if config is not None else pick_config("qmm_mma", key, candidates, run))


class _QuantMatmul(torch.autograd.Function):
    """Forward: the kernel. Backward (inputs only; the codes are not trained): dx = dy @ dequant(W)."""

    @staticmethod
    def forward(ctx, x2, qweight, scales, zeros, bias, bits, group_size, config):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.bits, ctx.K = bits, x2.shape[1]
        return _launch(x2, qweight, scales, zeros, bits, bias, group_size, config)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        grad_x = (grad @ dequantize_weight(qweight, scales, zeros, ctx.bits, ctx.K).to(grad.dtype)
                  if ctx.needs_input_grad[0] else None)
        grad_b = grad.sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_b, None, None, None


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 *, bits: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x[..., perm] @ dequant(qweight)ᵀ + bias, [..., K] -> [..., N] in x's dtype (GEMV if M <= 16)."""
    N, K, group_size = _validate(x, qweight, scales, zeros, bits, perm, bias)
    if perm is not None:
        x = x.index_select(-1, perm)  # act-order: permute the activation once, the kernel never gathers
    x2 = x.reshape(-1, K)
    y = _QuantMatmul.apply(x2, qweight, scales, zeros, bias, bits, group_size, config)
    return y.reshape(*x.shape[:-1], N)


# -- the PyTorch path: dequantize, then matmul (what every kernel is tested against) -----------------
def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      K: int | None = None) -> torch.Tensor:
    """Ŵ_stored [N, K] in fp32 from the storage format (int4 symmetric codes are stored +8); the fragment
    layout (int32, from pack_int4_mma) and the slab order (pack_gemv_slabs) are padded, so they need K."""
    if qweight.dim() == 4:
        if K is None:
            raise ValueError("dequantize_weight needs K for a qweight in slab order (pack_gemv_slabs)")
        qweight = unpack_gemv_slabs(qweight, scales.shape[0], K)
    elif qweight.dtype == torch.int32:
        if K is None:
            raise ValueError("dequantize_weight needs K for a qweight in fragment order (pack_int4_mma)")
        qweight = unpack_int4_mma(qweight, K)
    if bits == 4:
        q = unpack_int4(qweight).to(torch.int32) - (8 if zeros is None else 0)
    else:
        q = qweight.to(torch.int32)
    return dequantize(q, scales.float(), None if zeros is None else zeros.float())


def quant_matmul_reference(x, qweight, scales, zeros=None, *, bits, perm=None, bias=None) -> torch.Tensor:
    """Dequantize-then-matmul in fp32 (fp64 when x is fp64), returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    W = dequantize_weight(qweight, scales, zeros, bits, x.shape[-1]).to(compute)
    xc = x.to(compute) if perm is None else x.to(compute)[..., perm]
    y = xc @ W.T
    return (y if bias is None else y + bias.to(compute)).to(x.dtype)


def quant_matmul_eager(x, qweight, scales, zeros=None, *, bits, perm=None, bias=None) -> torch.Tensor:
    """PyTorch eager at x's dtype (QuantizedLinear's PyTorch path): Ŵ rounded to x.dtype, then F.linear.

    Its error against the fp64 reference is the yardstick for a kernel's error at large K in bf16:
    a kernel that rounds Ŵ to bf16 before the tensor cores (as this does) cannot beat it.
    """
    W = dequantize_weight(qweight, scales, zeros, bits, x.shape[-1]).to(x.dtype)
    xp = x if perm is None else x[..., perm]
    return torch.nn.functional.linear(xp, W, None if bias is None else bias.to(x.dtype))


if __name__ == "__main__":
    from mlsys_ref.quant.linear import QuantizedLinear
    from mlsys_ref.testing import max_error, tolerance

    torch.manual_seed(0)
    device = default_device()
    dtype = torch.float16
    for bits, group, symmetric in ((4, 64, True), (4, 32, False), (8, None, True)):
        linear = torch.nn.Linear(192, 45, bias=True)
        ql = QuantizedLinear.from_linear(linear, bits, group, symmetric).to(device)
        for M in (1, 3, 17):
            x = torch.randn(M, 192, device=device, dtype=dtype)
            args = (ql.qweight, ql.scales, ql.zeros)
            y = quant_matmul(x, *args, bits=bits, bias=ql.bias.to(dtype))
            ref = quant_matmul_reference(x.double(), *args, bits=bits, bias=ql.bias)
            print(f"int{bits} group={ql.group_size} {'sym ' if symmetric else 'asym'} M={M:2d}: "
                  f"max error vs dequantize-then-matmul {max_error(y, ref):.2e} (fp16 atol {tolerance(dtype).atol})")
