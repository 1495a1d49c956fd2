"""W8A8 matmul in Triton: int8 × int8 on the tensor cores, int32 accumulation, scales in the epilogue.

Paper: SmoothQuant (Xiao et al. 2023, arXiv:2211.10438), §2 "Preliminaries" and Figure 3: activations
quantized per token, weights per output channel -- both scales sit on the *outer* dimensions of the
GEMM (per-channel activation scales would not), so that

    Y[m, n] = Δx[m] · Δw[n] · Σ_k Xq[m, k] · Wq[n, k]

and the integer sum runs on int8 tensor cores (twice the bf16 rate, half the bytes). The scales are
outer-product shaped, so they factor out of the K sum and cost one multiply per *output* element: the
epilogue. The per-token quantization of X is either a small kernel of its own (a few tokens per program:
absmax, then round) or, as in the paper's implementation, part of the operator before the GEMM:
``rms_norm_quantize_per_token`` is RMSNorm emitting int8 codes and Δx instead of bf16, so a W8A8 layer
costs one norm and one GEMM, as its bf16 twin does (``rms_norm``, the same kernel emitting bf16).

Rounding matches ``torch.round`` (half to even) and the quotient rounds as IEEE division does
(``_divide``), so the kernel's codes equal :func:`mlsys_ref.quant.primitives.quantize` (granularity
"token") bit for bit on the CPU (on CUDA torch divides by a Python scalar through its reciprocal, so a
code may differ by one at a tie).

Left out: fusing the quantization into other preceding operators (the attention output before o_proj,
SiLU·up before down_proj), per-tensor static scales (O3), int8 outputs, and the smoothing itself (see
:mod:`mlsys_ref.quant.smoothquant`; a smoothing factor folds into the norm's weight).

The one idea to notice: the scales never enter the inner loop -- exact integer arithmetic until the
last moment is what makes W8A8 both fast and easy to reason about.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import check_kernel_device, is_interpreter, require_triton, tl, tma_descriptor, triton
from mlsys_ref.quant.primitives import quantize
from mlsys_ref.quant.qmatmul_tune import m_bucket, pick_config

__all__ = ["quantize_per_token", "w8a8_matmul", "w8a8_linear", "rms_norm", "rms_norm_quantize_per_token",
           "quantize_per_token_reference", "w8a8_matmul_reference", "w8a8_linear_reference", "rms_norm_reference"]


@triton.jit
def _round_half_even(v):
    """torch.round for |v| < 2^22 in two adds: at 1.5·2^23 the fp32 spacing is 1, so the add itself rounds
    to an integer -- half to even, as IEEE round-to-nearest does -- and the subtraction is exact."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _divide(x, d, inverse):
    """x / d rounded as IEEE division rounds it, from inverse = 1/d (correctly rounded) in three instructions
    instead of a division's ~10: q = x·(1/d), then one Newton step on the exact residual r = x - q·d (an FMA
    computes it exactly), q + r·(1/d) (Markstein's correction, the last step of hardware division sequences).
    Checked bit for bit against x / d on 4·10^7 random float32 pairs; the tests compare codes with torch's."""
    q = x * inverse
    return tl.fma(tl.fma(-q, d, x), inverse, q)


@triton.jit
def _token_scale(amax):
    """Δx = max_k |x[row, k]| / 127 per token ([ROWS]), and 1/Δx as a column: one IEEE division per token."""
    scale = tl.math.div_rn(amax, 127.0)
    scale = tl.where(scale > 0, scale, 1.0)  # an all-zero token: any scale is exact
    return scale, tl.math.div_rn(1.0, scale)[:, None]


@triton.jit
def _int8_codes(v, scale, inverse):
    """Xq = clamp(round(x / Δx), -128, 127) as int8, no division per element."""
    return tl.minimum(tl.maximum(_round_half_even(_divide(v, scale[:, None], inverse)), -128.0), 127.0).to(tl.int8)


@triton.jit
def _quantize_rows(v, rows, row_mask, mask, q_rows, offs, s_ptr):
    """v [ROWS, BLOCK_K] fp32, whole tokens (zeros where masked) -> Xq and Δx stored: the one-pass body."""
    scale, inverse = _token_scale(tl.max(tl.abs(v), axis=1))
    tl.store(s_ptr + rows, scale, mask=row_mask)
    tl.store(q_rows + offs[None, :], _int8_codes(v, scale, inverse), mask=mask)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm,
                               ONE_PASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS tokens per program (short rows would leave most of a program idle), [ROWS, BLOCK_K] at a time."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    offs = tl.arange(0, BLOCK_K)
    x_rows, q_rows = x_ptr + rows[:, None] * stride_xm, q_ptr + rows[:, None] * stride_qm
    if ONE_PASS:  # BLOCK_K >= K: the rows are read once and stay in registers
        mask = row_mask[:, None] & (offs < K)[None, :]
        v = tl.load(x_rows + offs[None, :] * stride_xk, mask=mask, other=0).to(tl.float32)
        _quantize_rows(v, rows, row_mask, mask, q_rows, offs, s_ptr)
    else:  # -- pass 1: Δx = max_k |x[row, k]| / 127; pass 2: Xq = clamp(round(x / Δx), -128, 127)
        amax = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_mask[:, None] & (k < K)[None, :], other=0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale, inverse = _token_scale(tl.max(amax, axis=1))
        tl.store(s_ptr + rows, scale, mask=row_mask)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            mask = row_mask[:, None] & (k < K)[None, :]
            v = tl.load(x_rows + k[None, :] * stride_xk, mask=mask, other=0).to(tl.float32)  # re-read (from L2)
            tl.store(q_rows + k[None, :], _int8_codes(v, scale, inverse), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, g_ptr, y_ptr, q_ptr, s_ptr, M, K, eps, stride_xm, stride_ym, stride_qm,
                     QUANTIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """h = RMSNorm(x)·g as RMSNorm computes it in x's dtype; QUANTIZE: h never leaves registers, its int8
    codes and Δx are stored instead (SmoothQuant's fusion of the quantization into the preceding norm)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    offs = tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (offs < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / K + eps)  # 1 / sqrt(mean(x²) + eps), per token
    dtype = x_ptr.dtype.element_ty
    n = (x * r[:, None]).to(dtype).to(tl.float32)  # normalized in fp32, rounded to x's dtype, times g there
    h = (n * tl.load(g_ptr + offs, mask=offs < K, other=0).to(dtype).to(tl.float32)[None, :]).to(dtype)
    if QUANTIZE:
        _quantize_rows(h.to(tl.float32), rows, row_mask, mask, q_ptr + rows[:, None] * stride_qm, offs, s_ptr)
    else:
        tl.store(y_ptr + rows[:, None] * stride_ym + offs[None, :], h, mask=mask)


@triton.jit
def _w8a8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_sb, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """TMA: a_ptr and b_ptr are tensor descriptors of Xq and Wq (tiles past M, N or K arrive as zeros)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)  # axis 0 fastest: M tiles of one weight strip together
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    if not TMA:
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak  # Xq [BLOCK_M, BLOCK_K]
        b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk  # Wqᵀ [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if TMA:  # one bulk copy per tile, no per-thread addresses
            a = a_ptr.load([pid_m * BLOCK_M, k0])
            b = tl.trans(b_ptr.load([pid_n * BLOCK_N, k0]))
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0)
        else:
            a = tl.load(a_ptrs, mask=m_mask[:, None] & (k0 + offs_k[None, :] < K), other=0)
            b = tl.load(b_ptrs, mask=n_mask[None, :] & (k0 + offs_k[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 × int8 -> int32, exact (triton 3.6 needs out_dtype said)
        if not TMA:
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    # -- epilogue: Y = Δx[m] · Δw[n] · acc (+ bias)
    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0)
    sb = tl.load(sb_ptr + offs_n * stride_sb, mask=n_mask, other=0).to(tl.float32)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemm_configs() -> list[dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA)."""
    if is_interpreter():
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1, TMA=0)]
    # H100 sweep (M = 256): small tiles (more programs than SMs) win at N = 4096, 128 x 128 at N = 11008; tiles
    # by TMA (last field), 6 stages deep, are 3-11% faster there than by pointers. At N = 11008 (172 tiles on 132
    # SMs) one warpgroup per 128 x 128 tile beats two (30.1 against 31.0 µs); 6 stages of 16 KB let two programs
    # share an SM, 8 stages do not (46 µs with 4 or 8 warps)
    table = [(64, 64, 128, 4, 6, 1), (64, 64, 128, 4, 7, 1), (128, 128, 64, 8, 6, 1), (128, 128, 64, 4, 6, 1),
             (128, 128, 64, 4, 5, 1), (64, 64, 256, 4, 3, 0), (64, 64, 128, 4, 4, 0),
             (128, 128, 128, 8, 3, 0), (128, 128, 64, 8, 5, 0), (64, 128, 256, 4, 3, 0), (64, 128, 128, 4, 4, 0),
             (16, 128, 256, 4, 3, 0), (16, 64, 256, 4, 4, 0)]
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s, TMA=t) for m, n, k, w, s, t in table]


def _check_device(*named):
    first = named[0][1]
    for name, t in named:
        if t is not None:
            check_kernel_device(t, name)
            if t.device != first.device:
                raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {first.device}")


def _check_float(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def _quantize_config(K: int, one_pass: bool = False) -> dict:
    """One pass (the rows in registers) up to 16K elements on the GPU, ~16 elements a thread; the interpreter
    pays per program, so there it takes many rows at once."""
    if is_interpreter():  # one_pass: whole tokens in one block (the fused norm), then fewer of them
        return dict(ROWS=4, BLOCK_K=triton.next_power_of_2(K), num_warps=4) if one_pass else \
            dict(ROWS=8, BLOCK_K=min(256, triton.next_power_of_2(K)), num_warps=4)
    block = min(16384, triton.next_power_of_2(K))
    rows = max(1, min(8, 2048 // block))
    return dict(ROWS=rows, BLOCK_K=block, num_warps=max(1, min(16, rows * block // 512)))


def quantize_per_token(x: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (Xq int8 [..., K], Δx fp32 [..., 1]), symmetric absmax per token. ``config``
    (ROWS, BLOCK_K, num_warps) overrides :func:`_quantize_config`."""
    require_triton("quantize_per_token")
    _check_float(x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got {tuple(x.shape)}")
    _check_device(("x", x))
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    q = torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    s = torch.empty(x2.shape[0], 1, device=x.device, dtype=torch.float32)
    if x2.shape[0]:
        config = config or _quantize_config(K)
        rows = config.get("ROWS", 1)
        _quantize_per_token_kernel[(triton.cdiv(x2.shape[0], rows),)](
            x2, q, s, x2.shape[0], K, x2.stride(0), x2.stride(1), q.stride(0),
            ONE_PASS=config["BLOCK_K"] >= K, ROWS=rows, BLOCK_K=config["BLOCK_K"], num_warps=config["num_warps"])
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool):
    """Validate, then launch _rms_norm_kernel: one pass, whole tokens in registers (K <= 16384)."""
    name = "rms_norm_quantize_per_token" if quantize else "rms_norm"
    require_triton(name)
    _check_float(x)
    if x.dim() < 1 or not 0 < x.shape[-1] <= 16384:
        raise ValueError(f"x must be [..., K] with 0 < K <= 16384 (one pass in registers), got {tuple(x.shape)}")
    K = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (K,) or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor [K={K}], got {getattr(weight, 'shape', weight)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    _check_device(("x", x), ("weight", weight))
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(0 if quantize else M, K, device=x.device, dtype=x.dtype)
    q = torch.empty(M if quantize else 0, K, device=x.device, dtype=torch.int8)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M:
        config = _quantize_config(K, one_pass=True)  # K <= 16384: BLOCK_K covers the token
        _rms_norm_kernel[(triton.cdiv(M, config["ROWS"]),)](
            x2, weight.contiguous(), y if not quantize else x2, q if quantize else x2, s, M, K, float(eps), x2.stride(0),
            y.stride(0) if not quantize else 0, q.stride(0) if quantize else 0, QUANTIZE=quantize, ROWS=config["ROWS"],
            BLOCK_K=config["BLOCK_K"], num_warps=config["num_warps"])
    if quantize:
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
    return y.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4) in one kernel: x / sqrt(mean(x²) + eps), rounded to x's dtype,
    times weight in x's dtype -- the bf16 twin of :func:`rms_norm_quantize_per_token`, same code path."""
    return _norm(x, weight, eps, quantize=False)


def rms_norm_quantize_per_token(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """quantize_per_token(rms_norm(x, weight, eps)) in one kernel, bit for bit: the normalized activations
    never reach memory in 16 bits, only their int8 codes and Δx (SmoothQuant §4: the activation
    quantization is fused into the LayerNorm before each W8A8 linear, so it costs no extra pass)."""
    return _norm(x, weight, eps, quantize=True)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """What :class:`mlsys_ref.serving.model.RMSNorm` computes with its weight in x's dtype."""
    wide = x.float()
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict | None = None) -> torch.Tensor:
    """Y = Δx ⊙ (Xq Wqᵀ) ⊙ Δwᵀ (+ bias): Xq int8 [..., K], Δx [..., 1], Wq int8 [N, K], Δw [N, 1] -> [..., N]."""
    require_triton("w8a8_matmul")
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"xq and wq must be int8 (symmetric codes), got {xq.dtype} and {wq.dtype}")
    if xq.dim() < 1 or wq.dim() != 2 or wq.shape[1] != xq.shape[-1]:
        raise ValueError(f"need xq [..., K] and wq [N, K] with the same K, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    N, K = wq.shape
    if x_scale.shape != (*xq.shape[:-1], 1) or not x_scale.is_floating_point():
        raise ValueError(f"x_scale must be float [..., 1] = {(*xq.shape[:-1], 1)} (per token), got {tuple(x_scale.shape)}")
    if w_scale.shape not in ((N, 1), (N,)) or not w_scale.is_floating_point():
        raise ValueError(f"w_scale must be float [N={N}, 1] (per output channel; no groups in W8A8), got {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be None or [N={N}], got {tuple(bias.shape)}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    _check_device(("xq", xq), ("x_scale", x_scale), ("wq", wq), ("w_scale", w_scale), ("bias", bias))
    a = xq.reshape(-1, K)
    sa = x_scale.reshape(-1).float().contiguous()
    M = a.shape[0]
    out = torch.empty(M, N, device=xq.device, dtype=out_dtype)
    if M:
        def run(cfg: dict) -> torch.Tensor:
            grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
            descs = (tma_descriptor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                     tma_descriptor(wq, [cfg["BLOCK_N"], cfg["BLOCK_K"]])) if cfg.get("TMA", 0) else (None,)
            tma = None not in descs  # else the same tiles by pointers
            _w8a8_gemm_kernel[grid](
                descs[0] if tma else a, descs[1] if tma else wq,
                sa, w_scale, bias.contiguous() if bias is not None else out, out, M, N, K,
                a.stride(0), a.stride(1), wq.stride(0), wq.stride(1), w_scale.stride(0), out.stride(0), out.stride(1),
                HAS_BIAS=bias is not None, EVEN_K=K % cfg["BLOCK_K"] == 0, TMA=tma, BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return out

        key = (m_bucket(M), N, K, bias is not None, out_dtype)
        run(pick_config("w8a8", key, [config] if config is not None else _gemm_configs(), run))
    return out.reshape(*xq.shape[:-1], N)


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothQuant's linear layer: quantize x per token (kernel 1), int8 GEMM with the scale epilogue (kernel 2)."""
    xq, x_scale = quantize_per_token(x)
    return w8a8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype=x.dtype)


# -- references -------------------------------------------------------------------------------------
def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qt = quantize(x, 8, symmetric=True, granularity="token")
    return qt.q.to(torch.int8), qt.scale


def w8a8_matmul_reference(xq, x_scale, wq, w_scale, bias=None) -> torch.Tensor:
    """In fp64: exact integer sums (|Σ| < 2^53), then the scales."""
    y = (xq.double() @ wq.double().T) * x_scale.double() * w_scale.double().reshape(-1)
    return y if bias is None else y + bias.double()


def w8a8_linear_reference(x, wq, w_scale, bias=None) -> torch.Tensor:
    return w8a8_matmul_reference(*quantize_per_token_reference(x), wq, w_scale, bias)


if __name__ == "__main__":
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error, tolerance

    torch.manual_seed(0)
    device, dtype = default_device(), torch.float16
    W = torch.randn(45, 200) * 0.05
    qt = quantize(W, 8, symmetric=True, granularity="channel")
    wq, w_scale = qt.q.to(torch.int8).to(device), qt.scale.to(device)
    for M in (1, 3, 17):
        x = torch.randn(M, 200, device=device, dtype=dtype)
        xq, xs = quantize_per_token(x)
        xq_ref, xs_ref = quantize_per_token_reference(x)
        y, ref = w8a8_linear(x, wq, w_scale), w8a8_linear_reference(x, wq, w_scale)
        print(f"M={M:2d}: codes equal to torch's {torch.equal(xq, xq_ref)}, scales max error "
              f"{max_error(xs, xs_ref):.1e}; W8A8 vs reference {max_error(y, ref):.2e} (fp16 atol {tolerance(dtype).atol})")
