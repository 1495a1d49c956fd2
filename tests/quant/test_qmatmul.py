"""W4A16 / W8A16 kernels against dequantize-then-matmul, on odd shapes, plus validation and dispatch."""

import contextlib
import itertools

import pytest
import torch
from torch import nn

from mlsys_ref.quant import qmatmul, qmatmul_chain, qmatmul_dispatch, qmatmul_gemv_tc, qmatmul_launch
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.primitives import unpack_int4
from mlsys_ref.quant.qmatmul import quant_matmul, quant_matmul_eager, quant_matmul_reference
from mlsys_ref.quant.qmatmul_gemv_tc import tc_gemv_applies, tc_gemv_configs
from mlsys_ref.quant.qmatmul_tune import tuned_configs
from mlsys_ref.quant.qmatmul_tune import gemv_configs as gemv_configs_tuned  # unpinned by the fixture below
from mlsys_ref.testing import assert_close, max_error


@pytest.fixture(autouse=True)
def one_config(monkeypatch, request):
    """Pin autotuning to one config per path (STYLE.md point 8), so that on a GPU each kernel variant
    compiles once; tests named ``*autotuned`` keep every candidate (the interpreter has one anyway)."""
    if "autotuned" in request.node.name:
        return
    gemv_configs, gemm_configs = qmatmul_launch.gemv_configs, qmatmul_launch.gemm_configs
    monkeypatch.setattr(qmatmul_launch, "gemv_configs", lambda bits=4: gemv_configs(bits)[:1])
    monkeypatch.setattr(qmatmul_launch, "gemm_configs", lambda M: gemm_configs(M)[:1])


def make_layer(N, K, bits, group, symmetric, device, act_order=False, bias=False, scale_dtype=torch.float32,
               integer_zero=True):
    linear = nn.Linear(K, N, bias=bias, device=device)  # quantized where it runs (fast for 4096 x 11008)
    nn.init.normal_(linear.weight, std=0.05)
    ql = QuantizedLinear.from_linear(linear, bits, group, symmetric, scale_dtype=scale_dtype, integer_zero=integer_zero)
    if act_order:  # same codes, columns declared as stored in a random order
        ql = QuantizedLinear.from_codes(ql.codes(), ql.scales, ql.zeros, bits, bias=ql.bias,
                                        perm=torch.randperm(K), scale_dtype=scale_dtype)
    return ql.to(device)


def check(x, ql, config=None, bias=None):
    """Kernel vs the fp64 dequantize-then-matmul within the table; at large K in bf16, where rounding Ŵ
    to bf16 alone exceeds the table's atol, within 2x of PyTorch eager's own error (STYLE.md, point 6)."""
    args = (ql.qweight, ql.scales, ql.zeros)
    y = quant_matmul(x, *args, bits=ql.bits, perm=ql.perm, bias=bias, config=config)
    ref = quant_matmul_reference(x.double(), *args, bits=ql.bits, perm=ql.perm, bias=bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], ql.out_features)
    try:
        assert_close(y, ref, x.dtype)
    except AssertionError:
        eager = quant_matmul_eager(x, *args, bits=ql.bits, perm=ql.perm, bias=bias)
        if not max_error(y, ref) <= 2 * max_error(eager, ref):
            raise


# K = 160 is not a multiple of the 128-wide chunk; N = 45 is odd; per channel with K = 150 / 75 odd.
@pytest.mark.parametrize("bits,group,symmetric,K", [
    (4, 32, True, 160), (4, 64, False, 192), (4, None, True, 150), (4, None, False, 150),
    (8, 32, True, 160), (8, None, False, 75), (8, None, True, 75),
])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_matches_dequantize_then_matmul_fp16(device, bits, group, symmetric, K, M):
    ql = make_layer(45, K, bits, group, symmetric, device)
    check(torch.randn(M, K, device=device, dtype=torch.float16), ql)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_fp32_act_order_bias_and_leading_dims(device, bits, M):
    ql = make_layer(37, 128, bits, 32, False, device, act_order=True, bias=True)
    x = torch.randn(M, 2, 128, device=device)
    check(x, ql, bias=ql.bias)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 5, 17])
def test_fractional_zero_points(device, bits, M):
    """llama.cpp's Q4_1 grid: z = -min/s is not an integer, and the kernels must not round it."""
    ql = make_layer(45, 128, bits, 32, False, device, integer_zero=False)
    assert (ql.zeros != ql.zeros.round()).any()
    check(torch.randn(M, 128, device=device), ql)


@pytest.mark.parametrize("split", [1, 3, 4])
@pytest.mark.parametrize("M", [1, 16])
def test_gemv_split_k_and_tiles(device, split, M):
    """Both epilogues of the GEMV (direct store; split-K partials summed by the last program) and of the GEMM
    (fp32 workspace + reduction), with a bias; M = 1 also through the GEMM (a config naming BLOCK_M)."""
    ql = make_layer(70, 256, 4, 64, True, device, bias=True, scale_dtype=torch.float16)
    config = dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=2)
    if M > 1 or split == 3:
        config["BLOCK_M"] = 16
    check(torch.randn(M, 256, device=device, dtype=torch.float16), ql, config=config, bias=ql.bias.half())
    if M == 1:  # the GEMV's split-K counters are back at zero after a launch: a second call is right too
        check(torch.randn(M, 256, device=device, dtype=torch.float16), ql, config=config, bias=ql.bias.half())


@pytest.mark.parametrize("even_k", [True, False])
def test_gemv_pipelined_loop(device, even_k):
    """The GEMV with Triton's pipelined loop (num_stages > 1) instead of the register double buffer."""
    K = 256 if even_k else 288
    ql = make_layer(37, K, 4, 32, False, device)
    config = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3)
    check(torch.randn(1, K, device=device, dtype=torch.float16), ql, config=config)


@pytest.mark.parametrize("fold", [0, 1])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_gemm_fold_and_per_weight_scales(device, fold, bits, symmetric):
    """Both GEMM variants: scales per weight (FOLD=0) and exact codes with scales on the chunk product (FOLD=1)."""
    ql = make_layer(45, 160, bits, 32, symmetric, device)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1, FOLD=fold)
    check(torch.randn(20, 160, device=device, dtype=torch.float16), ql, config=config)


@pytest.mark.parametrize("layout", ["transposed", "odd_offset"])
def test_non_contiguous_inputs(device, layout):
    """x as a strided view (the int32-pair view needs a copy then), zeros laid out unlike scales."""
    ql = make_layer(24, 64, 4, 32, False, device)
    if layout == "transposed":
        x = torch.randn(64, 5, device=device, dtype=torch.float16).T  # [5, 64], strides (1, 5)
    else:
        x = torch.randn(5, 65, device=device, dtype=torch.float16)[:, 1:]  # storage offset 1, row stride 65
    zeros = ql.zeros.T.contiguous().T  # same values, column-major
    y = quant_matmul(x, ql.qweight, ql.scales, zeros, bits=4)
    assert_close(y, quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4), torch.float16)


@pytest.mark.parametrize("K,group,layout", [(64, 32, "row-major"), (256, 128, "fragment")])
def test_backward_matches_reference(device, K, group, layout):
    """dx through the kernel's autograd (both int4 layouts, act-order) against autograd through the reference."""
    ql = make_layer(24, K, 4, group, False, device, act_order=True)
    x = torch.randn(3, K, device=device, requires_grad=True)
    qweight = qmatmul.pack_int4_mma(ql.qweight) if layout == "fragment" else ql.qweight
    y = quant_matmul(x, qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = x.detach().double().requires_grad_()
    y_ref = quant_matmul_reference(x_ref, ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    assert_close(grad, grad_ref, torch.float32)


def test_bad_inputs_raise(device):
    ql = make_layer(8, 64, 4, 32, True, device)
    x = torch.randn(2, 64, device=device)
    args = (ql.qweight, ql.scales, None)
    with pytest.raises(TypeError, match="x must be"):
        quant_matmul(x.to(torch.int32), *args, bits=4)
    with pytest.raises(ValueError, match="K/2"):
        quant_matmul(torch.randn(2, 62, device=device), *args, bits=4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quant_matmul(x, *args, bits=3)
    with pytest.raises(ValueError, match="int8 qweight"):
        quant_matmul(x, ql.qweight, ql.scales, None, bits=8)
    with pytest.raises(ValueError, match="G dividing K"):
        quant_matmul(x, ql.qweight, ql.scales[:, :1].repeat(1, 3), None, bits=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_matmul(x, ql.qweight, ql.scales.repeat_interleave(2, 1), None, bits=4)  # group 16
    with pytest.raises(ValueError, match="zeros"):
        quant_matmul(x, ql.qweight, ql.scales, ql.scales[:, :1], bits=4)
    with pytest.raises(ValueError, match="perm"):
        quant_matmul(x, *args, bits=4, perm=torch.arange(64, device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias"):
        quant_matmul(x, *args, bits=4, bias=torch.zeros(7, device=device))


def test_quantized_linear_dispatch(device):
    """QuantizedLinear uses the kernel automatically; use_kernels(False) forces the PyTorch path."""
    ql = make_layer(33, 96, 4, 32, False, device, act_order=True, bias=True)
    x = torch.randn(3, 96, device=device)
    assert qmatmul_dispatch.kernel_applies(ql, x)
    with qmatmul_dispatch.use_kernels(False):
        assert not qmatmul_dispatch.kernel_applies(ql, x)
        y_torch = ql(x)
    calls = []
    original = qmatmul_dispatch.quant_matmul
    qmatmul_dispatch.quant_matmul = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        y_kernel = ql(x)
    finally:
        qmatmul_dispatch.quant_matmul = original
    assert calls, "QuantizedLinear.forward did not reach the kernel"
    assert_close(y_kernel, y_torch, torch.float32)
    if device.type == "cpu":  # the interpreter takes toy layers only; a SmolLM2-sized one keeps PyTorch
        big = make_layer(576, 576, 4, 32, True, device)
        assert not qmatmul_dispatch.kernel_applies(big, torch.randn(1, 576))
    int3 = make_layer(8, 64, 3, 32, True, device)
    assert not qmatmul_dispatch.kernel_applies(int3, torch.randn(1, 64, device=device))  # no int3 kernel: PyTorch path
    with qmatmul_dispatch.use_kernels(True), pytest.raises(ValueError, match="bits must be 4 or 8"):
        int3(torch.randn(1, 64, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, True), (4, 128, False), (8, None, True)])
@pytest.mark.parametrize("M", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 11008)])
def test_gpu_bf16_large(bits, group, symmetric, M, N, K):
    ql = make_layer(N, K, bits, group, symmetric, "cuda", scale_dtype=torch.bfloat16)
    check(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), ql)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,symmetric,N,K", [
    (4, 128, True, 4096, 4096), (4, 128, False, 1001, 11008), (4, None, True, 777, 1104),
    (8, None, True, 4096, 4096), (8, None, False, 1001, 1100)])
def test_gpu_every_gemv_config(bits, group, symmetric, N, K):
    """Every tuned M = 1 config (the tuner keeps whichever is fastest, so each must be right): odd N, K not a
    multiple of the step, split-K with a ragged last split, zero points."""
    ql = make_layer(N, K, bits, group, symmetric, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    for config in gemv_configs_tuned(bits):
        check(x, ql, config=config)


def test_tensor_core_gemv_scope(device):
    """The Gluon GEMV (qmatmul_gemv_tc) is a GPU-only candidate for int4, 16-bit x, K % 32 == 0 and groups of whole
    128-code units; asked for where it does not apply, quant_matmul says so instead of running something else."""
    on_gpu = device.type == "cuda"
    assert tc_gemv_applies(4, 4096, 128, torch.bfloat16) == on_gpu
    assert not tc_gemv_applies(8, 4096, 4096, torch.bfloat16)  # int8: the FMA GEMV
    assert not tc_gemv_applies(4, 4096, 128, torch.float32)
    assert not tc_gemv_applies(4, 4112, 4112, torch.float16)  # K % 32 != 0
    assert not tc_gemv_applies(4, 4096, 64, torch.float16)  # groups split a unit
    ql = make_layer(45, 192, 4, 64, True, device)
    with pytest.raises(ValueError, match="tensor-core GEMV"):
        check(torch.randn(1, 192, device=device, dtype=torch.float16), ql, config=dict(W=4, SPW=1, DEPTH=1))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,group,symmetric,dtype,bias", [
    (4096, 4096, 128, True, torch.bfloat16, False), (777, 1120, None, True, torch.bfloat16, True),
    (1001, 1152, 128, False, torch.float16, False), (300, 2048, 256, True, torch.float16, True),
    (96, 11008, 128, False, torch.bfloat16, True)])
def test_gpu_every_tensor_core_gemv_config(N, K, group, symmetric, dtype, bias):
    """Every tuned config of the Gluon GEMV: odd N (a ragged last program), K not a multiple of 128 (a ragged last
    unit) or of the warps' share, per-row and grouped scales, zero points, bias, bf16 and fp16."""
    ql = make_layer(N, K, 4, group, symmetric, "cuda", scale_dtype=dtype, bias=bias)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    for config in tc_gemv_configs():
        check(x, ql, config=config, bias=ql.bias.to(dtype) if bias else None)


def check_slabs(x, ql, config=None, bias=None):
    """The tensor-core GEMV from the slab order (pack_gemv_slabs) against the fp64 reference on the row-major codes."""
    slabs = qmatmul_gemv_tc.pack_gemv_slabs(ql.qweight)
    y = quant_matmul(x, slabs, ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias, config=config)
    ref = quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], ql.out_features)
    eager = quant_matmul_eager(x, ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias)
    assert max_error(y, ref) <= max(2 * max_error(eager, ref), 1e-2), f"{config}: {max_error(y, ref):.3g}"
    return y


@pytest.mark.parametrize("N,K", [(45, 200), (16, 128), (33, 4160), (1, 32)])
def test_gemv_slab_order_round_trip(N, K):
    """pack_gemv_slabs is a reordering of whole 64-byte pieces (row, unit), padded with zero codes to 16 rows and
    128 codes: unpacking gives the codes back exactly, and slab s, unit u, row r holds that row's unit words."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    slabs = qmatmul_gemv_tc.pack_gemv_slabs(qweight)
    assert tuple(slabs.shape) == qmatmul_gemv_tc.gemv_slabs_shape(N, K) == (-(-N // 16), -(-K // 128), 16, 16)
    assert torch.equal(qmatmul_gemv_tc.unpack_gemv_slabs(slabs, N, K), qweight)
    n, u = N - 1, (K // 2 - 1) // 64  # the last row's last unit
    words = torch.nn.functional.pad(qweight[n, 64 * u:], (0, 64 * (u + 1) - K // 2)).contiguous().view(torch.int32)
    assert torch.equal(slabs[n // 16, u, n % 16], words)
    assert slabs[-1, :, N % 16 or 16:].eq(0).all()  # rows past N are zero codes


def test_gemv_slab_order_validation(device):
    """The slab order is for one row of x on the tensor-core GEMV; other uses raise and name what was expected."""
    ql = make_layer(45, 256, 4, 128, True, device, scale_dtype=torch.float16)
    slabs = qmatmul_gemv_tc.pack_gemv_slabs(ql.qweight)
    with pytest.raises(ValueError, match="M = 1"):
        quant_matmul(torch.randn(2, 256, device=device, dtype=torch.float16), slabs, ql.scales, bits=4)
    with pytest.raises(ValueError, match="pack_gemv_slabs"):
        quant_matmul(torch.randn(1, 256, device=device, dtype=torch.float16), slabs[:, :1], ql.scales, bits=4)
    with pytest.raises(ValueError, match="pack_gemv_slabs"):
        qmatmul_gemv_tc.pack_gemv_slabs(ql.qweight.view(torch.int8))
    with pytest.raises(ValueError, match="unpack_gemv_slabs"):
        qmatmul_gemv_tc.unpack_gemv_slabs(slabs, 45, 384)
    W = qmatmul.dequantize_weight(slabs, ql.scales, None, 4, 256)  # the PyTorch path reads the slab order too
    assert torch.equal(W, qmatmul.dequantize_weight(ql.qweight, ql.scales, None, 4, 256))
    if device.type != "cuda":  # no tensor-core GEMV here: said, not run on something else
        with pytest.raises(ValueError, match="tensor-core GEMV"):
            quant_matmul(torch.randn(1, 256, device=device, dtype=torch.float16), slabs, ql.scales, bits=4)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,group,symmetric,dtype,bias", [
    (4096, 4096, 128, True, torch.bfloat16, False), (777, 1120, None, True, torch.bfloat16, True),
    (1001, 1152, 128, False, torch.float16, False), (300, 2048, 256, True, torch.float16, True),
    (96, 11008, 128, False, torch.bfloat16, True), (45, 4160, None, True, torch.bfloat16, False)])
def test_gpu_every_tensor_core_gemv_config_slab_order(N, K, group, symmetric, dtype, bias):
    """Every tuned config from the slab order: odd N (a ragged last slab and program), K not a multiple of 128 (a
    padded last unit), per-row and grouped scales, zero points, bias, bf16 and fp16; then three launches in a
    row give the same answer, alone and chained (on Hopper: launched as dependents of the one before)."""
    ql = make_layer(N, K, 4, group, symmetric, "cuda", scale_dtype=dtype, bias=bias)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    b = ql.bias.to(dtype) if bias else None
    slabs = qmatmul_gemv_tc.pack_gemv_slabs(ql.qweight)
    for config, chained in itertools.product(tc_gemv_configs(), (False, True)):
        with qmatmul_chain.chained_gemvs() if chained else contextlib.nullcontext():
            first = check_slabs(x, ql, config=config, bias=b)
            again = [quant_matmul(x, slabs, ql.scales, ql.zeros, bits=4, bias=b, config=config) for _ in range(3)]
        assert all(torch.equal(y, first) for y in again)


@pytest.mark.gpu
def test_gpu_slab_order_chain_in_cuda_graph():
    """A chain of GEMVs in one captured graph, each one's output the next one's x: launched as dependents, a
    kernel may start before the one before it ends, and must still read x only after it is written. The configs
    come from the tuner's chained timing (scratch copies of the weights), kept apart from the lone GEMV's."""
    layers = [make_layer(1024, 1024, 4, 128, True, "cuda", scale_dtype=torch.bfloat16) for _ in range(4)]
    slabs = [qmatmul_gemv_tc.pack_gemv_slabs(ql.qweight) for ql in layers]
    x0 = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)

    def chain(x):
        with qmatmul_chain.chained_gemvs():
            for ql, s in zip(layers, slabs):
                x = quant_matmul(x, s, ql.scales, bits=4) / 8
        return x

    expected = x0.double()
    for ql in layers:
        expected = quant_matmul_reference(expected, ql.qweight, ql.scales, None, bits=4) / 8
    first = chain(x0)
    assert max_error(first, expected) <= 0.05 * expected.abs().max().item()  # four bf16 roundings of x on the way
    keys = [key for key in tuned_configs() if key[0] == "qmm_slabs" and key[1][1:3] == (1024, 1024)]
    assert any(key[1][-1] for key in keys), keys  # tuned as a chain
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(x0)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, first)


def test_chained_gemvs_launch_flags():
    """Inside chained_gemvs the first GEMV is a plain launch and the next ones are dependents (on Hopper; elsewhere
    nothing changes); a nested block starts its own chain; break_chain makes the next launch a first one."""
    launch = qmatmul_chain.chain_launch
    assert launch(True) == (False, False) and not qmatmul_chain.in_chain()
    with qmatmul_chain.chained_gemvs():
        assert qmatmul_chain.in_chain()
        assert launch(False) == (False, False)  # no Hopper
        assert [launch(True) for _ in range(3)] == [(True, False), (True, True), (True, True)]
        qmatmul_chain.break_chain()
        assert launch(True) == (True, False)
        with qmatmul_chain.chained_gemvs():
            assert launch(True) == (True, False)
        assert launch(True) == (True, True)
    assert launch(True) == (False, False) and not qmatmul_chain.in_chain()


def test_packing_the_slab_copy_breaks_the_chain():
    """The GEMV right after its weight was packed must not read it early: packing inside a chain restarts it."""
    ql = make_layer(40, 256, 4, 128, True, "cpu")
    with qmatmul_chain.chained_gemvs():
        qmatmul_chain.chain_launch(True)
        slabs = qmatmul_dispatch.slab_qweight(ql)  # packed now
        assert qmatmul_chain.chain_launch(True) == (True, False)
        assert qmatmul_dispatch.slab_qweight(ql) is slabs  # cached: nothing written
        assert qmatmul_chain.chain_launch(True) == (True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fold,asm,il", [(1, 1, 0), (0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 0, 0)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pack", [2, 4])
def test_gpu_int4_inline_ptx_variants(dtype, fold, asm, il, symmetric, pack):
    """The inline-PTX int4 codes (GPU only) in the GEMM variants, 2 or 4 bytes per call, bf16 and fp16, scales in
    x's dtype (asymmetric FOLD = 0 and fp32 scales take the plain path: the config still runs, without PTX)."""
    ql = make_layer(1000, 1024, 4, 128, symmetric, "cuda", scale_dtype=dtype)
    config = dict(BLOCK_M=16 if fold else 64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3,
                  FOLD=fold, ASM=asm, IL=il, PACK=pack)
    check(torch.randn(37, 1024, device="cuda", dtype=dtype), ql, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,group", [(256, 4096, 4096, 128), (300, 1000, 1024, 128), (129, 777, 576, 64)])
@pytest.mark.parametrize("tile", [(256, 64, 128, 2, 4, 3), (128, 128, 128, 2, 8, 3), (256, 128, 128, 1, 8, 2),
                                  (256, 128, 128, 4, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tma_x_tiles(M, N, K, group, tile, dtype):
    """x through a TMA descriptor (interleaved path): a ragged last M tile (zero-filled rows), odd N, split-K with
    a ragged last split; a row stride that TMA cannot take falls back to pointer loads and is still right."""
    ql = make_layer(N, K, 4, group, True, "cuda", scale_dtype=dtype)
    m, n, k, split, warps, stages = tile
    config = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=split, num_warps=warps, num_stages=stages, FOLD=0, ASM=1,
                  IL=1, TMA=1)
    check(torch.randn(M, K, device="cuda", dtype=dtype), ql, config=config)
    check(torch.randn(M, K + 1, device="cuda", dtype=dtype)[:, :K], ql, config=config)  # rows 2(K+1) bytes apart


@pytest.mark.gpu
@pytest.mark.parametrize("M,config", [
    (1, dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=2, num_stages=1)),  # GEMV
    (1, dict(W=16, SPW=1, DEPTH=2)),  # the tensor-core GEMV: its split of K meets in shared memory
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=2, num_stages=3, FOLD=1, ASM=1)),  # skinny
    (256, dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3, FOLD=0, ASM=1, IL=1, TMA=1)),
])
def test_gpu_split_k_in_cuda_graph(M, config):
    """Split-K in a captured graph: the GEMV's arrival counters reset themselves, the GEMM's partials are
    reduced by a second kernel in a fixed order; replays stay right and bit-identical."""
    ql = make_layer(4096, 4096, 4, 128, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    args = (ql.qweight, ql.scales, ql.zeros)
    first = quant_matmul(x, *args, bits=4, config=config)  # allocates the counters before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = quant_matmul(x, *args, bits=4, config=config)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, first)  # fixed summation order: bit-identical
    check(x, ql, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (8, None)])
@pytest.mark.parametrize("M", [1, 16, 256])
def test_gpu_bf16_autotuned(bits, group, M):
    """Every candidate config is compiled and timed once; the winner must still match."""
    ql = make_layer(4096, 4096, bits, group, True, "cuda", scale_dtype=torch.bfloat16)
    check(torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16), ql)


@pytest.mark.gpu
def test_gpu_quantized_linear_bf16_act_order():
    """The module on the GPU goes through the kernel, with act-order, in bf16."""
    ql = make_layer(4096, 4096, 4, 128, False, "cuda", act_order=True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert qmatmul_dispatch.kernel_applies(ql, x)
    with qmatmul_dispatch.use_kernels(False):
        eager = ql(x)
    y = ql(x)
    ref = quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm)
    assert max_error(y, ref) <= max(2 * max_error(eager, ref), 1e-3)
    check(x, ql)


@pytest.mark.parametrize("N,K,group,symmetric", [(45, 256, 128, True), (37, 416, None, False), (20, 768, 256, False)])
def test_tensor_core_gemv_algorithm_in_pytorch(N, K, group, symmetric):
    """The Gluon kernel's k order and split (qmatmul_gemv_tc.tc_gemv_torch), on the CPU: the slot order is a
    permutation, the bit work on row-major words yields the codes in that order, and the product matches the
    reference (K = 416 leaves a ragged last unit; per-row scales; zero points; a warp with no units)."""
    order = qmatmul_gemv_tc.slot_order()
    assert torch.equal(order.sort().values, torch.arange(128))
    ql = make_layer(N, K, 4, group, symmetric, "cpu")
    codes = unpack_int4(ql.qweight)
    words = ql.qweight[:, :64].contiguous().view(torch.int32)  # the first unit's 16 words per row
    assert torch.equal(qmatmul_gemv_tc.unit_slots_from_words(words), codes[:, order].to(torch.int64))
    x = torch.randn(K)
    y = qmatmul_gemv_tc.tc_gemv_torch(x, ql.qweight, ql.scales, ql.zeros, ql.group_size, warps=4)
    ref = quant_matmul_reference(x[None].double(), ql.qweight, ql.scales, ql.zeros, bits=4)[0]
    assert_close(y, ref, torch.float32)
