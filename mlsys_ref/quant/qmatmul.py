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
The jit code lives in :mod:`mlsys_ref.quant.qmatmul_kernels`; this file validates, and
:mod:`mlsys_ref.quant.qmatmul_launch` launches and tunes.

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

from mlsys_ref.backend import check_kernel_device, default_device
from mlsys_ref.quant.primitives import dequantize, unpack_int4
from mlsys_ref.quant.qmatmul_gemv_tc import gemv_slabs_shape, unpack_gemv_slabs
from mlsys_ref.quant.qmatmul_launch import launch
from mlsys_ref.quant.qmatmul_mma import UNIT, mma_words, pack_int4_mma, unpack_int4_mma

__all__ = ["quant_matmul", "quant_matmul_reference", "quant_matmul_eager", "dequantize_weight", "pack_int4_mma"]


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


class _QuantMatmul(torch.autograd.Function):
    """Forward: the kernel. Backward (inputs only; the codes are not trained): dx = dy @ dequant(W)."""

    @staticmethod
    def forward(ctx, x2, qweight, scales, zeros, bias, bits, group_size, config):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.bits, ctx.K = bits, x2.shape[1]
        return launch(x2, qweight, scales, zeros, bits, bias, group_size, config)

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
