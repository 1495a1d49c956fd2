"""Parallel training runs checked, inside every rank, against the single-process reference.

One ``Job`` is a few optimizer steps of the reference model under one parallel layout: ``"model"``
(tensor parallel over ``tp`` ranks, optionally sequence parallel and recomputed, cut into ``pp``
pipeline stages run with GPipe, 1F1B or interleaved 1F1B, replicated over ``dp``) or ``"zero"`` (ZeRO-1/2 over
``dp``). Each rank also trains the reference model on the whole batch and asserts, at every step,
that the loss, *every* gradient of its shard and, at the end, every parameter equal the matching
slice of the reference (fp32, relative error <= 1e-5). ``launch`` validates all jobs in the
calling process *before* spawning, so a bad configuration never creates a process group.

Model jobs step with SGD, not AdamW: Adam divides by sqrt(v) + eps, so a gradient element near 0
turns its last-bit rounding (which any change of summation order causes) into a full +-lr step,
and comparing trajectories through Adam would measure Adam's conditioning, not the parallelism.
ZeRO jobs therefore check AdamW where it is the claim: each rank also keeps a plain data-parallel
replica with torch.optim.AdamW fed the same averaged gradient, and the ZeRO parameters must equal
it at every step. Against the single-process reference, the losses are checked at every step and
the data-parallel-averaged gradients at the first (afterwards Adam has amplified the rounding of
the averaging, see above, and the comparison would measure that).

Tests, the tour, the notebooks and the benchmark share these jobs (STYLE.md point 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mlsys_ref.parallel.comm import STATS, all_reduce
from mlsys_ref.parallel.launch import Grid, init_groups, spawn, validate_grid
from mlsys_ref.parallel.pipeline_parallel import interleaved_step, pipeline_step, stage_layers, validate_pipeline
from mlsys_ref.parallel.recompute import measure_recompute
from mlsys_ref.parallel.reference import ModelConfig, ReferenceModel, make_batch
from mlsys_ref.parallel.tensor_parallel import (ColumnParallelLinear, ParallelTransformer, RowParallelLinear,
                                                allreduce_sequence_parallel_grads, expected_shard, validate_tp)
from mlsys_ref.parallel.zero import ZeroAdamW
from mlsys_ref.testing import assert_close, max_error, tolerance

__all__ = ["Job", "validate_job", "launch", "run_jobs", "check", "describe_tp"]


@dataclass(frozen=True)
class Job:
    kind: str = "model"  # "model" (TP x PP x DP) or "zero"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: int = 8
    seq: int = 12
    steps: int = 3
    schedule: str = "1f1b"
    micro_batches: int = 4
    virtual: int = 1  # model chunks per stage, for schedule="interleaved"
    sequence_parallel: bool = False
    recompute: bool = False
    zero_stage: int = 1
    lr: float = 0.5  # SGD, for model jobs
    adam_lr: float = 1e-2  # AdamW, for ZeRO jobs
    raise_on_rank: int | None = None  # for the test that a failing rank fails the run quickly

    @property
    def grid(self) -> Grid:
        return Grid(self.tp, self.pp, self.dp)


def validate_job(job: Job, world_size: int) -> None:
    if job.kind not in ("model", "zero"):
        raise ValueError(f"Job.kind must be 'model' or 'zero', got {job.kind!r}")
    validate_grid(world_size, job.grid)
    validate_tp(job.model, job.tp, job.seq, job.sequence_parallel)
    if job.batch % job.dp:
        raise ValueError(f"batch ({job.batch}) must divide by the data-parallel size ({job.dp})")
    validate_pipeline(job.model, job.pp, job.batch // job.dp, job.micro_batches if job.pp > 1 else 1, job.schedule,
                      job.virtual)
    if job.kind == "zero" and (job.tp, job.pp) != (1, 1):
        raise ValueError("a 'zero' job is data parallel only: tp and pp must be 1")


def check(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """assert_close relative to the tensor's scale; returns the max error divided by max |expected|.

    Gradients here are ~1e-3, so the table's absolute fp32 term (1e-5) would hide real errors:
    the absolute term is the table's relative bound times the tensor's largest magnitude instead.
    """
    rtol = tolerance(torch.float32).rtol
    scale = max(float(expected.detach().abs().max()), 1e-30)
    assert_close(actual, expected, atol=rtol * scale, rtol=rtol, name=name)
    return max_error(actual, expected) / scale


def _dp_average(params, group):
    for p in params:
        if p.grad is not None:
            all_reduce(p.grad, group).div_(dist.get_world_size(group))


def _check_layer_options(g, ref, tokens) -> float:
    """ColumnParallelLinear(gather_output=True) and RowParallelLinear(input_is_parallel=False), forward and backward."""
    worst = 0.0
    x = ref.embed(tokens).detach()  # [b, s, h], replicated
    options = [lambda: ColumnParallelLinear(ref, ["head.weight"], g.tp_group, gather_output=True),
               lambda: RowParallelLinear(ref, "layers.0.attn.o_proj.weight", g.tp_group, input_is_parallel=False)]
    for make in options:
        layer = make()
        layer_name = layer.weight.ref_parts[0][0]
        full = ref.get_parameter(layer_name)
        x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = layer(x_par), torch.nn.functional.linear(x_ref, full)
        weights = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
        (y * weights).sum().backward()
        (y_ref * weights).sum().backward()
        worst = max(worst, check(f"{layer_name} output", y, y_ref), check(f"{layer_name} input grad", x_par.grad, x_ref.grad))
        expected = expected_shard(layer.weight, ref, g.tp_group, "grad")
        worst = max(worst, check(f"{layer_name} weight grad", layer.weight.grad, expected))
        full.grad = None
    return worst


def _run_model(job: Job, g, ref, opt_ref, tokens, targets) -> dict:
    c, worst = job.model, 0.0
    virtual = [k * job.pp + g.pp_rank for k in range(job.virtual)]  # chunk k = virtual stage k*pp + pp_rank
    chunks = [ParallelTransformer(ref, g.tp_group, stage_layers(c.layers, job.pp * job.virtual, vs), first=vs == 0,
                                  last=vs == job.pp * job.virtual - 1, sequence_parallel=job.sequence_parallel,
                                  recompute=job.recompute) for vs in virtual]
    stage = chunks[0] if job.virtual == 1 else torch.nn.ModuleList(chunks)
    opt = torch.optim.SGD(stage.parameters(), lr=job.lr)
    local = slice(g.dp_rank * job.batch // job.dp, (g.dp_rank + 1) * job.batch // job.dp)
    seq = job.seq // job.tp if job.sequence_parallel else job.seq
    losses = []
    if job.pp == 1 and job.tp > 1:
        worst = _check_layer_options(g, ref, tokens)
        STATS.reset()  # count only the training steps below
    for step in range(job.steps):
        opt_ref.zero_grad()
        loss_ref = ref.loss(tokens, targets)
        loss_ref.backward()
        opt.zero_grad()
        if job.pp == 1:
            loss = stage(tokens[local], targets[local])
            loss.backward()
        else:
            shape = (job.batch // job.dp // job.micro_batches, seq, c.hidden)
            if job.schedule == "interleaved":
                loss = interleaved_step(chunks, g, tokens[local], targets[local], job.micro_batches, shape)
            else:
                loss = pipeline_step(stage, g, tokens[local], targets[local], job.micro_batches, job.schedule, shape)
        if job.sequence_parallel:
            allreduce_sequence_parallel_grads(stage, g.tp_group)
        _dp_average(stage.parameters(), g.dp_group)
        if loss is not None:  # the last stage has it: the mean over this data-parallel shard
            loss = all_reduce(loss.detach().clone(), g.dp_group).div_(job.dp)
            worst = max(worst, check(f"loss at step {step}", loss, loss_ref.detach()))
            losses.append(float(loss))
        for name, p in stage.named_parameters():
            worst = max(worst, check(f"grad of {name} at step {step}", p.grad, expected_shard(p, ref, g.tp_group, "grad")))
        opt_ref.step()
        opt.step()
    for name, p in stage.named_parameters():
        worst = max(worst, check(f"{name} after {job.steps} steps", p, expected_shard(p, ref, g.tp_group)))
    result = {"max_rel_error": worst, "losses": losses, "peak_in_flight": getattr(chunks[0], "peak_in_flight", None),
              "comm_payload_bytes": dict(STATS.payload), "comm_calls": dict(STATS.calls)}
    if job.recompute:  # activation bytes of one block, with and without recomputation
        x = torch.randn(job.batch // job.dp, seq, c.hidden, generator=torch.Generator().manual_seed(g.rank)).to(tokens.device)
        result["activation_bytes"] = measure_recompute(next(iter(chunks[0].layers.values())), x)
    return result


def _run_zero(job: Job, g, ref, opt_ref, tokens, targets) -> dict:
    device = tokens.device
    model, plain = ReferenceModel(job.model).to(device), ReferenceModel(job.model).to(device)  # ZeRO, plain DP
    hyper = dict(lr=job.adam_lr, weight_decay=0.1)
    opt = ZeroAdamW(model.parameters(), g.dp_group, stage=job.zero_stage, **hyper)
    opt_plain = torch.optim.AdamW(plain.parameters(), foreach=False, **hyper)
    local = slice(g.dp_rank * job.batch // job.dp, (g.dp_rank + 1) * job.batch // job.dp)
    worst, losses = 0.0, []
    for step in range(job.steps):
        opt_ref.zero_grad()
        loss_ref = ref.loss(tokens, targets)
        loss_ref.backward()
        opt.zero_grad()
        loss = model.loss(tokens[local], targets[local])
        loss.backward()
        opt_plain.zero_grad()
        plain.loss(tokens[local], targets[local]).backward()
        flat = opt._flat([p.grad for p in plain.parameters()])
        all_reduce(flat, g.dp_group).div_(job.dp)  # plain data parallelism: every rank averages everything
        offset = 0
        for p in plain.parameters():
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        for name, p in plain.named_parameters() if step == 0 else ():  # later: trajectories part (docstring)
            worst = max(worst, check(f"DP-averaged grad of {name} at step {step}", p.grad, ref.get_parameter(name).grad))
        opt.step()
        opt_plain.step()
        opt_ref.step()
        loss = all_reduce(loss.detach().clone(), g.dp_group).div_(job.dp)
        worst = max(worst, check(f"loss at step {step}", loss, loss_ref.detach()))
        losses.append(float(loss))
        if job.zero_stage == 2:  # only the owned slice of the averaged gradient survives
            worst = max(worst, check(f"grad shard at step {step}", opt.grad_shard, flat[opt.lo : opt.lo + opt.shard]))
        for (name, p), p_plain in zip(model.named_parameters(), plain.parameters()):
            worst = max(worst, check(f"{name} after step {step} vs unsharded AdamW", p, p_plain))
    held, plain = opt.state_bytes(), opt.unsharded_bytes()
    padding = (opt.shard * opt.t - opt.numel) * (2 + (job.zero_stage == 2)) * 4
    if held * job.dp != plain + padding:  # the per-rank optimizer bytes fall by the data-parallel size
        raise AssertionError(f"ZeRO-{job.zero_stage}: {held} B per rank x {job.dp} != {plain} B unsharded + {padding} B padding")
    return {"max_rel_error": worst, "losses": losses, "state_bytes": held, "unsharded_bytes": plain}


def run_jobs(rank: int, world_size: int, jobs: list[Job]) -> list[dict]:
    """Worker entry (every rank runs every job in order); returns one result dict per job."""
    results = []
    for job in jobs:
        g = init_groups(job.grid)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        if job.raise_on_rank == rank:
            raise ValueError(f"rank {rank} raises on purpose")
        if job.raise_on_rank is not None:
            dist.all_reduce(torch.zeros(1, device=device))  # would wait (until the timeout) for the rank that raised
        ref = ReferenceModel(job.model).to(device)
        opt_ref = (torch.optim.SGD(ref.parameters(), lr=job.lr) if job.kind == "model" else
                   torch.optim.AdamW(ref.parameters(), lr=job.adam_lr, weight_decay=0.1, foreach=False))
        tokens, targets = (t.to(device) for t in make_batch(job.model, job.batch, job.seq))
        STATS.reset()
        run = _run_model if job.kind == "model" else _run_zero
        result = run(job, g, ref, opt_ref, tokens, targets)
        result.setdefault("comm_payload_bytes", dict(STATS.payload))
        result.setdefault("comm_calls", dict(STATS.calls))
        results.append(result)
    return results


def describe_tp(rank: int, world_size: int, c: ModelConfig, batch: int, seq: int) -> dict:
    """Worker: this rank's shards (name, local shape, reference slice) and the bytes of one forward + backward,
    without ("plain") and with ("sp") sequence parallelism."""
    g = init_groups(Grid(tp=world_size))
    ref = ReferenceModel(c)
    tokens, targets = make_batch(c, batch, seq)
    out = {"shards": []}
    for key, sequence_parallel in (("plain", False), ("sp", True)):
        model = ParallelTransformer(ref, g.tp_group, sequence_parallel=sequence_parallel)
        STATS.reset()
        model(tokens, targets).backward()
        if sequence_parallel:
            allreduce_sequence_parallel_grads(model, g.tp_group)
        out[key] = {"payload": dict(STATS.payload), "wire": dict(STATS.wire), "calls": dict(STATS.calls)}
    x = torch.randn(batch, seq, c.hidden, generator=torch.Generator().manual_seed(g.rank))
    out["recompute"] = measure_recompute(next(iter(model.layers.values())), x[:, : seq // world_size])  # SP block
    for name, p in model.named_parameters():
        for ref_name, dim in p.ref_parts:
            full = ref.get_parameter(ref_name).shape
            size = full[dim] // world_size if dim is not None else None
            where = "replicated" if dim is None else f"dim {dim}: [{rank * size}, {(rank + 1) * size})"
            out["shards"].append({"rank": rank, "local parameter": name, "local shape": tuple(p.shape),
                                  "reference weight": ref_name, "full shape": tuple(full), "slice": where})
    return out


def launch(jobs: list[Job], world_size: int, backend: str = "gloo", timeout_s: float = 60.0,
           join_timeout_s: float = 300.0) -> list[list[dict]]:
    """Validate every job here, then run them all in one spawned world; results[rank][job]."""
    for job in jobs:
        validate_job(job, world_size)
    return spawn(run_jobs, world_size, (list(jobs),), backend, timeout_s, join_timeout_s)


if __name__ == "__main__":
    import os

    jobs = [Job(tp=2), Job(tp=2, sequence_parallel=True, recompute=True), Job(pp=2, schedule="1f1b"),
            Job("zero", dp=2, zero_stage=2)]
    if "RANK" in os.environ:  # torchrun --nproc-per-node 2 -m mlsys_ref.parallel.verify
        from mlsys_ref.parallel.launch import init_distributed

        rank, world = init_distributed(timeout_s=60.0)
        for job in jobs:
            validate_job(job, world)
        results = run_jobs(rank, world, jobs)
        dist.destroy_process_group()
    else:
        results = launch(jobs, 2)[-1]
        rank = 1
    for job, result in zip(jobs, results):
        print(f"rank {rank} {job.kind} tp={job.tp} pp={job.pp} dp={job.dp} sp={job.sequence_parallel} "
              f"zero={job.zero_stage if job.kind == 'zero' else '-'}: max relative error {result['max_rel_error']:.2e}, "
              f"losses {[round(x, 4) for x in result['losses']]}")
