"""Paged decode attention bandwidth vs PyTorch SDPA on a contiguous cache (issue 8, part 7a).

Decode is memory-bound: one query row per sequence reads every cached K and V byte once, so the
unit is TB/s of KV bytes read (B · context · Hkv · D · 2 tensors · 2 bytes / time). The paged
kernel (``mlsys_ref.serving.paged_attention.paged_decode``) reads K/V through shuffled block tables;
SDPA reads the same values from a contiguous ``[B, Hkv, S, D]`` cache, with each backend (flash,
cuDNN, memory-efficient) tried in the same run, GQA native (``enable_gqa``) where the backend takes
it, else K/V expanded to Hq heads (which reads 4x the bytes: reported, but marked). Outputs are
checked against SDPA before anything is timed.

Setup (issue 8): Hq 32, Hkv 8, D 128, bf16, batch 64, block 16, contexts 1k/4k/8k/16k; target: the
paged kernel at >= 0.9x the best SDPA backend. Writes benchmarks/results/<gpu>/serving_kernels.{csv,md,png}.

    python benchmarks/serving_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from mlsys_ref.serving.paged_attention import paged_decode  # noqa: E402
from mlsys_ref.testing import assert_close  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16


def build(batch: int, context: int, block_size: int, device="cuda", dtype=DTYPE):
    """A paged cache with shuffled blocks, its block tables, and the same K/V laid out contiguously."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device, dtype=dtype)

    def contiguous(cache):  # [B, Hkv, S, D]
        gathered = cache[block_tables.long()].flatten(1, 2)[:, :context]  # [B, S, Hkv, D]
        return gathered.transpose(1, 2).contiguous()

    return q, k_cache, v_cache, block_tables, context_lens, contiguous(k_cache), contiguous(v_cache)


def sdpa_variants(q, k, v):
    """(name, callable) for each SDPA backend that accepts this problem, GQA native where possible."""
    q4 = q[:, :, None, :]  # [B, Hq, 1, D]
    group = Q_HEADS // KV_HEADS
    expanded = None
    found = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in ("native", "expanded"):
            if gqa == "expanded" and expanded is None:
                expanded = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

            def call(backend=backend, gqa=gqa):
                with sdpa_kernel(backend):
                    if gqa == "native":
                        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]
                    return F.scaled_dot_product_attention(q4, *expanded)[:, :, 0]

            try:
                call()
                torch.cuda.synchronize()
            except Exception as error:  # this backend does not take this problem: say so, try the next
                print(f"  sdpa {name} ({gqa} GQA) unavailable: {str(error).splitlines()[0][:100]}")
                continue
            found.append((f"sdpa-{name}" + ("" if gqa == "native" else " (GQA expanded)"), call))
            break  # native worked, or expanded is this backend's only way
    return found


def measure(batch: int, context: int, block_size: int, copy_tbps: float, best_sdpa_ms: float | None = None,
            num_splits: int | None = None) -> list[dict]:
    """Rows for the paged kernel and (unless ``best_sdpa_ms`` is given) every SDPA backend."""
    q, k_cache, v_cache, block_tables, context_lens, k, v = build(batch, context, block_size)
    kv_bytes = 2 * k.numel() * k.element_size()  # logical K and V bytes, read once
    paged = lambda: paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits=num_splits)  # noqa: E731
    variants = sdpa_variants(q, k, v) if best_sdpa_ms is None else []
    if best_sdpa_ms is None and not variants:
        raise SystemExit("no SDPA backend ran this problem: nothing to compare against")
    if variants:
        expected, against = variants[0][1](), variants[0][0]
    else:  # the math backend, which always runs, as the check
        with sdpa_kernel(SDPBackend.MATH):
            expected, against = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0], "sdpa-math"
    assert_close(paged(), expected, name=f"paged decode vs {against} (context {context}, block {block_size})")
    rows = []
    label = f"paged triton (block {block_size}" + (f", {num_splits} splits)" if num_splits else ")")
    for name, function in [(label, paged)] + variants:
        median, p20, p80 = common.bench(function)
        tbps = kv_bytes / (median * 1e-3) / 1e12
        rows.append({"impl": name, "batch": batch, "context": context,
                     "block_size": block_size if name.startswith("paged") else "contiguous",
                     "ms": median, "ms_p20": p20, "ms_p80": p80, "kv_TBps": tbps,
                     "pct_of_copy": 100 * tbps / copy_tbps, "vs_best_sdpa": float("nan")})
        print(f"  {name:36s} context {context:6d}: {median:.3f} ms  {tbps:.2f} TB/s ({100 * tbps / copy_tbps:.0f}% of copy)")
    native = [row for row in rows[1:] if "expanded" not in row["impl"]] or rows[1:]
    best = best_sdpa_ms if best_sdpa_ms is not None else min(row["ms"] for row in native)
    rows[0]["vs_best_sdpa"] = best / rows[0]["ms"]
    rows[0]["best_sdpa_ms"] = best
    print(f"  -> paged / best SDPA: {rows[0]['vs_best_sdpa']:.2f}x (target >= 0.9)")
    del q, k_cache, v_cache, k, v
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="context 4k and block 16 only")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    common.require_cuda("benchmarks/serving_kernels.py")
    torch.manual_seed(0)
    copy_tbps = common.measured_copy_tbps()
    sheet = common.datasheet()["hbm_tbps"]
    print(f"{torch.cuda.get_device_name(0)}: measured copy {copy_tbps:.2f} TB/s (datasheet HBM {sheet} TB/s)")
    contexts = [4096] if args.quick else [4096, 1024, 8192, 16384]  # 4k first: the autotuner picks tiles on it
    rows = []
    for context in contexts:
        rows += measure(args.batch, context, 16, copy_tbps)
    if not args.quick:  # the same 4k problem through other block sizes: the kernel's paging granularity
        best_4k = next(row["best_sdpa_ms"] for row in rows if row["context"] == 4096 and "best_sdpa_ms" in row)
        for block_size in (8, 32, 64):
            rows += measure(args.batch, 4096, block_size, copy_tbps, best_sdpa_ms=best_4k)
        for num_splits in (2, 4):  # the flash-decoding split, forced (the default heuristic picks 1 here)
            rows += measure(args.batch, 4096, 16, copy_tbps, best_sdpa_ms=best_4k, num_splits=num_splits)
    for row in rows:
        row.pop("best_sdpa_ms", None)
    notes = (f"Decode attention, Hq {Q_HEADS}, Hkv {KV_HEADS}, D {HEAD_DIM}, bf16, batch {args.batch}; "
             f"kv_TBps = K+V bytes / median time; measured copy bandwidth {copy_tbps:.2f} TB/s "
             f"(read + write); vs_best_sdpa = best native-GQA SDPA time / paged time (target >= 0.9).")
    folder = common.write_results("serving_kernels", rows, notes)
    block16 = [row for row in rows if row["block_size"] in (16, "contiguous") and "splits" not in row["impl"]]
    common.plot(block16, x="context", y="kv_TBps", series="impl", path=folder / "serving_kernels.png",
                title="paged decode vs SDPA (bf16, Hq 32 / Hkv 8, D 128, batch 64)",
                hline=copy_tbps, hline_label="measured copy")
    print(f"wrote {folder}/serving_kernels.{{csv,md,png}}")


if __name__ == "__main__":
    main()
