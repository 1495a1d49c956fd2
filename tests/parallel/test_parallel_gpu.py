"""The same runs as test_parallel_cpu.py over NCCL, one GPU per rank (fp32, TF32 off: torch's default)."""

import time

import pytest
import torch

from mlsys_ref.parallel import verify
from mlsys_ref.parallel.verify import Job

pytestmark = pytest.mark.gpu
TIMEOUT = dict(backend="nccl", timeout_s=60.0, join_timeout_s=300.0)


def needs_gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")


@needs_gpus(2)
def test_nccl_world2():
    jobs = [Job(tp=2), Job(tp=2, sequence_parallel=True, recompute=True), Job(pp=2, schedule="gpipe"),
            Job(pp=2, schedule="1f1b"), Job("zero", dp=2, zero_stage=1), Job("zero", dp=2, zero_stage=2),
            Job(pp=2, schedule="interleaved", virtual=2)]
    results = verify.launch(jobs, 2, **TIMEOUT)
    for job, result in zip(jobs, results[-1]):
        assert result["max_rel_error"] <= 1e-5, job
    assert [r[3]["peak_in_flight"] for r in results] == [2, 1]


@needs_gpus(4)
def test_nccl_world4():
    jobs = [Job(tp=2, pp=2, schedule="gpipe"), Job(tp=2, pp=2, schedule="1f1b", sequence_parallel=True),
            Job(pp=4), Job(tp=4), Job(tp=2, dp=2), Job("zero", dp=4, zero_stage=2),
            Job(tp=2, pp=2, schedule="interleaved", virtual=2)]
    results = verify.launch(jobs, 4, **TIMEOUT)
    for job, result in zip(jobs, results[-1]):
        assert result["max_rel_error"] <= 1e-5, job


@needs_gpus(2)
def test_nccl_failing_rank_fails_fast():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 raised.*rank 1 raises on purpose"):
        verify.launch([Job(dp=2, raise_on_rank=1, steps=1)], 2, **TIMEOUT)
    assert time.monotonic() - start < 60
