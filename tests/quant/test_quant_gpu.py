"""CUDA-only checks of the quantization modules (the kernels' own GPU tests live in test_qmatmul*.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlsys_ref.quant.gptq import gptq_quantize, gptq_reference
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.llm_int8 import Int8Linear, int8_matmul, int_mm_applies
from mlsys_ref.quant.model import quantize_model
from mlsys_ref.testing import assert_close

pytestmark = pytest.mark.gpu


def test_int_mm_on_cuda_is_exact():
    a = torch.randint(-128, 128, (64, 256), dtype=torch.int8)
    b = torch.randint(-128, 128, (256, 96), dtype=torch.int8)
    expected = a.long() @ b.long()  # on the CPU: CUDA has no int64 matmul
    a_cuda, b_cuda = a.cuda(), b.T.contiguous().cuda().T  # b column-major, as Int8Linear passes W_i8ᵀ
    assert int_mm_applies(a_cuda, b_cuda)
    assert torch.equal(int8_matmul(a_cuda, b_cuda).cpu().long(), expected)
    assert torch.equal(int8_matmul(a_cuda, b_cuda, use_int_mm=False).cpu().long(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_cuda_matches_cpu(dtype):
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(40, 256)
    x[:, 7] *= 20
    x = x.to(dtype)
    expected = Int8Linear.from_linear(linear, 6.0)(x.float())  # CPU, fp32, same input values
    actual = Int8Linear.from_linear(linear.cuda(), 6.0)(x.cuda())
    # identical int8 codes and exact int32 sums; only the outlier part runs in dtype, and the output is rounded
    assert_close(actual.float().cpu(), expected, dtype)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, True), (4, None, False), (8, 64, True)])
def test_quantized_linear_bf16_cuda(bits, group, symmetric):
    linear = nn.Linear(512, 384, bias=False)
    ql = QuantizedLinear.from_linear(linear, bits, group, symmetric).cuda()
    x = torch.randn(3, 77, 512, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x.float(), ql.weight_in_input_order())
    assert_close(ql(x).float(), expected, torch.bfloat16)


def test_gptq_on_cuda_equals_cpu_reference():
    X = torch.randn(96, 400, dtype=torch.float64)
    W = torch.randn(33, 96, dtype=torch.float64)
    H = 2 * X @ X.T / 400
    fast = gptq_quantize(W.cuda(), H.cuda(), 4, 32, act_order=True, blocksize=40)
    slow = gptq_reference(W, H, 4, 32, act_order=True)
    assert torch.equal(fast.q.cpu(), slow.q)
    assert_close(fast.dequantize().cpu(), slow.dequantize(), torch.float64)


@pytest.mark.parametrize("method,bits,group", [("gptq", 4, 16), ("llm_int8", 8, None), ("smoothquant", 8, None)])
def test_quantize_model_on_cuda(method, bits, group):
    from mlsys_ref.serving.model import Llama, LlamaConfig

    config = LlamaConfig.tiny()
    tokens = torch.randint(0, config.vocab_size, (2, 33), device="cuda")
    model = Llama.random(config).cuda()
    reference = model.forward_dense(tokens)
    quantize_model(model, method, bits, group, lambda m: m.forward_dense(tokens))
    logits = model.forward_dense(tokens)
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().mean() < 0.5 * reference.abs().mean()
