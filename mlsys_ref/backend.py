"""The one place that decides where kernels run: CUDA, or the Triton interpreter on the CPU.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *defined*, so the
decision has to be made before any kernel module is imported. ``mlsys_ref/__init__.py``
imports this module first, which makes that true for every kernel in the package.

Rules:
- A user's explicit ``TRITON_INTERPRET`` (set before import) always wins.
- Otherwise: a CUDA device present -> compiled kernels; none -> interpreter (``=1``).
- No Triton installed (macOS, say): the PyTorch layers still work, and every Triton
  entry point raises :class:`TritonUnavailableError` saying what is missing.
- Gluon (``triton.experimental.gluon``, Triton's explicit-layout dialect) compiles for the GPU only: the
  interpreter cannot run it, so ``HAS_GLUON`` is False there, and a Gluon kernel is only ever an extra,
  GPU-side candidate next to a Triton kernel that does the same job everywhere.

Nothing else in the package touches ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Any

import torch

__all__ = [
    "HAS_GLUON",
    "HAS_TRITON",
    "TritonUnavailableError",
    "default_device",
    "info",
    "is_interpreter",
    "require_triton",
    "tma_descriptor",
    "triton",
    "tl",
    "gluon",
    "gl",
]


class TritonUnavailableError(RuntimeError):
    """Raised when a Triton kernel is called but Triton cannot be imported."""


_USER_SETTING = os.environ.get("TRITON_INTERPRET")
_HAS_CUDA = torch.cuda.is_available()
if _USER_SETTING is None and not _HAS_CUDA:
    # Must happen before `import triton` defines any kernel.
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_IMPORT_ERROR: str | None = None

if HAS_TRITON:
    try:
        import triton  # noqa: E402
        import triton.language as tl  # noqa: E402
    except Exception as error:  # a broken install counts as missing, with its reason kept
        HAS_TRITON = False
        _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _TRITON_IMPORT_ERROR = "the package 'triton' is not installed"

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except Exception:
    _TensorDescriptor = None

if not HAS_TRITON:

    class _Anything:
        """Stands in for `triton` and `triton.language` so kernel modules still import.

        Decorators pass the function through (wrapped so that calling it raises), and any
        attribute (``tl.constexpr``, ``tl.float32``...) is another stand-in.
        """

        def __getattr__(self, name: str) -> Any:
            return _Anything()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _unavailable_kernel(args[0])
            return self  # decorator factories: triton.autotune(configs=...)(fn)

        def __getitem__(self, item: Any) -> Any:  # kernel[grid](...)
            return self

    def _unavailable_kernel(function: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            require_triton(getattr(function, "__name__", "kernel"))

        class _Kernel:
            __name__ = getattr(function, "__name__", "kernel")

            def __getitem__(self, grid: Any) -> Any:
                return launch

            __call__ = staticmethod(launch)

        return _Kernel()

    triton = _Anything()  # type: ignore[assignment]
    tl = _Anything()  # type: ignore[assignment]


def require_triton(what: str = "this kernel") -> None:
    """Raise a clear error if Triton is unavailable; call at the top of every launcher."""
    if not HAS_TRITON:
        raise TritonUnavailableError(
            f"{what} is a Triton kernel, but Triton cannot be used here "
            f"({_TRITON_IMPORT_ERROR}). Install it with `pip install triton` (Linux), or use "
            "the PyTorch implementations of the same technique (the *_reference and *_torch "
            "functions), which need only torch."
        )


def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU under the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


HAS_GLUON = False
if HAS_TRITON and not is_interpreter():
    try:  # the names a Gluon kernel here uses, in triton 3.6 as in 3.9
        from triton.experimental import gluon  # noqa: E402
        from triton.experimental.gluon import language as gl  # noqa: E402
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2 as _mma_v2  # noqa: E402, F401
        HAS_GLUON = True
    except Exception:
        pass
if not HAS_GLUON:  # kernel modules still import; their launchers check HAS_GLUON first
    class _NoGluon:
        def __getattr__(self, name: str) -> Any:
            return self

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # @gluon.jit: the plain function, never launched
            return self

    gluon = gl = _NoGluon()  # type: ignore[assignment]


def default_device() -> torch.device:
    """The device kernels expect their tensors on: CUDA if present, else the CPU."""
    if _HAS_CUDA and not is_interpreter():
        return torch.device("cuda")
    return torch.device("cpu")


def backend_name() -> str:
    if not HAS_TRITON:
        return "torch-only (no triton)"
    return "triton-interpreter (cpu)" if is_interpreter() else "triton (cuda)"


def check_kernel_device(tensor: torch.Tensor, name: str) -> None:
    """Kernels run where the backend says: CUDA tensors compiled, CPU tensors interpreted."""
    expected = default_device()
    if tensor.device.type != expected.type:
        raise ValueError(
            f"{name} is on {tensor.device}, but the kernel backend is {backend_name()} and "
            f"expects tensors on {expected.type}"
        )


def tma_descriptor(tensor: torch.Tensor, block_shape: list[int]):
    """A host-side TMA (tensor memory accelerator) descriptor of a 2-D tensor for tiles of ``block_shape``,
    or None where TMA cannot describe it (unit stride along the last dimension, 16-byte aligned rows and
    base; triton >= 3.3): the caller then reads the same tiles by pointers. Tiles past the edge load as zeros."""
    if _TensorDescriptor is None or tensor.dim() != 2 or tensor.stride(1) != 1 \
            or (tensor.stride(0) * tensor.element_size()) % 16 or tensor.data_ptr() % 16:
        return None
    return _TensorDescriptor.from_tensor(tensor, block_shape)


def info() -> dict[str, str]:
    """Versions, device and backend, as printed by ``python -m mlsys_ref info``."""
    rows = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "not available") if HAS_TRITON else "not available",
        "cuda available": str(_HAS_CUDA),
        "device": str(default_device()),
        "gpu": torch.cuda.get_device_name(0) if _HAS_CUDA else "none",
        "backend": backend_name(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "<unset>")
        + (" (set by user)" if _USER_SETTING is not None else " (set by mlsys_ref)" if is_interpreter() else ""),
    }
    return rows
