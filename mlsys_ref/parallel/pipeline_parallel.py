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

Interleaved 1F1B (§2.2.2, v model chunks per stage) is ``interleaved_step``: it replays the
simulator's timeline instead of Megatron's hand-matched communication (see its docstring).

Left out: zero-bubble schedules, overlapping p2p with compute, activation deallocation tricks, uneven micro-batches.
The one idea to notice: both schedules are *the same* forward/backward/send/recv steps, just
ordered differently; that order alone decides the activation memory (see schedule_sim.py).
"""

from __future__ import annotations

import torch

from mlsys_ref.parallel.comm import send_recv
from mlsys_ref.parallel.launch import Groups
from mlsys_ref.parallel.reference import ModelConfig

__all__ = ["SCHEDULES", "validate_pipeline", "stage_layers", "pipeline_step", "interleaved_step"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def validate_pipeline(c: ModelConfig, pp: int, batch: int, micro_batches: int, schedule: str = "1f1b",
                      virtual: int = 1) -> None:
    if c.layers < pp * virtual:
        raise ValueError(f"layers ({c.layers}) must be at least the number of pipeline stages ({pp}"
                         f"{f' x {virtual} chunks' if virtual > 1 else ''})")
    if schedule == "interleaved" and (pp < 2 or micro_batches % pp):
        raise ValueError(f"interleaved needs pp >= 2 and micro_batches ({micro_batches}) a multiple of pp ({pp})")
    if schedule != "interleaved" and virtual != 1:
        raise ValueError(f"virtual ({virtual}) chunks per stage need schedule='interleaved'")
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
                  hidden_shape=None, record=None):
    """Forward and backward of one batch through the pipeline; returns the loss on the last stage, else None.

    ``tokens``/``targets`` [b, s] are the whole (data-parallel-local) batch on every stage;
    ``hidden_shape`` is one micro-batch's activation shape, [b/m, s (or s/t with SP), hidden].
    Gradients are accumulated into ``stage``'s parameters; the optimizer step is the caller's.
    ``record(kind, micro_batch, edge)``, if given, is called with ("F" or "B", j, "start" or "end")
    around each forward and backward computation (the benchmark records CUDA events there).
    """
    if schedule not in SCHEDULES[:2]:
        raise ValueError(f"schedule must be one of {SCHEDULES[:2]} (interleaved: interleaved_step), got {schedule!r}")
    m = micro_batches
    token_mbs, target_mbs = tokens.chunk(m), targets.chunk(m)
    param = next(stage.parameters())
    io = _Neighbours(groups, hidden_shape, param.dtype, param.device)
    losses, alive, peak = [], [], 0  # alive: (input, output, micro-batch) of micro-batches awaiting backward
    record = record or (lambda kind, j, edge: None)

    def forward(i, x):
        x = token_mbs[i] if io.first else x.requires_grad_()
        record("F", i, "start")
        out = stage(x, target_mbs[i])
        if io.last:
            out = out / m  # sum of m micro-batch means = the full-batch mean
            losses.append(out.detach())
        record("F", i, "end")
        alive.append((x, out, i))
        return out

    def backward(g):
        nonlocal peak
        peak = max(peak, len(alive))
        x, out, i = alive.pop(0)  # micro-batches finish backward in the order they entered
        record("B", i, "start")
        torch.autograd.backward(out, None if io.last else g)
        record("B", i, "end")
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


def interleaved_step(chunks, groups: Groups, tokens, targets, micro_batches: int, hidden_shape):
    """Interleaved 1F1B (Megatron-LM §2.2.2): stage s holds v chunks, chunk c being virtual stage c*p + s.

    Rather than Megatron's hand-matched send/recv pairs, every rank replays the simulator's timeline
    (schedule_sim, uniform times): its own operations in order, and every message it sends or
    receives as one blocking exchange, all sorted by one global key (time the message is produced,
    then sender). Every rank sees its messages in the order of that one global sequence, so the
    earliest pending message always has both ends ready: no deadlock on gloo or NCCL.
    Returns the loss on the rank that holds the last virtual stage, else None.
    """
    from mlsys_ref.parallel.schedule_sim import simulate

    p, s, v, m = len(groups.pp_ranks), groups.pp_rank, len(chunks), micro_batches
    last_virtual = p * v - 1
    param = next(chunks[0].parameters())
    like = torch.empty(hidden_shape, dtype=param.dtype, device=param.device)
    token_mbs, target_mbs = tokens.chunk(m), targets.chunk(m)
    events = []
    for op in simulate("interleaved", p, m, v=v).ops:
        virtual = op.chunk * p + op.stage
        if op.stage == s:
            events.append((op.start, 1, op.stage, op, None))  # compute, after messages of the same instant
        if (op.kind == "F" and virtual < last_virtual) or (op.kind == "B" and virtual > 0):
            to_virtual = virtual + 1 if op.kind == "F" else virtual - 1
            if s in (op.stage, to_virtual % p):
                events.append((op.end, 0, op.stage, op, to_virtual))
    events.sort(key=lambda e: (e[0], e[1], e[2], e[3].kind, e[3].micro_batch, e[3].chunk))
    outbox, inbox, alive, losses, peak = {}, {}, {}, [], 0
    for _, is_compute, _, op, to_virtual in events:
        key = (op.kind, op.chunk, op.micro_batch)
        virtual = op.chunk * p + op.stage
        if not is_compute:  # the message that op produced, from op.stage to virtual stage to_virtual
            to_stage, to_chunk = to_virtual % p, to_virtual // p
            if op.stage == s:
                send_recv(send=outbox.pop(key), dst=groups.pp_ranks[to_stage])
            else:
                inbox[(op.kind, to_chunk, op.micro_batch)] = send_recv(recv_like=like, src=groups.pp_ranks[op.stage])
        elif op.kind == "F":
            x = token_mbs[op.micro_batch] if virtual == 0 else inbox.pop(key).requires_grad_()
            out = chunks[op.chunk](x, target_mbs[op.micro_batch])
            if virtual == last_virtual:
                out = out / m
                losses.append(out.detach())
            else:
                outbox[key] = out.detach()
            alive[(op.chunk, op.micro_batch)] = (x, out)
            peak = max(peak, len(alive))
        else:
            x, out = alive.pop((op.chunk, op.micro_batch))
            torch.autograd.backward(out, None if virtual == last_virtual else inbox.pop(key))
            if virtual > 0:
                outbox[key] = x.grad
    chunks[0].peak_in_flight = peak
    return torch.stack(losses).sum() if losses else None


if __name__ == "__main__":
    from mlsys_ref.parallel.verify import Job, launch

    for schedule in SCHEDULES:
        job = Job("model", pp=2, schedule=schedule, micro_batches=4, steps=2, virtual=2 if schedule == "interleaved" else 1)
        for rank, result in enumerate(launch([job], 2)):
            print(f"{schedule} rank {rank}: {result[0]}")
