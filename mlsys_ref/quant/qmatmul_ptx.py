"""The inline PTX of the quantized-matmul kernels (GPU only), built by the launcher and passed in as constexpr strings.

The interpreter cannot run PTX, so every user of these strings has a plain-Triton twin that computes the same
bits (an empty string selects it); the GPU tests compare both against the reference.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["nibble_ptx", "lop3_ptx", "mma_unit_ptx"]

_NIBBLE_PTX = """{{
    .reg .b32 t, u, v, a, b, c, d;
    mov.b32 a, {a}; mov.b32 b, {b}; mov.b32 c, {c}; mov.b32 d, {d};
    prmt.b32 t, ${src}, 0, 0x4140;{second}
{body}
}}"""


@functools.lru_cache(maxsize=None)  # called on every launch: build each string once
def nibble_ptx(dtype: torch.dtype, zero_shift: int, scaled: bool, pack: int = 2) -> tuple[str, str]:
    """(PTX, its operand constraints) for the GEMM (GPU only): ``pack`` (2 or 4) stored bytes -> the codes
    q = u - zero_shift of their nibbles as bf16x2/f16x2 registers (even nibbles first, then odd ones), or q·s
    when ``scaled`` (the scales are the last operands). PRMT spreads two bytes into the two halves of a register; one LOP3 ORs a
    nibble into the mantissa of a power of two, f = 2^e + u·2^j (bf16: 128 + u, its 7 mantissa bits take the
    low nibble in place and the high one after a shift by 4; fp16: 1024 + u and 1024 + 16·u, both in place);
    one packed FMA, f·2^-j - (2^(e-j) + zero_shift), gives q exactly: 1.5 (bf16) or 1.25 (fp16) instructions
    per weight instead of ~6 for unpacked integer-to-float conversion. pack = 4 takes a whole loaded 32-bit
    register, so the compiler packs no bytes around the call."""
    if pack not in (2, 4):
        raise ValueError(f"pack must be 2 or 4, got {pack!r}")
    bf16 = dtype == torch.bfloat16
    value = (lambda v: f"0x{torch.tensor([v, v], dtype=dtype).view(torch.int32).item() & 0xFFFFFFFF:08X}")
    ty = "bf16x2" if bf16 else "f16x2"
    magic, base = ("0x43004300", 128.0) if bf16 else ("0x64006400", 1024.0)
    # (a, b): low nibble f = base + u -> q; (c, d): high nibble, bf16 shifted down (base + u), fp16 in place (base + 16u)
    a, b = value(1.0), value(-base - zero_shift)
    c, d = (a, b) if bf16 else (value(1.0 / 16), value(-base / 16 - zero_shift))
    halves = ["t", "u"][:pack // 2]  # registers holding two spread bytes each
    src = 2 * len(halves)  # operands: the outputs, the packed bytes, then the scales
    steps = []
    for nibble in range(2):
        for i, reg in enumerate(halves):
            out = nibble * len(halves) + i
            scale = f" mul.rn.{ty} ${out}, ${out}, ${src + 1 + i};" if scaled else ""
            if nibble == 0:
                bits = f"lop3.b32 v, {reg}, 0x000F000F, {magic}, 0xea; fma.rn.{ty} ${out}, v, a, b;"
            elif bf16:
                bits = f"shr.u32 v, {reg}, 4; lop3.b32 v, v, 0x000F000F, {magic}, 0xea; fma.rn.{ty} ${out}, v, c, d;"
            else:
                bits = f"lop3.b32 v, {reg}, 0x00F000F0, {magic}, 0xea; fma.rn.{ty} ${out}, v, c, d;"
            steps.append("    " + bits + scale)
    ptx = _NIBBLE_PTX.format(a=a, b=b, c=c, d=d, src=src, body="\n".join(steps),
                             second=f"\n    prmt.b32 u, ${src}, 0, 0x4342;" if pack == 4 else "")
    # one output register per 2 codes, one register of packed bytes, one of scales per output pair
    return ptx, ",".join(["=r"] * pack + ["r"] + ["r"] * (len(halves) if scaled else 0))


def lop3_ptx(mask: int, power: int) -> str:
    """(a & mask) | power in one LOP3 (lookup table 0xEA = (a & b) | c), for the GEMV's code -> float: the
    code lands in the mantissa of the power of two whose bits are ``power``."""
    return f"lop3.b32 $0, $1, {mask:#010x}, {power:#010x}, 0xEA;"


@functools.lru_cache(maxsize=None)
def mma_unit_ptx(dtype: torch.dtype, zero_shift: int, scaled: bool = False) -> str:
    """One int32 word of the fragment layout (qmatmul_mma) -> its four code pairs q = u - zero_shift as
    bf16x2/f16x2 registers: pair j is (word >> 4j) & 0x000F000F, ORed into the mantissas of 128.0 (bf16) or
    1024.0 (fp16), whose unit in the last place is 1, so f = 2^e + u exactly, and one packed subtraction of
    2^e + zero_shift leaves q: a shift, a LOP3 and a SUB per two weights. ``scaled``: the weights q·s instead
    (one packed multiply more, rounded once, as dequantize-then-matmul rounds them), s given as a second
    operand holding the row's scale in both halves."""
    bf16 = dtype == torch.bfloat16
    magic, ty = ("0x43004300", "bf16x2") if bf16 else ("0x64006400", "f16x2")
    base = 128.0 if bf16 else 1024.0
    offset = torch.tensor([base + zero_shift] * 2, dtype=dtype).view(torch.int32).item() & 0xFFFFFFFF
    scale = (lambda j: f" mul.rn.{ty} ${j}, ${j}, $5;") if scaled else (lambda j: "")
    steps = [f"    lop3.b32 v, $4, 0x000F000F, {magic}, 0xea; sub.{ty} $0, v, o;{scale(0)}"]
    steps += [f"    shr.u32 v, $4, {4 * j}; lop3.b32 v, v, 0x000F000F, {magic}, 0xea; sub.{ty} ${j}, v, o;{scale(j)}"
              for j in range(1, 4)]
    return "{\n    .reg .b32 v, o;\n    mov.b32 o, " + f"0x{offset:08X};\n" + "\n".join(steps) + "\n}"
