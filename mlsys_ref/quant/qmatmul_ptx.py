"""The inline PTX of the quantized-matmul kernels (GPU only), built by the launcher and passed in as constexpr strings.

The interpreter cannot run PTX, so every user of these strings has a plain-Triton twin that computes the same
bits (an empty string selects it); the GPU tests compare both against the reference.
"""

from __future__ import annotations

import torch

__all__ = ["nibble_ptx", "lop3_ptx"]

_NIBBLE_PTX = """{{
    .reg .b32 t, u, v, a, b;
    mov.b32 a, {sixteen};
    mov.b32 b, {offset};
    prmt.b32 t, ${src}, 0, 0x4140;{second}
{body}
}}"""
_STEP = "    {op} v, {reg}, {shift}; lop3.b32 v, v, {mask}, {one}, 0xea; fma.rn.{ty} ${out}, v, a, b;{scale}"


def nibble_ptx(dtype: torch.dtype, zero_shift: int, scaled: bool, pack: int = 2) -> str:
    """Inline PTX for the GEMM (GPU only): ``pack`` (2 or 4) stored bytes -> the codes q = u - zero_shift of
    their nibbles as bf16x2/f16x2 registers (even nibbles first, then odd ones), or q·s when ``scaled`` (the
    scales are the last operands). PRMT spreads two bytes into the two halves of a register; one shift and
    one LOP3 put a nibble under the exponent of 1.0 (f = 1 + u/16); one packed FMA, f·16 - (16 + zero_shift),
    gives q exactly: ~1.75 instructions per weight instead of ~6 for unpacked integer-to-float conversion.
    pack = 4 takes a whole loaded 32-bit register, so the compiler packs no bytes around the call."""
    if pack not in (2, 4):
        raise ValueError(f"pack must be 2 or 4, got {pack!r}")
    bf16 = dtype == torch.bfloat16
    value = (lambda v: torch.tensor([v, v], dtype=dtype).view(torch.int32).item() & 0xFFFFFFFF)
    ty = "bf16x2" if bf16 else "f16x2"
    halves = ["t", "u"][:pack // 2]  # registers holding two spread bytes each
    outs, src = 2 * len(halves), 2 * len(halves)  # operands: outputs, the packed bytes, then the scales
    steps = []
    for nibble, (op, shift) in enumerate([("shl.b32", 3 if bf16 else 6), ("shr.u32" if bf16 else "shl.b32", 1 if bf16 else 2)]):
        for i, reg in enumerate(halves):
            out = nibble * len(halves) + i
            scale = f" mul.rn.{ty} ${out}, ${out}, ${src + 1 + i};" if scaled else ""
            steps.append(_STEP.format(op=op, reg=reg, shift=shift, mask="0x00780078" if bf16 else "0x03C003C0",
                                      one="0x3F803F80" if bf16 else "0x3C003C00", ty=ty, out=out, scale=scale))
    return _NIBBLE_PTX.format(sixteen=f"0x{value(16.0):08X}", offset=f"0x{value(-16.0 - zero_shift):08X}", src=src,
                              second=f"\n    prmt.b32 u, ${src}, 0, 0x4342;" if pack == 4 else "", body="\n".join(steps))


def lop3_ptx(mask: int) -> str:
    """(a & mask) | 0x3F800000 in one LOP3 (lookup table 0xEA = (a & b) | c), for the GEMV's code -> float."""
    return f"lop3.b32 $0, $1, {mask:#010x}, 0x3F800000, 0xEA;"
