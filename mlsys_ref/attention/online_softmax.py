"""Online softmax: the three-pass safe softmax, the two-pass online normalizer, and a Triton row kernel.

Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", arXiv 1805.02867:
- Algorithm 2, *safe softmax*: pass 1 finds ``m = max x``, pass 2 sums ``d = Σ exp(x - m)``, pass 3
  writes ``y = exp(x - m) / d``. Three reads of the row, one write.
- Algorithm 3, *online normalizer*: one pass keeps ``m`` and ``d`` together; when the max grows from
  ``m`` to ``m'`` the sum so far is rescaled, ``d ← d · exp(m - m') + Σ exp(x - m')``. Then pass 2
  writes ``y``. Two reads, one write.
- §3.2: the pairs ``(m, d)`` combine with an associative operator ``⊕``, so lanes (or blocks) can
  each keep their own pair and merge at the end: that is what the Triton kernel does.

The PyTorch versions walk the row in blocks of ``block`` columns (a GPU thread block's view of a
long row), vectorized over all rows. The kernel (`softmax`) gives one program per row; a row that
fits one block is read once and kept in registers, a longer row takes the two passes of Algorithm 3.

Conventions (all three implementations agree):
- arithmetic in fp32 for fp16/bf16/fp32 inputs (fp64 in the PyTorch versions for fp64 inputs), so
  ±1e4 in fp16 is fine: only differences ``x - m <= 0`` are exponentiated;
- ``-inf`` entries get probability 0, exactly as ``torch.softmax``;
- **a row that is entirely -inf gives all zeros** (``torch.softmax`` gives NaN). The normalizer of
  an empty set is 0 and we define 0/0 := 0 here, the same convention as a FlashAttention row that
  sees no key; ``m`` stays ``-inf`` and is replaced by 0 before any ``exp`` so no NaN is formed;
- ``+inf`` or NaN in a row gives a NaN row (as torch).

Left out: softmax + top-k fusion (paper §4, Algorithm 4-5), a dim other than the contiguous one
inside the kernel (other dims are moved last first), and fp64 in the kernel. The backward is
plain PyTorch (``dx = y ⊙ (dy - Σ dy ⊙ y)``), since the forward is the point here.

The one idea to notice: the rescale ``exp(m_old - m_new)`` lets the max and the sum be found in
the same pass, which is exactly the rescaling FlashAttention applies to its output accumulator.
"""

from __future__ import annotations

import torch

from mlsys_ref.backend import check_kernel_device, require_triton, tl, triton

__all__ = ["softmax_three_pass", "softmax_online", "online_normalizer", "combine", "softmax", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 16384  # one block covers rows up to this length: read once, kept in registers


# ---------------------------------------------------------------------------------------------
# Readable PyTorch: the two algorithms of the paper, over blocks of `block` columns of each row.
# ---------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """``m`` with -inf replaced by 0: a row with nothing seen yet has d = 0, and exp(-inf - 0) = 0."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def softmax_three_pass(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Safe softmax over the last dim (Algorithm 2): max pass, sum pass, normalize pass."""
    _check_block(block)
    xc = x.to(_compute_dtype(x))  # [..., n]
    n = xc.shape[-1]
    # -- pass 1: m = max_j x_j
    m = torch.full(xc.shape[:-1], float("-inf"), dtype=xc.dtype, device=xc.device)  # [...]
    for start in range(0, n, block):
        m = torch.maximum(m, xc[..., start : start + block].amax(-1))
    m_safe = _finite_or_zero(m)
    # -- pass 2: d = Σ_j exp(x_j - m)
    d = torch.zeros_like(m)
    for start in range(0, n, block):
        d = d + torch.exp(xc[..., start : start + block] - m_safe[..., None]).sum(-1)
    # -- pass 3: y_j = exp(x_j - m) / d   (d = 0 only for all -inf rows: defined as 0)
    d_inv = 1.0 / torch.where(d == 0, torch.ones_like(d), d)  # d = 0: all -inf row, exp(x - 0) = 0 there
    y = torch.empty_like(xc)
    for start in range(0, n, block):
        y[..., start : start + block] = torch.exp(xc[..., start : start + block] - m_safe[..., None]) * d_inv[..., None]
    return y.to(x.dtype)


def online_normalizer(x: torch.Tensor, block: int = 128, trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3's single pass: the running max ``m`` and running sum ``d`` of each row, updated together.

    Returns ``(m, d)`` with ``d = Σ exp(x - m)``. If ``trace`` is a list, ``(start, m, d)`` after each
    block is appended to it (the notebook prints it).
    """
    _check_block(block)
    xc = x.to(_compute_dtype(x))
    m = torch.full(xc.shape[:-1], float("-inf"), dtype=xc.dtype, device=xc.device)  # m_0 = -inf
    d = torch.zeros_like(m)  # d_0 = 0
    for start in range(0, xc.shape[-1], block):
        x_block = xc[..., start : start + block]
        # -- update m and d: m' = max(m, max x_block); d' = d·exp(m - m') + Σ exp(x_block - m')
        m_new = torch.maximum(m, x_block.amax(-1))
        m_new_safe = _finite_or_zero(m_new)
        d = d * torch.exp(m - m_new_safe) + torch.exp(x_block - m_new_safe[..., None]).sum(-1)
        m = m_new
        if trace is not None:
            trace.append((start, m.clone(), d.clone()))
    return m, d


def combine(m_a: torch.Tensor, d_a: torch.Tensor, m_b: torch.Tensor, d_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The §3.2 operator ``(m_a, d_a) ⊕ (m_b, d_b) = (m, d_a·exp(m_a - m) + d_b·exp(m_b - m))``, ``m = max(m_a, m_b)``.

    Associative and commutative, so any split of a row (lanes, blocks, GPUs) can be merged in any order.
    """
    m = torch.maximum(m_a, m_b)
    m_safe = _finite_or_zero(m)
    return m, d_a * torch.exp(m_a - m_safe) + d_b * torch.exp(m_b - m_safe)


def softmax_online(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Softmax over the last dim with the online normalizer (Algorithm 3): one (m, d) pass, one write pass."""
    m, d = online_normalizer(x, block)
    xc = x.to(_compute_dtype(x))
    m_safe = _finite_or_zero(m)
    d_inv = 1.0 / torch.where(d == 0, torch.ones_like(d), d)  # d = 0: all -inf row, exp(x - 0) = 0 there
    y = torch.empty_like(xc)
    for start in range(0, xc.shape[-1], block):
        y[..., start : start + block] = torch.exp(xc[..., start : start + block] - m_safe[..., None]) * d_inv[..., None]
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: one program per row.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_kernel(
    x_ptr, y_ptr,
    stride_x_row, stride_x_col, stride_y_row, stride_y_col,
    n_cols,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # n_cols <= BLOCK_N: keep the row in registers, read it once
):
    LOG2E: tl.constexpr = 1.4426950408889634  # 1/ln 2, so we can use exp2
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2^31
    x_row = x_ptr + row * stride_x_row
    y_row = y_ptr + row * stride_y_row
    cols = tl.arange(0, BLOCK_N)

    if ONE_BLOCK:
        x = tl.load(x_row + cols * stride_x_col, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # all -inf row: exp(-inf) = 0, no NaN
        p = tl.exp2((x - m_safe) * LOG2E)
        d = tl.sum(p, axis=0)
        d_inv = 1.0 / tl.where(d == 0.0, 1.0, d)  # d = 0: all -inf row, p = 0 -> zeros (documented)
        tl.store(y_row + cols * stride_y_col, (p * d_inv).to(y_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        # -- pass 1 (Algorithm 3): every lane keeps its own (m, d) over its strided subsequence,
        #    so the loop has no cross-lane reduction; lanes merge with ⊕ (§3.2) after the loop.
        x = tl.load(x_row + cols * stride_x_col, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m = x  # [BLOCK_N] per-lane running max
        d = tl.where(x == float("-inf"), 0.0, 1.0)  # exp(x - m) = 1 where x is the lane's max so far
        for start in range(BLOCK_N, n_cols, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs * stride_x_col, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # -- update m and d: d' = d·exp(m - m') + exp(x - m')
            d = d * tl.exp2((m - m_new_safe) * LOG2E) + tl.exp2((x - m_new_safe) * LOG2E)
            m = m_new
        # -- ⊕ over lanes: M = max m, D = Σ d · exp(m - M)
        m_row = tl.max(m, axis=0)
        m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        d_row = tl.sum(d * tl.exp2((m - m_row_safe) * LOG2E), axis=0)
        d_inv = 1.0 / tl.where(d_row == 0.0, 1.0, d_row)
        # -- pass 2: y = exp(x - M) / D
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs * stride_x_col, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            y = tl.exp2((x - m_row_safe) * LOG2E) * d_inv
            tl.store(y_row + offs * stride_y_col, y.to(y_ptr.dtype.element_ty), mask=offs < n_cols)


def _softmax_last_dim(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Launcher: validates, views ``x`` as ``[rows, n_cols]``, picks the block, launches one program per row."""
    require_triton("softmax")
    check_kernel_device(x, "x")
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if x.numel() == 0:
        return torch.empty_like(x)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)  # [rows, n_cols]; a view when it can be
    y2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    BLOCK_N = block_size or min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    num_warps = 4 if BLOCK_N <= 2048 else 8 if BLOCK_N <= 8192 else 16
    _softmax_kernel[(x2.shape[0],)](
        x2, y2,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
        n_cols,
        BLOCK_N=BLOCK_N, ONE_BLOCK=n_cols <= BLOCK_N,
        num_warps=num_warps,
    )
    return y2.reshape(x.shape)


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, block_size: int | None) -> torch.Tensor:
        y = _softmax_last_dim(x, block_size)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        # Softmax Jacobian-vector product, in fp32: dx = y ⊙ (dy - Σ_j dy_j y_j).
        y32, dy32 = y.float(), dy.float()
        dx = y32 * (dy32 - (dy32 * y32).sum(-1, keepdim=True))
        return dx.to(y.dtype), None


def softmax(x: torch.Tensor, dim: int = -1, block_size: int | None = None) -> torch.Tensor:
    """Softmax along ``dim`` with the Triton online-normalizer kernel; same as ``torch.softmax(x, dim)``
    except that a row of all ``-inf`` gives zeros instead of NaN.

    ``x``: fp16, bf16 or fp32 on the kernel's device (CUDA, or the CPU under the interpreter).
    ``block_size``: columns per block (power of two >= 16); default covers the row in one block up to
    16384 columns. Smaller values force the multi-block path (tests use this).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must have dtype in {KERNEL_DTYPES}, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [{-x.ndim}, {x.ndim}), got {dim!r}")
    moved = x.movedim(dim, -1)
    return _Softmax.apply(moved, block_size).movedim(-1, dim)


if __name__ == "__main__":
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    device = default_device()
    x = torch.randn(5, 300, device=device) * 10
    x[0, 7] = float("-inf")
    expected = torch.softmax(x.double(), -1)
    for name, y in (
        ("three-pass (Alg. 2)", softmax_three_pass(x, block=64)),
        ("online (Alg. 3)", softmax_online(x, block=64)),
        ("Triton, one block", softmax(x)),
        ("Triton, blocks of 64", softmax(x, block_size=64)),
    ):
        print(f"{name:22s} max |y - torch.softmax| = {max_error(y, expected):.2e}")
