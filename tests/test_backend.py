"""The backend switch, the tolerance table, the CLI and a real Triton kernel under the interpreter."""

import os
import subprocess
import sys

import pytest
import torch

import mlsys_ref
from mlsys_ref import backend
from mlsys_ref.backend import tl, triton
from mlsys_ref.testing import TOLERANCES, assert_close, max_error, tolerance


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * alpha + y, mask=mask)


def test_triton_kernel_runs_on_the_backend(device):
    """A real @triton.jit kernel runs (interpreted on the CPU, compiled on CUDA) with right values."""
    n = 1000  # not a multiple of the block: the mask matters
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    out = torch.full_like(x, float("nan"))  # poisoned, so an unwritten element fails
    _scaled_add_kernel[(triton.cdiv(n, 256),)](x, y, out, 2.5, n, BLOCK=256)
    assert_close(out, 2.5 * x + y)


def test_interpreter_chosen_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert backend.is_interpreter()
    assert backend.default_device() == torch.device("cpu")
    assert os.environ["TRITON_INTERPRET"] == "1"


def _run_python(code: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_without_variable_set():
    result = _run_python(
        "import os, torch, mlsys_ref; from mlsys_ref import backend;"
        "print(os.environ.get('TRITON_INTERPRET'), backend.is_interpreter(), torch.cuda.is_available())",
        {"TRITON_INTERPRET": None},
    )
    assert result.returncode == 0, result.stderr
    value, interpreted, has_cuda = result.stdout.split()
    assert interpreted == str(has_cuda == "False")


def test_user_setting_wins():
    result = _run_python("import mlsys_ref; print(mlsys_ref.is_interpreter())", {"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_import_without_triton_then_kernel_raises_clear_error():
    """On a machine with no Triton (macOS) the package imports; a kernel says what is missing."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import mlsys_ref\n"
        "from mlsys_ref.backend import triton, tl, HAS_TRITON, TritonUnavailableError\n"
        "assert not HAS_TRITON\n"
        "@triton.jit\n"
        "def k(x, B: tl.constexpr):\n"
        "    pass\n"
        "try:\n"
        "    k[(1,)](1, B=2)\n"
        "except TritonUnavailableError as e:\n"
        "    print('raised:', e)\n"
    )
    result = _run_python(code, {})
    assert result.returncode == 0, result.stderr
    assert "raised:" in result.stdout and "pip install triton" in result.stdout


def test_info_cli():
    result = subprocess.run([sys.executable, "-m", "mlsys_ref", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key in ("torch", "triton", "device", "backend"):
        assert key in result.stdout


def test_tolerance_table_orders_precisions():
    assert set(TOLERANCES) >= {torch.float32, torch.float16, torch.bfloat16}
    assert tolerance(torch.float32).atol < tolerance(torch.float16).atol < tolerance(torch.bfloat16).atol
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance(torch.int8)


def test_assert_close_explains_failures():
    expected = torch.zeros(4, 5)
    actual = expected.clone()
    actual[2, 3] = 1.0
    actual[0, 0] = float("nan")
    with pytest.raises(AssertionError) as failure:
        assert_close(actual, expected, name="thing")
    message = str(failure.value)
    assert "thing: 2/20" in message and "(2, 3)" in message and "NaN" in message
    assert max_error(actual, expected) == float("inf")
    assert max_error(torch.tensor([1.0, float("-inf")]), torch.tensor([1.5, float("-inf")])) == 0.5


def test_tour_rejects_unknown_area():
    from mlsys_ref.tour import collect

    with pytest.raises(ValueError, match="only must be one of"):
        collect("nonsense")


def test_version():
    assert mlsys_ref.__version__


def test_tma_descriptor_only_where_tma_can_describe():
    from mlsys_ref.backend import tma_descriptor

    base = torch.zeros(8, 40, dtype=torch.float16)
    assert tma_descriptor(base, [8, 16]) is not None  # 80-byte rows: 16-byte aligned
    assert tma_descriptor(base[:, 1:33], [8, 16]) is None  # base 2 bytes past an aligned address
    assert tma_descriptor(torch.zeros(8, 37, dtype=torch.float16), [8, 16]) is None  # 74-byte rows
    assert tma_descriptor(base.t(), [8, 8]) is None  # the last dimension is not contiguous
