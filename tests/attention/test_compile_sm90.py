"""Compile the attention kernels for Hopper (sm_90) without a GPU: catches what the interpreter cannot
(types that do not unify across branches, APIs missing from the compiler, shared-memory overflow)."""

import os
import subprocess
import sys

import pytest

_SCRIPT = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"  # a user setting wins in mlsys_ref.backend: compile, do not interpret
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlsys_ref.attention import flash_decoding as fd, flash_triton as ft, flash_triton_backward as fb

def compile_for_sm90(kernel, pointers, constexprs, floats=()):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # under @triton.autotune
        fn = fn.fn
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 64),
                              options={"num_warps": 4, "num_stages": 2})
    assert compiled.metadata.shared <= 228 * 1024, (fn.__name__, compiled.metadata.shared)
    print("compiled", fn.__name__, flush=True)

pointers = {name: "*fp16" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "OUT")}
pointers.update(LSE="*fp32", DELTA="*fp32", SLOPES="*fp32", CU_Q="*i32", CU_K="*i32", SEQLENS="*i32",
                O_PART="*fp32", LSE_PART="*fp32")
common = dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64, CAUSAL=True, HAS_WINDOW=False, HAS_ALIBI=True,
              VARLEN=False, UPCAST=False, PRECISION="tf32")
scales = ("qk_scale", "sm_scale")
compile_for_sm90(ft._fwd_kernel, pointers, common, scales)
compile_for_sm90(ft._fwd_kernel, pointers, dict(common, CAUSAL=False, HAS_WINDOW=True, HAS_ALIBI=False, VARLEN=True), scales)
compile_for_sm90(fb._preprocess_kernel, pointers, dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64, VARLEN=False))
compile_for_sm90(fb._dkdv_kernel, pointers, common, scales)
compile_for_sm90(fb._dq_kernel, pointers, common, scales)
compile_for_sm90(fd._split_kernel, pointers, dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, HAS_SEQLENS=True,
                                                  UPCAST=False, PRECISION="tf32"), scales)
compile_for_sm90(fd._combine_kernel, pointers, dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_S=4))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("compiled") == 7
