"""TP, PP (GPipe and 1F1B), TP x PP and ZeRO on gloo, against the single-process reference.

Each spawned world runs several jobs (spawning costs seconds); every rank asserts, inside, that
losses, every gradient and the final parameters equal the reference slice (mlsys_ref/parallel/verify.py),
so a mismatch surfaces here as a RuntimeError carrying that rank's assertion message.
"""

import time

import pytest
import torch.distributed as dist

from mlsys_ref.parallel import verify
from mlsys_ref.parallel.launch import Grid, spawn
from mlsys_ref.parallel.pipeline_parallel import stage_layers
from mlsys_ref.parallel.reference import ModelConfig
from mlsys_ref.parallel.schedule_sim import simulate
from mlsys_ref.parallel.tensor_parallel import tp_comm_bytes
from mlsys_ref.parallel.verify import Job

TIMEOUT = dict(timeout_s=60.0, join_timeout_s=240.0)  # collectives and the whole run both bounded


def _check_common(jobs, results):
    for job, result in zip(jobs, results[-1]):  # the last rank holds the losses of the last stage
        assert result["max_rel_error"] <= 1e-5, job
        assert len(result["losses"]) == job.steps and result["losses"][-1] < result["losses"][0], job


@pytest.mark.slow  # spawns processes: 15-35 s on 2 busy cores; still runs in `make test`
def test_world2_tensor_parallel():
    """TP=2 plain; TP=2 with sequence parallelism and recomputation; TP=1 x DP=2; counted bytes."""
    jobs = [Job(tp=2), Job(tp=2, sequence_parallel=True, recompute=True, steps=2), Job(dp=2, steps=2)]
    results = verify.launch(jobs, 2, **TIMEOUT)
    _check_common(jobs, results)
    c = ModelConfig()
    for job, result in zip(jobs[:2], results[0]):
        per_step = tp_comm_bytes(c, job.batch * job.seq, job.tp, job.sequence_parallel, job.recompute)
        expected = {k: v * job.steps for k, v in per_step.items()}
        measured = result["comm_payload_bytes"]
        assert measured == expected, (job, measured, expected)
    saved = results[0][1]["activation_bytes"]
    assert saved["recompute"] < saved["no_recompute"] / 4, saved


@pytest.mark.slow  # spawns processes: 15-35 s on 2 busy cores; still runs in `make test`
def test_world2_pipeline_and_zero():
    jobs = [Job(pp=2, schedule="gpipe"), Job(pp=2, schedule="1f1b", micro_batches=8, steps=2),
            Job("zero", dp=2, zero_stage=1), Job("zero", dp=2, zero_stage=2),
            Job(pp=2, schedule="interleaved", virtual=2, micro_batches=4, steps=2)]
    results = verify.launch(jobs, 2, **TIMEOUT)
    _check_common(jobs, results)
    assert [r[0]["peak_in_flight"] for r in results] == [4, 4]  # GPipe keeps all m
    assert [r[1]["peak_in_flight"] for r in results] == [2, 1]  # 1F1B: p - s
    simulated = simulate("interleaved", 2, 4, v=2).peak_in_flight  # chunk-micro-batches, as run
    assert [r[4]["peak_in_flight"] for r in results] == simulated
    for job, result in zip(jobs[2:4], results[0][2:4]):
        assert result["state_bytes"] * job.dp == result["unsharded_bytes"], result  # N divides by 2: no padding


@pytest.mark.slow  # spawns processes: 15-35 s on 2 busy cores; still runs in `make test`
def test_world4_tp_x_pp_and_zero():
    jobs = [Job(tp=2, pp=2, schedule="gpipe", steps=3),
            Job(tp=2, pp=2, schedule="1f1b", sequence_parallel=True, steps=3),
            Job(pp=4, schedule="1f1b", steps=2),
            Job(tp=2, pp=2, schedule="interleaved", virtual=2, steps=2),
            Job(tp=4, steps=2),
            Job(tp=2, dp=2, steps=2),
            Job("zero", dp=4, zero_stage=1, steps=2),
            Job("zero", dp=4, zero_stage=2, steps=2)]
    results = verify.launch(jobs, 4, **TIMEOUT)
    _check_common(jobs, results)
    assert [r[2]["peak_in_flight"] for r in results] == [4, 3, 2, 1]
    for job, result in zip(jobs[6:], results[0][6:]):
        assert result["state_bytes"] * 4 == result["unsharded_bytes"], result


def test_failing_rank_fails_fast():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 raised.*rank 1 raises on purpose"):
        verify.launch([Job(dp=2, raise_on_rank=1, steps=1)], 2, timeout_s=60.0, join_timeout_s=60.0)
    assert time.monotonic() - start < 45  # rank 0 sits in an all-reduce: it is terminated, not awaited


def _never_called(*args, **kwargs):
    raise AssertionError("spawn must not run for a bad configuration")


@pytest.mark.parametrize("job,world,match", [
    (Job(tp=4, model=ModelConfig(hidden=48, heads=6, kv_heads=6)), 4, "heads .6. must be divisible"),
    (Job(tp=2, model=ModelConfig(heads=8, kv_heads=1)), 2, "kv_heads .1. must be divisible"),
    (Job(tp=2, model=ModelConfig(vocab=97)), 2, "vocab .97. must be divisible"),
    (Job(pp=4, model=ModelConfig(layers=3)), 4, "layers .3. must be at least"),
    (Job(tp=2), 4, "world size 4 does not match"),
    (Job(tp=2, sequence_parallel=True, seq=13), 2, "seq .13. must be divisible"),
    (Job(pp=2, micro_batches=3), 2, "micro_batches"),
    (Job(pp=2, schedule="zb"), 2, "schedule"),
    (Job(pp=2, schedule="interleaved", virtual=3), 2, r"layers .4. must be at least .* \(2 x 3 chunks\)"),
    (Job(pp=2, schedule="interleaved", virtual=2, micro_batches=1), 2, "multiple of pp"),
    (Job(pp=2, virtual=2), 2, "need schedule='interleaved'"),
    (Job("zero", tp=2), 2, "data parallel only"),
])
def test_bad_configuration_raises_before_any_process_group(monkeypatch, job, world, match):
    monkeypatch.setattr(verify, "spawn", _never_called)
    with pytest.raises(ValueError, match=match):
        verify.launch([job], world)
    assert not dist.is_initialized()


def test_spawn_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        spawn(print, 0)


def test_megatron_rank_order():
    groups = Grid(tp=2, pp=2, dp=2).all_groups()  # Megatron-LM's parallel_state docstring, 8 GPUs
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert all(Grid(2, 2, 2).rank(*Grid(2, 2, 2).coordinates(r)) == r for r in range(8))


def test_stage_layers_cover_the_model_once():
    for layers, pp in [(4, 4), (5, 2), (7, 3), (3, 1)]:
        ranges = [stage_layers(layers, pp, s) for s in range(pp)]
        assert [i for r in ranges for i in r] == list(range(layers)) and all(len(r) >= 1 for r in ranges)
