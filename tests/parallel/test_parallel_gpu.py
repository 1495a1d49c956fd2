"""The same runs as test_parallel_cpu.py over NCCL, one GPU per rank (fp32, TF32 off: torch's default).

Every job trains the reference model for a few steps under one parallel layout and asserts, in
every rank, that losses, every gradient and the final parameters equal the single-process
reference (mlsys_ref/parallel/verify.py, relative error <= 1e-5). Spawning a world (CUDA and NCCL
start-up) costs seconds, so each world size is spawned once by a module fixture that runs all its
jobs; the tests below only read that world's results, one test per layout, named after it.

    NCCL_NVLS_ENABLE=0 pytest -m gpu tests/parallel/test_parallel_gpu.py -k "not world2 and not failing"  # 4 and 8 GPUs
"""

import time

import pytest
import torch

from mlsys_ref.parallel import verify
from mlsys_ref.parallel.reference import ModelConfig
from mlsys_ref.parallel.verify import Job

pytestmark = pytest.mark.gpu
TIMEOUT = dict(backend="nccl", timeout_s=60.0, join_timeout_s=300.0)


def needs_gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")


def _assert_matches_reference(jobs, results, names):
    """Every named job's max relative error (in every rank) is within fp32 rounding, and training learns."""
    for name in names:
        job = jobs[name]
        for rank, per_rank in enumerate(results):
            assert per_rank[name]["max_rel_error"] <= 1e-5, (name, rank, job)
        losses = results[-1][name]["losses"]  # the last rank holds the last stage's losses
        assert len(losses) == job.steps and losses[-1] < losses[0], (name, losses)


def _launch(jobs: dict[str, Job], world: int) -> list[dict]:
    """One spawned world for all ``jobs``; results[rank][name]."""
    names = list(jobs)
    per_rank = verify.launch([jobs[n] for n in names], world, **TIMEOUT)
    return [dict(zip(names, results)) for results in per_rank]


@needs_gpus(2)
def test_nccl_world2():
    jobs = [Job(tp=2), Job(tp=2, sequence_parallel=True, recompute=True), Job(pp=2, schedule="gpipe"),
            Job(pp=2, schedule="1f1b"), Job("zero", dp=2, zero_stage=1), Job("zero", dp=2, zero_stage=2),
            Job(pp=2, schedule="interleaved", virtual=2)]
    results = verify.launch(jobs, 2, **TIMEOUT)
    for job, result in zip(jobs, results[-1]):
        assert result["max_rel_error"] <= 1e-5, job
    assert [r[3]["peak_in_flight"] for r in results] == [2, 1]


# -- 4 GPUs: TP = 4, PP = 4, TP x PP = 2 x 2, TP x DP and ZeRO over 4, in one world --------------------
WORLD4 = {
    "tp4": Job(tp=4, steps=2),
    "tp4_sp": Job(tp=4, sequence_parallel=True, steps=2),
    "pp4_gpipe": Job(pp=4, schedule="gpipe", steps=2),
    "pp4_1f1b": Job(pp=4, schedule="1f1b", micro_batches=8, steps=2),
    "tp2_pp2_gpipe": Job(tp=2, pp=2, schedule="gpipe"),
    "tp2_pp2_1f1b_sp": Job(tp=2, pp=2, schedule="1f1b", sequence_parallel=True),
    "tp2_pp2_interleaved": Job(tp=2, pp=2, schedule="interleaved", virtual=2, steps=2),
    "tp2_dp2": Job(tp=2, dp=2, steps=2),
    "zero2_dp4": Job("zero", dp=4, zero_stage=2, steps=2),
}


@pytest.fixture(scope="module")
def world4():  # the tests' needs_gpus(4) skips before this runs
    return _launch(WORLD4, 4)


@needs_gpus(4)
def test_nccl_tp4(world4):
    _assert_matches_reference(WORLD4, world4, ["tp4", "tp4_sp"])


@needs_gpus(4)
def test_nccl_pp4_gpipe_and_1f1b(world4):
    _assert_matches_reference(WORLD4, world4, ["pp4_gpipe", "pp4_1f1b"])
    assert [r["pp4_gpipe"]["peak_in_flight"] for r in world4] == [4, 4, 4, 4]  # GPipe keeps all m = 4
    assert [r["pp4_1f1b"]["peak_in_flight"] for r in world4] == [4, 3, 2, 1]  # 1F1B: p - s, with m = 8


@needs_gpus(4)
def test_nccl_tp2_pp2(world4):
    _assert_matches_reference(WORLD4, world4, ["tp2_pp2_gpipe", "tp2_pp2_1f1b_sp", "tp2_pp2_interleaved"])


@needs_gpus(4)
def test_nccl_tp2_dp2_and_zero4(world4):
    _assert_matches_reference(WORLD4, world4, ["tp2_dp2", "zero2_dp4"])
    zero = world4[0]["zero2_dp4"]
    assert zero["state_bytes"] * 4 == zero["unsharded_bytes"], zero


# -- 8 GPUs: TP = 8 (8 KV heads), PP = 8 (8 layers), TP x PP = 2 x 4 and 4 x 2 -------------------------
EIGHT = ModelConfig(heads=8, kv_heads=8, layers=8)
WORLD8 = {
    "tp8": Job(tp=8, model=EIGHT, steps=2),
    "pp8_gpipe": Job(pp=8, model=EIGHT, schedule="gpipe", micro_batches=8, steps=2),
    "pp8_1f1b": Job(pp=8, model=EIGHT, schedule="1f1b", micro_batches=8, steps=2),
    "tp2_pp4": Job(tp=2, pp=4, model=EIGHT, schedule="1f1b", steps=2),
    "tp4_pp2_sp": Job(tp=4, pp=2, model=EIGHT, schedule="1f1b", sequence_parallel=True, steps=2),
}


@pytest.fixture(scope="module")
def world8():  # the tests' needs_gpus(8) skips before this runs
    return _launch(WORLD8, 8)


@needs_gpus(8)
def test_nccl_tp8(world8):
    _assert_matches_reference(WORLD8, world8, ["tp8"])


@needs_gpus(8)
def test_nccl_pp8_gpipe_and_1f1b(world8):
    _assert_matches_reference(WORLD8, world8, ["pp8_gpipe", "pp8_1f1b"])
    assert [r["pp8_1f1b"]["peak_in_flight"] for r in world8] == [8, 7, 6, 5, 4, 3, 2, 1]


@needs_gpus(8)
def test_nccl_tp_x_pp_8(world8):
    _assert_matches_reference(WORLD8, world8, ["tp2_pp4", "tp4_pp2_sp"])


@needs_gpus(2)
def test_nccl_failing_rank_fails_fast():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 raised.*rank 1 raises on purpose"):
        verify.launch([Job(dp=2, raise_on_rank=1, steps=1)], 2, **TIMEOUT)
    assert time.monotonic() - start < 60
