"""The launches of the W4A16 / W8A16 kernels, one path per order of the int4 codes.

:func:`mlsys_ref.quant.qmatmul.quant_matmul` checks the storage format, permutes x for act-order and keeps
autograd; this file turns a validated product into kernel launches and picks each one's tile config
(:mod:`mlsys_ref.quant.qmatmul_tune`):
- row-major codes (QuantizedLinear's storage): at M = 1 the FMA GEMV (split-K summed by the last arrival) and the
  tensor-core GEMV of :mod:`mlsys_ref.quant.qmatmul_gemv_tc` compete with the 16-row tensor-core GEMM; above M = 1
  the skinny or tiled GEMM of :mod:`mlsys_ref.quant.qmatmul_kernels` (split-K summed by a second kernel);
- slab order (``pack_gemv_slabs``, M = 1): the tensor-core GEMV, tuned apart inside ``chained_gemvs()``;
- fragment order (``pack_int4_mma``): :mod:`mlsys_ref.quant.qmatmul_mma`'s kernel and, on Hopper above M = 64,
  :mod:`mlsys_ref.quant.qmatmul_wgmma`'s.

The one idea to notice: each path's ``run(config)`` is both what the tuner times for every candidate and what
runs afterwards (a chained GEMV is timed in a chain instead), so the choice is measured on the launch itself.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import is_interpreter, require_triton, tl, tma_descriptor, triton
from mlsys_ref.quant.qmatmul_chain import chain_timing, in_chain
from mlsys_ref.quant.qmatmul_gemv_tc import tc_gemv, tc_gemv_applies, tc_gemv_configs
from mlsys_ref.quant.qmatmul_kernels import _qgemm_kernel, _qgemv_kernel, _splitk_reduce_kernel
from mlsys_ref.quant.qmatmul_mma import mma_launch
from mlsys_ref.quant.qmatmul_ptx import lop3_ptx, nibble_ptx
from mlsys_ref.quant.qmatmul_tune import gemm_configs, gemv_configs, m_bucket, mma_configs, pick_config
from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies, wgmma_configs, wgmma_launch, wgmma_splits

__all__ = ["launch", "launch_slabs", "launch_mma"]


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


def launch(x2, qweight, scales, zeros, bits, bias, group_size, config=None) -> torch.Tensor:
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
        return launch_slabs(x2, qweight, scales, zeros, bias, group_size, out, config)
    if qweight.dtype == torch.int32:  # fragment order (qmatmul_mma): its own kernel, for every M
        return launch_mma(x2, qweight, scales, zeros, bias, group_size, out, config)
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


def launch_slabs(x2, slabs, scales, zeros, bias, group_size, out, config=None) -> torch.Tensor:
    """The slab order (pack_gemv_slabs): what QuantizedLinear runs at M = 1 where the tensor-core GEMV applies.
    Inside ``chained_gemvs()`` the configs are tuned apart, timed in a chain (``qmatmul_chain.chain_timing``)."""
    K = x2.shape[1]
    if not tc_gemv_applies(4, K, group_size, x2.dtype):
        raise ValueError("int4 qweight in slab order (pack_gemv_slabs) runs only on the tensor-core GEMV "
                         "(qmatmul_gemv_tc: GPU with Gluon, 16-bit x, K % 32 == 0, groups of whole 128-code units)")
    xv = _gemv_x_words(x2[0])  # (launch already gave zeros the strides of scales)
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


def launch_mma(x2, packed, scales, zeros, bias, group_size, out, config=None) -> torch.Tensor:
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
