"""What the Triton attention launchers share: autotune configs that fit in shared memory, and input checks.

Used by flash_triton (forward), flash_triton_backward (dK/dV, dQ) and flash_decoding (split-KV). Dao 2023,
"FlashAttention-2" (arXiv 2307.08691) §3.3: block sizes are chosen so that the tiles fit in SRAM, and a
bigger head dim needs smaller blocks; here a pruner drops the configs whose tiles would not fit in shared
memory, or (backward) whose fp32 accumulators would spill registers.

Left out on purpose: a cost model; the autotuner times the few configs that fit and keeps the fastest.

The one idea: shared memory per SM bounds (rows held for the whole loop + rows in flight) · head_dim · bytes.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import check_kernel_device, is_interpreter, triton


def _configs(pass_name: str) -> list:
    """Block sizes: ONE small config under the interpreter (autotuning there would multiply its slow
    runtime); a small autotune set on the GPU, pruned by head dim so that tiles fit in SRAM."""
    if is_interpreter():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    table = {  # (BLOCK_M, BLOCK_N, warps, stages), best first; the last one fits any head dim
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        # backward, measured on an H100 (triton 3.6, bf16, seq 2k-16k): dK/dV 64x64 w4 s4 best at d64, 64x128 w8 s4
        # at d128 (32x64 at 2k); dQ 128x64 w8 s4 (64x128 w4 s3 at d64 causal)
        "dkdv": [(64, 64, 4, 4), (64, 128, 8, 4), (32, 64, 4, 3), (32, 64, 8, 2), (16, 32, 4, 2)],
        "dq": [(128, 64, 8, 4), (64, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 16, 4, 2)],
    }[pass_name]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


_SMEM_BUDGET = 200 * 1024  # bytes of tiles; an H100 SM has 228 KB of shared memory


_ACC_REGISTERS = 128  # fp32 accumulator values per thread; an H100 thread has 255 registers for everything


def _keep_fitting(configs, named_args, kwargs, rows, keep: int, acc_rows=None) -> list:
    """Drop configs whose tiles overflow shared memory (head_dim 256, fp32) or whose accumulators (``acc_rows``
    rows of head_dim fp32 values, spread over the threads) would spill registers; keep the first ``keep`` of
    the rest, and always keep one. ``rows(config)``: (rows held all loop, rows streamed per pipeline stage)."""
    if len(configs) <= 1:
        return configs
    q = named_args.get("Q", kwargs.get("Q"))
    block_d = kwargs.get("BLOCK_D", 128)
    row_bytes = block_d * (q.element_size() if hasattr(q, "element_size") else 2)

    def tile_bytes(config):
        resident, streamed = rows(config)
        return (resident + (config.num_stages - 1) * streamed) * row_bytes  # rows held all loop + rows in flight

    def acc_registers(config):
        return acc_rows(config) * block_d // (32 * config.num_warps) if acc_rows else 0

    fitting = [c for c in configs if tile_bytes(c) <= _SMEM_BUDGET and acc_registers(c) <= _ACC_REGISTERS]
    return fitting[:keep] or configs[-1:]


def _pruner(pass_name: str):
    keep = {"fwd": 3, "dkdv": 3, "dq": 2}[pass_name]  # each config costs seconds of compile time on the first call

    def rows(config):
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        # the backward's dots are all wgmma, whose pipelining keeps num_stages buffers (not num_stages - 1): one more
        return {"fwd": (m, 2 * n), "dkdv": (2 * n + 2 * m, 2 * m), "dq": (2 * m + 2 * n, 2 * n)}[pass_name]

    def acc_rows(config):  # fp32 accumulator rows: dK and dV (BLOCK_N each), dQ (BLOCK_M); the forward's are not pruned
        return {"fwd": 0, "dkdv": 2 * config.kwargs["BLOCK_N"], "dq": config.kwargs["BLOCK_M"]}[pass_name]

    return lambda configs, named_args, **kwargs: _keep_fitting(configs, named_args, kwargs, rows, keep, acc_rows)


_AUTOTUNE_KEY = ["BLOCK_D", "CAUSAL", "HAS_WINDOW", "bucket_q", "bucket_k"]


def _check_tensors(named: tuple, rank: int, dtypes: tuple) -> None:
    """Every ``(name, x)`` is a tensor of rank ``rank`` with the first one's dtype (one of ``dtypes``) and
    device, and that device is one the kernels run on. Shared by every Triton attention entry point."""
    first, q = named[0]
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != rank:
            layout = "[batch, heads, seq, head_dim]" if rank == 4 else "[total_tokens, heads, head_dim]"
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} dtype must be one of {dtypes}, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first} has {q.dtype}: all must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but {first} is on {q.device}")
    check_kernel_device(q, first)


def _check_heads(head_dim: int, q_heads: int, kv_heads: int, kv_name: str) -> None:
    """Head dims the kernels pad to a power of two (16..256), and GQA/MQA head counts."""
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in 16..256 (e.g. 32, 64, 80, 96, 128, 256), got {head_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"q's {q_heads} heads must be a multiple of {kv_name}'s {kv_heads} heads (GQA/MQA)")


if __name__ == "__main__":
    q = torch.empty(1, dtype=torch.float16)
    where = "the Triton interpreter: one config" if is_interpreter() else "the GPU"
    print(f"autotune configs kept for fp16 on {where} (BLOCK_M x BLOCK_N, pipeline stages)")
    for head_dim in (64, 128, 256):
        for pass_name in ("fwd", "dkdv", "dq"):
            kept = _pruner(pass_name)(_configs(pass_name), {"Q": q}, BLOCK_D=head_dim)
            shapes = ", ".join(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} s{c.num_stages}" for c in kept)
            print(f"  head_dim {head_dim:3d} {pass_name:4s}: {shapes}")
