"""Launch N local processes on torch.distributed and build Megatron's TP x PP x DP process groups.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", arXiv:2104.04473, §3 (the 3-D grid) and Megatron's ``parallel_state.py``: ranks are
laid out tensor-parallel fastest, then data-parallel, then pipeline-parallel, i.e.
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``, so a tensor-parallel group is a block of
neighbouring ranks (on one node, on NVLink) and the pipeline crosses the slowest links.

``spawn(fn, world_size)`` starts ``world_size`` processes (gloo on CPU, NCCL on GPUs), each with
``init_process_group(timeout=...)``; a rank that raises makes ``spawn`` terminate the others and
raise at once with that rank's traceback, and the whole run is joined with a deadline, so a test
fails quickly instead of hanging. Under ``torchrun`` call ``init_distributed()`` instead.

Left out: multi-node launch, context/expert parallel groups, virtual pipeline ranks.
The one idea to notice: the grid is checked *before* any process group exists, so a bad
configuration is a plain ValueError in the parent, not a hang in N children.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Grid", "Groups", "validate_grid", "init_groups", "init_distributed", "free_port", "spawn"]


@dataclass(frozen=True)
class Grid:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank, Megatron order."""
        return rank // (self.tp * self.dp), rank // self.tp % self.dp, rank % self.tp

    def rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every tensor-, data- and pipeline-parallel group as lists of global ranks."""
        r = range
        return {
            "tp": [[self.rank(p, d, t) for t in r(self.tp)] for p in r(self.pp) for d in r(self.dp)],
            "dp": [[self.rank(p, d, t) for d in r(self.dp)] for p in r(self.pp) for t in r(self.tp)],
            "pp": [[self.rank(p, d, t) for p in r(self.pp)] for d in r(self.dp) for t in r(self.tp)],
        }


def validate_grid(world_size: int, grid: Grid) -> None:
    for name in ("tp", "pp", "dp"):
        value = getattr(grid, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"grid.{name} must be a positive int, got {value!r}")
    if grid.world != world_size:
        raise ValueError(f"world size {world_size} does not match the grid tp*pp*dp = "
                         f"{grid.tp}*{grid.pp}*{grid.dp} = {grid.world}")


@dataclass
class Groups:
    """This rank's place in the grid and the process groups it belongs to."""

    grid: Grid
    rank: int
    tp_group: object
    dp_group: object
    pp_group: object
    pp_ranks: list[int]  # global ranks of this rank's pipeline, stage order

    @property
    def tp_rank(self) -> int:
        return self.grid.coordinates(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.grid.coordinates(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.grid.coordinates(self.rank)[0]


def init_groups(grid: Grid, timeout_s: float = 60.0) -> Groups:
    """Create every group of the grid (all ranks must call this, in the same order)."""
    validate_grid(dist.get_world_size(), grid)
    rank, timeout = dist.get_rank(), datetime.timedelta(seconds=timeout_s)
    mine = {}
    for kind, groups in grid.all_groups().items():
        for ranks in groups:  # new_group is collective: every rank creates every group
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = (group, ranks)
    return Groups(grid, rank, mine["tp"][0], mine["dp"][0], mine["pp"][0], mine["pp"][1])


def init_distributed(backend: str | None = None, timeout_s: float = 60.0, rank: int | None = None,
                     world_size: int | None = None, port: int | None = None) -> tuple[int, int]:
    """init_process_group from arguments, or from torchrun's RANK/WORLD_SIZE/MASTER_* variables."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # the GPU machines need NVLink multicast off
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    init = "env://" if port is None else f"tcp://127.0.0.1:{port}"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    # Touch the world group once so that NCCL's communicator exists before any batched p2p.
    probe = torch.zeros(1, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(probe)
    return rank, world_size


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, backend, timeout_s, args, results):
    try:
        torch.set_num_threads(1)  # N ranks share the machine's cores
        init_distributed(backend, timeout_s, rank, world_size, port)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 60.0,
          join_timeout_s: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return their results.

    ``fn`` must be importable (module level) and return something picklable and small.
    Raises RuntimeError as soon as one rank raises, or when ``join_timeout_s`` passes.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl with {world_size} ranks needs {world_size} GPUs, found {torch.cuda.device_count()}")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    context = torch.multiprocessing.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [context.Process(target=_worker, daemon=True,
                                 args=(fn, rank, world_size, port, backend, timeout_s, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outputs, deadline = {}, time.monotonic() + join_timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {processes[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"spawn timed out after {join_timeout_s:.0f}s; ranks done: {sorted(outputs)}")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} raised:\n{payload}")
            outputs[rank] = payload
    finally:
        for process in processes:
            process.join(timeout=max(0.1, min(2.0, deadline - time.monotonic())))  # results are in: don't wait long
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
    return [outputs[rank] for rank in range(world_size)]


def _demo(rank: int, world_size: int) -> str:
    groups = init_groups(Grid(tp=2, pp=world_size // 2, dp=1))
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=groups.tp_group)
    return f"rank {rank}: (pp, dp, tp) = {groups.grid.coordinates(rank)}, pipeline {groups.pp_ranks}, tp sum {x.item():.0f}"


if __name__ == "__main__":
    if "RANK" in os.environ:  # torchrun --nproc-per-node 2 -m mlsys_ref.parallel.launch
        r, w = init_distributed()
        print(_demo(r, w))
        dist.destroy_process_group()
    else:
        print("Megatron order for tp=2, pp=2, dp=2:", Grid(2, 2, 2).all_groups())
        for line in spawn(_demo, 2):
            print(line)
