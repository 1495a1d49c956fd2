"""Pipeline parallelism: the model cut into stages, micro-batches, GPipe and 1F1B over send/recv.

Huang et al. 2019, "GPipe", arXiv:1811.06965, §2.2: split the batch into m micro-batches, run all
forwards then all backwards, accumulate gradients, step once. Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", arXiv:2104.04473, §2.2.1
(Figure 4, top; PipeDream-Flush of Narayanan et al. 2020, arXiv:2006.09503): 1F1B, where stage s
runs ``p - s - 1`` warm-up forwards, then alternates one forward and one backward, then drains the
remaining backwards; same bubble as GPipe, (p-1)/(m+p-1), but at most ``p - s`` micro-batches of
activations alive instead of m. The code follows Megatron's
``forward_backward_pipelining_without_interleaving``; each stage is a
``ParallelTransformer`` (so TP x PP is the same code with a bigger TP group), and the micro-batch
loss is divided by m so that the accumulated gradient is the full-batch gradient.

Left out: interleaved (virtual) stages at run time (the simulator has the formula), zero-bubble
schedules, overlapping p2p with compute, activation deallocation tricks, uneven micro-batches.
The one idea to notice: both schedules are *the same* forward/backward/send/recv steps, just
ordered differently; that order alone decides the activation memory (see schedule_sim.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mlsys_ref.parallel.comm import send_recv
from mlsys_ref.parallel.launch import Groups
from mlsys_ref.parallel.reference import ModelConfig

__all__ = ["SCHEDULES", "validate_pipeline", "stage_layers", "pipeline_step"]

SCHEDULES = ("gpipe", "1f1b")


def validate_pipeline(c: ModelConfig, pp: int, batch: int, micro_batches: int, schedule: str = "1f1b") -> None:
    if c.layers < pp:
        raise ValueError(f"layers ({c.layers}) must be at least the number of pipeline stages ({pp})")
    if not isinstance(micro_batches, int) or micro_batches < 1 or batch % micro_batches:
        raise ValueError(f"batch ({batch}) must split into micro_batches ({micro_batches}) equal parts")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def stage_layers(layers: int, pp: int, stage: int) -> range:
    """Contiguous layers of one stage; the first ``layers % pp`` stages take one extra."""
    base, extra = divmod(layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class _Neighbours:
    """Send/receive to the previous and next stage of this rank's pipeline (global ranks)."""

    def __init__(self, groups: Groups, shape, dtype, device):
        s, ranks = groups.pp_rank, groups.pp_ranks
        self.first, self.last = s == 0, s == len(ranks) - 1
        self.prev = None if self.first else ranks[s - 1]
        self.next = None if self.last else ranks[s + 1]
        self.like = torch.empty(shape, dtype=dtype, device=device)  # activation = gradient shape

    def recv_forward(self):
        return None if self.first else send_recv(recv_like=self.like, src=self.prev)

    def send_forward(self, y):
        if not self.last:
            send_recv(send=y, dst=self.next)

    def recv_backward(self):
        return None if self.last else send_recv(recv_like=self.like, src=self.next)

    def send_backward(self, g):
        if not self.first:
            send_recv(send=g, dst=self.prev)

    def send_forward_recv_backward(self, y):
        return None if self.last else send_recv(send=y, dst=self.next, recv_like=self.like, src=self.next)

    def send_backward_recv_forward(self, g):
        return None if self.first else send_recv(send=g, dst=self.prev, recv_like=self.like, src=self.prev)


def pipeline_step(stage, groups: Groups, tokens, targets, micro_batches: int, schedule: str = "1f1b",
                  hidden_shape=None):
    """Forward and backward of one batch through the pipeline; returns the loss on the last stage, else None.

    ``tokens``/``targets`` [b, s] are the whole (data-parallel-local) batch on every stage;
    ``hidden_shape`` is one micro-batch's activation shape, [b/m, s (or s/t with SP), hidden].
    Gradients are accumulated into ``stage``'s parameters; the optimizer step is the caller's.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m = micro_batches
    token_mbs, target_mbs = tokens.chunk(m), targets.chunk(m)
    param = next(stage.parameters())
    io = _Neighbours(groups, hidden_shape, param.dtype, param.device)
    losses, alive, peak = [], [], 0  # alive: (input, output) of micro-batches awaiting backward

    def forward(i, x):
        x = token_mbs[i] if io.first else x.requires_grad_()
        out = stage(x, target_mbs[i])
        if io.last:
            out = out / m  # sum of m micro-batch means = the full-batch mean
            losses.append(out.detach())
        alive.append((x, out))
        return out

    def backward(g):
        nonlocal peak
        peak = max(peak, len(alive))
        x, out = alive.pop(0)  # micro-batches finish backward in the order they entered
        torch.autograd.backward(out, None if io.last else g)
        return None if io.first else x.grad

    if schedule == "gpipe":
        for i in range(m):
            io.send_forward(forward(i, io.recv_forward()).detach())
        for i in range(m):
            io.send_backward(backward(io.recv_backward()))
    else:
        warmup = min(len(groups.pp_ranks) - groups.pp_rank - 1, m)
        for i in range(warmup):
            io.send_forward(forward(i, io.recv_forward()).detach())
        x = io.recv_forward() if warmup < m else None
        for i in range(warmup, m):  # steady state: one forward, one backward
            g = io.send_forward_recv_backward(forward(i, x).detach())
            grad_in = backward(g)
            x = io.send_backward_recv_forward(grad_in) if i < m - 1 else io.send_backward(grad_in)
        for _ in range(warmup):  # cool-down: drain the backwards
            io.send_backward(backward(io.recv_backward()))
    stage.peak_in_flight = peak
    return torch.stack(losses).sum() if io.last else None


if __name__ == "__main__":
    from mlsys_ref.parallel.verify import Job, launch

    for schedule in SCHEDULES:
        job = Job("model", pp=2, schedule=schedule, micro_batches=4, steps=2)
        for rank, result in enumerate(launch([job], 2)):
            print(f"{schedule} rank {rank}: {result[0]}")
