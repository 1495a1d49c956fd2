"""The fragment-order int4 layout (Marlin's offline reshuffle) and its kernel, against dequantize-then-matmul."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mlsys_ref.quant import qmatmul, qmatmul_dispatch, qmatmul_tune
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.primitives import pack_int4
from mlsys_ref.quant.qmatmul import pack_int4_mma, quant_matmul, quant_matmul_eager, quant_matmul_reference
from mlsys_ref.quant.qmatmul_gemv_tc import tc_gemv_applies
from mlsys_ref.quant.qmatmul_mma import UNIT, unpack_int4_mma
from mlsys_ref.testing import assert_close, max_error


def make_layer(N, K, group, symmetric, device, scale_dtype=torch.float32, bias=False, act_order=False):
    linear = nn.Linear(K, N, bias=bias, device=device)
    nn.init.normal_(linear.weight, std=0.05)
    ql = QuantizedLinear.from_linear(linear, 4, group, symmetric, scale_dtype=scale_dtype)
    if act_order:
        ql = QuantizedLinear.from_codes(ql.codes(), ql.scales, ql.zeros, 4, bias=ql.bias,
                                        perm=torch.randperm(K, device=device), scale_dtype=scale_dtype)
    return ql.to(device)


def check(x, ql, config=None, bias=None):
    """The kernel on the packed codes vs the fp64 reference on the row-major ones: within the tolerance table,
    or (bf16 at large K, where rounding Ŵ or its codes·scales to bf16 exceeds the table) within 2x eager's error."""
    y = quant_matmul(x, pack_int4_mma(ql.qweight), ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias, config=config)
    ref = quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], ql.out_features)
    try:
        assert_close(y, ref, x.dtype)
    except AssertionError:
        eager = quant_matmul_eager(x, ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm, bias=bias)
        if not max_error(y, ref) <= 2 * max_error(eager, ref):
            raise


@given(N=st.integers(1, 9), K=st.integers(1, 300).map(lambda k: 2 * k), seed=st.integers(0, 2 ** 16))
def test_pack_round_trip(N, K, seed):
    """unpack(pack(q)) == q for any N and even K (K padded to whole 128-code units in between)."""
    generator = torch.Generator().manual_seed(seed)
    q = pack_int4(torch.randint(0, 16, (N, K), generator=generator, dtype=torch.uint8))
    packed = pack_int4_mma(q)
    assert packed.dtype == torch.int32 and packed.shape == (N, 16 * -(-K // UNIT))  # whole 128-code units
    assert torch.equal(unpack_int4_mma(packed, K), q)


def test_pack_puts_each_code_in_its_fragment_slot():
    """Word 4t + b of a unit, nibble j (+ 4 for the pair's second code) holds k = 16(2b + j//2) + 8(j%2) + 2t (+1):
    the pairs (2t, 2t+1) and (2t+8, 2t+9) of every 16-wide chunk that lane column t feeds the MMA."""
    u = torch.randint(0, 16, (3, 2 * UNIT), dtype=torch.uint8)
    packed = pack_int4_mma(pack_int4(u)).view(3, 2, 16).to(torch.int64) & 0xFFFFFFFF
    for t in range(4):
        for b in range(4):
            for j in range(4):
                for half in range(2):
                    k = 16 * (2 * b + j // 2) + 8 * (j % 2) + 2 * t + half
                    nibbles = (packed[:, :, 4 * t + b] >> (4 * j + 16 * half)) & 0xF
                    assert torch.equal(nibbles, u.view(3, 2, UNIT)[:, :, k].to(torch.int64))


# K = 160 and 300: not a multiple of the 128-code unit; N = 45 odd; per channel, groups of 128 and 256.
@pytest.mark.parametrize("K,group,symmetric", [(160, None, True), (160, None, False), (300, None, True),
                                               (384, 128, True), (384, 128, False), (512, 256, True)])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_dequantize_then_matmul(device, K, group, symmetric, M, dtype):
    ql = make_layer(45, K, group, symmetric, device)
    check(torch.randn(M, K, device=device, dtype=dtype), ql)


@pytest.mark.parametrize("split,last", [(1, 0), (2, 0), (3, 1), (2, 1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_split_k_tiles(device, split, last, symmetric):
    """Split-K (ragged last split, two units a step) summed by the second kernel or by the last arriving program,
    twice in a row (the arrival counters reset themselves), with a bias."""
    ql = make_layer(70, 640, 128, symmetric, device, scale_dtype=torch.float16, bias=True)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=split, num_warps=4, num_stages=1, LAST=last)
    x = torch.randn(5, 640, device=device, dtype=torch.float16)
    for _ in range(2):
        check(x, ql, config=config, bias=ql.bias.to(x.dtype))


def test_act_order_and_leading_dims(device):
    """(The backward pass of both layouts: tests/quant/test_qmatmul.py::test_backward_matches_reference.)"""
    ql = make_layer(24, 256, 128, False, device, act_order=True)
    x = torch.randn(2, 3, 256, device=device)
    y = quant_matmul(x, pack_int4_mma(ql.qweight), ql.scales, ql.zeros, bits=4, perm=ql.perm)
    assert y.shape == (2, 3, 24)
    assert_close(y, quant_matmul_reference(x.double(), ql.qweight, ql.scales, ql.zeros, bits=4, perm=ql.perm),
                 torch.float32)


def test_bad_inputs_raise(device):
    ql = make_layer(8, 256, 128, True, device)
    packed = pack_int4_mma(ql.qweight)
    x = torch.randn(2, 256, device=device)
    with pytest.raises(ValueError, match="fragment order"):
        quant_matmul(x, packed[:, :-16], ql.scales, None, bits=4)
    with pytest.raises(ValueError, match=f"multiple of {UNIT}"):
        quant_matmul(x, packed, ql.scales.repeat_interleave(2, 1), None, bits=4)  # groups of 64
    with pytest.raises(ValueError, match="int8 qweight"):
        quant_matmul(x, packed, ql.scales, None, bits=8)
    with pytest.raises(ValueError, match="uint8"):
        pack_int4_mma(packed)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4_mma(packed, 300)
    with pytest.raises(ValueError, match="needs K"):
        qmatmul.dequantize_weight(packed, ql.scales, None, 4)
    # a wgmma config where that kernel does not apply (fp32 x here; everywhere off Hopper): refused, no fallback
    from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies
    assert not wgmma_applies(256, 128, x, None)
    assert not wgmma_applies(256, 128, x.half(), torch.zeros(8, 2, device=device))  # zero points
    assert not wgmma_applies(256, 64, x.half(), None)  # groups split a unit
    with pytest.raises(ValueError, match="wgmma kernel"):
        quant_matmul(x, packed, ql.scales, None, bits=4, config=dict(BLOCK_M=256, STAGES=3, SPLIT_K=1))


def test_quantized_linear_packs_once_and_again_after_a_change(device):
    """The module runs 2 <= M <= 64 in fragment order, packed on first use and cached (M = 65 stays row-major;
    M = 1: test_gpu_module_at_m1); changing qweight in place re-packs."""
    ql = make_layer(40, 256, 128, True, device, scale_dtype=torch.float16)
    x = torch.randn(3, 256, device=device, dtype=torch.float16)
    assert qmatmul_dispatch.mma_layout_applies(ql, x) and qmatmul_dispatch.mma_layout_applies(ql, x[:1])
    assert not qmatmul_dispatch.mma_layout_applies(ql, torch.randn(65, 256, device=device, dtype=torch.float16))
    assert not qmatmul_dispatch.mma_layout_applies(make_layer(40, 256, 64, True, device), x)  # groups of 64: row-major
    with qmatmul_dispatch.use_kernels(True):
        y = ql(x)
        first = ql._mma_cache[1]
        assert_close(y, quant_matmul_reference(x.double(), ql.qweight, ql.scales, None, bits=4), torch.float16)
        ql(x)
        assert ql._mma_cache[1] is first  # cached
        ql.qweight.copy_(ql.qweight.flip(0))
        y = ql(x)
        assert ql._mma_cache[1] is not first
        assert_close(y, quant_matmul_reference(x.double(), ql.qweight, ql.scales, None, bits=4), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16, 64, 200, 256])
@pytest.mark.parametrize("N,K,group,symmetric,dtype", [
    (4096, 4096, 128, True, torch.bfloat16), (1000, 11008, 128, True, torch.float16),
    (777, 1100, None, False, torch.bfloat16), (2048, 640, 128, False, torch.bfloat16)])
def test_gpu_every_config(M, N, K, group, symmetric, dtype):
    """Every tuned config of M's bucket (inline PTX, TMA, split-K in and out of the kernel), bf16 and fp16."""
    ql = make_layer(N, K, group, symmetric, "cuda", scale_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    for config in qmatmul_tune.mma_configs(M):
        check(x, ql, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 256])
def test_gpu_autotuned_in_cuda_graph(M):
    """The tuner's pick, replayed from a CUDA graph: right, and bit-identical across replays."""
    ql = make_layer(4096, 4096, 128, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    packed = pack_int4_mma(ql.qweight)
    first = quant_matmul(x, packed, ql.scales, bits=4)  # tunes, allocates counters, before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = quant_matmul(x, packed, ql.scales, bits=4)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, first)
    check(x, ql)


@pytest.mark.gpu
def test_gpu_module_refuses_to_pack_inside_a_capture():
    ql = make_layer(256, 256, 128, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"), torch.cuda.graph(graph):
        ql(x)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,group", [(4096, 4096, 128), (11008, 4096, 128), (1000, 4112, None)])
def test_gpu_module_at_m1(N, K, group):
    """At M = 1 the module runs the slab order where the tensor-core GEMV applies, without packing a fragment
    copy; elsewhere (K % 32 != 0 here) it times the two layouts once per shape and keeps the faster. Right
    either way, then also inside a CUDA graph."""
    ql = make_layer(N, K, group, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ref = quant_matmul_reference(x.double(), ql.qweight, ql.scales, None, bits=4)
    eager_error = max_error(quant_matmul_eager(x, ql.qweight, ql.scales, None, bits=4), ref)
    y = ql(x)
    assert hasattr(ql, "_mma_cache") == (not tc_gemv_applies(4, K, ql.group_size, x.dtype))
    assert hasattr(ql, "_slab_cache") == tc_gemv_applies(4, K, ql.group_size, x.dtype)  # the GEMV's slab order
    assert max_error(y, ref) <= 2 * eager_error
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = ql(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 37, 256, 300])
@pytest.mark.parametrize("N,K,group,dtype,with_bias", [
    (4096, 4096, 128, torch.bfloat16, False), (1000, 11008, 128, torch.float16, True),
    (777, 1104, None, torch.bfloat16, True), (200, 768, 256, torch.bfloat16, False)])
def test_gpu_wgmma_every_config(M, N, K, group, dtype, with_bias):
    """The warp-specialized wgmma kernel (qmatmul_wgmma), every config: odd M and N (rows past both masked), a K
    that is not a multiple of the 128-code unit, split-K summed by the second kernel, bias, bf16 and fp16."""
    from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies, wgmma_configs
    ql = make_layer(N, K, group, True, "cuda", scale_dtype=dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype) if with_bias else None
    if not wgmma_applies(K, ql.group_size, x, None):
        pytest.skip("needs a Hopper GPU with Gluon")
    for config in wgmma_configs():
        check(x, ql, config=config, bias=bias)


@pytest.mark.gpu
def test_gpu_wgmma_refuses_an_unknown_config():
    """CONSUMERS (warpgroups of 64 rows), DEPTH (units of weight words in flight) and BLOCK_M outside the compiled
    set are refused with ValueError, not launched."""
    from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies
    ql = make_layer(200, 512, 128, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)
    if not wgmma_applies(512, 128, x, None):
        pytest.skip("needs a Hopper GPU with Gluon")
    packed = pack_int4_mma(ql.qweight)
    for bad in (dict(CONSUMERS=4), dict(DEPTH=3), dict(BLOCK_M=64)):
        config = dict(dict(BLOCK_M=128, STAGES=4, SPLIT_K=1, CONSUMERS=3, DEPTH=2), **bad)
        with pytest.raises(ValueError, match="CONSUMERS must be 2 or 3"):
            quant_matmul(x, packed, ql.scales, None, bits=4, config=config)


@pytest.mark.gpu
def test_gpu_module_at_m256_runs_the_fragment_layout():
    """On Hopper the module takes the fragment layout at M = 256 (the wgmma kernel among the tuner's candidates),
    elsewhere the row-major codes; right either way."""
    from mlsys_ref.quant.qmatmul_wgmma import wgmma_applies
    ql = make_layer(1024, 2048, 128, True, "cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    y = ql(x)
    ref = quant_matmul_reference(x.double(), ql.qweight, ql.scales, None, bits=4)
    assert max_error(y, ref) <= 2 * max_error(quant_matmul_eager(x, ql.qweight, ql.scales, None, bits=4), ref)
    assert qmatmul_dispatch.mma_layout_applies(ql, x) == wgmma_applies(2048, 128, x, None)
    assert hasattr(ql, "_mma_cache") == wgmma_applies(2048, 128, x, None)
