"""mlsys_ref: minimal, readable and fast reference implementations of ML-systems techniques.

Importing the package first imports :mod:`mlsys_ref.backend`, which decides between CUDA and
the Triton interpreter before any kernel is defined. Subpackages (``attention``, ``quant``,
``serving``, ``parallel``) are imported on demand.
"""

from mlsys_ref import backend  # noqa: F401  (must come first: it sets up Triton)
from mlsys_ref.backend import default_device, info, is_interpreter

__version__ = "0.1.0"
__all__ = ["backend", "default_device", "info", "is_interpreter", "__version__"]
