"""Megatron tensor parallelism (and sequence parallelism) for the reference Llama-style model.

Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053, §3: the MLP's first weight is split by
columns and the second by rows, so the pair needs one all-reduce forward (``g``) and one backward
(``f``); attention is split by heads (here with grouped-query heads: query *and* KV heads divide by
the TP size); the embedding and the LM head are split along the vocabulary, and the cross-entropy is
computed from vocab-sharded logits with three all-reduces of [tokens] floats (max, target logit,
sum of exponentials) instead of gathering [tokens, vocab]. Korthikanti et al. 2022, arXiv:2205.05198,
§4.2.2: with ``sequence_parallel`` the norms and residuals run on a sequence shard [b, s/t, h],
``f`` becomes an all-gather and ``g`` a reduce-scatter, and the norm weights' gradients are
all-reduced over the TP group (``allreduce_sequence_parallel_grads``). §5: ``recompute`` wraps a
block in activation checkpointing (full recomputation, not the paper's selective variant).

Every parallel parameter is a slice of a reference parameter and remembers which
(``p.ref_parts``: a list of (reference name, split dim), fused along dim 0 when several, as in
Megatron's fused QKV), so ``expected_shard`` checks any weight or gradient against the reference.

Left out: biases, dropout, KV-head replication when TP > kv_heads, fused kernels, selective recompute.
The one idea to notice: no layer calls a collective in its backward; the conjugate f/g pairs do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mlsys_ref.parallel.comm import (all_reduce, copy_to_tp, gather_from_tp, gather_seq, reduce_from_tp,
                                     reduce_scatter_seq, scatter_to_tp)
from mlsys_ref.parallel.reference import ModelConfig, RMSNorm, causal_attention, shard

__all__ = ["validate_tp", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "vocab_parallel_cross_entropy", "TPBlock", "ParallelTransformer", "expected_shard",
           "allreduce_sequence_parallel_grads", "tp_comm_bytes"]


def validate_tp(c: ModelConfig, tp: int, seq: int | None = None, sequence_parallel: bool = False) -> None:
    """Raise ValueError naming the first model dimension that TP (and SP) cannot split evenly."""
    for name in ("heads", "kv_heads", "vocab", "ffn"):
        if getattr(c, name) % tp:
            raise ValueError(f"{name} ({getattr(c, name)}) must be divisible by the tensor-parallel size ({tp})")
    if sequence_parallel and seq is not None and seq % tp:
        raise ValueError(f"with sequence_parallel, seq ({seq}) must be divisible by the tensor-parallel size ({tp})")


def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _parameter(ref: nn.Module, names: list[str], dim: int | None, group) -> nn.Parameter:
    """This rank's slice of one or more reference parameters (concatenated on dim 0)."""
    r, t = _rank_size(group)
    pieces = [shard(ref.get_parameter(n).detach(), dim, r, t) for n in names]
    p = nn.Parameter(torch.cat(pieces, 0).clone() if len(pieces) > 1 else pieces[0].clone())
    p.ref_parts = [(n, dim) for n in names]
    return p


def expected_shard(p: nn.Parameter, ref: nn.Module, group, attr: str = "data") -> torch.Tensor:
    """What ``p`` (or its ``.grad`` with attr='grad') must equal: the same slice of the reference."""
    r, t = _rank_size(group)
    full = [getattr(ref.get_parameter(n), attr) for n, _ in p.ref_parts]
    return torch.cat([shard(f, d, r, t) for f, (_, d) in zip(full, p.ref_parts)], 0)


class ColumnParallelLinear(nn.Module):
    """y_i = x A_i: weight rows (output features) split over ranks. x [.., in] -> [.., out/t] (or [.., out])."""

    def __init__(self, ref, names: list[str], group, gather_output: bool = False, sequence_parallel: bool = False):
        super().__init__()
        if gather_output and len(names) > 1:
            raise ValueError("gather_output needs a single (unfused) weight")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.weight = _parameter(ref, names, 0, group)  # [sum(out_k)/t, in]

    def forward(self, x):
        x = gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)  # f
        y = F.linear(x, self.weight)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum_i x_i B_i: weight columns (input features) split. x [.., in/t] -> [.., out] (summed by g)."""

    def __init__(self, ref, name: str, group, input_is_parallel: bool = True, sequence_parallel: bool = False):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.weight = _parameter(ref, [name], 1, group)  # [out, in/t]

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)  # partial sums on every rank
        return reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)  # g


class VocabParallelEmbedding(nn.Module):
    """Rows [r*V/t, (r+1)*V/t) of the table; tokens outside give 0 and the all-reduce fills them in."""

    def __init__(self, ref, name: str, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _parameter(ref, [name], 0, group)  # [V/t, hidden]
        rank, _ = _rank_size(group)
        self.start, self.end = rank * self.weight.shape[0], (rank + 1) * self.weight.shape[0]

    def forward(self, tokens):  # [b, s] -> [b, s, h] (or [b, s/t, h] with sequence parallelism)
        outside = (tokens < self.start) | (tokens >= self.end)
        out = F.embedding((tokens - self.start).masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group):  # logits [N, V/t] (this rank's vocab slice), targets [N]
        rank, _ = _rank_size(group)
        per_rank = logits.shape[-1]
        logits_max = all_reduce(logits.max(-1).values, group, dist.ReduceOp.MAX, name="ce_all_reduce")
        shifted = logits - logits_max[:, None]  # the global max, so every rank's exp is safe
        local = targets - rank * per_rank
        outside = (local < 0) | (local >= per_rank)
        local = local.masked_fill(outside, 0)
        rows = torch.arange(len(targets), device=logits.device)
        target_logit = shifted[rows, local].masked_fill(outside, 0.0)
        target_logit = all_reduce(target_logit, group, name="ce_all_reduce")
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(-1), group, name="ce_all_reduce")  # [N]
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, outside)
        return sum_exp.log() - target_logit  # per-token loss [N]

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        rows = torch.arange(len(local), device=softmax.device)
        grad_logits = softmax.clone()
        grad_logits[rows, local] -= (~outside).to(softmax.dtype)
        return grad_logits * grad[:, None], None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """Per-token cross-entropy [N] from vocab-sharded logits [N, V/t]; never builds [N, V]."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V/t] and targets [N], got {tuple(logits.shape)}, {tuple(targets.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, targets, group)


class TPBlock(nn.Module):
    """One Llama block, tensor parallel: attention split by (query and KV) heads, MLP column then row."""

    def __init__(self, ref, layer: int, group, sequence_parallel: bool = False, recompute: bool = False):
        super().__init__()
        c: ModelConfig = ref.c
        _, t = _rank_size(group)
        validate_tp(c, t)
        self.c, self.recompute, pre = c, recompute, f"layers.{layer}."
        self.attn_norm, self.mlp_norm = RMSNorm(c.hidden, c.eps), RMSNorm(c.hidden, c.eps)
        for norm in ("attn_norm", "mlp_norm"):  # replicated; partial grads under SP (one sequence shard)
            getattr(self, norm).weight = _parameter(ref, [pre + norm + ".weight"], None, group)
            getattr(self, norm).weight.sequence_parallel = sequence_parallel
        sp = dict(sequence_parallel=sequence_parallel)
        self.qkv = ColumnParallelLinear(ref, [pre + f"attn.{n}_proj.weight" for n in "qkv"], group, **sp)
        self.o_proj = RowParallelLinear(ref, pre + "attn.o_proj.weight", group, **sp)
        self.gate_up = ColumnParallelLinear(ref, [pre + f"mlp.{n}_proj.weight" for n in ("gate", "up")], group, **sp)
        self.down_proj = RowParallelLinear(ref, pre + "mlp.down_proj.weight", group, **sp)
        self.q_width, self.kv_width = c.heads // t * c.head_dim, c.kv_heads // t * c.head_dim

    def _attention(self, x):  # [b, s(/t), h] -> [b, s(/t), h]
        qkv = self.qkv(x)  # [b, s, (Hq + 2 Hkv)/t * d]: this rank's heads, full sequence
        b, s, d = qkv.shape[0], qkv.shape[1], self.c.head_dim
        q, k, v = (y.view(b, s, -1, d).transpose(1, 2) for y in qkv.split([self.q_width, self.kv_width, self.kv_width], -1))
        return self.o_proj(causal_attention(q, k, v, self.c.rope_base))

    def _mlp(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [b, s, ffn/t] each
        return self.down_proj(F.silu(gate) * up)

    def _forward(self, x):
        x = x + self._attention(self.attn_norm(x))
        return x + self._mlp(self.mlp_norm(x))

    def forward(self, x):
        if self.recompute and torch.is_grad_enabled():  # keep only x; rerun the block (and its f/g) in backward
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ParallelTransformer(nn.Module):
    """Layers ``layers`` of the reference, tensor parallel over ``group``; embedding if ``first``, head+loss if ``last``.

    With first and last and every layer it is the whole model (tensor parallel only); a pipeline
    stage is a slice. A TP group of one rank makes it a plain copy of those layers.
    """

    def __init__(self, ref, group, layers=None, first: bool = True, last: bool = True,
                 sequence_parallel: bool = False, recompute: bool = False):
        super().__init__()
        layers = range(ref.c.layers) if layers is None else layers
        self.group, self.first, self.last, self.sp = group, first, last, sequence_parallel
        self.embed = VocabParallelEmbedding(ref, "embed.weight", group, sequence_parallel) if first else None
        self.layers = nn.ModuleDict({str(i): TPBlock(ref, i, group, sequence_parallel, recompute) for i in layers})
        if last:
            self.norm = RMSNorm(ref.c.hidden, ref.c.eps)
            self.norm.weight = _parameter(ref, ["norm.weight"], None, group)
            self.norm.weight.sequence_parallel = sequence_parallel
            self.head = ColumnParallelLinear(ref, ["head.weight"], group, sequence_parallel=sequence_parallel)

    def forward(self, x, targets=None):
        """tokens [b, s] (first stage) or hidden [b, s(/t), h] -> hidden, or the mean loss (last stage)."""
        if self.first:
            x = self.embed(x)
        for block in self.layers.values():
            x = block(x)
        if not self.last:
            return x
        logits = self.head(self.norm(x))  # [b, s, V/t]: vocab-sharded, never gathered
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.group).mean()


def allreduce_sequence_parallel_grads(model: nn.Module, group) -> None:
    """Under SP each rank saw one sequence shard, so replicated weights hold partial grads: sum them."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            all_reduce(p.grad, group, name="sp_grad_all_reduce")


def tp_comm_bytes(c: ModelConfig, tokens: int, tp: int, sequence_parallel: bool = False, recompute: bool = False,
                  element_size: int = 4) -> dict[str, int]:
    """Payload bytes one rank's collectives move in one forward + backward of ``ParallelTransformer`` (comm.STATS names).

    Per layer and token: 2 all-reduces of h values forward (after o_proj, after down_proj: ``g``) and
    2 backward (``f`` before qkv and gate_up), i.e. 4·h·element_size bytes; with sequence parallelism
    each all-reduce becomes an all-gather plus a reduce-scatter of the same payload. Recomputation
    reruns the forward ones, except the last ``g`` of each block: torch's checkpoint stops
    recomputing once it has every tensor backward needs, and nothing saves the MLP's output.
    Plus the embedding (forward) and the head (backward), 3 floats per token for the
    cross-entropy, and under SP the norm weights' gradient all-reduce.
    """
    if tp == 1:
        return {}
    activation = tokens * c.hidden * element_size  # one [tokens, hidden] tensor
    L, r = c.layers, int(recompute)
    out = {"ce_all_reduce": 3 * tokens * element_size}
    if sequence_parallel:  # all-gathers: f forward, g backward, f recomputed; reduce-scatters: the conjugates
        out["all_gather"] = ((4 + 2 * r) * L + 2) * activation
        out["reduce_scatter"] = ((4 + r) * L + 2) * activation
        out["sp_grad_all_reduce"] = (2 * L + 1) * c.hidden * element_size
    else:  # g forward (2 per block + embedding), f backward (2 per block + head), g recomputed
        out["all_reduce"] = ((4 + r) * L + 2) * activation
    return out


if __name__ == "__main__":
    from mlsys_ref.parallel.verify import Job, launch

    jobs = [Job(tp=2, steps=2), Job(tp=2, sequence_parallel=True, steps=2)]
    for job, result in zip(jobs, launch(jobs, 2)[0]):
        print(f"TP=2 sequence_parallel={job.sequence_parallel}: losses, every gradient and parameter vs the reference, "
              f"max relative error {result['max_rel_error']:.2e}; bytes {result['comm_payload_bytes']}")
