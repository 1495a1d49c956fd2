"""Quantization: int8/int4 primitives, LLM.int8(), SmoothQuant, GPTQ and quantized matmul kernels.

One technique per module: ``primitives`` (absmax / zero-point, int4 packing, fp8), ``linear``
(QuantizedLinear and the storage format the kernels read), ``llm_int8`` (Dettmers et al. 2022),
``smoothquant`` (Xiao et al. 2023), ``gptq`` (Frantar et al. 2022, with RTN), ``model``
(quantize_model, save/load), ``evaluation`` (corpus and perplexity); the Triton kernels: ``qmatmul`` (W4A16 /
W8A16: the front, validation and autograd; ``qmatmul_launch`` the launches per code order), ``qmatmul_mma`` (int4 in tensor-core fragment order), ``qmatmul_w8a8``;
``qmatmul_dispatch`` (which of them QuantizedLinear runs, and the ``use_kernels`` switch), ``qmatmul_gemv_tc``
(the tensor-core GEMV of M = 1), ``qmatmul_chain`` (``chained_gemvs``: GEMVs that follow one another). Tour rows:
``checks``.

Names below are imported on first use, so that ``python -m mlsys_ref.quant.<module>`` demos run
their module once, cleanly.
"""

from importlib import import_module

_EXPORTS = {
    "QuantizedLinear": "linear", "Int8Linear": "llm_int8", "int8_matmul": "llm_int8", "llm_int8_matmul": "llm_int8",
    "quantize": "primitives", "dequantize": "primitives", "pack_int4": "primitives", "unpack_int4": "primitives",
    "quantize_fp8": "primitives", "dequantize_fp8": "primitives",
    "smoothing_factors": "smoothquant", "smooth_model": "smoothquant",
    "gptq_quantize": "gptq", "gptq_reference": "gptq", "rtn_quantize": "gptq",
    "quantize_model": "model", "save_quantized": "model", "load_quantized": "model",
    "quant_matmul": "qmatmul", "pack_int4_mma": "qmatmul_mma", "use_kernels": "qmatmul_dispatch",
    "chained_gemvs": "qmatmul_chain",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"mlsys_ref.quant.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mlsys_ref.quant' has no attribute {name!r}")
