"""The shared autotune pruner and input checks of the Triton attention launchers (mlsys_ref.attention.flash_launch)."""

import pytest
import torch

from mlsys_ref.attention.flash_launch import (
    _ACC_REGISTERS, _SMEM_BUDGET, _check_heads, _check_tensors, _keep_fitting, _pruner,
)
from mlsys_ref.backend import triton


def _config(m, n, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=stages)


def test_keep_fitting_drops_tiles_that_overflow_shared_memory():
    configs = [_config(128, 128, 3), _config(128, 64, 3), _config(64, 64, 2), _config(32, 32, 2)]
    rows = lambda c: (c.kwargs["BLOCK_M"], 2 * c.kwargs["BLOCK_N"])  # noqa: E731  (the forward's tiles)
    q = torch.empty(1, dtype=torch.float32)
    kept = _keep_fitting(configs, {"Q": q}, {"BLOCK_D": 256}, rows, keep=3)
    for c in kept:  # (resident + (stages - 1) · streamed) rows of 256 fp32 values
        assert (c.kwargs["BLOCK_M"] + (c.num_stages - 1) * 2 * c.kwargs["BLOCK_N"]) * 256 * 4 <= _SMEM_BUDGET
    assert kept == configs[2:]  # 128x128 s3 and 128x64 s3 overflow 200 KB at fp32, head_dim 256
    assert _keep_fitting(configs, {"Q": q.half()}, {"BLOCK_D": 64}, rows, keep=2) == configs[:2]  # small tiles: first two
    assert _keep_fitting(configs[:1], {"Q": q}, {"BLOCK_D": 4096}, rows, keep=3) == configs[:1]  # one config: kept as is
    assert _keep_fitting(configs[:2], {"Q": q}, {"BLOCK_D": 4096}, rows, keep=3) == configs[1:2]  # none fits: the last


def _warps(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def test_backward_pruner_drops_configs_whose_accumulators_would_spill():
    """dK and dV hold 2 · BLOCK_N rows of head_dim fp32 values across the loop: at head_dim 128, 32x128 with 4
    warps needs 256 of them per thread (it spilled on an H100, 181 vs 394 TFLOP/s); 64x128 with 8 warps needs 128."""
    configs = [_warps(32, 128, 4, 3), _warps(64, 128, 8, 3), _warps(32, 64, 4, 3), _warps(16, 32, 4, 2)]
    bf16 = {"Q": torch.empty(1, dtype=torch.bfloat16)}
    kept = _pruner("dkdv")(configs, bf16, BLOCK_D=128)
    assert kept == [configs[1], configs[2], configs[3]]  # all but 32x128 with 4 warps
    for c in kept:
        assert 2 * c.kwargs["BLOCK_N"] * 128 // (32 * c.num_warps) <= _ACC_REGISTERS
    assert _pruner("dkdv")(configs, bf16, BLOCK_D=64)[:2] == configs[:2]  # at head_dim 64 both fit
    dq = [_warps(128, 32, 4, 3), _warps(64, 64, 4, 3), _warps(64, 32, 4, 2), _warps(32, 16, 4, 2)]
    # head_dim 256: 128 rows over 128 threads would spill; 64x64 s3 needs 256 KB of shared memory (3 K/V buffers,
    # compiled for sm_90), more than an SM has
    assert _pruner("dq")(dq, bf16, BLOCK_D=256) == dq[2:]


def test_checks_name_the_bad_argument():
    x = torch.randn(1, 2, 8, 32)
    with pytest.raises(TypeError, match="k_cache"):
        _check_tensors((("q", x), ("k_cache", x.half())), 4, (torch.float32, torch.float16))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        _check_tensors((("q", x), ("v", [1.0])), 4, (torch.float32,))
    with pytest.raises(ValueError, match="rank 3"):
        _check_tensors((("q", x),), 3, (torch.float32,))
    with pytest.raises(TypeError, match="one of"):
        _check_tensors((("q", x.double()),), 4, (torch.float32,))
    with pytest.raises(ValueError, match="head_dim"):
        _check_heads(8, 4, 2, "k/v")
    with pytest.raises(ValueError, match="the cache's 3 heads"):
        _check_heads(32, 4, 3, "the cache")
    _check_heads(80, 6, 2, "k/v")  # 80 is padded to 128 by the kernels: allowed
