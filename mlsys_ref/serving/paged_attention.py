"""Paged attention: attention that reads K and V through block tables, for decode and (chunked) prefill.

Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(vLLM), arXiv 2309.06180, §4.1 (the PagedAttention kernel: keys and values are fetched block by
block through the block table); split-KV decoding after Dao et al. 2023, "Flash-Decoding for
long-context inference" (each program attends to one slice of the context and writes a partial O
and its log-sum-exp; a second kernel rescales and sums them, as in FlashAttention's online softmax,
Dao et al. 2022, arXiv 2205.14135, Algorithm 1); grouped-query attention (Ainslie et al. 2023,
arXiv 2305.13245): one decode program serves a KV head and its whole group of query heads, so each
K/V byte is read once per group.

Cache per layer ``[num_blocks, block_size, Hkv, D]``; ``block_tables`` ``[B, max_blocks]`` int32 maps a
sequence's logical block to a physical one. In ``paged_attention`` every sequence's q rows are its
*last* ``q_len`` positions (bottom-right causal), which covers decode, prefill, chunked prefill and
mixed batches in one call.

The one idea to notice: the kernel never needs K/V to be contiguous: token ``n`` of a sequence lives
at ``block_table[n // block_size]``, row ``n % block_size``, and the gather costs nothing extra
because each token's row of ``D`` values is contiguous anyway.

Left out: no backward (inference only), no sliding window/ALiBi, no fp8 KV, no TMA/warp
specialisation; tile sizes come from a small autotune set.
"""

from __future__ import annotations

import functools
import math

import torch

from mlsys_ref.attention.reference import attention_reference
from mlsys_ref.backend import check_kernel_device, is_interpreter, require_triton, tl, triton

__all__ = ["paged_decode", "paged_attention", "paged_attention_reference", "num_splits_for"]


def _configs(kind: str) -> list:
    """ONE small config under the interpreter; a small autotune set on the GPU."""
    if is_interpreter():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    table = {  # (BLOCK_M, BLOCK_N, warps, stages); decode ignores BLOCK_M
        "decode": [(16, 64, 4, 2), (16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 8, 3), (16, 32, 4, 4), (16, 64, 8, 4)],
        "prefill": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


@triton.jit
def _load_paged_kv(k_cache_ptr, v_cache_ptr, table_row_ptr, tokens, in_range, kv_head, offs_d,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """K_j, V_j [BLOCK_N, BLOCK_D] of logical tokens ``tokens``, gathered through one block-table lookup."""
    # token n -> physical block table[n // BLOCK_SIZE], row n % BLOCK_SIZE (read once, used for K and V)
    physical = tl.load(table_row_ptr + tokens // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slot = tokens % BLOCK_SIZE
    mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)  # HEAD_DIM == BLOCK_D folds away: 16-byte loads
    k_rows = physical * stride_kb + slot * stride_ks + kv_head * stride_kh
    v_rows = physical * stride_vb + slot * stride_vs + kv_head * stride_vh
    k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v


@triton.autotune(configs=_configs("decode"), key=["BLOCK_SIZE", "BLOCK_G", "BLOCK_D"])
@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, o_partial_ptr, lse_partial_ptr,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    qk_scale, group, tokens_per_split,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # program (KV head, sequence, split): the group's query heads against tokens [start, end) of the context.
    # KV head is the fastest grid axis, so neighbouring programs read neighbouring 256-byte rows of one block.
    kv_head = tl.program_id(0).to(tl.int64)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g  # the query heads that read this KV head
    g_mask = (offs_g[:, None] < group) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq * stride_tb
    for tile in range(start, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        in_range = tokens < end
        k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table_row, tokens, in_range, kv_head, offs_d,
                              stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              BLOCK_SIZE, HEAD_DIM, UPCAST)  # K_j, V_j [BLOCK_N, BLOCK_D]
        # -- S = q Kᵀ · scale · log2(e) (exp2 is the native instruction)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(in_range[None, :], s, float("-inf"))
        # -- online softmax: update m_i, l_i, rescale acc
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # an empty split (past the context) leaves l_i = 0: write O = 0 and lse = -inf, which the combine ignores
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # base-2 log-sum-exp
    o_ptrs = o_partial_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o, mask=g_mask)
    tl.store(lse_partial_ptr + seq * stride_lb + heads * stride_lh + split, lse2, mask=offs_g < group)


@triton.jit
def _paged_decode_combine_kernel(
    o_partial_ptr, lse_partial_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (sequence, query head): O = Σ_s exp(lse_s - lse) O_s, lse = log Σ_s exp(lse_s)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse2 = tl.load(lse_partial_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=offs_s < num_splits,
                   other=float("-inf"))
    m = tl.max(lse2, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty context: every weight is 0, no NaN
    w = tl.exp2(lse2 - m)  # [BLOCK_S]
    mask = (offs_s[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = o_partial_ptr + seq * stride_ob + head * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_outb + head * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.autotune(configs=_configs("prefill"), key=["BLOCK_SIZE", "BLOCK_D"])
@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
    stride_outt, stride_outh, qk_scale, group,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # program (q tile, sequence, query head): rows are the sequence's LAST q_len positions
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    kv_head = head // group
    q_start = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    positions = context_len - q_len + offs_m  # bottom-right causal: row i sits at position ctx - q_len + i
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + (q_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys past this tile's last row are never visible; a tile past q_len has no work at all
    end = tl.minimum(context_len, context_len - q_len + (tile + 1) * BLOCK_M)
    end = tl.where(tile * BLOCK_M < q_len, end, 0)
    table_row = block_tables_ptr + seq * stride_tb
    for start_n in range(0, end, BLOCK_N):
        tokens = start_n + tl.arange(0, BLOCK_N)
        in_range = tokens < end
        k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table_row, tokens, in_range, kv_head, offs_d,
                              stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              BLOCK_SIZE, HEAD_DIM, UPCAST)  # K_j, V_j [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # S_ij [BLOCK_M, BLOCK_N], log2 units
        visible = in_range[None, :] & (tokens[None, :] <= positions[:, None])
        s = tl.where(visible, s, float("-inf"))
        # -- update m_i and l_i; a row that has seen no key yet keeps m = -inf: subtract 0 instead of NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + (q_start + offs_m[:, None]) * stride_outt + head * stride_outh + offs_d[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers
def _check(q, k_cache, v_cache, block_tables, context_lens, batch: int, scale) -> tuple[int, int, int, float]:
    """Validate what needs no device sync; return (block_size, Hkv, D, scale)."""
    require_triton("paged attention")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D] of one dtype, got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    _, block_size, kv_heads, head_dim = k_cache.shape
    if q.shape[-1] != head_dim or q.shape[-2] % kv_heads:
        raise ValueError(f"q [..., Hq, D] = {tuple(q.shape)} needs D = {head_dim} and Hq a multiple of Hkv = {kv_heads}")
    if q.dtype != k_cache.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q ({q.dtype}) and the cache ({k_cache.dtype}) must share one dtype: fp16, bf16 or fp32")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (batch,):
        raise ValueError(f"context_lens must be int32 [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                         ("context_lens", context_lens)):
        check_kernel_device(tensor, name)
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return block_size, kv_heads, head_dim, 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _options(q: torch.Tensor, head_dim: int) -> dict:
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # pad 80 -> 128 etc.; loads mask the padding
        UPCAST=q.dtype == torch.bfloat16 and is_interpreter(),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 must match to 1e-5: no TF32
    )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits_for(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Flash-decoding heuristic: split the context until there are ~2 programs per SM, each split >= 256 tokens."""
    if device.type != "cuda":
        return 1
    programs = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(programs, batch * kv_heads), triton.cdiv(max_context, 256)))


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale=None, num_splits=None):
    """One query row per sequence: q ``[B, Hq, D]`` attends to its ``context_lens[b]`` cached tokens -> ``[B, Hq, D]``.

    The context is split into ``num_splits`` slices (default: :func:`num_splits_for`, from
    ``block_tables.shape[1]`` so that no device sync is needed), each a program per KV head. Values are
    not checked (that would sync): ``context_lens[b] <= block_tables.shape[1] * block_size`` is the
    caller's promise; a sequence with context 0 gets output 0.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, q_heads, _ = q.shape
    block_size, kv_heads, head_dim, scale = _check(q, k_cache, v_cache, block_tables, context_lens, batch, scale)
    max_context = max(1, block_tables.shape[1] * block_size)
    if num_splits is None:
        num_splits = num_splits_for(batch, kv_heads, max_context, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    tokens_per_split = triton.cdiv(max_context, num_splits)
    granule = 128 if tokens_per_split >= 512 else 16  # long splits end on a whole tile of any config
    tokens_per_split = triton.cdiv(tokens_per_split, granule) * granule
    num_splits = max(1, triton.cdiv(max_context, tokens_per_split))
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    o_partial = torch.empty(batch, q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    lse_partial = torch.empty(batch, q_heads, num_splits, device=q.device, dtype=torch.float32)
    options = _options(q, head_dim)
    _paged_decode_split_kernel[(kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_partial, lse_partial,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        *o_partial.stride()[:3], *lse_partial.stride()[:2],
        scale * 1.44269504, group, tokens_per_split,  # 1/ln 2: exp2 instead of exp
        BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)), **options,
    )
    _paged_decode_combine_kernel[(batch, q_heads)](
        o_partial, lse_partial, out, *o_partial.stride()[:3], *lse_partial.stride()[:2], out.stride(0), out.stride(1),
        num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=options["BLOCK_D"],
    )
    return out


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None, max_q_len=None):
    """Packed queries q ``[T, Hq, D]``; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are
    its last ``q_len`` positions of ``context_lens[b]`` (bottom-right causal) -> ``[T, Hq, D]``.

    ``max_q_len`` (the longest q_len) sizes the grid; if None it is read from ``cu_seqlens_q`` (a device
    sync), and then the values are also checked (``q_len <= context_len``, ``cu_seqlens_q[-1] == T``).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q must be int32 [B+1], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.numel() - 1
    block_size, kv_heads, head_dim, scale = _check(q, k_cache, v_cache, block_tables, context_lens, batch, scale)
    check_kernel_device(cu_seqlens_q, "cu_seqlens_q")
    if max_q_len is None:
        cu, lens = cu_seqlens_q.cpu(), context_lens.cpu()
        q_lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or bool((q_lens < 0).any()):
            raise ValueError(f"cu_seqlens_q must rise from 0 to T = {q.shape[0]}, got {cu.tolist()}")
        if bool((q_lens > lens).any()) or bool((lens > block_tables.shape[1] * block_size).any()):
            raise ValueError(f"need q_len <= context_len <= max_blocks * block_size; q_lens {q_lens.tolist()}, "
                             f"context_lens {lens.tolist()}, block_tables width {block_tables.shape[1]}")
        max_q_len = int(q_lens.max()) if batch else 0
    out = torch.empty_like(q)
    if batch == 0 or max_q_len == 0:
        return out
    grid = lambda meta: (triton.cdiv(max_q_len, meta["BLOCK_M"]), batch, q.shape[1])  # noqa: E731
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), scale * 1.44269504, q.shape[1] // kv_heads,
        BLOCK_SIZE=block_size, **_options(q, head_dim),
    )
    return out


# ----------------------------------------------------------------------------- reference
def paged_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None):
    """Gather each sequence's blocks into contiguous K/V, then ``attention_reference`` (bottom-right causal)."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(block_tables.shape[0]):
        start, end, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n]  # [n, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:n]
        o, _ = attention_reference(q[start:end].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                   v.transpose(0, 1)[None], causal=True, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


if __name__ == "__main__":
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    device = default_device()
    num_blocks, block_size, q_heads, kv_heads, head_dim = 24, 8, 4, 2, 32
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device)
    block_tables = torch.randperm(num_blocks, device=device).int().view(3, 8)  # non-contiguous, shuffled
    context_lens = torch.tensor([37, 1, 64], dtype=torch.int32, device=device)
    q = torch.randn(3, q_heads, head_dim, device=device)
    cu = torch.arange(4, dtype=torch.int32, device=device)
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, context_lens)
    print(f"paged_decode (3 splits) vs reference: max error {max_error(paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits=3), expected):.1e}")
    cu = torch.tensor([0, 5, 6, 26], dtype=torch.int32, device=device)  # chunk, decode, prefill chunk
    q = torch.randn(26, q_heads, head_dim, device=device)
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, context_lens)
    print(f"paged_attention (mixed batch) vs reference: max error {max_error(paged_attention(q, k_cache, v_cache, block_tables, cu, context_lens), expected):.1e}")
