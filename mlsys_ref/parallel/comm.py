"""Communication for tensor, sequence and pipeline parallelism: counted collectives and Megatron's f/g.

Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053, §3 (Figure 3): the conjugate operators
``f`` (identity forward, all-reduce backward) and ``g`` (all-reduce forward, identity backward)
that bracket a column-then-row parallel pair. Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv:2205.05198, §4.2.2: with sequence parallelism
``g`` becomes a reduce-scatter along the sequence and ``f`` an all-gather (and their backwards swap).
Pipeline point-to-point uses ``batch_isend_irecv`` so that a send and a receive issued together
cannot deadlock on NCCL (Megatron's ``p2p_communication.py``).

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU); nothing is home-made.
Every call is counted in ``STATS``: ``payload`` is the size of the logical tensor (the all-reduced
tensor, the gathered output, the reduce-scattered input, the sent tensor) and ``wire`` the bytes
one rank sends in a ring implementation: 2(t-1)/t·N for all-reduce, (t-1)/t·N for all-gather and
reduce-scatter. Set ``VERBOSE = True`` (or ``MLSYS_VERBOSE_COMM=1``) to print every call with ranks.

Left out: overlapping communication with compute, bucketing, the ``_tensor`` collective variants.
The one idea to notice: an autograd function whose backward is the *conjugate* collective is all a
parallel layer needs; the layers themselves never call ``torch.distributed`` in their backward.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = ["STATS", "CommStats", "all_reduce", "all_gather", "reduce_scatter", "send_recv",
           "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp", "gather_seq", "reduce_scatter_seq"]

VERBOSE = os.environ.get("MLSYS_VERBOSE_COMM", "0") == "1"


class CommStats:
    """Bytes and calls per operation, in this process (reset between measurements)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.payload, self.wire, self.calls = defaultdict(int), defaultdict(float), defaultdict(int)

    def record(self, op: str, tensor: torch.Tensor, size: int, wire_factor: float):
        nbytes = tensor.numel() * tensor.element_size()
        self.payload[op] += nbytes
        self.wire[op] += wire_factor * nbytes
        self.calls[op] += 1
        if VERBOSE and not op.startswith("p2p"):  # send_recv prints its own line, with the peers
            print(f"[rank {dist.get_rank()}] {op} {tuple(tensor.shape)} over {size} ranks ({nbytes} B)", flush=True)

    def total(self, kind: str = "payload") -> float:
        return sum(getattr(self, kind).values())


STATS = CommStats()


def _size(group) -> int:
    return dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM, name: str = "all_reduce") -> torch.Tensor:
    t = _size(group)
    if t == 1:
        return x
    STATS.record(name, x, t, 2 * (t - 1) / t)
    dist.all_reduce(x, op=op, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    t = _size(group)
    if t == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x, group=group)
    out = torch.cat(parts, dim=dim)
    STATS.record("all_gather", out, t, (t - 1) / t)
    return out


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    t = _size(group)
    if t == 1:
        return x
    STATS.record("reduce_scatter", x, t, (t - 1) / t)
    parts = [c.contiguous() for c in x.chunk(t, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    t = _size(group)
    return x if t == 1 else x.chunk(t, dim=dim)[dist.get_rank(group)].contiguous()


# -- Megatron's f and g, and their sequence-parallel versions -----------------------------------
# Each operator is a pair (forward collective, backward collective), the backward being the
# conjugate (the transpose) of the forward: one autograd Function runs any pair.
def _identity(x, group):
    return x


def _sum(x, group):  # all-reduce
    return all_reduce(x.contiguous(), group)


def _gather_last(x, group):
    return all_gather(x, -1, group)


def _split_last(x, group):
    return _split(x, -1, group)


def _gather_seq(x, group):
    return all_gather(x, 1, group)


def _reduce_scatter_seq(x, group):
    return reduce_scatter(x.contiguous(), 1, group)


class _Conjugate(torch.autograd.Function):
    """y = forward_op(x); dx = backward_op(dy): the layers never call a collective in their backward."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.group), None, None, None


def _conjugate(x, group, forward_op, backward_op):
    return x if _size(group) == 1 else _Conjugate.apply(x, group, forward_op, backward_op)


def copy_to_tp(x, group):  # f: identity forward, all-reduce backward
    return _conjugate(x, group, _identity, _sum)


def reduce_from_tp(x, group):  # g: all-reduce forward, identity backward
    return _conjugate(x, group, _sum, _identity)


def gather_from_tp(x, group):  # gather_output: all-gather last dim forward, split backward
    return _conjugate(x, group, _gather_last, _split_last)


def scatter_to_tp(x, group):  # input_is_parallel=False: split last dim forward, all-gather backward
    return _conjugate(x, group, _split_last, _gather_last)


def gather_seq(x, group):  # SP's f: [b, s/t, h] -> [b, s, h]; backward reduce-scatter
    return _conjugate(x, group, _gather_seq, _reduce_scatter_seq)


def reduce_scatter_seq(x, group):  # SP's g: [b, s, h] partial sums -> [b, s/t, h] summed; backward all-gather
    return _conjugate(x, group, _reduce_scatter_seq, _gather_seq)


# -- pipeline point-to-point ----------------------------------------------------------------------
def send_recv(send: torch.Tensor | None = None, dst: int | None = None, recv_like: torch.Tensor | None = None,
              src: int | None = None) -> torch.Tensor | None:
    """Send ``send`` to global rank ``dst`` and/or receive a tensor shaped like ``recv_like`` from ``src``.

    Both directions go in one ``batch_isend_irecv`` and are waited for together: on NCCL a lone
    send followed by a lone receive can deadlock against a neighbour doing the same (1F1B does).
    """
    ops, received = [], None
    if send is not None:
        STATS.record("p2p_send", send, 2, 1.0)
        ops.append(dist.P2POp(dist.isend, send.contiguous(), dst))
    if recv_like is not None:
        received = torch.empty_like(recv_like)
        ops.append(dist.P2POp(dist.irecv, received, src))
    if VERBOSE:
        print(f"[rank {dist.get_rank()}] send -> {dst} {None if send is None else tuple(send.shape)}, "
              f"recv <- {src} {None if recv_like is None else tuple(recv_like.shape)}", flush=True)
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received


def _demo(rank: int, world_size: int) -> str:
    group = dist.group.WORLD
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = reduce_from_tp(copy_to_tp(x, group) * 1.0, group)  # forward: sum over ranks; backward: all-reduce of ones
    y.sum().backward()
    return (f"rank {rank}: g(f(x)) = {y[0, 0].item():.0f} (sum of 1..{world_size}), dx = {x.grad[0, 0].item():.0f}, "
            f"bytes {dict(STATS.payload)}")


if __name__ == "__main__":
    from mlsys_ref.parallel.launch import spawn

    for line in spawn(_demo, 2):
        print(line)
