"""Quantized matmul kernels (W4A16, W8A16, W8A8) against cuBLAS bf16, and decode tokens/s of a ~1B model.

    python benchmarks/quant.py [--quick]

1. Kernel latency for M in {1, 16, 64, 256} x (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)}:
   microseconds (median, p20, p80), effective weight bandwidth (bytes of the quantized weight --
   codes + scales -- per second), its percent of the device-to-device copy bandwidth measured in this
   run, and the speed-up over ``torch.nn.functional.linear`` in bf16 (cuBLAS), measured in the same run.
   W4A16 runs from three storage orders of the same codes: row-major ("W4A16 g128", as QuantizedLinear stores
   them: at M = 1 the tuner's pick of the FMA GEMV and the tensor-core GEMV of ``qmatmul_gemv_tc``, the
   row-major GEMM above), tensor-core fragment order ("W4A16 g128 fragment", ``pack_int4_mma``: what
   QuantizedLinear runs for 2 <= M <= 64) and, at M = 1, the tensor-core GEMV's slab order ("W4A16 g128 slabs",
   ``pack_gemv_slabs``: what QuantizedLinear runs at M = 1 on the GPU; ", chained": the same calls inside
   ``chained_gemvs()``, so that on Hopper each GEMV starts while the one before it finishes, as the GEMVs of a
   decode step that follow one another do -- q, k, v and gate, up below; the bandwidth floor is judged there,
   the speed-ups over cuBLAS on the lone calls).
   Each kernel's output is checked against dequantize-then-matmul before it is timed.
   Timing: one CUDA graph replays the op over enough *copies* of the weight to overflow the 50 MB L2
   (a 8 MB int4 weight would otherwise be read from L2), so launch overhead and L2 hits hide nothing.
   At M = 1 the int4 codes are also streamed by a kernel with no arithmetic ("int4 codes, read only"): what
   any kernel reading that many bytes pays in this harness (launch, HBM ramp, tail), beside the copy bandwidth.
2. Decode tokens/s at batch 1 for a Llama-3.2-1B-shaped stack (16 layers, d 2048, FFN 8192, 32/8
   heads, vocab 128256; random weights; context 512) in bf16, W8A16 (per channel) and W4A16 (g128),
   one decode step captured in a CUDA graph; q, k, v and gate, up run in ``chained_gemvs()`` (a last row
   without, for the difference). The LM head stays bf16 in every variant (as GPTQ leaves it) and RoPE is left
   out (elementwise on one token): both are the same work in every row.

Writes benchmarks/results/<gpu>/quant.{csv,md,png} and quant_decode.{csv,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from mlsys_ref.quant import qmatmul_dispatch, qmatmul_gemv_tc  # noqa: E402
from mlsys_ref.quant.linear import QuantizedLinear  # noqa: E402
from mlsys_ref.quant.qmatmul import pack_int4_mma, quant_matmul, quant_matmul_eager, quant_matmul_reference  # noqa: E402
from mlsys_ref.quant.qmatmul_chain import chained_gemvs  # noqa: E402
from mlsys_ref.quant.qmatmul_gemv_tc import pack_gemv_slabs, tc_gemv_applies  # noqa: E402
from mlsys_ref.quant.qmatmul_tune import tuned_configs  # noqa: E402
from mlsys_ref.quant.qmatmul_w8a8 import (quantize_per_token, rms_norm, rms_norm_quantize_per_token, w8a8_linear,  # noqa: E402
                                          w8a8_linear_reference, w8a8_matmul)
from mlsys_ref.backend import tl, triton  # noqa: E402
from mlsys_ref.testing import assert_close, max_error  # noqa: E402

DEVICE = "cuda"  # a CPU dry run of this script sets "cpu" (tests nothing about speed)
L2_FLUSH_BYTES = 256 << 20  # copies of the weight so that one graph replay reads this many bytes
FAILURES: list[str] = []  # correctness checks that failed (the script exits non-zero)


def graph_time_us(op, copies: int, chained: bool = False) -> tuple[float, float, float]:
    """Per-call (median, p20, p80) microseconds of op(i) for i over the copies, replayed as one CUDA graph;
    ``chained``: the calls inside one ``chained_gemvs()`` block (each GEMV may start while the one before ends)."""
    around = chained_gemvs if chained else contextlib.nullcontext
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), around():  # warm-up (compiles, autotunes) outside the capture
        for i in range(copies):
            op(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), around():
        for i in range(copies):
            op(i)
    median, p20, p80 = common.bench(graph.replay)
    del graph
    return tuple(1e3 * t / copies for t in (median, p20, p80))


READ = "int4 codes, read only"  # the ceiling row: the W4A16 codes streamed with no arithmetic
SLABS = "W4A16 g128 slabs"  # the tensor-core GEMV from its slab order (pack_gemv_slabs), QuantizedLinear's M = 1 path
CHAINED = "W4A16 g128 slabs, chained"  # the same, GEMVs back to back in chained_gemvs(): the bandwidth row


@triton.jit
def _stream_read_kernel(words_ptr, out_ptr, n_words, words_per_program, BLOCK: tl.constexpr):
    """XOR of one contiguous run of words: a read of the weight with no arithmetic, so its time is what any
    kernel that streams this many bytes pays in this harness (launch, the HBM ramp, the tail)."""
    start = tl.program_id(0) * words_per_program
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(start, start + words_per_program, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc ^= tl.load(words_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def stream_read(codes: torch.Tensor) -> torch.Tensor:
    """Read ``codes`` once, contiguously, about 8 programs an SM of 8192 words a step (the fastest of a sweep
    of 132-1056 programs and 2048-8192 words a step on the H100: 72-73% of copy at 22.5 MB, quant_notes.md)."""
    words = codes.view(torch.int32).view(-1)
    block = 8192
    sms = torch.cuda.get_device_properties(codes.device).multi_processor_count
    per_program = triton.cdiv(triton.cdiv(words.numel(), 8 * sms), block) * block
    out = torch.empty(triton.cdiv(words.numel(), per_program), dtype=torch.int32, device=codes.device)
    _stream_read_kernel[(out.numel(),)](words, out, words.numel(), per_program, BLOCK=block, num_warps=8)
    return out


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_weight_only(y: torch.Tensor, x: torch.Tensor, q: QuantizedLinear, name: str) -> None:
    """Within the bf16 table of the fp64 reference, or within 2x of PyTorch eager's own error (Ŵ in bf16)."""
    args = (q.qweight, q.scales, q.zeros)
    ref = quant_matmul_reference(x.double(), *args, bits=q.bits)
    try:
        assert_close(y, ref, torch.bfloat16, name=name)
    except AssertionError:
        error, eager = max_error(y, ref), max_error(quant_matmul_eager(x, *args, bits=q.bits), ref)
        if not error <= 2 * eager:
            raise AssertionError(f"{name}: error {error:.3g} vs fp64 > 2x PyTorch eager's {eager:.3g}") from None


def kernel_rows(N: int, K: int, Ms: list[int], copy_tbps: float) -> list[dict]:
    linear = nn.Linear(K, N, bias=False, device=DEVICE, dtype=torch.float32)
    nn.init.normal_(linear.weight, std=0.02)
    w4 = QuantizedLinear.from_linear(linear, 4, 128, symmetric=True, scale_dtype=torch.bfloat16)  # GPTQ-style g128
    w8 = QuantizedLinear.from_linear(linear, 8, None, symmetric=True, scale_dtype=torch.bfloat16)  # per channel
    W = linear.weight.detach().to(torch.bfloat16)
    w4_mma = pack_int4_mma(w4.qweight)  # the same codes in tensor-core fragment order (qmatmul_mma)
    w4_slabs = pack_gemv_slabs(w4.qweight)  # ... and in the tensor-core GEMV's slab order (M = 1)
    del linear
    formats = {  # name: (tensors of one weight copy, bytes read per call)
        "bf16 cuBLAS": ((W,), nbytes(W)),
        "W8A16": ((w8.qweight, w8.scales), nbytes(w8.qweight, w8.scales)),
        "W4A16 g128": ((w4.qweight, w4.scales), nbytes(w4.qweight, w4.scales)),
        "W4A16 g128 fragment": ((w4_mma, w4.scales), nbytes(w4_mma, w4.scales)),
        SLABS: ((w4_slabs, w4.scales), nbytes(w4_slabs, w4.scales)),
        CHAINED: ((w4_slabs, w4.scales), nbytes(w4_slabs, w4.scales)),
        "W8A8": ((w8.qweight, w8.scales), nbytes(w8.qweight, w8.scales)),
        "W8A8 GEMM only": ((w8.qweight, w8.scales), nbytes(w8.qweight, w8.scales)),
        "bf16 RMSNorm + cuBLAS": ((W,), nbytes(W)),
        "W8A8 + quant fused in RMSNorm": ((w8.qweight, w8.scales), nbytes(w8.qweight, w8.scales)),
        READ: ((w4.qweight,), nbytes(w4.qweight)),
    }
    norm_weight = torch.rand(K, device=DEVICE, dtype=torch.bfloat16) + 0.5
    rows = []
    for M in Ms:
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        xq, xs = quantize_per_token(x)
        ops = {
            "bf16 cuBLAS": lambda c: F.linear(x, c[0]),
            "W8A16": lambda c: quant_matmul(x, c[0], c[1], bits=8),
            "W4A16 g128": lambda c: quant_matmul(x, c[0], c[1], bits=4),
            "W4A16 g128 fragment": lambda c: quant_matmul(x, c[0], c[1], bits=4),
            "W8A8": lambda c: w8a8_linear(x, c[0], c[1]),
            "W8A8 GEMM only": lambda c: w8a8_matmul(xq, xs, c[0], c[1], out_dtype=torch.bfloat16),
            # SmoothQuant's layout of a block: the norm before each W8A8 linear emits int8 (one kernel), the
            # bf16 layer runs the same norm kernel emitting bf16; each side is one norm + one GEMM
            "bf16 RMSNorm + cuBLAS": lambda c: F.linear(rms_norm(x, norm_weight), c[0]),
            "W8A8 + quant fused in RMSNorm": lambda c: w8a8_matmul(*rms_norm_quantize_per_token(x, norm_weight), c[0], c[1],
                                                                   out_dtype=torch.bfloat16),
        }
        if M == 1:  # the bandwidth ceiling of this harness, for the GEMV's bandwidth row
            ops[READ] = lambda c: stream_read(c[0])
            if tc_gemv_applies(4, K, 128, x.dtype):  # what QuantizedLinear runs at M = 1
                ops[SLABS] = lambda c: quant_matmul(x, c[0], c[1], bits=4)
                ops[CHAINED] = ops[SLABS]  # timed inside chained_gemvs()
        # -- correctness first: each kernel against dequantize-then-matmul (or W8A8's own reference);
        # a kernel that fails is reported (FAILURES, non-zero exit) and not timed, the others still are
        checks = {
            "W8A16": lambda: check_weight_only(ops["W8A16"](formats["W8A16"][0]), x, w8, f"W8A16 M={M} N={N} K={K}"),
            "W4A16 g128": lambda: check_weight_only(ops["W4A16 g128"](formats["W4A16 g128"][0]), x, w4,
                                                    f"W4A16 M={M} N={N} K={K}"),
            SLABS: lambda: check_weight_only(ops[SLABS](formats[SLABS][0]), x, w4, f"W4A16 slabs M={M} N={N} K={K}"),
            CHAINED: lambda: check_chained(ops[CHAINED], formats[CHAINED][0], x, w4, f"W4A16 chained M={M} N={N} K={K}"),
            "W4A16 g128 fragment": lambda: check_weight_only(ops["W4A16 g128 fragment"](formats["W4A16 g128 fragment"][0]),
                                                             x, w4, f"W4A16 fragment M={M} N={N} K={K}"),
            "W8A8": lambda: assert_close(ops["W8A8"](formats["W8A8"][0]), w8a8_linear_reference(x, w8.qweight, w8.scales),
                                         torch.bfloat16, name=f"W8A8 M={M} N={N} K={K}"),
            "W8A8 + quant fused in RMSNorm": lambda: assert_close(
                ops["W8A8 + quant fused in RMSNorm"](formats["W8A8"][0]),
                w8a8_linear_reference(rms_norm(x, norm_weight), w8.qweight, w8.scales), torch.bfloat16,
                name=f"W8A8 fused M={M} N={N} K={K}"),
        }
        failed = set()
        for name, check in checks.items():
            if name not in ops:
                continue
            try:
                check()
            except Exception as error:  # an assertion, or a kernel that does not compile/launch
                FAILURES.append(f"{name} M={M} N={N} K={K}: {type(error).__name__}: {error}")
                print(f"  CHECK FAILED {FAILURES[-1]}", flush=True)
                failed |= {name, "W8A8 GEMM only"} if name == "W8A8" else {name}
        timings = {}
        for name, op in ops.items():
            if name in failed:
                continue
            tensors, weight_bytes = formats[name]
            copies = max(2, min(64, math.ceil(L2_FLUSH_BYTES / weight_bytes)))
            sets = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
            timings[name] = graph_time_us(lambda i: op(sets[i]), copies, chained=name == CHAINED)
            del sets
        for name, (us, p20, p80) in timings.items():
            base = timings[BASELINE.get(name, "bf16 cuBLAS")][0]
            weight_bytes = formats[name][1]
            rows.append({
                "kernel": name, "shape": f"{N}x{K}", "M": M, "N": N, "K": K, "us": us, "us_p20": p20, "us_p80": p80,
                "weight_MB": weight_bytes / 1e6, "weight_TBps": weight_bytes / (us * 1e-6) / 1e12,
                "pct_copy_bw": 100 * weight_bytes / (us * 1e-6) / 1e12 / copy_tbps, "speedup_vs_bf16": base / us,
                "baseline": BASELINE.get(name, "bf16 cuBLAS"),
            })
            print(f"  {name:15s} M={M:4d} {N:5d}x{K:<5d} {us:8.1f} us  {rows[-1]['weight_TBps']:.2f} TB/s "
                  f"({rows[-1]['pct_copy_bw']:.0f}% of copy)  {base / us:.2f}x bf16", flush=True)
    return rows


def check_chained(op, tensors, x: torch.Tensor, q: QuantizedLinear, name: str) -> None:
    """Three calls back to back in one chain (the second and third launched as dependents on Hopper)."""
    with chained_gemvs():
        ys = [op(tensors) for _ in range(3)]
    for y in ys:
        check_weight_only(y, x, q, name)


# -- end to end: one decode step of a Llama-3.2-1B-shaped stack -------------------------------------
class Decoder(nn.Module):
    def __init__(self, kind: str, layers: int, d=2048, ffn=8192, heads=32, kv_heads=8, vocab=128256, context=512,
                 chained: bool = True):
        super().__init__()
        self.chained = chained
        self.heads, self.kv_heads, self.head_dim, self.pos = heads, kv_heads, d // heads, context - 1
        self.embed = nn.Embedding(vocab, d, device=DEVICE, dtype=torch.bfloat16)
        shapes = {"q": (d, d), "k": (d, kv_heads * self.head_dim), "v": (d, kv_heads * self.head_dim), "o": (d, d),
                  "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}
        self.blocks = nn.ModuleList(nn.ModuleDict({n: make_linear(kind, k, m) for n, (k, m) in shapes.items()})
                                    for _ in range(layers))
        cache = (layers, 1, kv_heads, context, self.head_dim)
        self.k_cache = torch.randn(cache, device=DEVICE, dtype=torch.bfloat16)
        self.v_cache = torch.randn(cache, device=DEVICE, dtype=torch.bfloat16)

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    @torch.no_grad()
    def forward(self, token: torch.Tensor) -> torch.Tensor:
        h = self.embed(token)  # [1, d]
        chain = chained_gemvs if self.chained else contextlib.nullcontext  # GEMVs that follow one another
        for i, b in enumerate(self.blocks):
            a = self.norm(h)
            with chain():
                q, k, v = b["q"](a), b["k"](a), b["v"](a)
            self.k_cache[i, :, :, self.pos] = k.view(1, self.kv_heads, self.head_dim)
            self.v_cache[i, :, :, self.pos] = v.view(1, self.kv_heads, self.head_dim)
            attn = F.scaled_dot_product_attention(q.view(1, self.heads, 1, self.head_dim), self.k_cache[i],
                                                  self.v_cache[i], enable_gqa=True)
            h = h + b["o"](attn.reshape(1, -1))
            a = self.norm(h)
            with chain():
                gate, up = b["gate"](a), b["up"](a)
            h = h + b["down"](F.silu(gate) * up)
        return self.norm(h) @ self.embed.weight.T  # bf16 LM head, tied


def make_linear(kind: str, K: int, N: int) -> nn.Module:
    if kind == "bf16":
        linear = nn.Linear(K, N, bias=False, device=DEVICE, dtype=torch.bfloat16)
        nn.init.normal_(linear.weight, std=0.02)
        return linear
    bits = 8 if kind == "W8A16" else 4
    ql = QuantizedLinear(K, N, bits, None if bits == 8 else 128, symmetric=True, scale_dtype=torch.bfloat16, device=DEVICE)
    ql.qweight.copy_(torch.randint(-128 if bits == 8 else 0, 128 if bits == 8 else 256, ql.qweight.shape, device=DEVICE))
    ql.scales.uniform_(1e-4, 3e-4) if bits == 8 else ql.scales.uniform_(2e-3, 5e-3)
    return ql


UNCHAINED = "W4A16, GEMVs unchained"  # the W4A16 decode without chained_gemvs(), for the difference


def decode_rows(layers: int, **sizes) -> list[dict]:
    rows, token = [], torch.tensor([1], device=DEVICE)
    for name in ("bf16", "W8A16", "W4A16", UNCHAINED):
        torch.manual_seed(0)
        kind = name.split(",")[0]
        model = Decoder(kind, layers, **sizes, chained=name != UNCHAINED)
        linear_bytes = sum(nbytes(*(b for _, b in m.named_buffers())) if isinstance(m, QuantizedLinear)
                           else nbytes(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear)))
        total_bytes = linear_bytes + nbytes(model.embed.weight)
        logits = model(token)
        if kind != "bf16":  # the kernels against the PyTorch path, on the whole model
            with qmatmul_dispatch.use_kernels(False):
                expected = model(token)
            similarity = F.cosine_similarity(logits.float(), expected.float()).item()
            print(f"  {name}: logits cosine similarity kernels vs PyTorch path {similarity:.5f}")
            if not similarity > 0.99:
                FAILURES.append(f"decode {name}: logits cosine similarity {similarity:.4f} vs the PyTorch path")
        ms = graph_time_us(lambda i: model(token), 1)[0] / 1e3
        rows.append({"model": name, "layers": layers, "linear_weight_GB": linear_bytes / 1e9,
                     "read_per_token_GB": total_bytes / 1e9, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                     "effective_TBps": total_bytes / (ms * 1e-3) / 1e12})
        print(f"  decode {name:6s}: {ms:.3f} ms/token, {1e3 / ms:.0f} tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()
    for row in rows:
        row["speedup_vs_bf16"] = rows[0]["ms_per_token"] / row["ms_per_token"]
    return rows


BASELINE = {"W8A8 + quant fused in RMSNorm": "bf16 RMSNorm + cuBLAS"}  # a row's bf16 counterpart (default: bf16 cuBLAS)
# (kernels, M, floor, target) on the speed-up over bf16. W4A16 is judged on the path QuantizedLinear takes
# (qmatmul_dispatch.quantized_linear): at M = 1 the slab order where the tensor-core GEMV applies (else the faster
# of row-major and fragment order, timed; judging the fastest of the three covers both), the fragment layout for
# 2 <= M <= 64, row-major above; the md table has every layout at every M it runs.
W4_M1 = ("W4A16 g128", "W4A16 g128 fragment", SLABS)
TARGETS = [
    (W4_M1, 1, 2.5, 3.5), (("W8A16",), 1, 1.6, 1.9), (("W4A16 g128 fragment",), 16, 2.0, 3.0),
    (W4_M1, 256, 0.9, 1.0), (("W8A8",), 256, 1.3, 1.7), (("W8A8 GEMM only",), 256, 1.3, 1.7),
    (("W8A8 + quant fused in RMSNorm",), 256, 1.3, 1.7),
]


def best_of(rows: list[dict], kernels: tuple, M: int) -> list[dict]:
    """Per shape, the fastest row among ``kernels`` at M (one kernel: its rows)."""
    best = {}
    for r in rows:
        if r["kernel"] in kernels and r["M"] == M and (r["shape"] not in best or r["us"] < best[r["shape"]]["us"]):
            best[r["shape"]] = r
    return list(best.values())


def targets_note(rows: list[dict]) -> str:
    lines = ["| what | floor | target | measured (per shape) | met |", "|---|---|---|---|---|"]
    for kernels, M, floor, target in TARGETS:
        values = [r["speedup_vs_bf16"] for r in best_of(rows, kernels, M)]
        if values:
            shown = ", ".join(f"{v:.2f}x" for v in values)
            name = " or ".join(kernels) + (" (the faster, as QuantizedLinear picks)" if len(kernels) > 1 else "")
            lines.append(f"| {name}, M = {M} vs {BASELINE.get(kernels[0], 'bf16 cuBLAS')} | {floor}x | {target}x | "
                         f"{shown} | {'yes' if min(values) >= floor else 'NO'} |")
    chained = best_of(rows, (CHAINED,), 1)  # the bandwidth floor: GEMVs back to back, as a decode step runs them
    large = [r["pct_copy_bw"] for r in chained if r["N"] * r["K"] > 4096 * 4096]  # the issue judges the large shapes
    if chained:
        alone = {r["shape"]: r["pct_copy_bw"] for r in best_of(rows, W4_M1, 1)}
        ceiling = {r["shape"]: r["pct_copy_bw"] for r in rows if r["kernel"] == READ}
        shown = ", ".join(f"{r['pct_copy_bw']:.0f}% ({alone.get(r['shape'], float('nan')):.0f}% / "
                          f"{ceiling.get(r['shape'], float('nan')):.0f}%)" for r in chained)
        lines.append(f"| W4A16 M = 1 weight bandwidth, % of copy: GEMVs back to back in chained_gemvs() (judged on the "
                     f"large shapes; in brackets: one lone GEMV as QuantizedLinear runs it outside a chain / the same "
                     f"codes read with no arithmetic) | 70% | 85% | {shown} | "
                     f"{('yes' if min(large) >= 70 else 'NO') if large else 'n/a (no large shape in this run)'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 256}, a 4-layer model")
    args = parser.parse_args()
    common.require_cuda("benchmarks/quant.py")
    start = time.perf_counter()
    torch.manual_seed(0)
    copy_tbps = common.measured_copy_tbps()
    print(f"copy bandwidth {copy_tbps:.2f} TB/s (datasheet {common.datasheet()['hbm_tbps']} TB/s)", flush=True)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    Ms = [1, 16, 256] if args.quick else [1, 16, 64, 256]
    rows = []
    for N, K in shapes:
        rows += kernel_rows(N, K, Ms, copy_tbps)
        torch.cuda.empty_cache()
    try:
        decode = decode_rows(4 if args.quick else 16)
    except Exception as error:  # keep the kernel table even if the end-to-end run breaks
        FAILURES.append(f"decode: {type(error).__name__}: {error}")
        decode = []
    decode_table = common.markdown_table(decode) if decode else "(the decode run failed, see below)"
    chosen = "\n".join(f"- {key}: {config}" for key, config in tuned_configs().items())
    notes = (f"Copy bandwidth measured in this run: {copy_tbps:.2f} TB/s (read + write). Times are per call, "
             "from CUDA-graph replays over enough weight copies to defeat the L2.\n\n" + targets_note(rows)
             + "\n\nDecode, batch 1, Llama-3.2-1B shapes (bf16 LM head in every row), CUDA graph:\n\n"
             + decode_table
             + ("\n\n**Correctness checks that FAILED (those kernels were not timed):**\n\n" + "\n".join(f"- {f}" for f in FAILURES)
                if FAILURES else "\n\nEvery kernel matched its reference before it was timed.")
             + f"\n\nAutotuned configs (key: M bucket, N, K, group, bits, "
             f"signed, zeros, bias, dtype):\n\n{chosen}\n\nTotal benchmark time {time.perf_counter() - start:.0f} s.")
    folder = common.write_results("quant", rows, notes)
    if decode:
        common.write_results("quant_decode", decode)
    common.plot([r for r in rows if r["kernel"] != READ], x="M", y="speedup_vs_bf16", series="kernel", panels="shape",
                path=folder / "quant.png", title="quantized matmul: speed-up over cuBLAS bf16", hline=1.0, hline_label="bf16")
    print(targets_note(rows))
    print(decode_table)
    print(f"wrote {folder}/quant.{{csv,md,png}} in {time.perf_counter() - start:.0f} s")
    if FAILURES:
        raise SystemExit("correctness checks FAILED:\n" + "\n".join(FAILURES))


if __name__ == "__main__":
    main()
