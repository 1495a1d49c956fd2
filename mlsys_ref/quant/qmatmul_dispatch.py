"""Which path QuantizedLinear takes: the Triton kernels or PyTorch, and which int4 layout.

Issue 7's second requirement: the quantized modules use the kernels of :mod:`mlsys_ref.quant.qmatmul`
automatically, on the GPU and (for toy layers) under the Triton interpreter, with a switch to force the
PyTorch path -- ``with use_kernels(False):`` -- or the kernels -- ``use_kernels(True)``, which then validate
and raise on a format they do not cover instead of falling back.

The one idea to notice: the layout is a measured choice, not a rule. int4 codes in tensor-core fragment
order (Marlin, Frantar et al. 2024, §3; :mod:`mlsys_ref.quant.qmatmul_mma`) win for 2 <= M <= 64 on the
H100 and, through the warp-specialized wgmma kernel (:mod:`mlsys_ref.quant.qmatmul_wgmma`), at M = 256; at
M = 1 the tensor-core GEMV (:mod:`mlsys_ref.quant.qmatmul_gemv_tc`, GPU only) wins, reading the codes in its
own slab order (each 16-row x 128-code unit one 1 KB piece: 10-20% faster than from the row-major codes,
quant_notes.md); where that one does not apply, the row-major and fragment layouts' tuned M = 1 kernels are
timed once per shape and the faster is kept (``quantized_linear``). The module keeps the row-major codes (its
storage format and state dict) and packs a cached copy in the order a kernel needs on first use -- fragment
order for M > 1, slab order for M = 1 -- so the price of speed is memory: a decode-only model on the GPU holds
two copies of the codes (1 byte a weight, as int8), a model that also prefills three. Layers whose GEMVs follow
one another (q, k, v of a token; gate and up) can run inside ``qmatmul_chain.chained_gemvs()``: on Hopper
each GEMV then starts while the one before it finishes.
"""

from __future__ import annotations

import contextlib

import torch

from mlsys_ref.backend import HAS_TRITON, default_device, is_interpreter, triton
from mlsys_ref.quant.qmatmul import quant_matmul
from mlsys_ref.quant.qmatmul_chain import break_chain
from mlsys_ref.quant.qmatmul_gemv_tc import pack_gemv_slabs, tc_gemv_applies
from mlsys_ref.quant.qmatmul_mma import UNIT, pack_int4_mma
from mlsys_ref.quant.qmatmul_tune import gemm_configs, gemv_configs, pick_config
from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies

__all__ = ["use_kernels", "kernel_applies", "mma_layout_applies", "quantized_linear"]

_MODE = "auto"  # "auto" | "triton" | "torch": set by use_kernels
# Under the interpreter every program step is Python on numpy tiles (milliseconds each; a 576x576
# GEMV takes seconds), so "auto" takes the kernel there only for toy layers -- at most this many tile
# steps, e.g. 256x96 -- which is what tests and the tour exercise; CPU models keep the PyTorch path.
INTERPRETER_MAX_STEPS = 8


def _interpreter_steps(M: int, N: int, K: int) -> int:
    """Program steps (tiles x K chunks) of the interpreter's one config for an [M, K] x [K, N] product."""
    if M == 1:
        c = gemv_configs(4)[0]
        return triton.cdiv(N, c["BLOCK_N"]) * triton.cdiv(K, c["BLOCK_K"])
    c = gemm_configs(M)[0]
    return triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]) * triton.cdiv(K, c["BLOCK_K"])


@contextlib.contextmanager
def use_kernels(enabled: bool | None = True):
    """``with use_kernels(False):`` forces the PyTorch path; True forces the kernels; None is "auto"."""
    global _MODE
    if enabled not in (True, False, None):
        raise ValueError(f"use_kernels takes True, False or None, got {enabled!r}")
    previous, _MODE = _MODE, {True: "triton", False: "torch", None: "auto"}[enabled]
    try:
        yield
    finally:
        _MODE = previous


def kernel_applies(module, x: torch.Tensor) -> bool:
    """Whether QuantizedLinear._matmul should call :func:`quant_matmul` (forced: always; it validates)."""
    if _MODE != "auto":
        return _MODE == "triton"
    K = module.in_features
    group_ok = module.group_size == K or module.group_size % (32 if module.bits == 4 else 16) == 0
    if not (HAS_TRITON and module.bits in (4, 8) and group_ok and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False  # a format the kernels do not cover: the PyTorch path computes the same thing
    if x.device.type != default_device().type or module.qweight.device != x.device:
        return False
    return not is_interpreter() or _interpreter_steps(x.numel() // K, module.out_features, K) <= INTERPRETER_MAX_STEPS


MMA_LAYOUT_M = (1, 64)  # the token counts QuantizedLinear may run in fragment order (H100 measurements)


def mma_layout_applies(module, x: torch.Tensor) -> bool:
    """Whether the module's int4 weight may run in fragment order (pack_int4_mma): int4 with groups of whole
    128-code units, 16-bit x, and M <= 64 or, on Hopper, any M the warp-specialized wgmma kernel covers
    (qmatmul_wgmma; elsewhere at M = 256 the row-major TMA-fed GEMM was faster on the H100,
    benchmarks/results/h100-sxm/quant_notes.md). At M = 1 quantized_linear decides (see there)."""
    K = module.in_features
    M = x.numel() // K
    if not (module.bits == 4 and (module.group_size == K or module.group_size % UNIT == 0)
            and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    return (MMA_LAYOUT_M[0] <= M <= MMA_LAYOUT_M[1]  # the check below only for the other M
            or wgmma_applies(K, module.group_size, x.reshape(-1, K), module.zeros))


def _cached_pack(module, attribute: str, pack, what: str) -> torch.Tensor:
    """``pack(module.qweight)``, packed on first use and cached on the module as ``attribute``; re-packed when
    qweight changes (in place, or moved to another device)."""
    qweight = module.qweight
    cached = getattr(module, attribute, None)
    stamp = (qweight.data_ptr(), qweight._version, qweight.device)
    if cached is None or cached[0] != stamp:
        if qweight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"QuantizedLinear: run the layer once before capturing a CUDA graph (its int4 weight "
                               f"is packed into {what} on first use)")
        cached = (stamp, pack(qweight))
        setattr(module, attribute, cached)
        break_chain()  # the pack's kernel writes the weight the next GEMV reads: no early start for that one
    return cached[1]


def mma_qweight(module) -> torch.Tensor:
    """The module's int4 codes in fragment order (a second copy of the codes: 0.5 byte a weight)."""
    return _cached_pack(module, "_mma_cache", pack_int4_mma, "fragment order")


def slab_qweight(module) -> torch.Tensor:
    """The module's int4 codes in the GEMV's slab order (pack_gemv_slabs; a copy of the codes: 0.5 byte a weight)."""
    return _cached_pack(module, "_slab_cache", pack_gemv_slabs, "slab order")


def quantized_linear(module, x: torch.Tensor) -> torch.Tensor:
    """The kernel path of QuantizedLinear.forward: int4 in fragment order where it applies. At M = 1 the slab
    order, wherever the tensor-core GEMV (qmatmul_gemv_tc) covers the product: on the H100 it beat the fragment
    kernel and the row-major codes on every shape measured. Elsewhere at M = 1 (no Gluon, or K % 32 != 0) the
    row-major and fragment layouts' tuned kernels are timed once per shape and the faster is kept."""
    bias = None if module.bias is None else module.bias.to(x.dtype)

    def run(layout: dict) -> torch.Tensor:
        qweight = {"fragment": mma_qweight, "slabs": slab_qweight}.get(layout["LAYOUT"], lambda m: m.qweight)(module)
        return quant_matmul(x, qweight, module.scales, module.zeros, bits=module.bits, perm=module.perm, bias=bias)

    if not mma_layout_applies(module, x):
        return run(dict(LAYOUT="row-major"))
    if x.numel() // module.in_features > 1:
        return run(dict(LAYOUT="fragment"))
    if tc_gemv_applies(module.bits, module.in_features, module.group_size, x.dtype):
        return run(dict(LAYOUT="slabs"))
    key = (module.out_features, module.in_features, module.group_size, module.zeros is not None,
           module.bias is not None, x.dtype)
    return run(pick_config("qlinear_layout", key, [dict(LAYOUT="row-major"), dict(LAYOUT="fragment")], run))
