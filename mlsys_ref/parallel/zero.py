"""ZeRO stages 1 and 2: AdamW whose state (and, in stage 2, gradients) is sharded over data parallel.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
arXiv:1910.02054, §5.1 (P_os, stage 1) and §5.2 (P_os+g, stage 2). All parameters are viewed as
one flat vector of N numbers padded to a multiple of the data-parallel size t; rank r owns the
slice [r*N/t, (r+1)*N/t): it keeps AdamW's m and v only for that slice, updates only that slice,
and all-gathers the updated parameters. Stage 1 all-reduces the full gradient (every rank holds it,
uses 1/t of it); stage 2 reduce-scatters it, so only the owned 1/t of the gradient is kept after
the step starts. Optimizer bytes per rank therefore fall from 8N (fp32 m and v) to 8N/t, plus in
stage 2 the gradient from 4N to 4N/t; ``state_bytes`` counts the tensors actually held.

The update is torch.optim.AdamW's (Loshchilov & Hutter 2019, arXiv:1711.05101, Algorithm 2),
operation for operation, so a ZeRO step equals the unsharded step to fp32 rounding.

Left out: stage 3 (parameter sharding), reducing gradients in buckets during backward (here the
reduce-scatter runs after backward, so the full gradient exists briefly), mixed-precision master
weights, gradient clipping. The one idea to notice: data parallelism replicates the optimizer for
no reason; AdamW is elementwise, so any slicing of the flat vector gives the same update.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mlsys_ref.parallel.comm import all_gather, all_reduce, reduce_scatter

__all__ = ["ZeroAdamW", "adamw_update"]


def adamw_update(param, grad, m, v, step: int, lr, betas, eps, weight_decay) -> None:
    """In place, torch.optim.AdamW's single-tensor update (same operations, same order)."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)


class ZeroAdamW:
    """AdamW over ``params`` with state sharded over ``group`` (the data-parallel group).

    Call ``step()`` after each rank's ``backward()`` on its own data: the step averages the
    gradients over the group (all-reduce in stage 1, reduce-scatter in stage 2), so do not.
    """

    def __init__(self, params, group, stage: int = 1, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is not implemented), got {stage!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad hyper-parameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params is empty")
        self.group, self.stage, self.lr, self.betas, self.eps, self.weight_decay = group, stage, lr, betas, eps, weight_decay
        self.t, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for p in self.params)  # N
        self.shard = math.ceil(self.numel / self.t)  # N/t, padded
        self.lo = self.rank * self.shard  # this rank owns flat[lo : lo + shard]
        like = self.params[0]
        self.m = torch.zeros(self.shard, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.m)
        self.grad_shard = None  # stage 2 keeps only this
        self.step_count = 0

    def _flat(self, tensors) -> torch.Tensor:  # [N] -> padded [t * shard]
        flat = torch.cat([x.reshape(-1) for x in tensors])
        return torch.nn.functional.pad(flat, (0, self.shard * self.t - self.numel))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.grad_shard = None

    @torch.no_grad()
    def step(self) -> None:
        grads = self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        if self.stage == 1:
            g = all_reduce(grads, self.group).div_(self.t)[self.lo : self.lo + self.shard]  # every rank has all of it
        else:
            g = reduce_scatter(grads, 0, self.group).div_(self.t)  # only this rank's slice arrives
            for p in self.params:
                p.grad = None  # the full gradient is not kept
            self.grad_shard = g
        self.step_count += 1
        owned = self._flat([p.detach() for p in self.params])[self.lo : self.lo + self.shard].clone()
        adamw_update(owned, g, self.m, self.v, self.step_count, self.lr, self.betas, self.eps, self.weight_decay)
        flat = all_gather(owned, 0, self.group)[: self.numel]  # every rank gets every updated slice
        offset = 0
        for p in self.params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: m, v and (stage 2) the gradient slice, counted."""
        held = [self.m, self.v] + ([self.grad_shard] if self.grad_shard is not None else [])
        return sum(x.numel() * x.element_size() for x in held)

    def unsharded_bytes(self) -> int:
        """What plain AdamW holds per rank for the same parameters: m and v (+ the gradient in stage 2)."""
        per_element = self.params[0].element_size()
        return (2 + (self.stage == 2)) * self.numel * per_element


if __name__ == "__main__":
    from mlsys_ref.parallel.verify import Job, launch

    for stage in (1, 2):
        result = launch([Job("zero", dp=2, zero_stage=stage, steps=3)], 2)
        print(f"ZeRO-{stage}, dp=2, rank 0: {result[0][0]}")
