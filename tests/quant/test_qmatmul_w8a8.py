"""W8A8 (SmoothQuant's kernel): per-token quantization kernel and int8 GEMM against the references."""

import pytest
import torch

from mlsys_ref.quant import qmatmul_w8a8
from mlsys_ref.quant.primitives import quantize
from mlsys_ref.quant.qmatmul_w8a8 import (quantize_per_token, quantize_per_token_reference, rms_norm,
                                          rms_norm_quantize_per_token, rms_norm_reference, w8a8_linear,
                                          w8a8_linear_reference, w8a8_matmul, w8a8_matmul_reference)
from mlsys_ref.testing import assert_close


@pytest.fixture(autouse=True)
def one_config(monkeypatch, request):
    """Pin autotuning to one config (STYLE.md point 8) except in tests named ``*autotuned``."""
    if "autotuned" in request.node.name:
        return
    configs = qmatmul_w8a8._gemm_configs
    monkeypatch.setattr(qmatmul_w8a8, "_gemm_configs", lambda: configs()[:1])


def int8_weight(N, K, device):
    qt = quantize(torch.randn(N, K) * 0.05, 8, symmetric=True, granularity="channel")
    return qt.q.to(torch.int8).to(device), qt.scale.to(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 75), (3, 300), (2, 3, 17), (11, 40), (64, 1000)])
def test_quantize_per_token_equals_torch(device, dtype, shape):
    magnitude = 10.0 ** torch.randint(-3, 4, (*shape[:-1], 1))  # tokens of very different scales
    x = (torch.randn(shape) * magnitude).to(device=device, dtype=dtype)
    x[..., 0, :] = 0  # an all-zero token (scale 1, codes 0)
    q, s = quantize_per_token(x)
    q_ref, s_ref = quantize_per_token_reference(x)
    assert q.dtype == torch.int8 and s.shape == (*shape[:-1], 1)
    assert torch.equal(q.cpu(), q_ref.cpu())
    assert_close(s, s_ref, torch.float32)


def test_round_half_to_even_like_torch(device):
    """Ties land on even codes exactly as torch.round does (the row's absmax 127 makes Δx = 1)."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 126.5]], device=device)
    q, s = quantize_per_token(x)
    assert float(s) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, 126]]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 45, 75), (3, 45, 200), (17, 33, 64), (40, 70, 130)])
def test_int8_gemm_matches_fp64(device, M, N, K, bias):
    wq, w_scale = int8_weight(N, K, device)
    xq, x_scale = quantize_per_token(torch.randn(M, K, device=device))
    b = torch.randn(N, device=device) if bias else None
    y = w8a8_matmul(xq, x_scale, wq, w_scale, b, out_dtype=torch.float32)
    assert_close(y, w8a8_matmul_reference(xq, x_scale, wq, w_scale, b), torch.float32)


@pytest.mark.parametrize("M,N,K", [(37, 45, 96), (3, 70, 160)])
def test_int8_gemm_tma_tiles(device, M, N, K):
    """Xq and Wq through TMA descriptors (ragged M, N and K tiles load as zeros) give the pointer path's result;
    a row stride TMA cannot take (K = 75 bytes) falls back to pointers."""
    wq, w_scale = int8_weight(N, K, device)
    xq, x_scale = quantize_per_token(torch.randn(M, K, device=device))
    config = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, TMA=1)
    y = w8a8_matmul(xq, x_scale, wq, w_scale, out_dtype=torch.float32, config=config)
    assert_close(y, w8a8_matmul_reference(xq, x_scale, wq, w_scale), torch.float32)
    wq75, ws75 = int8_weight(N, 75, device)
    xq75, xs75 = quantize_per_token(torch.randn(M, 75, device=device))
    y = w8a8_matmul(xq75, xs75, wq75, ws75, out_dtype=torch.float32, config=config)
    assert_close(y, w8a8_matmul_reference(xq75, xs75, wq75, ws75), torch.float32)


@pytest.mark.parametrize("M", [1, 17])
def test_w8a8_linear_fp16(device, M):
    wq, w_scale = int8_weight(45, 96, device)
    x = torch.randn(M, 96, device=device, dtype=torch.float16)
    y = w8a8_linear(x, wq, w_scale)
    assert y.dtype == torch.float16
    assert_close(y, w8a8_linear_reference(x, wq, w_scale), torch.float16)


def test_bad_inputs_raise(device):
    wq, w_scale = int8_weight(8, 32, device)
    xq, xs = quantize_per_token(torch.randn(2, 32, device=device))
    with pytest.raises(TypeError, match="x must be"):
        quantize_per_token(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="int8"):
        w8a8_matmul(xq.float(), xs, wq, w_scale)
    with pytest.raises(ValueError, match="same K"):
        w8a8_matmul(xq[:, :16], xs, wq, w_scale)
    with pytest.raises(ValueError, match="per token"):
        w8a8_matmul(xq, xs[:1], wq, w_scale)
    with pytest.raises(ValueError, match="no groups"):
        w8a8_matmul(xq, xs, wq, w_scale.repeat(1, 2))
    with pytest.raises(ValueError, match="bias"):
        w8a8_matmul(xq, xs, wq, w_scale, torch.zeros(3, device=device))


def _norm_inputs(shape, dtype, device):
    x = (torch.randn(shape) * 10.0 ** torch.randint(-2, 3, (*shape[:-1], 1))).to(device=device, dtype=dtype)
    return x, (torch.rand(shape[-1]) + 0.5).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 40), (5, 96), (2, 3, 75)])
def test_rms_norm_and_its_fused_quantization(device, dtype, shape):
    """rms_norm matches RMSNorm; the fused kernel equals quantize_per_token(rms_norm(x)) bit for bit, and
    torch's quantization of torch's RMSNorm up to a one-code tie (the two norms may round 1 ulp apart)."""
    x, weight = _norm_inputs(shape, dtype, device)
    y = rms_norm(x, weight)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, rms_norm_reference(x, weight), dtype)
    q, s = rms_norm_quantize_per_token(x, weight)
    q_unfused, s_unfused = quantize_per_token(y)
    assert torch.equal(q, q_unfused) and torch.equal(s, s_unfused)
    q_ref, _ = quantize_per_token_reference(rms_norm_reference(x, weight))
    assert (q.int() - q_ref.int()).abs().max() <= 1


def test_rms_norm_bad_inputs_raise(device):
    x = torch.randn(2, 32, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(31, device=device))
    with pytest.raises(ValueError, match="K <= 16384"):
        rms_norm_quantize_per_token(torch.randn(1, 16385, device=device), torch.ones(16385, device=device))
    with pytest.raises(TypeError, match="x must be"):
        rms_norm(x.int(), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(32, device=device), eps=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [4096, 11008])
def test_gpu_rms_norm_quantize_large(K):
    x, weight = _norm_inputs((256, K), torch.bfloat16, "cuda")
    q, s = rms_norm_quantize_per_token(x, weight)
    q_unfused, s_unfused = quantize_per_token(rms_norm(x, weight))
    assert torch.equal(q, q_unfused) and torch.equal(s, s_unfused)
    assert_close(rms_norm(x, weight), rms_norm_reference(x, weight), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 256, 1000])
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_bf16_large(M, N, K):
    _check_large(M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 256])
def test_gpu_bf16_autotuned(M):
    _check_large(M, 4096, 4096)


def _check_large(M, N, K):
    wq, w_scale = int8_weight(N, K, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_per_token(x)
    q_ref, s_ref = quantize_per_token_reference(x)
    assert_close(xs, s_ref, torch.float32)
    # torch on CUDA divides by the Python scalar 127 as a multiply by its reciprocal (1 ulp off IEEE
    # division at times), so a code may differ by one where x/Δx sits within ~1e-5 of a rounding tie
    differ = (xq.int() - q_ref.int()).abs()
    assert differ.max() <= 1 and differ.sum() <= 1e-4 * differ.numel()
    # the GEMM and its epilogue, on the kernel's own codes (a one-code tie difference above, times
    # K = 11008 weights, can move an output by more than bf16's tolerance without any GEMM error)
    expected = qmatmul_w8a8.w8a8_matmul_reference(xq, xs, wq, w_scale)
    assert_close(w8a8_linear(x, wq, w_scale), expected.to(torch.bfloat16), torch.bfloat16)
