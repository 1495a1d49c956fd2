"""Triton FlashAttention-2 (forward and backward) against the reference: O, lse, dQ, dK, dV.

CPU (interpreter): small odd shapes (seq 37 and 1, q_len != kv_len, GQA 4:2, MQA, head dims 32 and 80),
causal / window / ALiBi, varlen, an fp64 gradcheck, bad inputs. GPU: fp16/bf16, every head dim, seq 1k-4k.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys_ref.attention import flash_triton_backward
from mlsys_ref.attention.flash_triton import _fwd_kernel, flash_attention, flash_attention_varlen
from mlsys_ref.attention.flash_triton_hopper import flash_attention_hopper
from mlsys_ref.attention.reference import attention_reference, attention_varlen_reference
from mlsys_ref.testing import assert_close, max_error, tolerance


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, device, dtype=torch.float32):
    q = torch.randn(batch, q_heads, q_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.fixture(autouse=True)
def one_config(monkeypatch, request):
    """Pin autotuning to one config (the smallest, valid for every head dim: STYLE.md point 8), so that on a GPU
    each shape compiles once; tests named ``*autotuned`` keep the whole autotune set (a no-op on the CPU)."""
    if "autotuned" in request.node.name:
        return
    for kernel in (_fwd_kernel, flash_triton_backward._dkdv_kernel, flash_triton_backward._dq_kernel):
        monkeypatch.setattr(kernel, "configs", kernel.configs[-1:])


def _loss(out, lse, weights):
    """A loss that reaches O and lse (rows that see no key have lse = -inf and are left out)."""
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return (out.float() * weights[0]).sum() + (finite_lse * weights[1]).sum()


def _check(run, reference, inputs, dtype=torch.float32, grad_tolerance=None):
    out, lse = run(*inputs)
    expected, expected_lse = reference(*inputs)
    assert_close(out, expected, dtype, name="O")
    assert_close(lse, expected_lse, dtype, name="lse")
    weights = (torch.randn_like(expected, dtype=torch.float32), torch.randn_like(expected_lse, dtype=torch.float32))
    grads = torch.autograd.grad(_loss(out, lse, weights), inputs)
    expected_grads = torch.autograd.grad(_loss(expected, expected_lse, weights), inputs)
    for name, actual, wanted in zip(("dQ", "dK", "dV"), grads, expected_grads):
        assert torch.isfinite(actual).all(), name
        assert_close(actual, wanted, dtype, name=name, **(grad_tolerance or {}))


CASES = [  # batch, Hq, Hkv, q_len, kv_len, head_dim, options
    (2, 4, 2, 37, 37, 32, dict(causal=False)),
    (2, 4, 2, 37, 45, 32, dict(causal=True)),  # q_len < kv_len: bottom-right causal
    (1, 4, 2, 45, 37, 32, dict(causal=True)),  # q_len > kv_len: the first 8 rows see no key
    (2, 4, 1, 1, 37, 32, dict(causal=True)),  # MQA, one query token
    (1, 2, 2, 37, 1, 32, dict(causal=False, window=7)),  # one key; most rows outside the window
    (1, 2, 2, 37, 37, 80, dict(causal=True)),  # head_dim 80, padded to 128
    (1, 4, 2, 37, 37, 32, dict(causal=True, window=5, alibi="heads")),
    (2, 4, 2, 33, 40, 32, dict(causal=False, window=6, alibi="batch", scale=0.3)),
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,kv_len,head_dim,options", CASES)
def test_matches_reference(batch, q_heads, kv_heads, q_len, kv_len, head_dim, options, device):
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi is not None:
        shape = (q_heads,) if alibi == "heads" else (batch, q_heads)
        options["alibi_slopes"] = torch.rand(shape, device=device)
    inputs = _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, device)
    _check(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **options),
           lambda q, k, v: attention_reference(q, k, v, **options), inputs)


@pytest.mark.parametrize("causal,window", [(True, None), (False, 9)])
def test_varlen_matches_reference(causal, window, device):
    cu_q = torch.tensor([0, 3, 20, 21, 40], device=device, dtype=torch.int32)  # lengths 3, 17, 1, 19
    cu_k = torch.tensor([0, 5, 17, 30, 30 + 19], device=device, dtype=torch.int32)  # 5, 12, 13, 19
    q = torch.randn(40, 4, 32, device=device, requires_grad=True)
    k, v = (torch.randn(49, 2, 32, device=device, requires_grad=True) for _ in range(2))
    options = dict(causal=causal, window=window)
    _check(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, 19, 19, return_lse=True, **options),
           lambda q, k, v: attention_varlen_reference(q, k, v, cu_q, cu_k, **options), (q, k, v))


def test_fp16_forward_and_backward(device):
    inputs = _inputs(1, 2, 2, 37, 37, 64, device, torch.float16)
    out = flash_attention(*inputs, causal=True)
    expected, _ = attention_reference(*inputs, causal=True)
    assert_close(out, expected, name="O")
    reference64 = [x.detach().double().requires_grad_() for x in inputs]
    expected64, _ = attention_reference(*reference64, causal=True)
    d_out = torch.randn_like(expected64)
    grads = torch.autograd.grad(out, inputs, d_out.half())
    # Bound: the reference's own fp16 gradients (autograd through fp32 math, rounded to fp16) vs fp64,
    # times 4 for the fp16 P and dS fed to the dots, plus the table's fp16 atol (STYLE.md point 6).
    expected_grads = torch.autograd.grad(expected, inputs, d_out.half())
    wanted = torch.autograd.grad(expected64, reference64, d_out)
    for name, actual, eager, exact in zip(("dQ", "dK", "dV"), grads, expected_grads, wanted):
        bound = 4 * max_error(eager, exact) + tolerance(torch.float16).atol
        assert max_error(actual, exact) <= bound, (name, max_error(actual, exact), bound)


def test_gradient_of_lse_alone(device):
    # only lse reaches the loss: dO is None inside the backward and dS = P · dlse (D becomes -dlse)
    q, k, v = _inputs(1, 2, 1, 20, 33, 32, device)
    lse = flash_attention(q, k, v, causal=True, return_lse=True)[1]
    grads = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    expected = torch.autograd.grad(attention_reference(q, k, v, causal=True)[1].sum(), (q, k, v), allow_unused=True)
    for name, actual, wanted in zip(("dQ", "dK", "dV"), grads, expected):
        assert_close(actual, wanted if wanted is not None else torch.zeros_like(actual), name=name)


def test_non_contiguous_inputs(device):
    # [batch, seq, heads, dim] projections transposed to SDPA layout: strides are passed, not copied
    q, k, v = (torch.randn(2, 37, 4, 32, device=device).transpose(1, 2) for _ in range(3))
    assert_close(flash_attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True)[0])
    # a slice along seq has gaps: gradients must still land in the right rows
    big = torch.randn(1, 2, 50, 32, device=device, requires_grad=True)
    q, k, v = big[:, :, 5:42], big[:, :, :45], big[:, :, 3:48]
    d_out = torch.randn(1, 2, 37, 32, device=device)
    grad = torch.autograd.grad(flash_attention(q, k, v, causal=True), big, d_out)[0]
    expected = torch.autograd.grad(attention_reference(q, k, v, causal=True)[0], big, d_out)[0]
    assert_close(grad, expected, name="d big")


def test_gradcheck_fp64(device):
    q, k, v = (torch.randn(1, heads, n, 16, device=device, dtype=torch.float64, requires_grad=True)
               for heads, n in ((2, 5), (1, 7), (1, 7)))
    slopes = torch.tensor([0.3, 0.1], device=device, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True),
        (q, k, v), fast_mode=True)


@settings(max_examples=6)
@given(q_len=st.integers(1, 40), kv_len=st.integers(1, 40), causal=st.booleans(), group=st.sampled_from([1, 3]))
def test_forward_any_lengths(q_len, kv_len, causal, group, device):
    q, k, v = _inputs(1, 3, 3 // group, q_len, kv_len, 16, device)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    expected, expected_lse = attention_reference(q, k, v, causal=causal)
    assert_close(out, expected, name="O")
    assert_close(lse, expected_lse, name="lse")


@pytest.mark.parametrize("q_len,kv_len,causal", [(37, 45, True), (45, 37, True), (33, 20, False)])
def test_hopper_variant_matches_reference(q_len, kv_len, causal, device):
    # the TMA forward (fp16: the interpreter's fp16 tl.dot is exact enough), backward shared with the teaching kernel
    inputs = _inputs(1, 4, 2, q_len, kv_len, 32, device, torch.float16)
    out, lse = flash_attention_hopper(*inputs, causal=causal, return_lse=True)
    expected, expected_lse = attention_reference(*inputs, causal=causal)
    assert_close(out, expected, name="O")
    assert_close(lse, expected_lse, torch.float16, name="lse")
    teaching = flash_attention(*inputs, causal=causal)
    d_out = torch.randn_like(out)
    for name, actual, wanted in zip(("dQ", "dK", "dV"), torch.autograd.grad(out, inputs, d_out),
                                    torch.autograd.grad(teaching, inputs, d_out)):
        assert_close(actual, wanted, name=name)


def test_hopper_variant_rejects_what_it_leaves_out(device):
    q = torch.randn(1, 2, 8, 32, device=device)
    with pytest.raises(TypeError):
        flash_attention_hopper(q, q, q)  # fp32
    h = torch.randn(1, 2, 8, 80, device=device, dtype=torch.float16)
    with pytest.raises(ValueError):
        flash_attention_hopper(h, h, h)  # head_dim not a power of two
    with pytest.raises(TypeError):
        flash_attention_hopper(h, h, h, window=4)  # no sliding window here


def _bad(device):
    q = torch.randn(1, 4, 8, 32, device=device)
    k = torch.randn(1, 2, 8, 32, device=device)
    return [
        (ValueError, lambda: flash_attention(q[0], k[0], k[0])),  # wrong rank
        (TypeError, lambda: flash_attention(q, k.half(), k)),  # mismatched dtypes
        (TypeError, lambda: flash_attention(q.long(), k.long(), k.long())),  # unsupported dtype
        (ValueError, lambda: flash_attention(q, torch.randn(1, 3, 8, 32, device=device), torch.randn(1, 3, 8, 32, device=device))),
        (ValueError, lambda: flash_attention(torch.randn(1, 4, 8, 512, device=device), torch.randn(1, 2, 8, 512, device=device),
                                             torch.randn(1, 2, 8, 512, device=device))),  # head_dim > 256
        (ValueError, lambda: flash_attention(q, k, torch.randn(1, 2, 9, 32, device=device))),  # k/v shapes differ
        (ValueError, lambda: flash_attention(q, k, k, window=0)),
        (ValueError, lambda: flash_attention(q, k, k, alibi_slopes=torch.ones(3, device=device))),
        (TypeError, lambda: flash_attention([1.0], k, k)),
        (TypeError, lambda: flash_attention_varlen(q[0, 0][:, None], k[0, 0][:, None], k[0, 0][:, None], [0, 8], [0, 8], 8, 8)),
        (ValueError, lambda: flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1),
                                                    torch.tensor([0, 9], dtype=torch.int32, device=device),
                                                    torch.tensor([0, 8], dtype=torch.int32, device=device), 9, 8)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_inputs_raise(case, device):
    error, call = _bad(device)[case]
    with pytest.raises(error):
        call()


def test_device_mismatch_raises(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    q = torch.randn(1, 2, 8, 32, device=device)
    with pytest.raises(ValueError):
        flash_attention(q, q.cpu(), q)


# ---------------------------------------------------------------- GPU: fp16/bf16, every head dim, long sequences


def _check_low_precision(dtype, head_dim, causal, seq, device, batch=2, q_heads=4, kv_heads=2, attention=flash_attention):
    """O and gradients within 2x PyTorch eager's own error at this dtype (both against an fp32 golden)."""
    inputs = _inputs(batch, q_heads, kv_heads, seq, seq, head_dim, device, dtype)
    golden = [x.detach().float().requires_grad_() for x in inputs]
    d_out = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype)
    out = attention(*inputs, causal=causal)
    expected, _ = attention_reference(*golden, causal=causal)

    def eager(q, k, v):  # the naive algorithm run in the low-precision dtype, as a user would write it
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        if causal:
            scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1), float("-inf"))
        return scores.softmax(-1) @ v

    eager_out = eager(*inputs)
    atol = tolerance(dtype).atol
    assert max_error(out, expected) <= 2 * max_error(eager_out, expected) + atol
    grads = torch.autograd.grad(out, inputs, d_out)
    wanted = torch.autograd.grad(expected, golden, d_out.float())
    eager_grads = torch.autograd.grad(eager_out, inputs, d_out)
    for name, actual, exact, naive in zip(("dQ", "dK", "dV"), grads, wanted, eager_grads):
        assert max_error(actual, exact) <= 2 * max_error(naive, exact) + atol, name


GPU_SWEEP = [(torch.bfloat16, d, c) for d in (32, 64, 80, 96, 128, 256) for c in (False, True)]
GPU_SWEEP += [(torch.float16, d, True) for d in (64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,causal", GPU_SWEEP)
def test_gpu_every_head_dim(dtype, head_dim, causal, device):
    _check_low_precision(dtype, head_dim, causal, 1024, device)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_long_sequence_autotuned(head_dim, device):
    _check_low_precision(torch.bfloat16, head_dim, True, 4096, device, batch=1, q_heads=8, kv_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_hopper_variant(head_dim, causal, device):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    _check_low_precision(torch.bfloat16, head_dim, causal, 4096, device, batch=1, q_heads=8, kv_heads=2,
                         attention=flash_attention_hopper)


@pytest.mark.gpu
def test_gpu_fp32_exact(device):
    inputs = _inputs(2, 4, 2, 1000, 1037, 64, device)
    # gradients sum ~1000 rows in fp32: the table's 1e-4 "after long reductions" bound (STYLE.md point 6)
    _check(lambda q, k, v: flash_attention(q, k, v, causal=True, return_lse=True),
           lambda q, k, v: attention_reference(q, k, v, causal=True), inputs,
           grad_tolerance=dict(atol=10 * tolerance(torch.float32).atol, rtol=10 * tolerance(torch.float32).rtol))


@pytest.mark.gpu
def test_gpu_varlen_bf16_autotuned(device):
    lengths = [1000, 17, 2048, 513]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device, dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), heads, 128, device=device, dtype=torch.bfloat16) for heads in (8, 2, 2))
    out = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    expected, _ = attention_varlen_reference(q.float(), k.float(), v.float(), cu, cu, causal=True)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_window_alibi_bf16(device):
    slopes = torch.rand(8, device=device)
    inputs = _inputs(1, 8, 2, 2048, 2048, 128, device, torch.bfloat16)
    out = flash_attention(*inputs, causal=True, window=256, alibi_slopes=slopes)
    expected, _ = attention_reference(*(x.float() for x in inputs), causal=True, window=256, alibi_slopes=slopes)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [None, 0, 1, 2, 3, 4, 5])
def test_gpu_large_grid_causal_d64_backward_autotuned(pinned, device, monkeypatch):
    """Regression test for issue #4: with many programs in flight (B32 H32, seq 512, d64, causal, bf16) the old
    dK/dV kernel's dK was wrong (~0.1 relative) and changed from run to run. Cause, seen in the TTGIR: its S and
    dP dots had 32 rows, too few for wgmma, so they became mma.sync, and triton's pipeliner then gave the shared
    Q tile stages-1 buffers, one too few for the asynchronous dK wgmma that also reads it: the next prefetch
    overwrote Q under it. Runs the autotuned path, then config ``pinned`` of each kernel's autotune set."""
    if pinned is not None:
        for kernel in (flash_triton_backward._dkdv_kernel, flash_triton_backward._dq_kernel):
            if pinned >= len(kernel.configs):
                pytest.skip(f"the autotune set has {len(kernel.configs)} configs")
            monkeypatch.setattr(kernel, "configs", kernel.configs[pinned:pinned + 1])
    q, k, v = (torch.randn(32, 32, 512, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected, _ = attention_reference(q64, k64, v64, causal=True)
    wanted = torch.autograd.grad(expected, (q64, k64, v64), grad.double())
    for name, ours, second, reference in zip(("dq", "dk", "dv"), grads, again, wanted):
        assert torch.equal(ours, second), f"{name} differs between two runs on the same inputs (a race?)"
        relative = (ours.double() - reference).abs().max() / reference.abs().max()
        assert relative < 0.02, f"{name}: relative error {relative:.3g}"


_SM90_DOTS = r'''
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"  # a user setting wins in mlsys_ref.backend: compile, do not interpret
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlsys_ref.attention import flash_triton_backward as fb

for kernel, (m, n, warps, stages) in ((fb._dkdv_kernel, (32, 128, 4, 3)), (fb._dq_kernel, (128, 32, 4, 3))):
    fn = kernel.fn
    common = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=m, BLOCK_N=n, CAUSAL=True, HAS_WINDOW=False, HAS_ALIBI=False,
                  VARLEN=False, UPCAST=False, PRECISION="tf32")
    pointers = dict(LSE="*fp32", DELTA="*fp32", SLOPES="*fp32", CU_Q="*i32", CU_K="*i32")
    signature = {a: "constexpr" if a in common else pointers.get(a, "*bf16" if a.isupper() else
                 "fp32" if a.endswith("scale") else "i32") for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)  # as the JIT specializes them
               if a not in common and (a.isupper() or a.startswith(("stride", "seqlen")))}
    ttgir = triton.compile(ASTSource(fn, signature, common, attrs=aligned), target=GPUTarget("cuda", 90, 64),
                           options={"num_warps": warps, "num_stages": stages}).asm["ttgir"]
    print(fn.__name__, "mma_sync", ttgir.count("tt.dot "), "wgmma", ttgir.count("ttng.warp_group_dot "))
'''


@pytest.mark.slow
def test_backward_dots_are_one_kind_on_sm90():
    """Issue #4 without a GPU: compile dK/dV (the config that raced) and dQ for sm_90 and check that no loop mixes
    mma.sync with asynchronous wgmma dots, the mix that triton's pipeliner under-buffered (see _dkdv_inner)."""
    pytest.importorskip("triton.backends.nvidia")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", _SM90_DOTS], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for line in result.stdout.strip().splitlines():
        name, _, mma_sync, _, wgmma = line.split()
        assert int(mma_sync) == 0 and int(wgmma) > 0, line
